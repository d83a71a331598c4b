"""Model: architecture, parameter count, the saved form and safe loading."""

from __future__ import annotations

import pickle

import pytest
import torch

from mnist_kf import model as model_module


def test_architecture_and_parameter_count():
    model = model_module.build_model()
    assert [type(layer).__name__ for layer in model] == ["Linear", "ReLU", "Linear"]
    assert model_module.count_parameters(model) == 101_770
    assert model(torch.zeros(3, 784)).shape == (3, 10)


def test_weights_round_trip_with_weights_only(tmp_path):
    original = model_module.build_model()
    model_module.save_weights(original, tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    loaded = model_module.load_weights(tmp_path / "model.pt")
    inputs = torch.randn(5, 784)
    assert torch.equal(loaded(inputs), original.eval()(inputs))


def test_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(print))  # weights_only must refuse arbitrary callables
    with pytest.raises(model_module.ModelFormatError, match="not a loadable weights file"):
        model_module.load_weights(path)


def test_a_state_dict_of_another_shape_is_refused(tmp_path):
    torch.save({"0.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(model_module.ModelFormatError, match="expected a state_dict"):
        model_module.load_weights(tmp_path / "other.pt")
