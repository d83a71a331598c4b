"""mnist_kf: MNIST → Katib → Kubeflow Pipelines → KServe, one package for notebooks, trials, steps and servers."""

__version__ = "0.1.0"
