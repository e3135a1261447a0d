"""fmnist-pl: Fashion-MNIST with Lightning and Prefect: the 2020 study's two networks and a modern small CNN."""

from importlib import import_module
from importlib.metadata import version

__version__ = version("fmnist-pl")  # declared once, in pyproject.toml

# Loaded on first use: importing a small part of the package (the pipeline's option checks, say) then costs
# torch alone, not Lightning too (about 5 s more on a 2-core CPU).
_EXPORTS = {
    "CLASS_NAMES": "fmnist_pl.fashion_mnist",
    "FashionMNISTDataModule": "fmnist_pl.data",
    "FashionMNISTClassifier": "fmnist_pl.module",
    "NETWORKS": "fmnist_pl.networks",
    "BatchNormCNN": "fmnist_pl.networks",
    "StudyDenseNet": "fmnist_pl.networks",
    "StudyLeNetCNN": "fmnist_pl.networks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fmnist_pl' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
