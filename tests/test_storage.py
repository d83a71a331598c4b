"""The versioned model store, on a local folder and on the GCS emulator (no client mocks)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import uuid

import pytest

from mnist_kf.storage import ModelStore, StorageError, gcs_client, parse_gcs_uri
from tests.conftest import GCS_TEST_BUCKET


@pytest.fixture(params=["local", "gcs"])
def store_uri(request, tmp_path):
    """A fresh, empty store: a temporary folder, or a fresh prefix in the emulated bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("gcs_emulator")
    return f"gs://{GCS_TEST_BUCKET}/runs/{uuid.uuid4().hex}"


def test_uploads_get_increasing_versions_with_their_metadata(store_uri, trained_model_dir):
    store = ModelStore(store_uri)
    first, second = store.upload(trained_model_dir), store.upload(trained_model_dir)
    assert (first.version, second.version) == (1, 2)
    assert first.uri.endswith("/mnist-model/v1") and second.uri.endswith("/mnist-model/v2")
    assert store.versions() == [1, 2] and store.latest() == 2
    metadata = store.metadata("v1")
    assert {"lr", "batch_size", "test_accuracy", "test_loss", "model_sha256", "version", "uploaded_at"} <= set(metadata)
    assert metadata["version"] == 1 and store.metadata()["version"] == 2


def test_download_checks_the_sha256(store_uri, trained_model_dir, tmp_path):
    store = ModelStore(store_uri)
    store.upload(trained_model_dir)
    downloaded = store.download(tmp_path / "download", "latest")
    content = (tmp_path / "download" / "model.pt").read_bytes()
    assert hashlib.sha256(content).hexdigest() == downloaded.metadata["model_sha256"]
    assert content == (trained_model_dir / "model.pt").read_bytes()


def test_a_corrupted_stored_model_is_refused_on_download(store_uri, trained_model_dir, tmp_path):
    store = ModelStore(store_uri)
    version = store.upload(trained_model_dir)
    # corrupt the stored bytes behind the store's back
    if store_uri.startswith("gs://"):
        bucket, prefix = parse_gcs_uri(version.uri)
        gcs_client().bucket(bucket).blob(f"{prefix}/model.pt").upload_from_string(b"not the model")
    else:
        with open(os.path.join(version.uri, "model.pt"), "ab") as handle:
            handle.write(b"\0")
    with pytest.raises(StorageError, match="checksum mismatch .* the stored model is corrupt"):
        store.download(tmp_path / "download", 1)
    assert not (tmp_path / "download" / "model.pt").exists()


def test_an_existing_version_is_never_overwritten(store_uri, trained_model_dir):
    store = ModelStore(store_uri)
    store.upload(trained_model_dir)
    original = store.metadata(1)
    # another writer that believes v1 is free still cannot replace it
    assert store._files.create_version("mnist-model", 1, {"model.pt": b"x", "metadata.json": b"{}"}) is False
    assert store.metadata(1) == original
    assert store.upload(trained_model_dir).version == 2


def test_concurrent_uploads_all_land_on_distinct_versions(store_uri, trained_model_dir):
    results, errors = [], []

    def upload():
        try:
            results.append(ModelStore(store_uri).upload(trained_model_dir).version)
        except Exception as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results) == [1, 2, 3, 4, 5, 6]  # one wins each number, nothing lost
    store = ModelStore(store_uri)
    assert store.versions() == [1, 2, 3, 4, 5, 6] and store.latest() == 6


def test_a_model_that_does_not_match_its_metadata_is_not_uploaded(store_uri, trained_model_dir, tmp_path):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / "model.pt").write_bytes((trained_model_dir / "model.pt").read_bytes() + b"\0")
    (tampered / "metadata.json").write_text((trained_model_dir / "metadata.json").read_text())
    store = ModelStore(store_uri)
    with pytest.raises(StorageError, match="does not match its metadata"):
        store.upload(tampered)
    assert store.versions() == []


def test_unknown_versions_and_empty_stores_are_clear_errors(store_uri, tmp_path):
    store = ModelStore(store_uri)
    with pytest.raises(StorageError, match="no model versions in"):
        store.download(tmp_path / "d")
    with pytest.raises(StorageError, match="version must be 'latest', N or 'vN'"):
        store.metadata("newest")


def test_other_uri_schemes_are_refused():
    with pytest.raises(StorageError, match="local folder or gs://bucket/prefix"):
        ModelStore("s3://bucket/models")


def test_missing_credentials_are_a_clear_error(tmp_path):
    """Without the emulator and without credentials, GCS access fails with a message saying what to set."""
    script = (
        "from mnist_kf.storage import ModelStore, StorageError\n"
        "try:\n"
        "    ModelStore('gs://some-bucket/models')\n"
        "except StorageError as error:\n"
        "    print(error)\n"
    )
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")}
    # no gcloud config, and no probe of the GCE metadata server (no traffic leaves loopback)
    environment.update(CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), NO_GCE_CHECK="True",
                       GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "missing-key.json"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=120)
    assert "no Google Cloud credentials found: set GOOGLE_APPLICATION_CREDENTIALS" in result.stdout, result.stderr
    assert "missing-key.json" in result.stdout


def test_the_store_cli_uploads_lists_and_downloads(tmp_path, trained_model_dir, capsys):
    from mnist_kf.storage import main

    store = str(tmp_path / "store")
    assert main(["--store", store, "upload", str(trained_model_dir)]) == 0
    assert main(["--store", store, "list"]) == 0
    assert main(["--store", store, "download", str(tmp_path / "out"), "--version", "v1"]) == 0
    out = capsys.readouterr().out
    assert "mnist-model/v1" in out and "v1  lr=0.05" in out
    assert (tmp_path / "out" / "model.pt").read_bytes() == (trained_model_dir / "model.pt").read_bytes()
    assert main(["--store", store, "download", str(tmp_path / "x"), "--version", "v9"]) == 1
    assert "version v9 does not exist" in capsys.readouterr().err
