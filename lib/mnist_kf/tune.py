"""Hyperparameter tuning driven by one Katib Experiment manifest.

- ``local`` backend (default off-cluster): validates the manifest with Katib's admission
  rules, samples parameters with Optuna (the library behind several of Katib's own
  suggestion services), runs each trial's primary-container command as a subprocess with
  ``${trialParameters.*}`` substituted, collects metrics from its stdout with Katib's
  StdOut filter and applies Katib's rules for objective, goal, max trials and max failed
  trials. State lives on disk, so a run killed at any moment resumes without redoing a
  finished trial.
- ``kubeflow`` backend (inside a cluster): submits the same manifest with the Katib SDK,
  waits, and reads the trials back.

Both return an `ExperimentResult`: a pandas table of trials and the best trial.

CLI: ``python -m mnist_kf.tune --manifest manifests/katib/experiment.yaml [--backend local]``
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from mnist_kf import config
from mnist_kf.processes import dies_with_this_process
from mnist_kf.storage import atomic_write

# Katib's default StdOut metrics filter (pkg/metricscollector/v1beta1/common).
KATIB_DEFAULT_METRICS_FILTER = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
# Katib's substitution syntax in trial templates.
TRIAL_PARAMETER_PATTERN = re.compile(r"\$\{trialParameters\.([^}]+)\}")
TRIAL_META_REFERENCES = {"${trialSpec.Name}", "${trialSpec.Namespace}", "${trialSpec.Kind}", "${trialSpec.APIVersion}"}
# Katib's defaults for batch/v1 Job trials (set by its mutating webhook).
JOB_SUCCESS_CONDITION = 'status.conditions.#(type=="Complete")#|#(status=="True")#'
JOB_FAILURE_CONDITION = 'status.conditions.#(type=="Failed")#|#(status=="True")#'
ALGORITHMS = ("random", "tpe", "multivariate-tpe", "grid", "cmaes", "sobol")
ALGORITHM_SETTINGS = {"random_state", "n_startup_trials", "n_ei_candidates", "sigma"}
BEST_HYPERPARAMETERS_PATH = config.OUTPUT_DIR / "best-hyperparameters.json"


class ExperimentError(ValueError):
    """The manifest breaks Katib's rules, or the local executor cannot honour it."""


# ---------------------------------------------------------------- the manifest


@dataclass
class ParameterSpec:
    name: str
    type: str  # int | double | categorical | discrete
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    values: list[str] = field(default_factory=list)
    log_scale: bool = False


@dataclass
class ExperimentSpec:
    """What the local executor needs from a validated manifest."""

    manifest: dict
    name: str
    objective_type: str
    objective_metric: str
    goal: float | None
    metric_strategies: dict[str, str]
    algorithm: str
    algorithm_settings: dict[str, str]
    parallel_trials: int
    max_trials: int
    max_failed_trials: int | None
    parameters: list[ParameterSpec]
    trial_parameters: dict[str, str]  # trial parameter name → reference (an experiment parameter or meta key)
    container: dict
    metrics_filters: list[str]

    @property
    def metric_names(self) -> list[str]:
        return list(self.metric_strategies)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()


