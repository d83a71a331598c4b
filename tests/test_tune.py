"""Katib manifest rules, metric parsing, and the local executor run for real on stand-in trials."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mnist_kf import config, tune

MANIFEST = config.KATIB_EXPERIMENT_MANIFEST
FAKE_TRIAL = Path(__file__).with_name("fake_trial.py")


# ---------------------------------------------------------------- the project's manifest


def test_the_manifest_has_the_seed_settings_and_passes_katibs_rules():
    spec = tune.validate_manifest(tune.load_manifest(MANIFEST))
    assert (spec.objective_type, spec.objective_metric, spec.goal) == ("minimize", "loss", 0.001)
    assert spec.metric_strategies == {"loss": "min", "accuracy": "max"}
    assert (spec.algorithm, spec.parallel_trials, spec.max_trials, spec.max_failed_trials) == ("random", 3, 12, 3)
    lr, batch_size = spec.parameters
    assert (lr.name, lr.type, lr.minimum, lr.maximum) == ("lr", "double", 0.01, 0.05)
    assert (batch_size.name, batch_size.type, batch_size.minimum, batch_size.maximum) == ("batch_size", "int", 1, 64)
    assert spec.container["command"][:3] == ["python", "-m", "mnist_kf.train"]


def test_the_manifest_parses_into_the_katib_sdk_experiment_model():
    experiment = tune.to_katib_model(tune.load_manifest(MANIFEST))
    assert type(experiment).__name__ == "V1beta1Experiment"
    assert experiment.spec.objective.objective_metric_name == "loss"
    assert experiment.spec.parallel_trial_count == 3 and experiment.spec.max_trial_count == 12
    assert [p.name for p in experiment.spec.parameters] == ["lr", "batch_size"]
    assert experiment.spec.trial_template.primary_container_name == "training-container"
    assert experiment.spec.metrics_collector_spec.collector.kind == "StdOut"


def test_the_trial_job_runs_the_trainer_with_every_trial_parameter_substituted():
    spec = tune.validate_manifest(tune.load_manifest(MANIFEST))
    executor = tune.LocalExecutor(spec, state_dir="/nonexistent")
    command = executor._command({"name": "t-1", "parameters": {"lr": 0.0125, "batch_size": 17}})
    assert command[0] == sys.executable and command[1:3] == ["-m", "mnist_kf.train"]
    assert "--lr=0.0125" in command and "--batch-size=17" in command and "--epochs=5" in command
    # the trainer accepts exactly these arguments
    from mnist_kf.train import build_parser
    parsed = build_parser().parse_args(command[3:])
    assert (parsed.lr, parsed.batch_size, parsed.epochs) == (0.0125, 17, 5)


def _broken(path: str, value) -> dict:
    """The project manifest with the value at a dotted path replaced (or deleted when value is ...)."""
    manifest = tune.load_manifest(MANIFEST)
    *parents, last = path.split(".")
    node = manifest
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is ...:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return manifest


CONTAINER = "spec.trialTemplate.trialSpec.spec.template.spec.containers.0"


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("spec.objective.type", "minimise", "spec.objective.type must be minimize or maximize"),
        ("spec.objective.objectiveMetricName", "", "objectiveMetricName must be specified"),
        ("spec.objective.additionalMetricNames", ["loss"], "should not contain spec.objective.objectiveMetricName"),
        ("spec.objective", ..., "spec.objective must be specified"),
        ("spec.algorithm.algorithmName", "hyperband-ish", "is not supported by the local executor"),
        ("spec.parallelTrialCount", 13, "parallelTrialCount should be less than or equal to spec.maxTrialCount"),
        ("spec.maxFailedTrialCount", 20, "maxFailedTrialCount should be less than or equal to spec.maxTrialCount"),
        ("spec.maxTrialCount", 0, "spec.maxTrialCount must be a whole number ≥ 1"),
        ("spec.parameters.0.feasibleSpace.min", "0.5", "feasibleSpace.min must be below max"),
        ("spec.parameters.0.feasibleSpace", ..., "feasibleSpace must be specified"),
        ("spec.parameters.1.parameterType", "integer", "parameterType 'integer' is not supported"),
        ("spec.parameters.0.feasibleSpace.max", "big", "feasibleSpace.max must be a number"),
        ("spec.trialTemplate.trialParameters.1.reference", "batchsize", "parameter reference batchsize does not exist"),
        ("spec.trialTemplate.trialParameters.1", ..., "${trialParameters.batchSize} in spec.trialTemplate not found"),
        (f"{CONTAINER}.args.1", "--batch-size=8", "parameter name: batchSize in spec.trialParameters not found"),
        ("spec.trialTemplate.trialSpec.metadata", {"name": "fixed"}, "metadata.name and metadata.namespace"),
        ("spec.trialTemplate.primaryContainerName", "trainer", "has no container named 'trainer'"),
        ("metadata.name", "MNIST_Tuning", "metadata.name 'MNIST_Tuning' must be lower case"),
        ("spec.metricsCollectorSpec.collector.kind", "File", "reads StdOut only"),
    ],
)
def test_a_malformed_manifest_is_a_clear_error_before_any_trial(path, value, message, tmp_path):
    with pytest.raises(tune.ExperimentError) as error:
        tune.validate_manifest(_broken(path, value))
    assert message in str(error.value)


def test_a_manifest_file_that_is_not_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("spec: [unclosed\n")
    with pytest.raises(tune.ExperimentError, match="is not valid YAML"):
        tune.run_experiment(path, backend="local", state_dir=tmp_path / "state")
    assert not (tmp_path / "state").exists()


def test_an_unknown_backend_is_a_clear_error():
    with pytest.raises(tune.ExperimentError, match="backend must be auto, local or kubeflow"):
        tune.resolve_backend("k8s")


# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    "line,expected",
    [
        ("epoch=3 loss=0.1012 accuracy=0.9688", [("epoch", 3.0), ("loss", 0.1012), ("accuracy", 0.9688)]),
        ("loss=1.5e-3 accuracy=9.9E-1", [("loss", 0.0015), ("accuracy", 0.99)]),
        ("loss = -0.25", [("loss", -0.25)]),
        ("2026-12-04T20:01:02Z epoch=2 loss=0.3", [("epoch", 2.0), ("loss", 0.3)]),
        ("training finished, no metrics here", []),
        ("loss=", []),
    ],
)
def test_katib_default_filter_parses_like_katib(line, expected):
    parsed = list(tune.parse_metrics(line))
    assert [name for name, _ in parsed] == [name for name, _ in expected]
    assert [value for _, value in parsed] == pytest.approx([value for _, value in expected])


def test_collect_metrics_keeps_watched_metrics_and_applies_strategies():
    lines = ["2026-12-04T20:01:02Z epoch=1 loss=0.5 accuracy=0.8", "noise", "epoch=2 loss=2e-1 accuracy=0.9 lr=9",
             "epoch=3 loss=0.3 accuracy=0.85"]
    history, observation = tune.collect_metrics(lines, ["loss", "accuracy"], [tune.KATIB_DEFAULT_METRICS_FILTER])
    assert history == [{"loss": 0.5, "accuracy": 0.8}, {"loss": 0.2, "accuracy": 0.9}, {"loss": 0.3, "accuracy": 0.85}]
    assert observation["loss"] == {"min": 0.2, "max": 0.5, "latest": 0.3}
    _, missing = tune.collect_metrics(["epoch=1 accuracy=0.9"], ["loss", "accuracy"], [tune.KATIB_DEFAULT_METRICS_FILTER])
    assert "loss" not in missing


# ---------------------------------------------------------------- the local executor


def stub_manifest(events: Path, name="stub", max_trials=4, parallel=2, max_failed=3, goal=None,
                  algorithm="random", trial_flags=(), sleep=0.0) -> dict:
    """The project manifest with its trial container swapped for tests/fake_trial.py."""
    manifest = copy.deepcopy(tune.load_manifest(MANIFEST))
    manifest["metadata"]["name"] = name
    spec = manifest["spec"]
    spec.update(maxTrialCount=max_trials, parallelTrialCount=parallel, maxFailedTrialCount=min(max_failed, max_trials))
    if goal is None:
        spec["objective"].pop("goal")
    else:
        spec["objective"]["goal"] = goal
    spec["algorithm"] = {"algorithmName": algorithm, "algorithmSettings": [{"name": "random_state", "value": "7"}]}
    if algorithm == "grid":
        spec["parameters"][0]["feasibleSpace"]["step"] = "0.01"
        spec["parameters"][1]["feasibleSpace"].update(min="8", max="16", step="8")
    spec["trialTemplate"]["trialParameters"].append({"name": "trialName", "description": "name", "reference": "${trialSpec.Name}"})
    container = tune._primary_container(manifest)
    container["command"] = ["python", str(FAKE_TRIAL)]
    container["args"] = ["--lr=${trialParameters.learningRate}", "--batch-size=${trialParameters.batchSize}",
                         "--name=${trialParameters.trialName}", f"--events={events}", f"--sleep={sleep}", *trial_flags]
    return manifest


def run_local(manifest: dict, state_dir: Path, **kwargs) -> tune.ExperimentResult:
    executor = tune.LocalExecutor(tune.validate_manifest(manifest), state_dir, poll_seconds=0.02, log=lambda _: None)
    return executor.run(progress=False, **kwargs)


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed child stays in /proc until PID 1 reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def max_overlap(events: list[dict]) -> int:
    """The most trials that were running at the same moment, from their own start/end stamps."""
    timeline = sorted((e["time"], 1 if e["kind"] == "start" else -1) for e in events)
    running = peak = 0
    for _, step in timeline:
        running += step
        peak = max(peak, running)
    return peak


def test_parallel_limit_is_never_exceeded_and_max_trials_is_honoured(tmp_path):
    events = tmp_path / "events.jsonl"
    result = run_local(stub_manifest(events, max_trials=7, parallel=3, sleep=0.4), tmp_path / "state")
    observed = read_events(events)
    assert max_overlap(observed) == 3  # reached, never exceeded
    assert len(result.trials) == 7 and sum(e["kind"] == "start" for e in observed) == 7
    assert (result.status, result.reason) == ("Succeeded", "ExperimentMaxTrialsReached")
    assert set(result.trials["status"]) == {"Succeeded"}
    assert result.trials["lr"].between(0.01, 0.05).all() and result.trials["batch_size"].between(1, 64).all()
    # the best trial is the one with the lowest objective (the stub reports loss = lr at its last epoch)
    assert result.best["name"] == result.trials.loc[result.trials["loss"].idxmin(), "name"]
    assert result.best["metrics"]["loss"] == pytest.approx(result.trials["lr"].min(), abs=1e-6)
    assert len(result.trials["history"].iloc[0]) == 2  # per-epoch values kept


def test_each_trial_gets_its_share_of_the_cpus(tmp_path):
    events = tmp_path / "events.jsonl"
    manifest = stub_manifest(events, max_trials=2, parallel=2)
    executor = tune.LocalExecutor(tune.validate_manifest(manifest), tmp_path / "state", threads_per_trial=None,
                                  poll_seconds=0.02, log=lambda _: None)
    executor.run(progress=False)
    expected = str(max(1, (os.cpu_count() or 1) // 2))
    assert {e["threads"] for e in read_events(events)} == {expected}


def test_reaching_the_goal_ends_the_experiment_early(tmp_path):
    events = tmp_path / "events.jsonl"
    result = run_local(stub_manifest(events, max_trials=12, parallel=1, goal=0.06), tmp_path / "state")
    assert (result.status, result.reason) == ("Succeeded", "ExperimentGoalReached")
    assert len(result.trials) == 1  # every lr in 0.01–0.05 beats the goal


def test_failed_trials_are_counted_and_max_failed_fails_the_experiment(tmp_path):
    events = tmp_path / "events.jsonl"
    result = run_local(stub_manifest(events, max_trials=12, parallel=1, max_failed=2, trial_flags=["--fail"]),
                       tmp_path / "state")
    assert (result.status, result.reason[:16]) == ("Failed", "ExperimentFailed")
    assert len(result.trials) == 3  # Katib fails the experiment when failed > maxFailedTrialCount
    assert set(result.trials["status"]) == {"Failed"}
    assert result.best is None


def test_a_trial_without_the_objective_fails_and_the_experiment_goes_on(tmp_path):
    events = tmp_path / "events.jsonl"
    result = run_local(stub_manifest(events, max_trials=3, parallel=3, max_failed=3, trial_flags=["--no-objective"]),
                       tmp_path / "state")
    assert (result.status, result.reason) == ("Succeeded", "ExperimentMaxTrialsReached")
    assert list(result.trials["status"]) == ["Failed"] * 3
    state = json.loads((tmp_path / "state" / "experiment.json").read_text())
    assert all(t["reason"].startswith("MetricsUnavailable") for t in state["trials"])


def test_running_a_completed_experiment_again_reports_it(tmp_path):
    events = tmp_path / "events.jsonl"
    manifest = stub_manifest(events, max_trials=2, parallel=2)
    first = run_local(manifest, tmp_path / "state")
    second = run_local(manifest, tmp_path / "state")
    assert len(read_events(events)) == 4  # two trials, start+end each: nothing re-ran
    assert second.trials.drop(columns="history").equals(first.trials.drop(columns="history"))
    again = run_local(manifest, tmp_path / "state", rerun=True)
    assert len(read_events(events)) == 8 and len(again.trials) == 2


def test_a_different_manifest_under_the_same_name_is_refused(tmp_path):
    events = tmp_path / "events.jsonl"
    run_local(stub_manifest(events, max_trials=2, parallel=2), tmp_path / "state")
    with pytest.raises(tune.ExperimentError, match="different manifest"):
        run_local(stub_manifest(events, max_trials=3, parallel=2), tmp_path / "state")


@pytest.mark.parametrize("algorithm", ["random", "tpe", "multivariate-tpe", "grid", "cmaes", "sobol"])
def test_each_katib_algorithm_maps_to_an_optuna_sampler(tmp_path, algorithm):
    events = tmp_path / "events.jsonl"
    result = run_local(stub_manifest(events, max_trials=4, parallel=2, algorithm=algorithm), tmp_path / "state")
    assert result.status == "Succeeded" and len(result.trials) == 4
    assert result.trials["lr"].between(0.01, 0.05).all() and result.trials["batch_size"].between(1, 64).all()
    if algorithm == "grid":
        assert set(result.trials["batch_size"]) <= {8, 16}
        assert len({(r.lr, r.batch_size) for r in result.trials.itertuples()}) == 4  # distinct grid points


def test_resume_after_kill_9_finishes_with_exactly_max_trials_and_none_run_twice(tmp_path):
    events = tmp_path / "events.jsonl"
    manifest_path = tmp_path / "experiment.yaml"
    # trials of 3 s: one that leaked past its executor's death would still be running when checked
    manifest_path.write_text(yaml.safe_dump(stub_manifest(events, name="killed", max_trials=8, parallel=2, sleep=3.0)))
    state_dir = tmp_path / "state"
    command = [sys.executable, "-m", "mnist_kf.tune", "--manifest", str(manifest_path), "--backend", "local",
               "--state-dir", str(state_dir), "--best-output", str(tmp_path / "best.json")]
    executor = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it mid-run: some trials done, some running
        state_path = state_dir / "experiment.json"
        if state_path.exists():
            trials = json.loads(state_path.read_text())["trials"]
            if sum(t["status"] == "Succeeded" for t in trials) >= 3 and any(t["status"] == "Running" for t in trials):
                break
        time.sleep(0.05)
    executor.send_signal(signal.SIGKILL)
    executor.wait()
    finished_before = {t["name"] for t in json.loads((state_dir / "experiment.json").read_text())["trials"]
                       if t["status"] == "Succeeded"}
    time.sleep(1.0)  # well inside a trial's 3 s
    orphans = [e["pid"] for e in read_events(events) if e["kind"] == "start" and running(e["pid"])]
    assert orphans == [], "trial processes outlived the killed executor"

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    state = json.loads((state_dir / "experiment.json").read_text())
    assert len(state["trials"]) == 8 and {t["status"] for t in state["trials"]} == {"Succeeded"}
    starts = [e["name"] for e in read_events(events) if e["kind"] == "start"]
    assert all(starts.count(name) == 1 for name in finished_before)  # no finished trial was redone
    assert len(set(starts)) == 8
    assert json.loads((tmp_path / "best.json").read_text())["source"]["experiment"] == "killed"


def test_best_hyperparameters_round_trip(tmp_path):
    events = tmp_path / "events.jsonl"
    result = run_local(stub_manifest(events, max_trials=2, parallel=2), tmp_path / "state")
    path = tune.save_best_hyperparameters(result, tmp_path / "best.json")
    assert tune.load_best_hyperparameters(path) == result.best["parameters"]
    assert set(result.best["parameters"]) == {"lr", "batch_size"}
    assert tune.load_best_hyperparameters(tmp_path / "absent.json") is None


def test_the_pipelines_tune_step_returns_the_best_trial(tmp_path, monkeypatch):
    """select-hyperparameters with tune=True: the Katib manifest (as the pipeline passes it, JSON) runs locally."""
    events = tmp_path / "events.jsonl"
    monkeypatch.setattr(tune.config, "OUTPUT_DIR", tmp_path)  # the executor's state folder
    manifest = json.dumps(stub_manifest(events, name="in-pipeline", max_trials=3, parallel=3))
    chosen = tune.given_or_tuned_hyperparameters(True, 0.5, 99, manifest, max_trials=3)
    trials = json.loads((tmp_path / "katib" / "in-pipeline" / "experiment.json").read_text())["trials"]
    best = min(trials, key=lambda trial: trial["metrics"]["loss"])
    assert chosen == {"lr": best["parameters"]["lr"], "batch_size": best["parameters"]["batch_size"]}
    assert tune.given_or_tuned_hyperparameters(False, 0.5, 99, manifest) == {"lr": 0.5, "batch_size": 99}
