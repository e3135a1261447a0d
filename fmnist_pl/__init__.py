"""fmnist-pl: Fashion-MNIST with Lightning and Prefect: the 2020 study's two networks and a modern small CNN."""

from importlib.metadata import version

from fmnist_pl.data import CLASS_NAMES, FashionMNISTDataModule
from fmnist_pl.module import FashionMNISTClassifier
from fmnist_pl.networks import NETWORKS, BatchNormCNN, StudyDenseNet, StudyLeNetCNN

__version__ = version("fmnist-pl")  # declared once, in pyproject.toml
__all__ = [
    "CLASS_NAMES",
    "NETWORKS",
    "BatchNormCNN",
    "FashionMNISTClassifier",
    "FashionMNISTDataModule",
    "StudyDenseNet",
    "StudyLeNetCNN",
]
