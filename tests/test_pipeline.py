"""The KFP pipeline: compiled IR up to date, and real local runs with kfp.local."""

from __future__ import annotations

import json

import pytest
import yaml

from mnist_kf import config, pipeline
from mnist_kf.storage import ModelStore
from tests.conftest import GCS_TEST_BUCKET

FAST = {"epochs": 1, "fraction": 0.05, "lr": 0.05, "batch_size": 64}  # a real run, in seconds


def test_the_committed_compiled_pipeline_is_up_to_date(tmp_path):
    fresh = pipeline.compile_pipeline(tmp_path / "pipeline.yaml")
    assert fresh.read_text() == pipeline.COMPILED_PIPELINE.read_text(), (
        "manifests/pipeline/mnist-pipeline.yaml is stale: run `python -m mnist_kf.pipeline compile` and commit it")


def test_the_compiled_pipeline_has_the_steps_the_gate_and_the_project_image():
    spec = yaml.safe_load(pipeline.COMPILED_PIPELINE.read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {pipeline.PROJECT_IMAGE}
    tasks = spec["root"]["dag"]["tasks"]
    assert {"select-hyperparameters", "prepare-data", "train", "evaluate", "condition-branches-1"} <= set(tasks)
    text = pipeline.COMPILED_PIPELINE.read_text()
    assert "accuracy_gate" in text and "test_accuracy" in text and ">=" in text
    assert {"upload", "deploy", "report-rejected"} <= {name.removeprefix("comp-") for name in spec["components"]}
    # the Katib and KServe manifests travel inside the pipeline as parameter defaults
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert json.loads(defaults["experiment_manifest"]["defaultValue"]) == yaml.safe_load(config.KATIB_EXPERIMENT_MANIFEST.read_text())
    assert (json.loads(defaults["inference_service_template"]["defaultValue"])
            == yaml.safe_load(config.INFERENCE_SERVICE_MANIFEST.read_text()))


@pytest.fixture
def isolated_outputs(tmp_path, monkeypatch):
    """Pipeline steps (subprocesses) write deployments and runs under a temporary outputs folder."""
    outputs = tmp_path / "outputs"
    monkeypatch.setenv("MNIST_KF_OUTPUT_DIR", str(outputs))
    return outputs


def run(arguments: dict, outputs, store_uri: str) -> pipeline.PipelineRun:
    return pipeline.run_local({**FAST, **arguments, "model_store_uri": store_uri}, pipeline_root=outputs / "runs")


def test_two_local_runs_leave_v1_and_v2_with_metadata_and_deploy_the_latest(isolated_outputs, tmp_path):
    store_uri = str(tmp_path / "store")
    first = run({"accuracy_gate": 0.5}, isolated_outputs, store_uri)
    second = run({"accuracy_gate": 0.5}, isolated_outputs, store_uri)
    assert first.outcome["outcome"] == second.outcome["outcome"] == "deployed"
    assert (first.outcome["version"], second.outcome["version"]) == (1, 2)
    store = ModelStore(store_uri)
    assert store.versions() == [1, 2]
    for version in (1, 2):
        downloaded = store.download(tmp_path / f"v{version}", version)  # sha256 checked
        assert {"lr", "batch_size", "test_accuracy", "test_loss", "validation_loss"} <= set(downloaded.metadata)
        assert downloaded.metadata["lr"] == 0.05 and downloaded.metadata["batch_size"] == 64
    # the evaluation the gate saw is the one stored with the model
    assert second.evaluation["test_accuracy"] == pytest.approx(store.metadata(2)["test_accuracy"])
    assert len(second.confusion_matrix) == 10 and sum(map(sum, second.confusion_matrix)) == 10000
    # deploy: v2 is the current local deployment and the rendered InferenceService points at it
    record = json.loads((isolated_outputs / "deployments" / "mnist-classifier.json").read_text())
    assert record["version"] == 2 and record["storage_uri"] == store.version_uri(2)
    container = record["inference_service"]["spec"]["predictor"]["containers"][0]
    assert {"name": "STORAGE_URI", "value": store.version_uri(2)} in container["env"]


def test_a_model_below_the_gate_is_neither_uploaded_nor_deployed(isolated_outputs, tmp_path):
    store_uri = str(tmp_path / "store")
    result = run({"accuracy_gate": 0.999}, isolated_outputs, store_uri)
    assert result.outcome["outcome"] == "rejected"
    assert "below the gate 0.9990: not uploaded, not deployed" in result.outcome["message"]
    assert ModelStore(store_uri).versions() == []
    assert not (isolated_outputs / "deployments").exists()
    assert (result.model_dir / "model.pt").is_file()  # trained and evaluated, just not shipped


def test_the_pipeline_against_the_gcs_emulator(isolated_outputs, tmp_path, gcs_emulator):
    store_uri = f"gs://{GCS_TEST_BUCKET}/pipeline-test"
    first = run({"accuracy_gate": 0.5}, isolated_outputs, store_uri)
    second = run({"accuracy_gate": 0.5}, isolated_outputs, store_uri)
    assert (first.outcome["version"], second.outcome["version"]) == (1, 2)
    store = ModelStore(store_uri)
    assert store.versions() == [1, 2] and store.version_uri(2) == f"{store_uri}/mnist-model/v2"
    assert store.download(tmp_path / "v2", "latest").metadata["version"] == 2
    rejected = run({"accuracy_gate": 0.999}, isolated_outputs, store_uri)
    assert rejected.outcome["outcome"] == "rejected" and store.versions() == [1, 2]


def test_default_arguments_take_the_saved_best_hyperparameters(tmp_path):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"lr": 0.0123, "batch_size": 7, "source": {"experiment": "x"}}))
    assert pipeline.default_arguments(best, epochs=3, lr=None) == {"lr": 0.0123, "batch_size": 7, "epochs": 3}
    assert pipeline.default_arguments(best, lr=0.02)["lr"] == 0.02
    assert pipeline.default_arguments(tmp_path / "absent.json", epochs=2) == {"epochs": 2}


def test_a_cluster_run_needs_a_bucket_for_the_model_store(tmp_path):
    with pytest.raises(ValueError, match="on a cluster the model store must be gs://bucket/prefix"):
        pipeline.run_on_cluster({"model_store_uri": str(tmp_path / "store")}, host="http://127.0.0.1:9")
