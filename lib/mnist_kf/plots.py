"""Figures for the notebooks. Each function returns a matplotlib Figure that is not
registered with pyplot, so a notebook shows it once and a server never leaks it."""

from __future__ import annotations

from pathlib import Path
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


# ---------------------------------------------------------------- tuning


def _succeeded(trials):
    return trials[trials["status"] == "Succeeded"]


def tuning_scatter(trials, x: str = "lr", y: str = "batch_size", objective: str = "loss") -> Figure:
    """Each succeeded trial at (x, y), coloured by its objective; failed trials as crosses."""
    figure = Figure(figsize=(6.5, 4), layout="constrained")
    axis = figure.subplots()
    done = _succeeded(trials)
    points = axis.scatter(done[x], done[y], c=done[objective], cmap="viridis_r", s=60, edgecolors="black")
    failed = trials[trials["status"] != "Succeeded"]
    if len(failed):
        axis.scatter(failed[x], failed[y], marker="x", color="crimson", label="failed / killed")
        axis.legend(loc="upper right")
    figure.colorbar(points, ax=axis, label=objective)
    axis.set_xlabel(x)
    axis.set_ylabel(y)
    axis.set_title(f"{len(trials)} trials: {x} vs {y}")
    return figure


def best_so_far(trials, objective: str = "loss", minimize: bool = True) -> Figure:
    """Each trial's objective in the order trials were created, and the best value so far."""
    figure = Figure(figsize=(6.5, 3.5), layout="constrained")
    axis = figure.subplots()
    values = trials[objective].where(trials["status"] == "Succeeded")
    best = values.cummin() if minimize else values.cummax()
    numbers = np.arange(1, len(trials) + 1)
    axis.plot(numbers, values, "o", label="trial")
    axis.step(numbers, best, where="post", label="best so far")
    axis.set_xlabel("trial number")
    axis.set_ylabel(objective)
    axis.set_xticks(numbers)
    axis.legend()
    return figure


def trial_curves(trials, metric: str = "loss", label_columns: Sequence[str] = ("lr", "batch_size")) -> Figure:
    """The per-epoch `metric` of every trial (from its stdout history)."""
    figure = Figure(figsize=(7.5, 4), layout="constrained")
    axis = figure.subplots()
    for row in trials.itertuples():
        values = [record[metric] for record in row.history if metric in record]
        if values:
            label = ", ".join(f"{c} {getattr(row, c):.3g}" for c in label_columns)
            axis.plot(range(1, len(values) + 1), values, marker=".", label=label)
    axis.set_xlabel("epoch")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_ylabel(f"validation {metric}")
    axis.legend(fontsize=7, ncols=2)
    return figure


def parallel_coordinates(trials, columns: Sequence[str] = ("lr", "batch_size", "accuracy", "loss"),
                         objective: str = "loss") -> Figure:
    """One line per succeeded trial across the (min–max scaled) columns, coloured by the objective."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    done = _succeeded(trials)
    figure = Figure(figsize=(7.5, 4), layout="constrained")
    axis = figure.subplots()
    table = done[list(columns)].astype(float)
    low, high = table.min(), table.max()
    scaled = (table - low) / (high - low).replace(0, 1)
    colours = colormaps["viridis_r"]
    norm = Normalize(done[objective].min(), done[objective].max())
    for (_, row), value in zip(scaled.iterrows(), done[objective]):
        axis.plot(range(len(columns)), row.values, color=colours(norm(value)), alpha=0.85)
    axis.set_xticks(range(len(columns)))
    axis.set_xticklabels([f"{c}\n[{low[c]:.3g}, {high[c]:.3g}]" for c in columns])
    axis.set_yticks([])
    from matplotlib.cm import ScalarMappable

    figure.colorbar(ScalarMappable(norm=norm, cmap=colours), ax=axis, label=objective)
    return figure


# ---------------------------------------------------------------- pipeline


def confusion_heatmap(matrix: Sequence[Sequence[int]]) -> Figure:
    """The confusion matrix (rows: true digit, columns: predicted), counts in the cells."""
    counts = np.asarray(matrix)
    figure = Figure(figsize=(6, 5.2), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(np.log1p(counts), cmap="Blues")
    for (row, column), value in np.ndenumerate(counts):
        axis.text(column, row, str(value), ha="center", va="center", fontsize=7,
                  color="white" if row == column else "black")
    axis.set_xticks(range(NUM_CLASSES))
    axis.set_yticks(range(NUM_CLASSES))
    axis.set_xlabel("predicted digit")
    axis.set_ylabel("true digit")
    axis.set_title(f"accuracy {np.trace(counts) / counts.sum():.2%} on {counts.sum():,} test images")
    figure.colorbar(image, ax=axis, label="log(1 + count)")
    return figure


def _dag_edges(spec: dict) -> tuple[list[str], list[tuple[str, str]], dict[str, str]]:
    """Tasks, dependency edges and each task's condition branch from compiled KFP IR."""
    tasks, edges, groups = [], [], {}

    def visit(dag: dict, group: str, group_dependencies: list[str]) -> None:
        for name, task in dag.get("tasks", {}).items():
            component = spec["components"].get(task["componentRef"]["name"], {})
            dependencies = task.get("dependentTasks") or group_dependencies  # a branch's first task follows the gate
            if "dag" in component:  # a condition group: name its tasks after the branch
                branch = task.get("taskInfo", {}).get("name", name)
                visit(component["dag"], group if name.startswith("condition-branches") else branch, dependencies)
                continue
            tasks.append(name)
            groups[name] = group
            edges.extend((dependency, name) for dependency in dependencies)

    visit(spec["root"]["dag"], "", [])
    return tasks, [(a, b) for a, b in edges if a in groups and b in groups], groups


