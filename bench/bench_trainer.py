"""Epoch time of the project's trainer vs the conventional DataLoader trainer, one run.

Baseline: Katib's pytorch-mnist trial style: torchvision MNIST with ToTensor + Normalize
per sample, a DataLoader over the same subset, autograd and torch.optim.SGD, same MLP.
Middle: the same autograd + torch.optim.SGD loop on in-memory tensors sliced per batch.
Project: `mnist_kf.train.train_epoch` (in-memory slices + closed-form SGD).

    python bench/bench_trainer.py [--batch-sizes 1 8 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from mnist_kf import config, data
from mnist_kf.model import build_model
from mnist_kf.train import ClosedFormSGD, train_epoch

LR, MOMENTUM = 0.05, 0.5


def dataloader_epoch(indices: torch.Tensor, batch_size: int) -> float:
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((config.PIXEL_MEAN,), (config.PIXEL_STD,))])
    dataset = Subset(datasets.MNIST(str(config.DATA_DIR), train=True, download=False, transform=transform), indices.tolist())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    model.train()
    started = time.perf_counter()
    for images, labels in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images.view(len(images), -1)), labels)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def in_memory_autograd_epoch(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    order = torch.randperm(len(labels), generator=generator)
    inputs, labels = inputs[order], labels[order]
    for start in range(0, len(labels), batch_size):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs[start : start + batch_size]), labels[start : start + batch_size]).backward()
        optimizer.step()
    return time.perf_counter() - started


def project_epoch(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    optimizer = ClosedFormSGD(build_model(), lr=LR, momentum=MOMENTUM)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    train_epoch(optimizer, inputs, labels, batch_size, generator)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for all three (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    splits = data.prepare_splits()
    _, labels = data.load_mnist(train=True)
    indices, _ = data.split_indices(labels, config.FRACTION, config.SEED)  # the images prepare_splits trains on
    assert len(indices) == len(splits.train_y)
    print(f"one epoch over {len(indices):,} images, {args.threads} thread(s), torch {torch.__version__}")
    header = f"{'batch':>5} | {'DataLoader (s)':>14} | {'in-memory autograd (s)':>22} | {'project (s)':>11} | {'speed-up vs DataLoader':>22}"
    print(header)
    print("-" * len(header))
    for batch_size in args.batch_sizes:
        baseline = dataloader_epoch(indices, batch_size)
        middle = in_memory_autograd_epoch(splits.train_x, splits.train_y, batch_size)
        ours = project_epoch(splits.train_x, splits.train_y, batch_size)
        print(f"{batch_size:>5} | {baseline:>14.2f} | {middle:>22.2f} | {ours:>11.2f} | {baseline / ours:>21.1f}×", flush=True)


if __name__ == "__main__":
    main()
