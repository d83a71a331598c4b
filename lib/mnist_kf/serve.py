"""Serving: the KServe predictor, its entrypoint, the InferenceService and its deployment.

- `MnistClassifier`: a `kserve.Model` answering the v1 protocol
  (`POST /v1/models/<name>:predict` with `{"instances": [...]}`) and the v2 Open Inference
  Protocol (`POST /v2/models/<name>/infer`), one forward pass per request;
- `python -m mnist_kf.serve --model_name mnist-classifier --storage_uri … --http_port 8080`:
  the predictor image's entrypoint (KServe's usual flags);
- `render_inference_service` fills `manifests/kserve/inference-service.yaml` with a model
  version's storage URI; `deploy` creates or patches it on a cluster with `KServeClient`, or,
  locally, records the version as the one `04_serve` starts.

Pixels: each image is 784 numbers (or 28 × 28) on the raw MNIST scale 0–255, like
`manifests/kserve/mnist-input.json`, or on the 0–1 scale (an image whose largest value is
≤ 1 is read as 0–1); both are standardised exactly as in training.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import io
import json
import logging
import os
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.errors import InvalidInput

from mnist_kf import config
from mnist_kf.storage import atomic_write

DEPLOYMENTS_DIR = config.OUTPUT_DIR / "deployments"


MAX_INSTANCES = 1000  # per request: bounds memory and latency; larger batches → split them
IMAGE_SIDE = 28
INPUT_NAME = "images"


class DeploymentError(RuntimeError):
    """An InferenceService could not be rendered or did not become Ready."""


class ModelLoadError(RuntimeError):
    """The model files are missing, corrupt or do not match their sha256."""


# ---------------------------------------------------------------- the predictor


def images_from_array(array: np.ndarray, where: str) -> np.ndarray:
    """Validate a numeric array of images, [N, 784] or [N, 28, 28] (or [N, 1, 28, 28]), and
    return float32 [N, 784] on the 0–1 scale. Raises InvalidInput saying what is wrong."""
    if array.dtype.kind not in "iuf":
        raise InvalidInput(f"{where} must contain only numbers (pixel values), got {array.dtype.name} values")
    count = array.shape[0] if array.ndim else 0
    if array.shape[1:] in ((1, IMAGE_SIDE, IMAGE_SIDE), (IMAGE_SIDE, IMAGE_SIDE)):  # [N, 1, 28, 28] or [N, 28, 28]
        array = array.reshape(count, -1)
    elif not (array.ndim == 2 and array.shape[1] == IMAGE_SIDE * IMAGE_SIDE):
        raise InvalidInput(f"{where} has shape {list(array.shape)}; expected [N, 784], [N, 28, 28] or [N, 1, 28, 28] "
                       "(each image 784 pixel values, or 28 rows of 28)")
    pixels = array.astype(np.float32, copy=False)
    if not np.isfinite(pixels).all():
        raise InvalidInput(f"{where} contains NaN or infinite values; pixels must be finite numbers in 0–255 (or 0–1)")
    low, high = pixels.min(axis=1), pixels.max(axis=1)
    if (low < 0).any() or (high > 255).any():
        bad = int(np.argmax((low < 0) | (high > 255)))
        raise InvalidInput(f"{where}: image {bad} has pixel values in [{low[bad]:g}, {high[bad]:g}]; "
                       "expected 0–255 (raw MNIST) or 0–1")
    scale = np.where(high <= 1.0, 1.0, 1.0 / 255.0).astype(np.float32)  # 0–1 images stay, 0–255 images shrink
    return pixels * scale[:, None]


def image_from_base64(encoded: Any, index: int) -> np.ndarray:
    """A base64 PNG/JPEG (28 × 28, grayscale or colour) as 784 pixel values 0–255."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(encoded, str):
        raise InvalidInput(f"instance {index}: b64 must be a base64 string of a PNG or JPEG image")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)))
        image.load()
    except (binascii.Error, ValueError):
        raise InvalidInput(f"instance {index}: b64 is not valid base64") from None
    except (UnidentifiedImageError, OSError):
        raise InvalidInput(f"instance {index}: b64 does not decode to a PNG or JPEG image") from None
    if image.size != (IMAGE_SIDE, IMAGE_SIDE):
        raise InvalidInput(f"instance {index}: the image is {image.size[0]}×{image.size[1]}; expected 28×28 pixels")
    return np.asarray(image.convert("L"), dtype=np.float32).reshape(-1)


