"""The LightningDataModule: the 55k/5k training/validation split, batches served from in-memory tensors (sliced,
sharded by rank, seeded), and the augmentations. The files themselves: fashion_mnist.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from fmnist_pl.errors import ConfigError
from fmnist_pl.fashion_mnist import CLASS_NAMES, IMAGE_SIZE, FashionMNISTTensors, load_dataset
from fmnist_pl.predict_images import load_predict_images

__all__ = ["CLASS_NAMES", "FashionMNISTDataModule", "ShardedBatches", "Split", "shift_and_flip"]

Split = Literal["test", "train", "val"]  # the splits `predict` (and `evaluate`) can classify


def shift_and_flip(
    images: torch.Tensor, generator: torch.Generator, max_shift: int = 2, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Horizontal flips (random, or where the boolean `flip` says) and random shifts of up to `max_shift` pixels
    (0: flips only), per image (B×1×28×28 in, same out), on the images' device with a generator of that device."""
    n, device = images.shape[0], images.device
    if flip is None:
        flip = torch.rand(n, generator=generator, device=device) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if max_shift == 0:
        return images
    padded = torch.nn.functional.pad(images, [max_shift] * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator, device=device)
    pixels = torch.arange(IMAGE_SIZE, device=device)
    rows = (dy[:, None] + pixels)[:, :, None]
    cols = (dx[:, None] + pixels)[:, None, :]
    return padded[torch.arange(n, device=device)[:, None, None], 0, rows, cols].unsqueeze(1)


