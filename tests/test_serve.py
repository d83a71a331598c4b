"""The KServe predictor, started for real on a loopback port: v1/v2 contracts, accuracy over
HTTP, every class of bad input, health, and refusing a model that fails its checksum."""

from __future__ import annotations

import base64
import io
import json
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from mnist_kf import config, data
from mnist_kf.model import load_weights, predict
from mnist_kf.serve import MAX_INSTANCES, LocalModelServer, ModelLoadError

NAME = "mnist-classifier"
SEED_INPUT = config.SEED_INPUT


def http(method: str, url: str, body: bytes | dict | None = None,
         content_type: str = "application/json") -> tuple[int, dict]:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def model_version(tmp_path_factory, raw_md5):
    """A trained model version folder (model.pt + metadata.json)."""
    from mnist_kf.train import TrainConfig, train

    output = tmp_path_factory.mktemp("version")
    train(TrainConfig(epochs=2, batch_size=32, lr=0.05), output, log=lambda _: None, progress=False)
    return output


@pytest.fixture(scope="module")
def server(model_version, tmp_path_factory):
    """The real entrypoint, `python -m mnist_kf.serve`, on a free loopback port."""
    with LocalModelServer(str(model_version), NAME, tmp_path_factory.mktemp("server") / "server.log") as running:
        assert http("GET", f"{running.url}/v1/models/{NAME}")[1]["ready"] is True
        yield running.url


def healthy(url: str) -> bool:
    status, _ = http("GET", f"{url}/v2/health/ready")
    code, body = http("POST", f"{url}/v1/models/{NAME}:predict", json.loads(SEED_INPUT.read_text()))
    return status == 200 and code == 200 and body == {"predictions": [7]}


# ---------------------------------------------------------------- contracts


def test_the_seed_request_returns_predictions_7(server):
    status, body = http("POST", f"{server}/v1/models/{NAME}:predict", SEED_INPUT.read_bytes())
    assert (status, body) == (200, {"predictions": [7]})


def test_v1_accepts_flat_nested_base64_and_unit_scale_images_alike(server):
    images, labels = data.load_mnist(train=False)
    digit = images[0]
    png = io.BytesIO()
    Image.fromarray(digit.numpy()).save(png, format="PNG")
    instances = [digit.reshape(-1).tolist(), digit.tolist(), {"b64": base64.b64encode(png.getvalue()).decode()},
                 (digit.float() / 255).reshape(-1).tolist()]
    status, body = http("POST", f"{server}/v1/models/{NAME}:predict",
                        {"instances": instances, "parameters": {"probabilities": True}})
    assert status == 200 and body["predictions"] == [7, 7, 7, 7]
    probabilities = np.array(body["probabilities"])
    assert probabilities.shape == (4, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert np.allclose(probabilities, probabilities[0], atol=1e-6)  # the same image, however it was sent


@pytest.mark.parametrize("datatype,shape", [("FP32", [3, 784]), ("UINT8", [3, 28, 28]), ("FP32", [3, 1, 28, 28])])
def test_v2_infer_returns_labels_and_probabilities(server, datatype, shape):
    images, labels = data.load_mnist(train=False)
    batch = images[:3].numpy().astype(np.float32 if datatype == "FP32" else np.uint8)
    request = {"id": "r1", "inputs": [{"name": "images", "datatype": datatype, "shape": shape,
                                        "data": batch.reshape(-1).tolist()}]}
    status, body = http("POST", f"{server}/v2/models/{NAME}/infer", request)
    assert status == 200, body
    outputs = {output["name"]: output for output in body["outputs"]}
    assert outputs["predictions"]["datatype"] == "INT64" and outputs["predictions"]["shape"] == [3]
    assert outputs["predictions"]["data"] == labels[:3].tolist()  # 7, 2, 1
    assert outputs["probabilities"]["shape"] == [3, 10]
    assert body["id"] == "r1" and body["model_name"] == NAME


def test_v2_request_without_an_id_gets_a_generated_one(server):
    images, _ = data.load_mnist(train=False)
    request = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28],
                           "data": images[0].reshape(-1).tolist()}]}
    status, body = http("POST", f"{server}/v2/models/{NAME}/infer", request)
    assert status == 200, body
    assert body["outputs"][0]["data"] == [7] and len(body["id"]) == 36


