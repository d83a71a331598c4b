"""Orchestration overhead of the local pipeline: kfp.local wall time vs its steps' own work.

In one run: (1) the pipeline through kfp.local's SubprocessRunner (every step a fresh
Python process, as on a cluster every step is a pod), (2) the same step functions called one
after another in this process. The difference is what orchestration costs: process start,
imports, artifact passing.

    python bench/bench_pipeline.py [--epochs 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mnist_kf import config, pipeline, serve
from mnist_kf.data import prepare_splits, save_splits
from mnist_kf.storage import ModelStore
from mnist_kf.train import evaluate_saved_model, train_saved_splits


def steps_in_process(workdir: Path, arguments: dict) -> dict[str, float]:
    """The pipeline's work, step by step, without orchestration; seconds per step."""
    seconds = {}
    started = time.perf_counter()
    save_splits(prepare_splits(fraction=arguments["fraction"], seed=arguments["seed"]), workdir / "dataset")
    seconds["prepare-data"] = time.perf_counter() - started
    started = time.perf_counter()
    train_saved_splits(workdir / "dataset", workdir / "model", lr=arguments["lr"], batch_size=arguments["batch_size"],
                       epochs=arguments["epochs"], seed=arguments["seed"])
    seconds["train"] = time.perf_counter() - started
    started = time.perf_counter()
    evaluate_saved_model(workdir / "dataset", workdir / "model")
    seconds["evaluate"] = time.perf_counter() - started
    started = time.perf_counter()
    stored = ModelStore(arguments["model_store_uri"]).upload(workdir / "model")
    seconds["upload"] = time.perf_counter() - started
    started = time.perf_counter()
    serve.render_inference_service(config.INFERENCE_SERVICE_MANIFEST.read_text(), stored.uri)
    seconds["deploy (render)"] = time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    import logging
    import os

    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        os.environ["MNIST_KF_OUTPUT_DIR"] = str(workdir / "outputs")  # step subprocesses deploy here
        arguments = {"fraction": 0.3, "seed": 42, "lr": 0.05, "batch_size": 16, "epochs": args.epochs,
                     "accuracy_gate": 0.0, "model_store_uri": str(workdir / "store")}
        in_process = steps_in_process(workdir, arguments)
        logging.disable(logging.INFO)  # kfp.local's per-task logs
        run = pipeline.run_local(arguments, pipeline_root=workdir / "runs")
        logging.disable(logging.NOTSET)
    work = sum(in_process.values())
    print(f"pipeline outcome: {run.outcome['outcome']} (test accuracy {run.evaluation['test_accuracy']:.4f})")
    print(f"{'measure':<48} | {'seconds':>8} | {'ratio to own work':>17}")
    print("-" * 80)
    for step, seconds in in_process.items():
        print(f"  step {step:<43} | {seconds:>8.2f} |")
    print(f"{'sum of the steps own work (in-process)':<48} | {work:>8.2f} | {1:>16.2f}×")
    print(f"{'kfp.local pipeline wall time (SubprocessRunner)':<48} | {run.seconds:>8.2f} | {run.seconds / work:>16.2f}×")
    print(f"{'orchestration overhead':<48} | {run.seconds - work:>8.2f} |")


if __name__ == "__main__":
    main()