class ShardedBatches(IterableDataset):
    """One rank's batches: slices of a seeded per-epoch permutation (or of the plain order) of in-memory tensors.

    Sharding is done here rather than by a DistributedSampler, which pads evaluation sets with duplicates:
    in evaluation every rank takes a disjoint contiguous part, so each image is counted exactly once.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        augment: bool = False,
        max_shift: int = 2,
        alternating_flips: bool = False,
        seed: int = 0,
        epoch: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.augment, self.max_shift = batch_size, shuffle, augment, max_shift
        self.alternating_flips = alternating_flips
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            # Seeded by (seed, epoch), so a run resumed at epoch e sees the batches an uninterrupted run saw.
            # Every rank draws the same permutation and takes an equal share: DDP needs equal step counts.
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch())
            per_rank = n // self.world_size
            return torch.randperm(n, generator=generator)[self.rank * per_rank : (self.rank + 1) * per_rank]
        return torch.arange(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def alternating_flip_plan(self) -> torch.Tensor:
        """Which images are mirrored this epoch: a random half in the first epoch (drawn from the seed alone), then
        every image the other way round from the epoch before. Each pair of epochs shows every image both ways,
        which random flips leave to chance (airbench: fewer epochs to the same accuracy)."""
        first_epoch = torch.rand(len(self.labels), generator=torch.Generator().manual_seed(self.seed)) < 0.5
        return first_epoch ^ bool(self.epoch() % 2)

    def __len__(self) -> int:
        n = len(self.labels)
        per_rank = (
            n // self.world_size
            if self.shuffle
            else (self.rank + 1) * n // self.world_size - self.rank * n // self.world_size
        )
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch()) * 1_009 + self.rank)
        flips = self.alternating_flip_plan() if self.augment and self.alternating_flips else None
        for batch in self._indices().split(self.batch_size):
            # uint8 -> float per batch: a quarter of the memory traffic of gathering from a float copy.
            images = self.images[batch].unsqueeze(1).float().div_(255)
            if self.augment:
                images = shift_and_flip(images, generator, self.max_shift, None if flips is None else flips[batch])
            yield images, self.labels[batch]


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST with the reference study's split: the first `val_size` training images validate."""

    def __init__(
        self,
        data_dir: str | None = None,
        cache_dir: str | None = None,
        download: bool = True,
        require_official: bool = True,
        val_size: int = 5_000,
        batch_size: int = 32,
        eval_batch_size: int = 1_000,
        augment: bool = False,
        max_shift: int = 2,
        alternating_flips: bool = False,
        predict_split: Split = "test",
        predict_path: str | None = None,
        seed: int | None = None,
    ) -> None:
        """Args:
        data_dir: folder with the four IDX files (.gz or not); default ${FMNIST_DATA_DIR}, a known local copy,
            then the official download.
        cache_dir: where decoded tensors and downloads go; default ~/.cache/fmnist_pl.
        download: allow the official download when no local copy is found.
        require_official: check counts and content hashes against the official release; false for own IDX files.
        val_size: the first `val_size` training images form the validation set.
        batch_size: training batch size per device.
        eval_batch_size: batch size for validation, test and predict.
        augment: random horizontal flips and shifts of training images.
        max_shift: with augment, shift by up to this many pixels in each direction (0: flips only).
        alternating_flips: with augment, mirror each image in every other epoch (a random half first) instead of
            flipping each image at random every epoch.
        predict_split: which split `predict` classifies when no `predict_path` is given.
        predict_path: images for `predict` (IDX images file or folder of 28×28 PNGs) instead of a split.
        seed: seeds the training batches' order and flips; the CLI links it from `seed_everything`. None: the seed
            torch's generator was last seeded with.
        """
        super().__init__()
        if not 0 < val_size < 60_000:
            raise ConfigError(f"data.val_size must be between 1 and 59,999 (of 60,000 training images), got {val_size}")
        if not 0 <= max_shift < IMAGE_SIZE:
            raise ConfigError(f"data.max_shift must be between 0 and 27 pixels, got {max_shift}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(
                f"data.batch_size and data.eval_batch_size must be ≥ 1, got {batch_size}, {eval_batch_size}"
            )
        self.save_hyperparameters()
        self.tensors: FashionMNISTTensors | None = None
        self.predict_names: list[str] | None = None  # the image files' names when predicting on a folder

    def prepare_data(self) -> None:
        # Runs once per node before setup(): downloads and writes the decoded cache that setup() then reads.
        load_dataset(
            self.hparams.data_dir, self.hparams.cache_dir, self.hparams.download, self.hparams.require_official
        )

    def setup(self, stage: str | None = None) -> None:
        if self.tensors is None:
            self.tensors = load_dataset(
                self.hparams.data_dir, self.hparams.cache_dir, self.hparams.download, self.hparams.require_official
            )
        n_train = len(self.tensors.train_labels)
        if self.hparams.val_size >= n_train:
            raise ConfigError(
                f"data.val_size={self.hparams.val_size} leaves no training images (the data has {n_train})"
            )

    def _loader(self, images: torch.Tensor, labels: torch.Tensor, train: bool) -> DataLoader:
        trainer = self.trainer
        batches = ShardedBatches(
            images,
            labels,
            batch_size=self.hparams.batch_size if train else self.hparams.eval_batch_size,
            shuffle=train,
            augment=train and self.hparams.augment,
            max_shift=self.hparams.max_shift,
            alternating_flips=self.hparams.alternating_flips,
            seed=torch.initial_seed() % 2**32 if self.hparams.seed is None else self.hparams.seed,
            epoch=lambda: trainer.current_epoch if trainer is not None else 0,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )
        return DataLoader(batches, batch_size=None)  # the dataset yields whole batches

    def train_images_sample(self, count: int) -> torch.Tensor:
        """The first `count` training images (after the validation split), count×1×28×28 in [0, 1], unaugmented:
        what data-derived layers (bn_cnn's whitening) are computed from."""
        val = self.hparams.val_size
        return self.tensors.train_images[val : val + count].unsqueeze(1).float().div(255)

    def train_dataloader(self) -> DataLoader:
        val = self.hparams.val_size
        return self._loader(self.tensors.train_images[val:], self.tensors.train_labels[val:], train=True)

    def val_dataloader(self) -> DataLoader:
        val = self.hparams.val_size
        return self._loader(self.tensors.train_images[:val], self.tensors.train_labels[:val], train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.tensors.test_images, self.tensors.test_labels, train=False)

    def predict_dataloader(self) -> DataLoader:
        if self.hparams.predict_path is not None:
            images, self.predict_names = load_predict_images(self.hparams.predict_path)
            return self._loader(images, torch.full((len(images),), -1, dtype=torch.int64), train=False)
        val = self.hparams.val_size
        images, labels = {
            "test": (self.tensors.test_images, self.tensors.test_labels),
            "train": (self.tensors.train_images[val:], self.tensors.train_labels[val:]),  # unshuffled, unaugmented
            "val": (self.tensors.train_images[:val], self.tensors.train_labels[:val]),
        }[self.hparams.predict_split]
        return self._loader(images, labels, train=False)
