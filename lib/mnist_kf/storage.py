"""Files and buckets: atomic writes, checksums and the Google Cloud Storage client.

Everything that writes an artifact goes through `atomic_write`, so a crash leaves either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
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