def test_v2_metadata_describes_inputs_and_outputs(server):
    status, body = http("GET", f"{server}/v2/models/{NAME}")
    assert status == 200
    assert body["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 784]}]
    assert [output["name"] for output in body["outputs"]] == ["predictions", "probabilities"]


def test_liveness_and_readiness(server):
    assert http("GET", f"{server}/v2/health/live") == (200, {"live": True})
    assert http("GET", f"{server}/v2/health/ready") == (200, {"ready": True})
    assert http("GET", f"{server}/v1/models/{NAME}")[1] == {"name": NAME, "ready": True}


def test_http_predictions_on_the_full_test_set_equal_offline_predictions(server, model_version):
    images, labels = data.load_mnist(train=False)
    offline = predict(load_weights(model_version / "model.pt"), images)
    served = []
    for start in range(0, len(images), MAX_INSTANCES):
        batch = images[start : start + MAX_INSTANCES].reshape(-1, 784).tolist()
        status, body = http("POST", f"{server}/v1/models/{NAME}:predict", {"instances": batch})
        assert status == 200
        served.extend(body["predictions"])
    assert torch.equal(torch.tensor(served), offline)
    assert (torch.tensor(served) == labels).float().mean().item() == (offline == labels).float().mean().item()


# ---------------------------------------------------------------- bad input


def _v2(datatype="FP32", shape=(1, 784), data=None, name="images"):
    values = data if data is not None else [0] * int(np.prod(shape))
    return {"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": values}]}


ZEROS = [0] * 784
BAD_V1 = [
    ("wrong shape", {"instances": [[1, 2, 3]]}, "has shape [1, 3]; expected [N, 784]"),
    ("ragged images", {"instances": [ZEROS, [0] * 783]}, "are not all the same shape"),
    ("strings", {"instances": [["a"] * 784]}, "must contain only numbers"),
    ("numeric strings", {"instances": [["1"] * 784]}, "must contain only numbers"),
    ("booleans", {"instances": [[True] * 784]}, "got booleans"),
    ("negative pixels", {"instances": [[-1] + ZEROS[1:]]}, "expected 0–255 (raw MNIST) or 0–1"),
    ("pixels above 255", {"instances": [[256] + ZEROS[1:]]}, "expected 0–255 (raw MNIST) or 0–1"),
    ("empty instances", {"instances": []}, "instances is empty"),
    ("too many instances", {"instances": [ZEROS] * (MAX_INSTANCES + 1)}, f"the limit is {MAX_INSTANCES}"),
    ("instances not a list", {"instances": "7"}, "list"),
    ("no instances key", {"inputs": [ZEROS]}, 'expected a JSON object {"instances": [...]}'),
    ("undecodable base64", {"instances": [{"b64": "not base64!"}]}, "b64 is not valid base64"),
    ("base64 of no image", {"instances": [{"b64": base64.b64encode(b"hello").decode()}]}, "does not decode to a PNG or JPEG"),
    ("unknown object", {"instances": [{"pixels": ZEROS}]}, 'an object must be {"b64"'),
]


@pytest.mark.parametrize("case,body,message", BAD_V1, ids=[case for case, _, _ in BAD_V1])
def test_bad_v1_input_is_a_400_with_a_message_and_the_server_stays_up(server, case, body, message):
    status, answer = http("POST", f"{server}/v1/models/{NAME}:predict", body)
    assert status == 400 and message in answer["error"], answer
    assert healthy(server)


NON_FINITE = [
    ("malformed JSON", b'{"instances": [[1, 2', "unexpected end of data"),
    ("NaN", b'{"instances": [[NaN' + b", 0" * 783 + b"]]}", "expected a JSON value"),
    ("infinity", b'{"instances": [[1e999' + b", 0" * 783 + b"]]}", "number is infinity"),
]


@pytest.mark.parametrize("case,raw,detail", NON_FINITE, ids=[case for case, _, _ in NON_FINITE])
def test_malformed_and_non_finite_json_is_a_400_from_kserves_parser(server, case, raw, detail):
    """With Content-Type: application/json KServe parses the body itself (strict JSON: no NaN/inf)."""
    status, answer = http("POST", f"{server}/v1/models/{NAME}:predict", raw)
    assert status == 400 and "Unrecognized request format" in answer["error"] and detail in answer["error"], answer
    assert healthy(server)


@pytest.mark.parametrize("case,raw,message", [
    ("malformed JSON", NON_FINITE[0][1], "the request body is not valid JSON"),
    ("NaN", NON_FINITE[1][1], "contains NaN or infinite values"),
])
def test_bad_form_bodies_are_400s_from_the_predictor(server, case, raw, message):
    """curl -d without a JSON Content-Type: the body reaches the predictor unparsed, which parses it."""
    status, answer = http("POST", f"{server}/v1/models/{NAME}:predict", raw, "application/x-www-form-urlencoded")
    assert status == 400 and message in answer["error"], answer
    assert healthy(server)


def test_the_seed_curl_without_a_content_type_still_works(server):
    status, body = http("POST", f"{server}/v1/models/{NAME}:predict", SEED_INPUT.read_bytes(),
                        "application/x-www-form-urlencoded")
    assert (status, body) == (200, {"predictions": [7]})


