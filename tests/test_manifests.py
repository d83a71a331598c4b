"""Manifests and images: InferenceServices against KServe's CRD schema, Dockerfiles through hadolint."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from mnist_kf import config
from mnist_kf.serve import render_inference_service

CRD = Path(__file__).parent / "reference" / "serving.kserve.io_inferenceservices.yaml"  # KServe's, see its README
KSERVE = config.PROJECT_ROOT / "manifests" / "kserve"
INFERENCE_SERVICES = ["inference-service.yaml", "inference-service-canary.yaml"]
DOCKERFILES = sorted((config.PROJECT_ROOT / "images").glob("*/Dockerfile"))


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields rejected where Kubernetes would silently prune them."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


@pytest.fixture(scope="module")
def validator():
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def errors(validator, manifest: dict) -> list[str]:
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(manifest)]


@pytest.mark.parametrize("name", INFERENCE_SERVICES)
def test_inference_services_validate_against_the_crd(validator, name):
    manifest = yaml.safe_load((KSERVE / name).read_text())
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    assert errors(validator, manifest) == []


def test_the_canary_sends_a_share_of_traffic_to_a_newer_version():
    main = yaml.safe_load(config.INFERENCE_SERVICE_MANIFEST.read_text())
    canary = yaml.safe_load((KSERVE / "inference-service-canary.yaml").read_text())
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert main["spec"]["predictor"]["containers"][0]["env"][0]["value"].endswith("/mnist-model/v1")
    assert canary["spec"]["predictor"]["containers"][0]["env"][0]["value"].endswith("/mnist-model/v2")
    assert canary["metadata"]["name"] == main["metadata"]["name"]


def test_a_typo_in_a_field_name_is_caught(validator):
    manifest = yaml.safe_load(config.INFERENCE_SERVICE_MANIFEST.read_text())
    manifest["spec"]["predictor"]["containers"][0]["readynessProbe"] = {"httpGet": {"path": "/", "port": 8080}}
    manifest["spec"]["predictor"]["canaryTrafficPercentage"] = 10
    found = " ".join(errors(validator, manifest))
    assert "readynessProbe" in found and "canaryTrafficPercentage" in found


def test_the_rendered_service_for_a_new_version_still_validates(validator):
    template = config.INFERENCE_SERVICE_MANIFEST.read_text()
    rendered = render_inference_service(template, "gs://bucket/models/mnist-model/v7", namespace="team-a")
    assert errors(validator, rendered) == []
    environment = rendered["spec"]["predictor"]["containers"][0]["env"]
    assert {"name": "STORAGE_URI", "value": "gs://bucket/models/mnist-model/v7"} in environment
    assert rendered["metadata"]["namespace"] == "team-a"


def test_the_predictor_runs_as_non_root_and_reads_the_model_the_initializer_downloads():
    container = yaml.safe_load(config.INFERENCE_SERVICE_MANIFEST.read_text())["spec"]["predictor"]["containers"][0]
    assert container["securityContext"]["runAsNonRoot"] is True
    assert "--storage_uri=/mnt/models" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/models/mnist-classifier"


def test_the_seed_input_is_one_real_test_digit_7():
    from mnist_kf import data

    instances = json.loads(config.SEED_INPUT.read_text())["instances"]
    images, labels = data.load_mnist(train=False)
    assert len(instances) == 1 and instances[0] == images[0].reshape(-1).tolist() and int(labels[0]) == 7


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[d.parent.name for d in DOCKERFILES])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "hadolint")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[d.parent.name for d in DOCKERFILES])
def test_images_run_as_non_root_with_pinned_torch(dockerfile):
    text = dockerfile.read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert [line for line in instructions if line.startswith("USER")] == ["USER 10001"]
    assert "torch==2.14.1 torchvision==0.29.1" in text
    assert "FROM python:3.11.11-slim-bookworm" in text
    assert not any(word in text.lower() for word in ("credentials.json", "service-account", "aws_secret"))


def test_both_images_are_referenced_by_the_manifests():
    experiment = config.KATIB_EXPERIMENT_MANIFEST.read_text()
    service = config.INFERENCE_SERVICE_MANIFEST.read_text()
    assert "ghcr.io/mnist-kf/trainer:0.1.0" in experiment and "ghcr.io/mnist-kf/predictor:0.1.0" in service
