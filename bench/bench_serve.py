"""Serving throughput and latency: the project's predictor vs a minimal KServe custom model.

Each server is started on a free loopback port in turn and loaded with `hey` (Debian's
package; `apt-get install hey`): single-digit requests (manifests/kserve/mnist-input.json)
at concurrency 1, 8 and 32, then 100-digit batches, then resident memory before and after
10,000 requests. Both serve the same weights (the newest model-store version, or a model
trained for the occasion).

    python bench/bench_serve.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mnist_kf import config
from mnist_kf.processes import free_port
from mnist_kf.serve import wait_until_ready

ROOT = Path(__file__).resolve().parents[1]
SEED_INPUT = config.SEED_INPUT
NAME = "mnist-classifier"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hey(url: str, body: Path, concurrency: int, seconds: float | None = None, requests: int | None = None) -> dict:
    """Run hey against url; return requests/s, p50 and p99 latency (ms) and the status codes."""
    limit = ["-z", f"{seconds}s"] if seconds else ["-n", str(requests)]
    command = ["hey", *limit, "-c", str(concurrency), "-m", "POST", "-T", "application/json", "-D", str(body), url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "99% in" not in output:  # no response at all: show hey's status and error distribution
        raise RuntimeError(f"hey got no responses from {url}:\n{output.split('Status code distribution:')[-1].strip()}")
    quantile = lambda q: float(re.search(rf"{q}% in ([\d.]+) secs", output).group(1)) * 1000  # noqa: E731
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)), "p50": quantile(50),
            "p99": quantile(99), "codes": dict(re.findall(r"\[(\d{3})\]\s+(\d+) responses", output))}


def measure(name: str, command: list[str], seconds: float, batch_body: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(Path(tempfile.gettempdir()) / f"bench-{name}.log", "w") as log:
        process = subprocess.Popen(command + [f"--http_port={port}", "--enable_grpc=false"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(url, NAME, process)
        predict = f"{url}/v1/models/{NAME}:predict"
        hey(predict, SEED_INPUT, 4, requests=400)  # warm up
        results = {f"c{c}": hey(predict, SEED_INPUT, c, seconds=seconds) for c in (1, 8, 32)}
        results["batch100"] = hey(predict, batch_body, 8, seconds=seconds)
        before = rss_mib(process.pid)
        results["soak"] = hey(predict, SEED_INPUT, 8, requests=10_000)
        results["memory"] = (before, rss_mib(process.pid))
        return results
    finally:
        process.terminate()
        process.wait(timeout=60)


def model_dir(workdir: Path) -> Path:
    """The newest local model-store version, else a freshly trained model."""
    from mnist_kf.storage import ModelStore, StorageError

    try:
        return Path(ModelStore(config.MODEL_STORE_URI).download(workdir / "model", "latest").uri)
    except StorageError:
        from mnist_kf.train import TrainConfig, train

        train(TrainConfig(epochs=3), workdir / "model", log=lambda _: None, progress=False)
        return workdir / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each load level")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        sys.exit("bench_serve.py needs hey: apt-get install hey")
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        weights = model_dir(workdir)
        from mnist_kf import data

        images, _ = data.load_mnist(train=False)
        batch_body = workdir / "batch100.json"
        batch_body.write_text(json.dumps({"instances": images[:100].reshape(-1, 784).tolist()}))
        servers = {
            "baseline": [sys.executable, str(ROOT / "bench" / "baseline_server.py"), f"--model_name={NAME}", f"--model_dir={weights}"],
            "project": [sys.executable, "-m", "mnist_kf.serve", f"--model_name={NAME}", f"--storage_uri={weights}"],
        }
        results = {name: measure(name, command, args.seconds, batch_body) for name, command in servers.items()}
    base, ours = results["baseline"], results["project"]
    print(f"{'load':<28} | {'baseline req/s':>14} | {'project req/s':>13} | {'ratio':>6} | {'p50 ms b/p':>12} | {'p99 ms b/p':>13}")
    print("-" * 100)
    for key, label in [("c1", "1 digit, concurrency 1"), ("c8", "1 digit, concurrency 8"), ("c32", "1 digit, concurrency 32")]:
        b, p = base[key], ours[key]
        print(f"{label:<28} | {b['rps']:>14.0f} | {p['rps']:>13.0f} | {p['rps'] / b['rps']:>5.2f}× | "
              f"{b['p50']:>5.1f}/{p['p50']:<6.1f} | {b['p99']:>6.1f}/{p['p99']:<6.1f}")
    b, p = base["batch100"], ours["batch100"]
    print(f"{'100-digit batches, conc. 8':<28} | {b['rps'] * 100:>9.0f} dig/s | {p['rps'] * 100:>8.0f} dig/s | "
          f"{p['rps'] / b['rps']:>5.2f}× | {b['p50']:>5.1f}/{p['p50']:<6.1f} | {b['p99']:>6.1f}/{p['p99']:<6.1f}")
    for name, result in results.items():
        before, after = result["memory"]
        print(f"{name:<9} RSS before/after 10,000 requests: {before:.1f} → {after:.1f} MiB ({after - before:+.1f}); "
              f"status codes {result['soak']['codes']}")


if __name__ == "__main__":
    main()
