"""Figures for the notebooks. Each function returns a matplotlib Figure that is not
registered with pyplot, so a notebook shows it once and a server never leaks it."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from mnist_kf.data import NUM_CLASSES


def _as_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return array.reshape(len(array), 28, 28)


def digit_grid(
    images: torch.Tensor | np.ndarray,
    labels: Sequence[int],
    predictions: Sequence[int] | None = None,
    columns: int = 10,
    title: str | None = None,
) -> Figure:
    """A grid of digits titled with their label (and prediction, red when wrong)."""
    images = _as_images(images)
    rows = max(1, -(-len(images) // columns))
    figure = Figure(figsize=(columns * 0.9, rows * 1.05 + (0.4 if title else 0)), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.set_axis_off()
        if index >= len(images):
            continue
        axis.imshow(images[index], cmap="gray_r")
        label = int(labels[index])
        if predictions is None:
            axis.set_title(str(label), fontsize=9)
        else:
            predicted = int(predictions[index])
            axis.set_title(f"{label}→{predicted}", fontsize=9, color="black" if predicted == label else "crimson")
    if title:
        figure.suptitle(title)
    return figure


def class_distribution(full_labels: torch.Tensor, subset_labels: torch.Tensor) -> Figure:
    """Share of each class in the full training set beside the stratified subset."""
    classes = np.arange(NUM_CLASSES)
    full = np.bincount(np.asarray(full_labels), minlength=NUM_CLASSES) / len(full_labels)
    subset = np.bincount(np.asarray(subset_labels), minlength=NUM_CLASSES) / len(subset_labels)
    figure = Figure(figsize=(8, 3.2), layout="constrained")
    axis = figure.subplots()
    axis.bar(classes - 0.2, full * 100, width=0.4, label=f"full training set ({len(full_labels):,})")
    axis.bar(classes + 0.2, subset * 100, width=0.4, label=f"stratified subset ({len(subset_labels):,})")
    axis.set_xticks(classes)
    axis.set_xlabel("digit")
    axis.set_ylabel("share of images (%)")
    axis.set_ylim(0, max(full.max(), subset.max()) * 100 * 1.25)
    axis.legend(loc="upper center", ncols=2, frameon=False)
    return figure


def pixel_histogram(images: torch.Tensor) -> Figure:
    """Histogram of raw pixel values (0–255), log scale: most pixels are background."""
    figure = Figure(figsize=(8, 3), layout="constrained")
    axis = figure.subplots()
    counts = torch.bincount(images.reshape(-1).to(torch.int64), minlength=256).numpy()
    axis.bar(np.arange(256), counts, width=1.0)
    axis.set_yscale("log")
    axis.set_xlabel("pixel value")
    axis.set_ylabel("count (log)")
    return figure


def class_mean_images(images: torch.Tensor, labels: torch.Tensor) -> Figure:
    """The mean image of each class."""
    means = torch.stack([images[labels == label].to(torch.float32).mean(0) for label in range(NUM_CLASSES)])
    return digit_grid(means, list(range(NUM_CLASSES)), columns=NUM_CLASSES)