def images_from_instances(instances: Any, max_instances: int = MAX_INSTANCES) -> np.ndarray:
    """v1 `instances` → float32 [N, 784] on the 0–1 scale, or InvalidInput."""
    if not isinstance(instances, list):
        raise InvalidInput('expected {"instances": [...]} with a list of images')
    if not instances:
        raise InvalidInput("instances is empty; send at least one image")
    if len(instances) > max_instances:
        raise InvalidInput(f"{len(instances)} instances in one request; the limit is {max_instances} (split the batch)")
    if any(isinstance(instance, dict) for instance in instances):  # base64 images (not the hot path)
        rows = []
        for index, instance in enumerate(instances):
            where = f"instance {index}"
            if isinstance(instance, dict):
                if set(instance) != {"b64"}:
                    raise InvalidInput(f'{where}: an object must be {{"b64": "<base64 PNG/JPEG>"}}')
                raw = image_from_base64(instance["b64"], index)[None]
            else:
                raw = _numeric_array([instance], where)
            rows.append(images_from_array(raw, where)[0])
        return np.stack(rows)
    return images_from_array(_numeric_array(instances, "instances"), "instances")


def _numeric_array(values: list, where: str) -> np.ndarray:
    try:
        array = np.asarray(values)
    except ValueError:  # ragged nesting
        raise InvalidInput(f"{where} are not all the same shape; each image must be 784 numbers or 28 rows of 28") from None
    if array.dtype == object:
        raise InvalidInput(f"{where} are not all the same shape; each image must be 784 numbers or 28 rows of 28")
    if array.dtype.kind == "b":
        raise InvalidInput(f"{where} must contain only numbers (pixel values), got booleans")
    return array


V2_DATATYPES = {"FP32": np.float32, "UINT8": np.uint8}