def pipeline_dag(compiled_pipeline: str | Path) -> Figure:
    """The compiled pipeline's task graph, left to right, condition branches labelled."""
    import yaml

    spec = yaml.safe_load(Path(compiled_pipeline).read_text())
    tasks, edges, groups = _dag_edges(spec)
    depth = {task: 0 for task in tasks}
    for _ in tasks:  # longest-path layering (the graph is small)
        for source, target in edges:
            depth[target] = max(depth[target], depth[source] + 1)
    columns: dict[int, list[str]] = {}
    for task in tasks:
        columns.setdefault(depth[task], []).append(task)
    position = {task: (level, -index + (len(members) - 1) / 2)
                for level, members in columns.items() for index, task in enumerate(members)}
    figure = Figure(figsize=(2.1 * (max(columns) + 1), 3.2), layout="constrained")
    axis = figure.subplots()
    for source, target in edges:
        (x0, y0), (x1, y1) = position[source], position[target]
        axis.annotate("", xy=(x1 - 0.38, y1), xytext=(x0 + 0.38, y0),
                      arrowprops={"arrowstyle": "->", "color": "gray"})
    for task, (x, y) in position.items():
        colour = {"": "#dbe9f6", "accuracy-gate-passed": "#d8f0d2", "accuracy-gate-failed": "#f8d7d3"}.get(groups[task], "#eeeeee")
        axis.text(x, y, task, ha="center", va="center", fontsize=8,
                  bbox={"boxstyle": "round", "facecolor": colour, "edgecolor": "gray"})
        if groups[task]:
            axis.text(x, y - 0.3, groups[task], ha="center", va="center", fontsize=6.5, color="dimgray")
    axis.set_xlim(-0.6, max(columns) + 0.6)
    axis.set_ylim(min(y for _, y in position.values()) - 0.6, max(y for _, y in position.values()) + 0.6)
    axis.set_axis_off()
    return figure


# ---------------------------------------------------------------- serving


def latency_histogram(latencies_ms: np.ndarray) -> Figure:
    """Distribution of request latencies with the median and 99th percentile marked."""
    figure = Figure(figsize=(7, 3.2), layout="constrained")
    axis = figure.subplots()
    axis.hist(latencies_ms, bins=40, color="#4c72b0")
    for quantile, style in ((50, "-"), (99, "--")):
        value = np.percentile(latencies_ms, quantile)
        axis.axvline(value, color="black", linestyle=style, label=f"p{quantile} {value:.1f} ms")
    axis.set_xlabel("latency (ms)")
    axis.set_ylabel("requests")
    axis.set_title(f"{len(latencies_ms)} sequential single-digit requests")
    axis.legend()
    return figure
