"""Serving: the InferenceService manifest and its deployment.

- `render_inference_service` fills `manifests/kserve/inference-service.yaml` with a model
  version's storage URI;
- `deploy` creates or patches it on a cluster with kserve's `KServeClient` and waits until
  it is Ready, or, locally, records the version as the one `04_serve` starts.
"""

from __future__ import annotations

import copy
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import yaml

from mnist_kf import config
from mnist_kf.storage import atomic_write

INFERENCE_SERVICE_MANIFEST = config.PROJECT_ROOT / "manifests" / "kserve" / "inference-service.yaml"
DEPLOYMENTS_DIR = config.OUTPUT_DIR / "deployments"


class DeploymentError(RuntimeError):
    """An InferenceService could not be rendered or did not become Ready."""


def render_inference_service(template: str | dict, storage_uri: str, name: str | None = None,
                             namespace: str | None = None) -> dict:
    """The InferenceService with its predictor's STORAGE_URI set to `storage_uri` (name/namespace optional)."""
    service = copy.deepcopy(template) if isinstance(template, dict) else yaml.safe_load(template)
    if not isinstance(service, dict) or service.get("kind") != "InferenceService":
        raise DeploymentError("the template is not an InferenceService manifest")
    if name:
        service["metadata"]["name"] = name
    if namespace:
        service["metadata"]["namespace"] = namespace
    predictor = service.get("spec", {}).get("predictor", {})
    if "model" in predictor:  # a built-in model format: KServe's storageUri field
        predictor["model"]["storageUri"] = storage_uri
        return service
    containers = predictor.get("containers") or []
    if not containers:
        raise DeploymentError("the InferenceService has neither spec.predictor.model nor predictor containers")
    environment = containers[0].setdefault("env", [])
    for variable in environment:
        if variable.get("name") == "STORAGE_URI":
            variable["value"] = storage_uri
            break
    else:
        environment.append({"name": "STORAGE_URI", "value": storage_uri})
    return service


def deploy_local(service: dict, storage_uri: str, version: int | None = None) -> dict:
    """Record the rendered service and its model version as current for the local model server."""
    record = {
        "name": service["metadata"]["name"],
        "storage_uri": storage_uri,
        "version": version,
        "deployed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": "local",
        "inference_service": service,
    }
    with atomic_write(DEPLOYMENTS_DIR / f"{record['name']}.json", "w") as handle:
        json.dump(record, handle, indent=2)
    return record


def current_deployment(name: str = config.MODEL_NAME) -> dict | None:
    """The local deployment record written by `deploy_local`, None when nothing was deployed."""
    path = DEPLOYMENTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def deploy_to_cluster(service: dict, namespace: str, timeout_seconds: int = 600) -> dict:
    """Create or patch the InferenceService with KServeClient and wait until it is Ready."""
    from kserve import KServeClient

    client = KServeClient()
    name = service["metadata"]["name"]
    service["metadata"]["namespace"] = namespace
    try:
        client.get(name, namespace=namespace)
        exists = True
    except RuntimeError:
        exists = False
    if exists:
        client.patch(name, service, namespace=namespace)
    else:
        client.create(service, namespace=namespace)
    client.wait_isvc_ready(name, namespace=namespace, timeout_seconds=timeout_seconds)
    status = client.get(name, namespace=namespace).get("status", {})
    return {"name": name, "namespace": namespace, "url": status.get("url"), "backend": "kubeflow",
            "updated": exists, "inference_service": service}


def deploy(template: str | dict, storage_uri: str, name: str | None = None, namespace: str | None = None,
           backend: str = "auto", version: int | None = None, manifest_path: str | os.PathLike | None = None) -> dict:
    """Render the InferenceService for `storage_uri` (written to `manifest_path` when given) and
    deploy it on the chosen backend; returns the deployment record."""
    from mnist_kf.tune import default_namespace, in_cluster

    if backend not in ("auto", "local", "kubeflow"):
        raise DeploymentError(f"backend must be auto, local or kubeflow, got {backend!r}")
    if backend == "auto":
        backend = "kubeflow" if in_cluster() else "local"
    service = render_inference_service(template, storage_uri, name, namespace)
    if manifest_path is not None:
        with atomic_write(manifest_path, "w") as handle:
            yaml.safe_dump(service, handle, sort_keys=False)
    if backend == "kubeflow":
        record = deploy_to_cluster(service, namespace or default_namespace())
    else:
        record = deploy_local(service, storage_uri, version)
    return {key: value for key, value in record.items() if key != "inference_service"}


def load_template(path: str | os.PathLike = INFERENCE_SERVICE_MANIFEST) -> str:
    return Path(path).read_text()