def images_from_infer_request(request: InferRequest, max_instances: int = MAX_INSTANCES) -> np.ndarray:
    """v2 request → float32 [N, 784] on the 0–1 scale, or InvalidInput."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"expected exactly one input tensor ({INPUT_NAME!r}), got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.datatype not in V2_DATATYPES:
        raise InvalidInput(f"input {tensor.name!r} has datatype {tensor.datatype}; expected FP32 or UINT8")
    shape = [int(size) for size in tensor.shape]
    if len(shape) not in (2, 3, 4) or shape[0] < 1:
        raise InvalidInput(f"input {tensor.name!r} has shape {shape}; expected [N, 784], [N, 28, 28] or [N, 1, 28, 28]")
    if shape[0] > max_instances:
        raise InvalidInput(f"{shape[0]} images in one request; the limit is {max_instances} (split the batch)")
    expected = int(np.prod(shape))
    data = tensor.data if tensor._raw_data is None else None
    if data is not None:
        flat = np.asarray(data)
        if flat.dtype.kind not in "iuf" or flat.dtype.kind == "b":
            raise InvalidInput(f"input {tensor.name!r} data must be numbers, got {flat.dtype.name} values")
        if flat.size != expected:
            raise InvalidInput(f"input {tensor.name!r} has {flat.size} values but shape {shape} needs {expected}")
        if tensor.datatype == "UINT8" and (flat.dtype.kind == "f" or (flat.size and (flat.min() < 0 or flat.max() > 255))):
            raise InvalidInput(f"input {tensor.name!r} is UINT8 but holds values outside the integers 0–255")
        array = flat.reshape(shape)
    else:
        try:
            array = tensor.as_numpy()
        except ValueError as error:
            raise InvalidInput(f"input {tensor.name!r}: binary data does not match shape {shape} ({error})") from None
    return images_from_array(np.asarray(array, dtype=V2_DATATYPES[tensor.datatype]), f"input {tensor.name!r}")


class MnistClassifier(Model):
    """The 784 → 128 → 10 MLP behind KServe's v1 and v2 protocols."""

    def __init__(self, name: str, storage_uri: str, max_instances: int = MAX_INSTANCES):
        super().__init__(name)
        self.storage_uri = storage_uri
        self.max_instances = max_instances
        self.layers: tuple[np.ndarray, ...] = ()
        self.model_metadata: dict = {}

    def load(self) -> bool:
        """Fetch the version with KServe's storage code, check the sha256, load weights_only, warm up."""
        from kserve_storage import Storage

        from mnist_kf.model import load_weights
        from mnist_kf.storage import file_digest

        model_dir = Path(Storage.download(self.storage_uri))
        model_path, metadata_path = model_dir / "model.pt", model_dir / "metadata.json"
        for path in (model_path, metadata_path):
            if not path.is_file():
                raise ModelLoadError(f"{path.name} is missing from {self.storage_uri}: a model version holds "
                                     "model.pt and metadata.json")
        self.model_metadata = json.loads(metadata_path.read_text())
        digest = file_digest(model_path)
        if digest != self.model_metadata.get("model_sha256"):
            raise ModelLoadError(f"refusing to serve {self.storage_uri}: model.pt has sha256 {digest} but "
                                 f"metadata.json expects {self.model_metadata.get('model_sha256')}")
        network = load_weights(model_path)  # torch.load(weights_only=True), shapes checked
        first, second = network[0], network[2]
        # the forward pass runs in NumPy on these float32 arrays: for a 100k-parameter MLP,
        # torch's per-operation dispatch costs more than the arithmetic (bench/bench_serve.py)
        self.layers = tuple(np.ascontiguousarray(tensor.detach().numpy(), dtype=np.float32)
                            for tensor in (first.weight.T, first.bias, second.weight.T, second.bias))
        self._forward(np.zeros((64, IMAGE_SIDE * IMAGE_SIDE), dtype=np.float32))  # warm up BLAS and allocator
        self.ready = True
        return self.ready

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities [N, 10] for 0–1 pixels [N, 784]: standardise as in training, one batched pass."""
        weight1, bias1, weight2, bias2 = self.layers
        inputs = (pixels - np.float32(config.PIXEL_MEAN)) / np.float32(config.PIXEL_STD)
        hidden = np.maximum(inputs @ weight1 + bias1, 0.0)
        logits = hidden @ weight2 + bias2
        logits -= logits.max(axis=1, keepdims=True)
        exponentials = np.exp(logits)
        return exponentials / exponentials.sum(axis=1, keepdims=True)

    def predict(self, payload: dict | InferRequest, headers: dict[str, str] | None = None) -> dict | InferResponse:
        if isinstance(payload, InferRequest):
            probabilities = self._forward(images_from_infer_request(payload, self.max_instances))
            labels = probabilities.argmax(axis=1)
            outputs = [InferOutput("predictions", [len(labels)], "INT64", labels.tolist()),
                       InferOutput("probabilities", list(probabilities.shape), "FP32", probabilities.reshape(-1).tolist())]
            response_id = payload.id or str(uuid.uuid4())  # the request id is optional in the protocol
            return InferResponse(response_id=response_id, model_name=self.name, infer_outputs=outputs)
        if isinstance(payload, (bytes, str)):  # a non-JSON Content-Type (curl -d's default): KServe passes it raw
            try:
                payload = json.loads(payload)
            except ValueError as error:
                raise InvalidInput(f'the request body is not valid JSON ({error}); expected {{"instances": [...]}}') from None
        if not isinstance(payload, dict) or "instances" not in payload:
            raise InvalidInput('expected a JSON object {"instances": [...]} (v1 protocol)')
        probabilities = self._forward(images_from_instances(payload["instances"], self.max_instances))
        response = {"predictions": probabilities.argmax(axis=1).tolist()}
        parameters = payload.get("parameters") or {}
        if isinstance(parameters, dict) and parameters.get("probabilities") is True:
            response["probabilities"] = probabilities.tolist()
        return response

    def get_input_types(self) -> list[dict]:
        # UINT8 and the shapes [-1, 28, 28] / [-1, 1, 28, 28] are accepted too (README)
        return [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, IMAGE_SIDE * IMAGE_SIDE]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "predictions", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]


class LocalModelServer:
    """`python -m mnist_kf.serve` as a child process on a free loopback port.

    Used by 04_serve, the tests and the benchmark. It stops when `stop()` is called, when the
    `with` block ends, when this Python process exits, or (Linux) when it is killed.
    """

    def __init__(self, storage_uri: str, model_name: str = config.MODEL_NAME, log_path: str | os.PathLike | None = None,
                 extra_args: tuple[str, ...] = (), environment: dict[str, str] | None = None):
        self.storage_uri, self.model_name = str(storage_uri), model_name
        self.log_path = Path(log_path) if log_path else config.OUTPUT_DIR / "logs" / f"{model_name}-server.log"
        self.extra_args, self.environment = extra_args, environment
        self.port: int | None = None
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def predict_url(self) -> str:
        return f"{self.url}/v1/models/{self.model_name}:predict"

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.model_name}/infer"

    def start(self, timeout: float = 120) -> "LocalModelServer":
        """Start the server and wait until the model reports ready; its log goes to `log_path`."""
        import atexit
        import subprocess

        from mnist_kf.processes import dies_with_this_process, free_port

        self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mnist_kf.serve", f"--model_name={self.model_name}",
                   f"--storage_uri={self.storage_uri}", f"--http_port={self.port}", "--enable_grpc=false",
                   *self.extra_args]
        with open(self.log_path, "w") as log:  # a file, not a pipe: a full pipe would block the server
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=dies_with_this_process(),
                                            env={**os.environ, **(self.environment or {})})
        atexit.register(self.stop)
        try:
            wait_until_ready(self.url, self.model_name, self.process, timeout)
        except ModelLoadError as error:
            raise ModelLoadError(f"{error}: {self.log_path.read_text().strip().splitlines()[-1:]}") from None
        except TimeoutError as error:
            self.stop()
            raise TimeoutError(f"{error} (log: {self.log_path})") from None
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=40)  # KServe drains in-flight requests first
            except Exception:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "LocalModelServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def wait_until_ready(url: str, model_name: str, process, timeout: float = 120) -> None:
    """Poll a KServe server's `GET /v1/models/<name>` until the model reports ready; raise
    ModelLoadError if `process` (the server) exits first, TimeoutError after `timeout` s."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ModelLoadError(f"the model server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models/{model_name}", timeout=2) as response:
                if json.loads(response.read()).get("ready"):
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"the model server at {url} was not ready after {timeout} s")


