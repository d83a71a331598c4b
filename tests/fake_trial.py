"""A quick stand-in trial for the executor tests: prints Katib metric lines derived from its
parameters, and records when it started and ended in an events file (to observe parallelism).

    python tests/fake_trial.py --lr 0.02 --batch-size 8 --events FILE [--sleep S] [--fail] [--no-objective]
The validation loss it reports is `lr` itself, so tests know which trial is best.
"""

import argparse
import json
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, required=True)
parser.add_argument("--batch-size", type=int, required=True)
parser.add_argument("--events", required=True)
parser.add_argument("--name", default="")
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--fail", action="store_true")
parser.add_argument("--no-objective", action="store_true")
args = parser.parse_args()


def event(kind: str) -> None:
    with open(args.events, "a") as handle:
        handle.write(json.dumps({"kind": kind, "name": args.name, "pid": os.getpid(), "time": time.time(),
                                 "threads": os.environ.get("OMP_NUM_THREADS")}) + "\n")


event("start")
for epoch in range(1, args.epochs + 1):
    time.sleep(args.sleep / args.epochs)
    if args.no_objective:
        print(f"epoch={epoch} accuracy={0.9 + epoch / 100:.4f}", flush=True)
    else:
        print(f"epoch={epoch} loss={args.lr + (args.epochs - epoch) * 0.1:.6f} accuracy={0.9 + epoch / 100:.4f}", flush=True)
event("end")
sys.exit(1 if args.fail else 0)
