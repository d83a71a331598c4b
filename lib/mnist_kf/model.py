"""The model: a 784 → 128 → 10 MLP whose saved form is its state_dict."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from mnist_kf.storage import atomic_write

INPUT_FEATURES = 784
HIDDEN_UNITS = 128
NUM_CLASSES = 10


class ModelFormatError(ValueError):
    """A weights file is not a state_dict of this model."""


def build_model() -> nn.Sequential:
    """nn.Sequential(Linear(784, 128), ReLU, Linear(128, 10)): 101,770 parameters."""
    return nn.Sequential(
        nn.Linear(INPUT_FEATURES, HIDDEN_UNITS),
        nn.ReLU(),
        nn.Linear(HIDDEN_UNITS, NUM_CLASSES),
    )


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the model's state_dict to `path` atomically (temp file, fsync, rename)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())


def load_weights(path: str | Path) -> nn.Sequential:
    """A model in eval mode from a state_dict file, loaded with torch.load(weights_only=True)."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refuses anything but tensors and containers
        raise ModelFormatError(f"{path} is not a loadable weights file: {error}") from error
    model = build_model()
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in state_dict.items()} if isinstance(state_dict, dict) else {}
    if found != expected:
        raise ModelFormatError(f"{path} holds {found or type(state_dict).__name__}, expected a state_dict {expected}")
    model.load_state_dict(state_dict)
    return model.eval()


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Predicted digits [N] (int64) for uint8 images [N, 28, 28] or [N, 784], standardised as in
    training (`data.normalize`), in one forward pass."""
    from mnist_kf.data import normalize

    model.eval()
    return model(normalize(images)).argmax(dim=1)