def load_manifest(path: str | Path) -> dict:
    """Read a Katib Experiment YAML file into a dict (clear errors for unreadable files)."""
    path = Path(path)
    try:
        manifest = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ExperimentError(f"manifest {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ExperimentError(f"manifest {path} is not valid YAML: {error}") from None
    if not isinstance(manifest, dict):
        raise ExperimentError(f"manifest {path} must hold one Experiment object, got {type(manifest).__name__}")
    return manifest


def apply_overrides(manifest: dict, max_trials: int | None = None, parallel_trials: int | None = None,
                    epochs: int | None = None, name: str | None = None) -> dict:
    """A copy of `manifest` with counts, trial epochs (the trainer's --epochs argument) or name replaced."""
    manifest = copy.deepcopy(manifest)
    spec = manifest.setdefault("spec", {})
    if max_trials is not None:
        spec["maxTrialCount"] = int(max_trials)
        if spec.get("maxFailedTrialCount", 0) > max_trials:
            spec["maxFailedTrialCount"] = int(max_trials)
    if parallel_trials is not None:
        spec["parallelTrialCount"] = int(parallel_trials)
    if name is not None:
        manifest.setdefault("metadata", {})["name"] = name
    if epochs is not None:
        container = _primary_container(manifest)
        arguments = [arg for arg in container.get("args", []) if not str(arg).startswith("--epochs")]
        container["args"] = arguments + [f"--epochs={int(epochs)}"]
    return manifest


def _primary_container(manifest: dict) -> dict:
    template = manifest.get("spec", {}).get("trialTemplate") or {}
    pod = (((template.get("trialSpec") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
    for container in pod.get("containers") or []:
        if container.get("name") == template.get("primaryContainerName"):
            return container
    raise ExperimentError(
        f"spec.trialTemplate.trialSpec has no container named {template.get('primaryContainerName')!r} "
        "(spec.trialTemplate.primaryContainerName); the local executor runs a batch/v1 Job's primary container"
    )


def _number(value: Any, where: str, problems: list[str]) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        problems.append(f"{where} must be a number, got {value!r}")
        return None


def validate_manifest(manifest: dict) -> ExperimentSpec:
    """Check `manifest` against Katib's admission rules; raise ExperimentError listing every problem."""
    problems: list[str] = []
    if manifest.get("apiVersion") != "kubeflow.org/v1beta1" or manifest.get("kind") != "Experiment":
        problems.append("apiVersion/kind must be kubeflow.org/v1beta1 Experiment, got "
                        f"{manifest.get('apiVersion')}/{manifest.get('kind')}")
    name = str((manifest.get("metadata") or {}).get("name", ""))
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"metadata.name {name!r} must be lower case alphanumerics or '-', starting with a letter")
    spec = manifest.get("spec") or {}

    # counts
    def count(key: str, minimum: int) -> int | None:
        value = spec.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or value < minimum:
            problems.append(f"spec.{key} must be a whole number ≥ {minimum}, got {value!r}")
            return None
        return value

    max_trials, parallel, max_failed = count("maxTrialCount", 1), count("parallelTrialCount", 1), count("maxFailedTrialCount", 0)
    if max_failed is not None and max_trials is not None and max_failed > max_trials:
        problems.append("spec.maxFailedTrialCount should be less than or equal to spec.maxTrialCount")
    if parallel is not None and max_trials is not None and parallel > max_trials:
        problems.append("spec.parallelTrialCount should be less than or equal to spec.maxTrialCount")

    # objective
    objective = spec.get("objective") or {}
    if not objective:
        problems.append("spec.objective must be specified")
    objective_type = objective.get("type")
    if objective and objective_type not in ("minimize", "maximize"):
        problems.append(f"spec.objective.type must be minimize or maximize, got {objective_type!r}")
    objective_metric = objective.get("objectiveMetricName") or ""
    if objective and not objective_metric:
        problems.append("spec.objective.objectiveMetricName must be specified")
    additional = list(objective.get("additionalMetricNames") or [])
    if objective_metric in additional:
        problems.append("spec.objective.additionalMetricNames should not contain spec.objective.objectiveMetricName")
    goal = objective.get("goal")
    goal = _number(goal, "spec.objective.goal", problems) if goal is not None else None
    default_strategy = "min" if objective_type == "minimize" else "max"
    strategies = {metric: default_strategy for metric in [objective_metric, *additional] if metric}
    for entry in objective.get("metricStrategies") or []:
        if entry.get("value") not in ("min", "max", "latest"):
            problems.append(f"spec.objective.metricStrategies[{entry.get('name')}] must be min, max or latest")
        elif entry.get("name") in strategies:
            strategies[entry["name"]] = entry["value"]

    # algorithm
    algorithm = (spec.get("algorithm") or {}).get("algorithmName") or ""
    settings = {str(item.get("name")): str(item.get("value")) for item in (spec.get("algorithm") or {}).get("algorithmSettings") or []}
    if not algorithm:
        problems.append("spec.algorithm.algorithmName must be specified")
    elif algorithm not in ALGORITHMS:
        problems.append(f"spec.algorithm.algorithmName {algorithm!r} is not supported by the local executor; "
                        f"supported: {', '.join(ALGORITHMS)} (run it on a cluster with backend='kubeflow')")
    for setting in settings:
        if setting not in ALGORITHM_SETTINGS:
            problems.append(f"spec.algorithm.algorithmSettings {setting!r} is unknown; known: {', '.join(sorted(ALGORITHM_SETTINGS))}")

    # parameters
    parameters = []
    raw_parameters = spec.get("parameters") or []
    if not raw_parameters:
        problems.append("spec.parameters must be specified")
    for index, raw in enumerate(raw_parameters):
        where = f"spec.parameters[{index}] ({raw.get('name')})"
        kind = raw.get("parameterType")
        space = raw.get("feasibleSpace") or {}
        if not raw.get("name"):
            problems.append(f"spec.parameters[{index}].name must be specified")
        if kind not in ("int", "double", "categorical", "discrete"):
            problems.append(f"{where}.parameterType {kind!r} is not supported (int, double, categorical, discrete)")
            continue
        if not space:
            problems.append(f"{where}.feasibleSpace must be specified")
            continue
        parameter = ParameterSpec(name=str(raw.get("name")), type=kind,
                                  log_scale=space.get("distribution") in ("logUniform", "logNormal"))
        if kind in ("int", "double"):
            if space.get("list"):
                problems.append(f"{where}.feasibleSpace.list is not supported for parameterType: {kind}")
            if space.get("min") in (None, "") or space.get("max") in (None, ""):
                problems.append(f"{where}.feasibleSpace.max or feasibleSpace.min must be specified for parameterType: {kind}")
                continue
            parameter.minimum = _number(space["min"], f"{where}.feasibleSpace.min", problems)
            parameter.maximum = _number(space["max"], f"{where}.feasibleSpace.max", problems)
            if space.get("step") not in (None, ""):
                parameter.step = _number(space["step"], f"{where}.feasibleSpace.step", problems)
            if None not in (parameter.minimum, parameter.maximum) and parameter.minimum >= parameter.maximum:
                problems.append(f"{where}.feasibleSpace.min must be below max, got {space['min']} ≥ {space['max']}")
            if kind == "int" and any(v is not None and v != int(v) for v in (parameter.minimum, parameter.maximum)):
                problems.append(f"{where}.feasibleSpace min/max must be whole numbers for parameterType: int")
        else:
            if any(space.get(key) not in (None, "") for key in ("min", "max", "step")):
                problems.append(f"{where}.feasibleSpace .max, .min and .step is not supported for parameterType: {kind}")
            parameter.values = [str(value) for value in space.get("list") or []]
            if not parameter.values:
                problems.append(f"{where}.feasibleSpace.list must be specified for parameterType: {kind}")
        parameters.append(parameter)
    parameter_names = {parameter.name for parameter in parameters}

    # trial template
    template = spec.get("trialTemplate") or {}
    trial_parameters: dict[str, str] = {}
    container: dict = {}
    if not template:
        problems.append("spec.trialTemplate must be specified")
    else:
        if not template.get("primaryContainerName"):
            problems.append("spec.trialTemplate.primaryContainerName must be specified")
        trial_spec = template.get("trialSpec")
        if trial_spec is None and template.get("configMap") is None:
            problems.append("spec.trialTemplate.trialSpec or spec.trialTemplate.configMap must be specified")
        elif trial_spec is not None and template.get("configMap") is not None:
            problems.append("only one of spec.trialTemplate.trialSpec or spec.trialTemplate.configMap can be specified")
        elif trial_spec is None:
            problems.append("spec.trialTemplate.configMap templates live in the cluster; the local executor needs trialSpec")
        if template.get("trialParameters") is None:
            problems.append("spec.trialTemplate.trialParameters must be specified")
        if isinstance(trial_spec, dict):
            if not trial_spec.get("apiVersion") or not trial_spec.get("kind"):
                problems.append("APIVersion and Kind in spec.trialTemplate must be specified")
            is_job = trial_spec.get("apiVersion") == "batch/v1" and trial_spec.get("kind") == "Job"
            if not is_job and not (template.get("successCondition") and template.get("failureCondition")):
                problems.append("successCondition and failureCondition must be specified for a trialSpec that is not a batch/v1 Job")
            metadata = trial_spec.get("metadata") or {}
            if metadata.get("name") or metadata.get("namespace"):
                problems.append("metadata.name and metadata.namespace in spec.trialTemplate must be omitted")
            template_text = json.dumps(trial_spec)
            used = set(TRIAL_PARAMETER_PATTERN.findall(template_text))
            for index, item in enumerate(template.get("trialParameters") or []):
                name_, reference = item.get("name") or "", item.get("reference") or ""
                if not name_ or not reference or "{" in name_ or "}" in name_:
                    problems.append(f"spec.trialTemplate.trialParameters[{index}]: name and reference must be "
                                    "specified and name must not contain '{' or '}'")
                    continue
                if name_ in trial_parameters:
                    problems.append(f"parameter name {name_} can't be duplicated in spec.trialTemplate.trialParameters")
                if reference in trial_parameters.values():
                    problems.append(f"parameter reference {reference} can't be duplicated in spec.trialTemplate.trialParameters")
                if reference not in parameter_names and reference not in TRIAL_META_REFERENCES:
                    problems.append(f"parameter reference {reference} does not exist in spec.parameters "
                                    f"({', '.join(sorted(parameter_names))})")
                if name_ not in used:
                    problems.append(f"parameter name: {name_} in spec.trialParameters not found in spec.trialTemplate")
                trial_parameters[name_] = reference
            for missing in sorted(used - set(trial_parameters)):
                problems.append(f"parameters: ${{trialParameters.{missing}}} in spec.trialTemplate not found in spec.trialParameters")
            try:
                container = _primary_container(manifest)
                if not container.get("command") and not container.get("args"):
                    problems.append("the primary container needs a command (the local executor runs it)")
            except ExperimentError as error:
                problems.append(str(error))

    # metrics collector
    collector = spec.get("metricsCollectorSpec") or {}
    kind = (collector.get("collector") or {}).get("kind", "StdOut")
    if kind != "StdOut":
        problems.append(f"spec.metricsCollectorSpec.collector.kind {kind!r}: the local executor reads StdOut only")
    filters = list(((collector.get("source") or {}).get("filter") or {}).get("metricsFormat") or [])
    for metrics_format in filters:
        try:
            compiled = re.compile(metrics_format)
        except re.error as error:
            problems.append(f"spec.metricsCollectorSpec.source.filter.metricsFormat {metrics_format!r}: invalid filter: {error}")
            continue
        if compiled.groups < 2:
            problems.append(f"spec.metricsCollectorSpec.source.filter.metricsFormat {metrics_format!r}: two top subexpressions are required")

    if problems:
        raise ExperimentError("the Katib Experiment manifest is invalid:\n  - " + "\n  - ".join(problems))
    return ExperimentSpec(
        manifest=manifest, name=name, objective_type=objective_type, objective_metric=objective_metric, goal=goal,
        metric_strategies=strategies, algorithm=algorithm, algorithm_settings=settings,
        parallel_trials=parallel or 3, max_trials=max_trials or 12,
        max_failed_trials=max_failed if max_failed is not None else 3,
        parameters=parameters, trial_parameters=trial_parameters, container=container,
        metrics_filters=filters or [KATIB_DEFAULT_METRICS_FILTER],
    )


def to_katib_model(manifest: dict):
    """The manifest as the Katib SDK's V1beta1Experiment (what KatibClient.create_experiment sends)."""
    from kubeflow.katib import V1beta1Experiment
    from kubeflow.katib.api_client import ApiClient

    class _Response:  # the SDK's deserializer reads JSON from a response-like object
        data = json.dumps(manifest)

    return ApiClient().deserialize(_Response(), V1beta1Experiment)


# ---------------------------------------------------------------- metrics


def parse_metrics(line: str, metrics_filter: str = KATIB_DEFAULT_METRICS_FILTER) -> Iterator[tuple[str, float]]:
    """(name, value) pairs that Katib's StdOut collector would take from one line of output."""
    for match in re.finditer(metrics_filter, line):
        name, value = match.group(1), match.group(2)
        try:
            number = float(value)
        except ValueError:  # the filter also matches "name=" with no digits
            continue
        if math.isfinite(number):
            yield name.strip(), number


def collect_metrics(lines: list[str], metric_names: list[str], filters: list[str]) -> tuple[list[dict], dict]:
    """Per-line history of the watched metrics, and Katib's observation {name: {min, max, latest}}."""
    history, values = [], {name: [] for name in metric_names}
    for line in lines:
        if not any(name in line for name in metric_names):  # as Katib: only lines naming a metric
            continue
        record = {}
        for metrics_filter in filters:
            for name, value in parse_metrics(line, metrics_filter):
                if name in values and name not in record:
                    record[name] = value
        if record:
            history.append(record)
            for name, value in record.items():
                values[name].append(value)
    observation = {name: {"min": min(v), "max": max(v), "latest": v[-1]} for name, v in values.items() if v}
    return history, observation


# ---------------------------------------------------------------- results


@dataclass
class ExperimentResult:
    """One shape from both backends: the trials as a table, and the best trial."""

    name: str
    status: str  # Succeeded | Failed | Running
    reason: str
    trials: "Any"  # pandas.DataFrame: name, parameters…, status, objective, metrics, history
    best: dict | None
    backend: str
    state_dir: Path | None = None

    def best_hyperparameters(self) -> dict:
        if self.best is None:
            raise ExperimentError(f"experiment {self.name} has no succeeded trial, so no best hyperparameters")
        return dict(self.best["parameters"])


def trials_table(trials: list[dict], spec_metric_names: list[str]):
    """The trials as a pandas DataFrame with one column per parameter and per metric."""
    import pandas as pd

    rows = []
    for trial in trials:
        row = {"name": trial["name"], **trial["parameters"], "status": trial["status"]}
        for metric in spec_metric_names:
            row[metric] = trial.get("metrics", {}).get(metric)
        row["seconds"] = trial.get("seconds")
        row["history"] = trial.get("history", [])
        rows.append(row)
    return pd.DataFrame(rows)


def _metric_value(observation: dict, name: str, strategy: str) -> float | None:
    entry = observation.get(name)
    return None if entry is None else entry[strategy]


def best_trial(trials: list[dict], objective_metric: str, objective_type: str) -> dict | None:
    """The succeeded trial with the best objective value (the first of equals), None if none succeeded."""
    best, best_value = None, None
    for trial in trials:
        value = trial.get("metrics", {}).get(objective_metric) if trial["status"] == "Succeeded" else None
        if value is None:
            continue
        if best_value is None or (value < best_value if objective_type == "minimize" else value > best_value):
            best, best_value = trial, value
    return best


def best_summary(trials: list[dict], spec: ExperimentSpec) -> dict | None:
    """`ExperimentResult.best`: the best trial's name, parameters and metrics."""
    best = best_trial(trials, spec.objective_metric, spec.objective_type)
    return None if best is None else {key: best[key] for key in ("name", "parameters", "metrics")}


def save_best_hyperparameters(result: ExperimentResult, path: str | Path = BEST_HYPERPARAMETERS_PATH) -> Path:
    """Write {"lr": …, "batch_size": …} plus where they came from, atomically; the pipeline reads it."""
    path = Path(path)
    payload = {**result.best_hyperparameters(), "source": {
        "experiment": result.name, "trial": result.best["name"], "backend": result.backend,
        "metrics": result.best["metrics"], "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }}
    with atomic_write(path, "w") as handle:
        json.dump(payload, handle, indent=2)
    return path


def load_best_hyperparameters(path: str | Path = BEST_HYPERPARAMETERS_PATH) -> dict | None:
    """The parameters saved by `save_best_hyperparameters`, None when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    return {key: value for key, value in json.loads(path.read_text()).items() if key != "source"}


# ---------------------------------------------------------------- local executor


class LocalExecutor:
    """Runs an Experiment's trials as local subprocesses under Katib's rules, with state on disk."""

    def __init__(self, spec: ExperimentSpec, state_dir: str | Path | None = None, threads_per_trial: int | None = None,
                 poll_seconds: float = 0.1, log: Callable[[str], None] = print):
        self.spec = spec
        self.state_dir = Path(state_dir) if state_dir else config.OUTPUT_DIR / "katib" / spec.name
        self.state_path = self.state_dir / "experiment.json"
        self.threads_per_trial = threads_per_trial or max(1, (os.cpu_count() or 1) // spec.parallel_trials)
        self.poll_seconds = poll_seconds
        self.log = log
        self.state: dict = {}

    # -- state
    def _save(self) -> None:
        with atomic_write(self.state_path, "w") as handle:
            json.dump(self.state, handle, indent=2)

    def _load_or_create(self, rerun: bool) -> None:
        fingerprint = self.spec.fingerprint()
        if self.state_path.is_file() and not rerun:
            self.state = json.loads(self.state_path.read_text())
            if self.state.get("fingerprint") != fingerprint:
                raise ExperimentError(
                    f"{self.state_path} holds experiment {self.spec.name!r} run from a different manifest; "
                    "pass rerun=True (--rerun) to start it again, or give the experiment another name"
                )
            return
        self.state = {"name": self.spec.name, "fingerprint": fingerprint, "status": "Running", "reason": "ExperimentCreated",
                      "created_at": _now(), "start_time": time.time(), "trials": []}
        if self.state_dir.exists() and rerun:
            for log_file in self.state_dir.glob("trials/*/stdout.log"):
                log_file.unlink()
        self._save()

    # -- sampling
    def _distributions(self) -> dict:
        import optuna

        distributions = {}
        for parameter in self.spec.parameters:
            if parameter.type == "double":
                distributions[parameter.name] = optuna.distributions.FloatDistribution(
                    parameter.minimum, parameter.maximum, log=parameter.log_scale,
                    step=None if parameter.log_scale else parameter.step)
            elif parameter.type == "int":
                distributions[parameter.name] = optuna.distributions.IntDistribution(
                    int(parameter.minimum), int(parameter.maximum), log=parameter.log_scale,
                    step=1 if parameter.log_scale else int(parameter.step or 1))
            else:
                distributions[parameter.name] = optuna.distributions.CategoricalDistribution(parameter.values)
        return distributions

    def _grid(self) -> dict[str, list]:
        grid = {}
        for parameter in self.spec.parameters:
            if parameter.type == "int":
                grid[parameter.name] = list(range(int(parameter.minimum), int(parameter.maximum) + 1, int(parameter.step or 1)))
            elif parameter.type == "double":
                if not parameter.step:
                    raise ExperimentError(f"algorithm grid needs feasibleSpace.step for double parameter {parameter.name}")
                count = int(math.floor((parameter.maximum - parameter.minimum) / parameter.step + 1e-9)) + 1
                grid[parameter.name] = [round(parameter.minimum + i * parameter.step, 12) for i in range(count)]
            else:
                grid[parameter.name] = list(parameter.values)
        return grid

    def _study(self, offset: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        settings = self.spec.algorithm_settings
        seed = int(settings["random_state"]) + offset if "random_state" in settings else None
        algorithm = self.spec.algorithm
        if algorithm == "random":
            sampler = optuna.samplers.RandomSampler(seed=seed)
        elif algorithm in ("tpe", "multivariate-tpe"):
            sampler = optuna.samplers.TPESampler(
                seed=seed, multivariate=algorithm == "multivariate-tpe",
                n_startup_trials=int(settings.get("n_startup_trials", 10)),
                n_ei_candidates=int(settings.get("n_ei_candidates", 24)))
        elif algorithm == "grid":
            sampler = optuna.samplers.GridSampler(self._grid(), seed=seed)
        elif algorithm == "cmaes":
            sampler = optuna.samplers.CmaEsSampler(seed=seed, sigma0=float(settings["sigma"]) if "sigma" in settings else None)
        else:  # sobol
            sampler = optuna.samplers.QMCSampler(qmc_type="sobol", seed=seed)
        direction = "minimize" if self.spec.objective_type == "minimize" else "maximize"
        return optuna.create_study(direction=direction, sampler=sampler)

    def _suggestion_limit(self) -> int:
        """Katib stops suggesting when a grid is exhausted."""
        if self.spec.algorithm != "grid":
            return self.spec.max_trials
        return math.prod(len(values) for values in self._grid().values())

    # -- trials
    def _command(self, trial: dict) -> list[str]:
        replacements = {}
        for name, reference in self.spec.trial_parameters.items():
            if reference == "${trialSpec.Name}":
                replacements[name] = trial["name"]
            elif reference in TRIAL_META_REFERENCES:
                replacements[name] = {"${trialSpec.Namespace}": "local", "${trialSpec.Kind}": "Job",
                                      "${trialSpec.APIVersion}": "batch/v1"}[reference]
            else:
                replacements[name] = _format_value(trial["parameters"][reference])
        words = [str(word) for word in (self.spec.container.get("command") or []) + (self.spec.container.get("args") or [])]
        words = [TRIAL_PARAMETER_PATTERN.sub(lambda match: replacements[match.group(1)], word) for word in words]
        if words and words[0] in ("python", "python3"):
            words[0] = sys.executable  # the current environment stands in for the image
        return words

    def _environment(self) -> dict[str, str]:
        environment = dict(os.environ)
        for item in self.spec.container.get("env") or []:
            if "value" in item:
                environment[item["name"]] = str(item["value"])
        threads = str(self.threads_per_trial)  # this machine's share of CPUs per trial
        environment.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
        return environment

    def _start(self, trial: dict) -> subprocess.Popen:
        trial_dir = self.state_dir / "trials" / trial["name"]
        trial_dir.mkdir(parents=True, exist_ok=True)
        trial.update(status="Running", started_at=_now(), start_time=time.time(), command=self._command(trial))
        with open(trial_dir / "stdout.log", "wb") as log_file:
            process = subprocess.Popen(trial["command"], stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=self._environment(), cwd=trial_dir, preexec_fn=dies_with_this_process())
        trial["pid"] = process.pid
        return process

    def _finish(self, trial: dict, exit_code: int) -> None:
        lines = (self.state_dir / "trials" / trial["name"] / "stdout.log").read_text(errors="replace").splitlines()
        history, observation = collect_metrics(lines, self.spec.metric_names, self.spec.metrics_filters)
        end_time = time.time()
        trial.update(exit_code=exit_code, history=history, observation=observation, finished_at=_now(),
                     end_time=end_time, seconds=round(end_time - trial["start_time"], 3))
        trial.pop("pid", None)
        trial["metrics"] = {name: _metric_value(observation, name, strategy)
                            for name, strategy in self.spec.metric_strategies.items()}
        if exit_code != 0:
            trial.update(status="Failed", reason=f"exit code {exit_code}")
        elif trial["metrics"].get(self.spec.objective_metric) is None:
            trial.update(status="Failed", reason=f"MetricsUnavailable: no {self.spec.objective_metric}=… line in its output")
        else:
            trial.update(status="Succeeded", reason="Completed")

    def _best(self) -> dict | None:
        return best_trial(self.state["trials"], self.spec.objective_metric, self.spec.objective_type)

    def _verdict(self) -> tuple[str, str] | None:
        """Katib's order: goal reached → Succeeded; failed > maxFailed → Failed; completed ≥ max → Succeeded."""
        trials = self.state["trials"]
        best = self._best()
        goal = self.spec.goal
        if best is not None and goal is not None:
            value = best["metrics"][self.spec.objective_metric]
            if (value <= goal) if self.spec.objective_type == "minimize" else (value >= goal):
                return "Succeeded", "ExperimentGoalReached"
        failed = sum(trial["status"] == "Failed" for trial in trials)
        if self.spec.max_failed_trials is not None and failed > self.spec.max_failed_trials:
            return "Failed", "ExperimentFailed: max failed trial count reached"
        completed = sum(trial["status"] in ("Succeeded", "Failed", "Killed") for trial in trials)
        if completed >= self.spec.max_trials:
            return "Succeeded", "ExperimentMaxTrialsReached"
        if completed >= self._suggestion_limit() and not any(trial["status"] == "Running" for trial in trials):
            return "Succeeded", "ExperimentSuggestionEndReached"
        return None

    def run(self, rerun: bool = False, progress: bool | None = None) -> ExperimentResult:
        """Run (or resume, or report) the experiment; returns when it has succeeded or failed."""
        import optuna
        from tqdm import tqdm

        self._load_or_create(rerun)
        if self.state["status"] != "Running":
            self.log(f"experiment {self.spec.name} already {self.state['status']} ({self.state['reason']}) in "
                     f"{self.state_dir}: reporting it (rerun=True runs it again)")
            return self.result()

        distributions = self._distributions()
        trials = self.state["trials"]
        interrupted = [trial for trial in trials if trial["status"] in ("Running", "Pending")]
        for trial in interrupted:  # killed mid-run: run again with the same assignments
            trial.update(status="Pending", restarts=trial.get("restarts", 0) + 1)
            trial.pop("pid", None)
        study = self._study(offset=len(trials))
        for trial in trials:  # what is known so far informs the sampler
            if trial["status"] == "Succeeded":
                study.add_trial(optuna.trial.create_trial(params=trial["parameters"], distributions=distributions,
                                                          value=trial["metrics"][self.spec.objective_metric]))
            elif trial["status"] == "Failed":
                study.add_trial(optuna.trial.create_trial(params=trial["parameters"], distributions=distributions,
                                                          state=optuna.trial.TrialState.FAIL))
        running: dict[str, tuple[subprocess.Popen, Any]] = {}
        done = sum(trial["status"] in ("Succeeded", "Failed", "Killed") for trial in trials)
        bar = tqdm(total=self.spec.max_trials, initial=done, desc=self.spec.name, unit="trial",
                   disable=None if progress is None else not progress)
        try:
            while True:
                # collect finished trials
                for name, (process, asked) in list(running.items()):
                    exit_code = process.poll()
                    if exit_code is None:
                        continue
                    trial = next(t for t in trials if t["name"] == name)
                    self._finish(trial, exit_code)
                    del running[name]
                    if asked is not None:
                        if trial["status"] == "Succeeded":
                            study.tell(asked, trial["metrics"][self.spec.objective_metric])
                        else:
                            study.tell(asked, state=optuna.trial.TrialState.FAIL)
                    self._save()
                    bar.update(1)
                    best = self._best()
                    if best is not None:
                        bar.set_postfix_str(f"best {self.spec.objective_metric} {best['metrics'][self.spec.objective_metric]:.4f}")
                verdict = self._verdict()
                if verdict is not None:
                    for name, (process, _) in running.items():  # Katib deletes the trials still running
                        process.kill()
                        process.wait()
                        trial = next(t for t in trials if t["name"] == name)
                        trial.update(status="Killed", reason=f"experiment completed ({verdict[1]})", finished_at=_now(),
                                     end_time=time.time())
                        trial.pop("pid", None)
                    self.state.update(status=verdict[0], reason=verdict[1], completed_at=_now(), end_time=time.time())
                    self._save()
                    break
                # start trials while a slot is free
                while len(running) < self.spec.parallel_trials:
                    trial = next((t for t in trials if t["status"] == "Pending"), None)
                    asked = None
                    if trial is None:
                        if len(trials) >= min(self.spec.max_trials, self._suggestion_limit()):
                            break
                        asked = study.ask(distributions)
                        trial = {"name": f"{self.spec.name}-{len(trials) + 1:03d}", "parameters": dict(asked.params),
                                 "status": "Pending"}
                        trials.append(trial)
                    running[trial["name"]] = (self._start(trial), asked)
                    self._save()
                time.sleep(self.poll_seconds)
        finally:
            bar.close()
            for process, _ in running.values():  # interrupted (Ctrl-C): stop the children too
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return self.result()

    def result(self) -> ExperimentResult:
        return ExperimentResult(
            name=self.spec.name, status=self.state["status"], reason=self.state["reason"],
            trials=trials_table(self.state["trials"], self.spec.metric_names),
            best=best_summary(self.state["trials"], self.spec), backend="local", state_dir=self.state_dir,
        )


def _format_value(value: Any) -> str:
    """A parameter value as Katib's suggestion services write it into the template."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- cluster backend

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def in_cluster() -> bool:
    """True inside a Kubernetes pod (a Kubeflow Notebook server)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and SERVICE_ACCOUNT_NAMESPACE.is_file()


def default_namespace() -> str:
    """The Notebook's namespace (its service account's), else $NAMESPACE or 'kubeflow-user-example-com'."""
    if SERVICE_ACCOUNT_NAMESPACE.is_file():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return os.environ.get("NAMESPACE", "kubeflow-user-example-com")


def run_on_cluster(spec: ExperimentSpec, namespace: str | None = None, timeout_seconds: int = 3600,
                   poll_seconds: int = 10, log: Callable[[str], None] = print) -> ExperimentResult:
    """Submit the manifest with the Katib SDK, wait for completion, read trials and the optimal trial."""
    from kubeflow.katib import KatibClient

    namespace = namespace or default_namespace()
    client = KatibClient()
    client.create_experiment(to_katib_model(spec.manifest), namespace=namespace)
    log(f"created Experiment {namespace}/{spec.name}; waiting for it to complete")
    deadline = time.monotonic() + timeout_seconds
    status = "Running"
    while time.monotonic() < deadline:
        status = client.get_experiment_status(spec.name, namespace=namespace)
        if status in ("Succeeded", "Failed"):
            break
        time.sleep(poll_seconds)
    else:
        raise TimeoutError(f"Experiment {namespace}/{spec.name} still {status} after {timeout_seconds} s")
    experiment = client.get_experiment(spec.name, namespace=namespace)
    conditions = (experiment.get("status") or {}).get("conditions") or [{}]
    trials = []
    for trial in client.list_trials(spec.name, namespace=namespace):
        if (trial.metadata.labels or {}).get("katib.kubeflow.org/experiment") != spec.name:
            continue  # the 0.14 SDK lists every trial of the namespace
        observation = {metric.name: {"min": _float(metric.min), "max": _float(metric.max), "latest": _float(metric.latest)}
                       for metric in ((trial.status.observation.metrics if trial.status and trial.status.observation else None) or [])}
        trial_status = next((c.type for c in reversed(trial.status.conditions or []) if c.status == "True"), "Unknown") if trial.status else "Unknown"
        trials.append({
            "name": trial.metadata.name, "status": trial_status,
            "parameters": {a.name: _parse_assignment(a.value) for a in trial.spec.parameter_assignments},
            "metrics": {name: _metric_value(observation, name, strategy) for name, strategy in spec.metric_strategies.items()},
            "history": [],  # per-epoch values live in Katib's DB; the trial CR keeps min/max/latest
        })
    return ExperimentResult(name=spec.name, status=status, reason=conditions[-1].get("reason", ""),
                            trials=trials_table(trials, spec.metric_names), best=best_summary(trials, spec), backend="kubeflow")


def _float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _parse_assignment(value: str) -> Any:
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value else number


# ---------------------------------------------------------------- entry points


def resolve_backend(backend: str) -> str:
    if backend not in ("auto", "local", "kubeflow"):
        raise ExperimentError(f"backend must be auto, local or kubeflow, got {backend!r}")
    if backend == "auto":
        return "kubeflow" if in_cluster() else "local"
    return backend


def run_experiment(manifest: str | Path | dict | None = None,
                   backend: str = "auto", namespace: str | None = None, max_trials: int | None = None,
                   parallel_trials: int | None = None, epochs: int | None = None, name: str | None = None,
                   rerun: bool = False, state_dir: str | Path | None = None, progress: bool | None = None,
                   log: Callable[[str], None] = print) -> ExperimentResult:
    """Validate the manifest (a path or a dict; default: the project's) with overrides, then run it."""
    loaded = manifest if isinstance(manifest, dict) else load_manifest(manifest or config.KATIB_EXPERIMENT_MANIFEST)
    manifest = apply_overrides(loaded, max_trials, parallel_trials, epochs, name)
    spec = validate_manifest(manifest)
    if resolve_backend(backend) == "kubeflow":
        return run_on_cluster(spec, namespace, log=log)
    return LocalExecutor(spec, state_dir, log=log).run(rerun=rerun, progress=progress)


def given_or_tuned_hyperparameters(tune: bool, lr: float, batch_size: int, manifest_yaml: str,
                                   max_trials: int | None = None, epochs: int | None = None) -> dict:
    """{"lr", "batch_size"}: the given ones, or (tune=True) the best trial of the manifest's experiment."""
    if not tune:
        return {"lr": float(lr), "batch_size": int(batch_size)}
    result = run_experiment(yaml.safe_load(manifest_yaml), backend="auto", max_trials=max_trials, epochs=epochs,
                            progress=False)
    best = result.best_hyperparameters()
    return {"lr": float(best["lr"]), "batch_size": int(best["batch_size"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_kf.tune", description="Run a Katib Experiment manifest.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--manifest", default=str(config.KATIB_EXPERIMENT_MANIFEST))
    parser.add_argument("--backend", default="auto", choices=["auto", "local", "kubeflow"],
                        help="auto: kubeflow inside a cluster, else local")
    parser.add_argument("--namespace", default=None, help="cluster namespace (default: the service account's)")
    parser.add_argument("--max-trials", type=int, default=None, help="override spec.maxTrialCount")
    parser.add_argument("--parallel-trials", type=int, default=None, help="override spec.parallelTrialCount")
    parser.add_argument("--epochs", type=int, default=None, help="override the trainer's --epochs in the trial template")
    parser.add_argument("--name", default=None, help="override metadata.name")
    parser.add_argument("--state-dir", default=None, help="local state folder (default: outputs/katib/<name>)")
    parser.add_argument("--rerun", action="store_true", help="run again even if this experiment already completed")
    parser.add_argument("--best-output", default=str(BEST_HYPERPARAMETERS_PATH), help="where to write the best hyperparameters")
    args = parser.parse_args(argv)
    try:
        result = run_experiment(args.manifest, args.backend, args.namespace, args.max_trials, args.parallel_trials,
                                args.epochs, args.name, args.rerun, args.state_dir)
    except ExperimentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    columns = [c for c in result.trials.columns if c != "history"]
    print(result.trials[columns].to_string(index=False))
    print(f"experiment {result.name}: {result.status} ({result.reason})")
    if result.best is None:
        print("no succeeded trial", file=sys.stderr)
        return 1
    path = save_best_hyperparameters(result, args.best_output)
    print(f"best trial {result.best['name']}: {json.dumps(result.best['parameters'])} → {path}")
    return 0 if result.status == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
