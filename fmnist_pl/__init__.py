"""fmnist-pl: the reference Fashion-MNIST study's two networks, trained with Lightning and orchestrated by Prefect."""

from fmnist_pl.data import CLASS_NAMES, FashionMNISTDataModule
from fmnist_pl.module import FashionMNISTClassifier
from fmnist_pl.networks import SeedCNN, SeedDenseNet

__version__ = "0.1.0"
__all__ = ["CLASS_NAMES", "FashionMNISTClassifier", "FashionMNISTDataModule", "SeedCNN", "SeedDenseNet"]
