"""Files and buckets: atomic writes, checksums, the Google Cloud Storage client and the
versioned model store.

Everything that writes an artifact goes through `atomic_write` (or a create-only upload),
so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Iterator


class StorageError(RuntimeError):
    """A store could not be read or written (missing credentials, bad URI, checksum)."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (md5 for MNIST's published sums, sha256 for models)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_gcs_uri(uri: str) -> tuple[str, str]:
    """Split `gs://bucket/some/prefix` into (`bucket`, `some/prefix`)."""
    if not uri.startswith("gs://") or len(uri) <= 5 or uri[5] == "/":
        raise StorageError(f"expected a URI of the form gs://bucket/prefix, got {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def gcs_client():
    """A google-cloud-storage client from the environment's credentials.

    Uses the GCS emulator when `STORAGE_EMULATOR_HOST` is set; otherwise Application
    Default Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, workload identity, gcloud).
    """
    from google.cloud import storage as gcs

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        project = os.environ.get("GOOGLE_CLOUD_PROJECT", "local-emulator")
        return gcs.Client(project=project, credentials=AnonymousCredentials())
    try:
        return gcs.Client()
    except Exception as error:  # google.auth raises DefaultCredentialsError, OSError, …
        raise StorageError(
            "no Google Cloud credentials found: set GOOGLE_APPLICATION_CREDENTIALS to a "
            "service-account key file, run `gcloud auth application-default login`, or run "
            f"in a pod whose service account has access to the bucket ({error})"
        ) from error


# ---------------------------------------------------------------- the versioned model store

MODEL_FILE = "model.pt"
METADATA_FILE = "metadata.json"
LATEST_POINTER = "latest"
VERSION_PATTERN = re.compile(r"^v(\d+)$")


@dataclass
class ModelVersion:
    """One stored version: its number, URI (…/mnist-model/vN) and metadata."""

    version: int
    uri: str
    metadata: dict


class _LocalFiles:
    """Store primitives on a local folder: create-only writes by atomic rename."""

    def __init__(self, root: Path):
        self.root = root

    def uri(self, relative: str) -> str:
        return str(self.root / relative)

    def claimed_versions(self, model_name: str) -> set[int]:
        folder = self.root / model_name
        names = os.listdir(folder) if folder.is_dir() else []
        return {int(m.group(1)) for m in map(VERSION_PATTERN.match, names) if m}

    def is_complete(self, model_name: str, version: int) -> bool:
        return (self.root / model_name / f"v{version}" / METADATA_FILE).is_file()

    def create_version(self, model_name: str, version: int, files: dict[str, bytes]) -> bool:
        """Write all files under a temporary name, then rename it to vN; False if vN exists."""
        folder = self.root / model_name
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
        try:
            for name, content in files.items():
                with open(staging / name, "wb") as handle:
                    handle.write(content)
                    handle.flush()
                    os.fsync(handle.fileno())
            try:
                os.rename(staging, folder / f"v{version}")  # fails when vN exists and is not empty
            except OSError as error:
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    return False
                raise
            return True
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def read(self, relative: str) -> bytes:
        path = self.root / relative
        if not path.is_file():
            raise StorageError(f"{path} does not exist")
        return path.read_bytes()

    def raise_latest(self, model_name: str, version: int) -> None:
        """Point `latest` at `version` unless it already points at a newer one (file lock)."""
        import fcntl

        folder = self.root / model_name
        with open(folder / ".latest.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            pointer = folder / LATEST_POINTER
            current = int(pointer.read_text()) if pointer.is_file() else 0
            if version > current:
                with atomic_write(pointer, "w") as handle:
                    handle.write(f"{version}\n")

    def latest(self, model_name: str) -> int | None:
        pointer = self.root / model_name / LATEST_POINTER
        return int(pointer.read_text()) if pointer.is_file() else None


class _GcsFiles:
    """Store primitives on GCS: create-only writes with the precondition if_generation_match=0."""

    def __init__(self, bucket_name: str, prefix: str):
        from google.api_core import exceptions

        self.exceptions = exceptions
        self.bucket_name, self.prefix = bucket_name, prefix
        self.bucket = gcs_client().bucket(bucket_name)

    def _name(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def uri(self, relative: str) -> str:
        return f"gs://{self.bucket_name}/{self._name(relative)}"

    def claimed_versions(self, model_name: str) -> set[int]:
        prefix = self._name(model_name) + "/"
        try:
            names = [blob.name[len(prefix):].split("/")[0] for blob in self.bucket.list_blobs(prefix=prefix)]
        except self.exceptions.NotFound:
            raise StorageError(f"bucket gs://{self.bucket_name} does not exist") from None
        except self.exceptions.Forbidden as error:
            raise StorageError(f"no permission to list gs://{self.bucket_name}/{prefix}: {error}") from None
        return {int(m.group(1)) for m in map(VERSION_PATTERN.match, names) if m}

    def is_complete(self, model_name: str, version: int) -> bool:
        return self.bucket.blob(self._name(f"{model_name}/v{version}/{METADATA_FILE}")).exists()

    def create_version(self, model_name: str, version: int, files: dict[str, bytes]) -> bool:
        """Upload each file create-only; the first (the model) claims vN. False if vN was taken."""
        for index, (name, content) in enumerate(files.items()):
            blob = self.bucket.blob(self._name(f"{model_name}/v{version}/{name}"))
            try:
                blob.upload_from_string(content, if_generation_match=0)
            except self.exceptions.PreconditionFailed:
                if index == 0:
                    return False
                raise StorageError(f"{blob.name} already exists: version v{version} is being written twice") from None
        return True

    def read(self, relative: str) -> bytes:
        try:
            return self.bucket.blob(self._name(relative)).download_as_bytes()
        except self.exceptions.NotFound:
            raise StorageError(f"{self.uri(relative)} does not exist") from None

    def raise_latest(self, model_name: str, version: int) -> None:
        """Compare-and-swap on the pointer's generation until it names `version` or newer."""
        blob_name = self._name(f"{model_name}/{LATEST_POINTER}")
        for _ in range(20):
            blob = self.bucket.get_blob(blob_name)
            current, generation = (int(blob.download_as_text()), blob.generation) if blob else (0, 0)
            if version <= current:
                return
            try:
                self.bucket.blob(blob_name).upload_from_string(f"{version}\n", if_generation_match=generation)
                return
            except self.exceptions.PreconditionFailed:
                continue  # someone else moved it: read again
        raise StorageError(f"could not update {self.uri(f'{model_name}/{LATEST_POINTER}')}: too much contention")

    def latest(self, model_name: str) -> int | None:
        blob = self.bucket.get_blob(self._name(f"{model_name}/{LATEST_POINTER}"))
        return int(blob.download_as_text()) if blob else None


class ModelStore:
    """Versioned models at `<store>/<model_name>/v<N>/{model.pt, metadata.json}` plus a `latest` pointer.

    `store_uri` is a local folder or `gs://bucket/prefix`. Versions are numbered 1, 2, …; an
    existing version is never overwritten (two uploads racing for vN: one wins, the other
    takes vN+1), and every download checks the model's sha256 against its metadata.
    """

    def __init__(self, store_uri: str | os.PathLike, model_name: str = "mnist-model"):
        self.store_uri = str(store_uri)
        self.model_name = model_name
        if self.store_uri.startswith("gs://"):
            self._files = _GcsFiles(*parse_gcs_uri(self.store_uri))
        elif "://" in self.store_uri:
            raise StorageError(f"model store must be a local folder or gs://bucket/prefix, got {self.store_uri!r}")
        else:
            self._files = _LocalFiles(Path(self.store_uri).expanduser().resolve())

    def version_uri(self, version: int) -> str:
        return self._files.uri(f"{self.model_name}/v{version}")

    def versions(self) -> list[int]:
        """Complete versions (model and metadata both written), oldest first."""
        return sorted(v for v in self._files.claimed_versions(self.model_name) if self._files.is_complete(self.model_name, v))

    def latest(self) -> int | None:
        return self._files.latest(self.model_name)

    def upload(self, model_dir: str | os.PathLike, extra_metadata: dict | None = None) -> ModelVersion:
        """Store model.pt + metadata.json from `model_dir` as the next version; return it."""
        model_dir = Path(model_dir)
        model_bytes = (model_dir / MODEL_FILE).read_bytes()
        metadata = json.loads((model_dir / METADATA_FILE).read_text())
        digest = hashlib.sha256(model_bytes).hexdigest()
        if metadata.get("model_sha256") != digest:
            raise StorageError(f"{model_dir / MODEL_FILE} has sha256 {digest}, but its metadata.json says "
                               f"{metadata.get('model_sha256')}: refusing to upload a model that does not match its metadata")
        version = max(self._files.claimed_versions(self.model_name), default=0) + 1
        while True:
            record = {**metadata, **(extra_metadata or {}), "version": version, "uri": self.version_uri(version),
                      "uploaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            files = {MODEL_FILE: model_bytes, METADATA_FILE: json.dumps(record, indent=2).encode()}
            if self._files.create_version(self.model_name, version, files):
                break
            version += 1  # taken by a concurrent upload: take the next number
        self._files.raise_latest(self.model_name, version)
        return ModelVersion(version, self.version_uri(version), record)

    def metadata(self, version: int | str = "latest") -> dict:
        return self._read_metadata(self._resolve(version))

    def list(self) -> list[ModelVersion]:
        return [ModelVersion(v, self.version_uri(v), self._read_metadata(v)) for v in self.versions()]

    def download(self, destination: str | os.PathLike, version: int | str = "latest") -> ModelVersion:
        """Copy vN's files into `destination` after checking the model's sha256; return the version."""
        number = self._resolve(version)
        metadata = self._read_metadata(number)
        model_bytes = self._files.read(f"{self.model_name}/v{number}/{MODEL_FILE}")
        digest = hashlib.sha256(model_bytes).hexdigest()
        if digest != metadata.get("model_sha256"):
            raise StorageError(f"checksum mismatch for {self.version_uri(number)}/{MODEL_FILE}: sha256 {digest}, "
                               f"metadata.json expects {metadata.get('model_sha256')}; the stored model is corrupt")
        destination = Path(destination)
        with atomic_write(destination / MODEL_FILE) as handle:
            handle.write(model_bytes)
        with atomic_write(destination / METADATA_FILE, "w") as handle:
            json.dump(metadata, handle, indent=2)
        return ModelVersion(number, self.version_uri(number), metadata)

    def _read_metadata(self, number: int) -> dict:
        """metadata.json of a version number `_resolve` or `versions` produced (no listing)."""
        return json.loads(self._files.read(f"{self.model_name}/v{number}/{METADATA_FILE}"))

    def _resolve(self, version: int | str) -> int:
        if version == "latest":
            latest = self.latest()
            if latest is None:
                raise StorageError(f"no model versions in {self._files.uri(self.model_name)} yet")
            return latest
        if isinstance(version, str):
            match = VERSION_PATTERN.match(version)
            if not match and not version.isdigit():
                raise StorageError(f"version must be 'latest', N or 'vN', got {version!r}")
            version = int(match.group(1) if match else version)
        versions = self.versions()
        if version not in versions:
            raise StorageError(f"version v{version} does not exist in {self._files.uri(self.model_name)} "
                               f"(versions: {', '.join(f'v{v}' for v in versions) or 'none'})")
        return version


def main(argv: list[str] | None = None) -> int:
    """python -m mnist_kf.storage {list,upload,download} [--store URI] …"""
    import argparse
    import sys

    from mnist_kf import config

    parser = argparse.ArgumentParser(prog="python -m mnist_kf.storage", description="The versioned model store.")
    parser.add_argument("--store", default=config.MODEL_STORE_URI, help="a folder or gs://bucket/prefix (default: %(default)s)")
    parser.add_argument("--model-name", default="mnist-model")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="versions with their hyperparameters and test accuracy")
    upload = commands.add_parser("upload", help="store a trainer output folder (model.pt + metadata.json) as the next version")
    upload.add_argument("model_dir")
    download = commands.add_parser("download", help="copy a version (sha256-checked) into a folder")
    download.add_argument("destination")
    download.add_argument("--version", default="latest", help="latest, N or vN (default: latest)")
    args = parser.parse_args(argv)
    try:
        store = ModelStore(args.store, args.model_name)
        if args.command == "list":
            for version in store.list():
                meta = version.metadata
                print(f"v{version.version}  lr={meta.get('lr')}  batch_size={meta.get('batch_size')}  "
                      f"test_accuracy={meta.get('test_accuracy')}  {meta.get('uploaded_at')}  {version.uri}")
        elif args.command == "upload":
            print(store.upload(args.model_dir).uri)
        else:
            print(store.download(args.destination, args.version).uri)
    except (StorageError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
