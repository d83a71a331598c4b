"""The seed's Katib experiment run by the local executor: wall time vs its own trials.

Runs manifests/katib/experiment.yaml (12 trials, 3 parallel) from scratch in a temporary
state folder and compares, in the same run:
- the wall time of the experiment,
- the sum of its trials' own run times (what one slot would need),
- the ideal 3-slot schedule of those same trials (list scheduling in creation order with
  zero launch, polling or bookkeeping overhead): the executor's target is ≤ 1.1× this,
- the time until the best trial had finished.

    python bench/bench_tune.py [--max-trials 12] [--parallel-trials 3]
"""

from __future__ import annotations

import argparse
import heapq
import json
import tempfile
import time

from mnist_kf import config, tune


def ideal_makespan(durations: list[float], slots: int) -> float:
    """Makespan when each trial starts the moment a slot frees up, in creation order."""
    free_at = [0.0] * slots
    for duration in durations:
        start = heapq.heappop(free_at)
        heapq.heappush(free_at, start + duration)
    return max(free_at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-trials", type=int, default=None)
    parser.add_argument("--parallel-trials", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state_dir:
        started = time.perf_counter()
        result = tune.run_experiment(backend="local", max_trials=args.max_trials, parallel_trials=args.parallel_trials,
                                     state_dir=state_dir, progress=False, log=lambda _: None)
        wall = time.perf_counter() - started
        state = json.load(open(f"{state_dir}/experiment.json"))
    trials = state["trials"]
    slots = args.parallel_trials or tune.validate_manifest(tune.load_manifest(config.KATIB_EXPERIMENT_MANIFEST)).parallel_trials
    durations = [t["end_time"] - t["start_time"] for t in trials]
    ideal = ideal_makespan(durations, slots)
    best = next(t for t in trials if t["name"] == result.best["name"])
    time_to_best = best["end_time"] - state["start_time"]
    print(f"experiment {result.name}: {result.status} ({result.reason}), {len(trials)} trials, {slots} slots")
    print(f"{'measure':<42} | {'seconds':>8} | {'ratio to ideal':>14}")
    print("-" * 72)
    for label, seconds in [
        ("wall time of the experiment", wall),
        ("sum of the trials' own run times", sum(durations)),
        (f"ideal {slots}-slot schedule of those trials", ideal),
        ("time to the best trial", time_to_best),
    ]:
        print(f"{label:<42} | {seconds:>8.1f} | {seconds / ideal:>13.3f}×")
    print(f"best trial {result.best['name']}: {result.best['parameters']} loss={result.best['metrics']['loss']:.4f}")


if __name__ == "__main__":
    main()