def test_a_base64_image_of_the_wrong_size_is_a_400(server):
    png = io.BytesIO()
    Image.new("L", (32, 32)).save(png, format="PNG")
    status, answer = http("POST", f"{server}/v1/models/{NAME}:predict",
                          {"instances": [{"b64": base64.b64encode(png.getvalue()).decode()}]})
    assert status == 400 and "the image is 32×32; expected 28×28" in answer["error"]
    assert healthy(server)


BAD_V2 = [
    ("dtype", _v2(datatype="INT32"), "has datatype INT32; expected FP32 or UINT8"),
    ("shape", _v2(shape=(1, 785)), "has shape [1, 785]"),
    ("rank", _v2(shape=(784,)), "has shape [784]"),
    ("data length", _v2(shape=(2, 784), data=ZEROS), "has 784 values but shape [2, 784] needs 1568"),
    ("uint8 range", _v2(datatype="UINT8", data=[300] + ZEROS[1:]), "outside the integers 0–255"),
    ("fp32 range", _v2(data=[-5.0] + ZEROS[1:]), "expected 0–255 (raw MNIST) or 0–1"),
    ("strings", _v2(data=["x"] * 784), "data must be numbers"),
    ("two inputs", {"inputs": _v2()["inputs"] * 2}, "expected exactly one input tensor"),
    ("too many", _v2(shape=(MAX_INSTANCES + 1, 784), data=[0] * 784 * (MAX_INSTANCES + 1)), f"the limit is {MAX_INSTANCES}"),
]


@pytest.mark.parametrize("case,body,message", BAD_V2, ids=[case for case, _, _ in BAD_V2])
def test_bad_v2_input_is_a_400_with_a_message_and_the_server_stays_up(server, case, body, message):
    status, answer = http("POST", f"{server}/v2/models/{NAME}/infer", body)
    assert status == 400 and message in answer.get("error", ""), answer
    assert healthy(server)


# ---------------------------------------------------------------- loading


def test_a_model_failing_its_checksum_is_refused_with_a_clear_error(model_version, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(model_version, tampered)
    with open(tampered / "model.pt", "ab") as handle:
        handle.write(b"\0")
    server = LocalModelServer(str(tampered), NAME, tmp_path / "server.log")
    with pytest.raises(ModelLoadError, match="exited with code 1"):
        server.start()
    log = (tmp_path / "server.log").read_text()
    assert "refusing to serve" in log and "sha256" in log


def test_a_missing_model_version_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="exited with code 1"):
        LocalModelServer(str(tmp_path / "empty"), NAME, tmp_path / "server.log").start()
    assert "model.pt is missing" in (tmp_path / "server.log").read_text()


def test_loads_a_gs_version_through_kserve_storage(model_version, gcs_emulator, tmp_path):
    from mnist_kf.storage import ModelStore
    from tests.conftest import GCS_TEST_BUCKET

    stored = ModelStore(f"gs://{GCS_TEST_BUCKET}/serve-test").upload(model_version)
    with LocalModelServer(stored.uri, NAME, tmp_path / "server.log", environment={"STORAGE_EMULATOR_HOST": gcs_emulator}) as running:
        status, body = http("POST", running.predict_url, SEED_INPUT.read_bytes())
    assert (status, body) == (200, {"predictions": [7]})


@pytest.mark.parametrize("ending", ["exception", "sigkill"])
def test_the_local_server_never_outlives_the_process_that_started_it(model_version, tmp_path, ending):
    """04_serve's guarantee: a failing cell, a dead kernel — the model server stops either way."""
    import os
    import signal
    import subprocess
    import sys
    import time

    last_line = "raise RuntimeError('a cell failed')" if ending == "exception" else "os.kill(os.getpid(), signal.SIGKILL)"
    script = (
        "import os, signal, sys\n"
        "from mnist_kf.serve import LocalModelServer\n"
        f"server = LocalModelServer({str(model_version)!r}, log_path={str(tmp_path / 'server.log')!r}).start()\n"
        "print(server.process.pid, flush=True)\n"
        f"{last_line}\n"
    )
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    server_pid = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and os.path.exists(f"/proc/{server_pid}"):
        if open(f"/proc/{server_pid}/stat").read().split()[2] == "Z":
            break  # exited, waiting to be reaped by init
        time.sleep(0.2)
    alive = os.path.exists(f"/proc/{server_pid}") and open(f"/proc/{server_pid}/stat").read().split()[2] != "Z"
    if alive:
        os.kill(server_pid, signal.SIGKILL)
    assert not alive, f"the model server outlived its parent ({ending})"