def measure_latency(url: str, body: bytes, requests: int = 300) -> np.ndarray:
    """Milliseconds of `requests` sequential POSTs of `body` to `url` (one connection)."""
    import time

    import httpx

    latencies = np.empty(requests)
    with httpx.Client(timeout=30) as client:
        for index in range(requests):
            started = time.perf_counter()
            client.post(url, content=body, headers={"Content-Type": "application/json"}).raise_for_status()
            latencies[index] = (time.perf_counter() - started) * 1000
    return latencies


def inference_service_url(name: str = config.MODEL_NAME, namespace: str | None = None) -> str:
    """The URL of a Ready InferenceService on the cluster (KServeClient)."""
    from kserve import KServeClient

    from mnist_kf.tune import default_namespace

    status = KServeClient().get(name, namespace=namespace or default_namespace()).get("status", {})
    if not status.get("url"):
        raise DeploymentError(f"InferenceService {name} has no URL yet (not Ready)")
    return status["url"]


def build_parser() -> argparse.ArgumentParser:
    """KServe's model-server flags plus --storage_uri and --max_instances."""
    from kserve import model_server

    parser = argparse.ArgumentParser(parents=[model_server.parser], prog="python -m mnist_kf.serve",
                                     description="Serve the MNIST classifier with KServe (v1 and v2 protocols).")
    parser.add_argument("--storage_uri", required=True,
                        help="a model version: local folder or gs://…/mnist-model/vN (model.pt + metadata.json)")
    parser.add_argument("--max_instances", type=int, default=MAX_INSTANCES, help="most images per request")
    parser.add_argument("--request_logging", action="store_true",
                        help="log every request (access, kserve.trace timing and latency lines); off by default: "
                             "they cost about a fifth of the throughput, and /metrics records latency anyway")
    parser.set_defaults(enable_latency_logging=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, _ = build_parser().parse_known_args(argv)
    model = MnistClassifier(args.model_name, args.storage_uri, args.max_instances)
    try:
        model.load()
    except Exception as error:  # kserve-storage raises bare Exceptions for unreachable URIs
        logging.getLogger("mnist_kf.serve").debug("load failed", exc_info=True)
        print(f"error: cannot serve {args.storage_uri}: {error}", file=sys.stderr)
        return 1
    server = ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
                         enable_grpc=args.enable_grpc, enable_latency_logging=args.enable_latency_logging)
    if not args.request_logging:  # after ModelServer configured logging; warnings and errors still log
        for logger_name in ("kserve.trace", "uvicorn.access"):
            logging.getLogger(logger_name).setLevel(logging.WARNING)
    server.start([model])
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
