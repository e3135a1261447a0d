"""The data module: sources, verification errors, the decoded cache, the split and the batches."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import N_TEST, N_TRAIN, idx_bytes, make_split, write_idx_dir

from fmnist_pl import fashion_mnist
from fmnist_pl.data import FashionMNISTDataModule, ShardedBatches, shift_and_flip
from fmnist_pl.errors import ConfigError, DataError
from fmnist_pl.fashion_mnist import load_dataset
from fmnist_pl.predict_images import load_predict_images


def test_gz_and_raw_files_decode_to_the_same_tensors(tmp_path: Path) -> None:
    gz = load_dataset(write_idx_dir(tmp_path / "gz"), require_official=False)
    raw = load_dataset(write_idx_dir(tmp_path / "raw", gz=False), require_official=False)
    assert gz.train_images.shape == (N_TRAIN, 28, 28) and gz.test_labels.shape == (N_TEST,)
    assert torch.equal(gz.train_images, raw.train_images) and torch.equal(gz.test_labels, raw.test_labels)
    assert gz.sha256 == raw.sha256  # hashes are of the content, not of the .gz wrapper


def test_sources_are_tried_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    named, env, local = (write_idx_dir(tmp_path / d) for d in ("named", "env", "local"))
    monkeypatch.setattr(fashion_mnist, "KNOWN_LOCAL_COPIES", (local,))
    downloads = []
    monkeypatch.setattr(
        fashion_mnist, "_download", lambda root, option: downloads.append(root) or write_idx_dir(root / "dl")
    )
    cache = tmp_path / "cache"
    assert fashion_mnist.locate_dataset(named, cache, download=True) == named
    monkeypatch.setenv("FMNIST_DATA_DIR", str(env))
    assert fashion_mnist.locate_dataset(None, cache, download=True) == env
    monkeypatch.delenv("FMNIST_DATA_DIR")
    assert fashion_mnist.locate_dataset(None, cache, download=True) == local
    assert downloads == []
    monkeypatch.setattr(fashion_mnist, "KNOWN_LOCAL_COPIES", (tmp_path / "nowhere",))
    assert fashion_mnist.locate_dataset(None, cache, download=True) == cache / "download" / "dl"
    assert downloads == [cache / "download"]
    with pytest.raises(DataError, match="download=False"):
        fashion_mnist.locate_dataset(None, tmp_path / "other-cache", download=False)


def test_failed_download_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", unreachable)
    monkeypatch.setattr(fashion_mnist, "check_download_reachable", lambda *args: None)  # names resolve, then...
    with pytest.raises(DataError, match="could not download Fashion-MNIST.*no route to host.*--data.data_dir"):
        fashion_mnist._download(tmp_path, "--data.data_dir")


def test_named_folder_without_the_files_is_not_silently_skipped(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"lacks train-images-idx3-ubyte"):
        load_dataset(tmp_path, require_official=False)


def _corrupt(directory: Path, how: str) -> str:
    """Damage one file of a tiny dataset; return the name the error must mention."""
    images = directory / "train-images-idx3-ubyte.gz"
    labels = directory / "train-labels-idx1-ubyte.gz"
    if how == "truncated gzip":
        images.write_bytes(images.read_bytes()[:-500])
    elif how == "not gzip":
        images.write_bytes(b"this is not gzip at all")
    elif how == "truncated content":
        images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-784]))
    elif how == "too short":
        images.write_bytes(gzip.compress(b"\x00\x00\x08"))
    elif how == "wrong magic":  # a label file where the images should be
        images.write_bytes(labels.read_bytes())
    elif how == "wrong size":
        images.write_bytes(gzip.compress(idx_bytes(np.zeros((N_TRAIN, 32, 32), np.uint8))))
    elif how == "bad label":
        _, y = make_split(N_TRAIN, 0)
        y[3] = 10
        labels.write_bytes(gzip.compress(idx_bytes(y)))
        return labels.name
    elif how == "count mismatch":
        labels.write_bytes(gzip.compress(idx_bytes(make_split(N_TRAIN - 1, 0)[1])))
        return labels.name
    return images.name


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated gzip", "truncated or corrupt"),
        ("not gzip", "truncated or corrupt"),
        ("truncated content", "truncated or corrupt"),
        ("too short", "too short to be an IDX"),
        ("wrong magic", "is not that of an IDX images file"),
        ("wrong size", "32×32"),
        ("bad label", "label 10"),
        ("count mismatch", f"{N_TRAIN} images but train-labels-idx1-ubyte.gz {N_TRAIN - 1} labels"),
    ],
)
def test_damaged_files_stop_with_a_message_naming_the_file(tiny_data: Path, how: str, message: str) -> None:
    named = _corrupt(tiny_data, how)
    with pytest.raises(DataError, match=message) as error:
        load_dataset(tiny_data, require_official=False)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_official_check_rejects_wrong_counts_and_wrong_content(
    tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DataError, match="640 images, the official file has 60,000"):
        load_dataset(tiny_data, require_official=True)
    # With the counts made to match, the content hash is what catches a wrong dataset.
    tiny_counts = {
        stem: (s, k, N_TRAIN if s == "train" else N_TEST, sha)
        for stem, (s, k, _, sha) in fashion_mnist.OFFICIAL_FILES.items()
    }
    monkeypatch.setattr(fashion_mnist, "OFFICIAL_FILES", tiny_counts)
    with pytest.raises(DataError, match="content differs from the official Fashion-MNIST file"):
        load_dataset(tiny_data, require_official=True)


def test_decoded_tensors_are_cached_and_invalidated_when_a_file_changes(
    tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_dataset(tiny_data, require_official=False)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    real_decode = fashion_mnist.decode_dataset
    monkeypatch.setattr(fashion_mnist, "decode_dataset", no_decoding)
    again = load_dataset(tiny_data, require_official=False)
    assert torch.equal(first.train_images, again.train_images) and again.sha256 == first.sha256
    changed = tiny_data / "t10k-labels-idx1-ubyte.gz"
    os.utime(changed, ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset(tiny_data, require_official=False)
    monkeypatch.setattr(fashion_mnist, "decode_dataset", real_decode)
    assert torch.equal(load_dataset(tiny_data, require_official=False).test_labels, first.test_labels)


@pytest.mark.parametrize("damage", ["quarter of 0xFF", "one byte"])
def test_a_damaged_cache_is_detected_rebuilt_and_never_trained_on(
    tiny_data: Path, isolated_cache: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    first = load_dataset(tiny_data, require_official=False)
    (cache,) = (isolated_cache / "fmnist_pl").glob("decoded-*.pt")
    raw = bytearray(cache.read_bytes())
    if damage == "one byte":  # inside the training images: the zip archive still loads
        at = raw.index(first.train_images.numpy().tobytes()[:64]) + 1000
        raw[at] ^= 0xFF
    else:  # as reported: a quarter of the file overwritten, the size kept
        start = len(raw) // 2
        raw[start : start + len(raw) // 4] = b"\xff" * (len(raw) // 4)
    cache.write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="fmnist_pl.fashion_mnist"):
        again = load_dataset(tiny_data, require_official=False)
    assert torch.equal(again.train_images, first.train_images) and torch.equal(again.test_images, first.test_images)
    assert [r.getMessage() for r in caplog.records if "checksum" in r.getMessage()] != []
    caplog.clear()
    with caplog.at_level("WARNING", logger="fmnist_pl.fashion_mnist"):
        load_dataset(tiny_data, require_official=False)  # the rebuilt cache verifies: no second warning
    assert not caplog.records


def test_split_takes_the_first_val_size_images_for_validation(tiny_data: Path) -> None:
    module = FashionMNISTDataModule(data_dir=str(tiny_data), require_official=False, val_size=100, batch_size=64)
    module.setup("fit")
    raw_x, raw_y = make_split(N_TRAIN, 0)
    val_x, val_y = (torch.cat(t) for t in zip(*module.val_dataloader(), strict=True))
    assert torch.equal(val_y, torch.from_numpy(raw_y[:100]).long())
    assert torch.allclose(val_x.squeeze(1), torch.from_numpy(raw_x[:100]).float() / 255)
    train_x, train_y = (torch.cat(t) for t in zip(*module.train_dataloader(), strict=True))
    assert len(train_y) == N_TRAIN - 100 and 0.0 <= train_x.min() and train_x.max() <= 1.0
    # The training split is exactly the rest: same label counts as images 100..639.
    assert torch.equal(train_y.bincount(minlength=10), torch.from_numpy(raw_y[100:]).long().bincount(minlength=10))


@pytest.mark.parametrize("bad", [{"val_size": 0}, {"val_size": 60_000}, {"batch_size": 0}])
def test_bad_data_options_are_rejected_up_front(bad: dict) -> None:
    with pytest.raises(ConfigError):
        FashionMNISTDataModule(**bad)


def test_val_size_must_leave_training_images(tiny_data: Path) -> None:
    module = FashionMNISTDataModule(data_dir=str(tiny_data), require_official=False, val_size=N_TRAIN)
    with pytest.raises(ConfigError, match="leaves no training images"):
        module.setup("fit")


def _epoch_indices(world_size: int, epoch: int, seed: int = 0, n: int = 103) -> list[torch.Tensor]:
    labels = torch.arange(n)  # labels double as image indices
    return [
        torch.cat(
            [
                y
                for _, y in ShardedBatches(
                    torch.zeros(n, 28, 28, dtype=torch.uint8),
                    labels,
                    8,
                    shuffle=True,
                    seed=seed,
                    epoch=lambda: epoch,
                    rank=r,
                    world_size=world_size,
                )
            ]
        )
        for r in range(world_size)
    ]


def test_training_batches_are_a_seeded_permutation_shared_out_between_ranks() -> None:
    (single,) = _epoch_indices(1, epoch=0)
    assert sorted(single.tolist()) == list(range(103))
    assert torch.equal(single, _epoch_indices(1, epoch=0)[0])  # same seed and epoch: same order
    assert not torch.equal(single, _epoch_indices(1, epoch=1)[0])  # a new order every epoch
    assert not torch.equal(single, _epoch_indices(1, epoch=0, seed=1)[0])
    shards = _epoch_indices(3, epoch=0)
    assert len({len(s) for s in shards}) == 1  # equal step counts, or DDP would hang
    together = torch.cat(shards)
    assert len(together.unique()) == len(together) == 102  # disjoint; at most world_size - 1 left out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_batches_count_every_image_exactly_once(world_size: int) -> None:
    labels = torch.arange(N_TEST)
    seen = torch.cat(
        [
            torch.cat(
                [
                    y
                    for _, y in ShardedBatches(
                        torch.zeros(N_TEST, 28, 28, dtype=torch.uint8),
                        labels,
                        10,
                        shuffle=False,
                        rank=r,
                        world_size=world_size,
                    )
                ]
            )
            for r in range(world_size)
        ]
    )
    assert torch.equal(seen, labels)  # in order, none twice, none missing
    for rank in range(world_size):  # __len__ is what Lightning plans epochs and progress with: it must be exact
        shard = ShardedBatches(labels, labels, 10, False, rank=rank, world_size=world_size)
        assert len(shard) == len(list(shard)) == -(-len(shard._indices()) // 10)


def test_augmentation_only_flips_and_shifts() -> None:
    images = torch.rand(16, 1, 28, 28)
    out = shift_and_flip(images, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, [2] * 4)
    for original, augmented in zip(padded, out, strict=True):
        candidates = [
            view[..., dy : dy + 28, dx : dx + 28]
            for view in (original, original.flip(-1))
            for dy in range(5)
            for dx in range(5)
        ]
        assert any(torch.equal(augmented, c) for c in candidates)
    assert not torch.equal(out, images)


def test_predict_images_from_a_folder_of_pngs(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "b.png")  # colour: converted to grayscale
    images, names = load_predict_images(tmp_path)
    assert images.shape == (2, 28, 28) and images[0, 0, 0] == 200 and names == ["a.png", "b.png"]
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(DataError, match=r"c.png: image is 32×32, the networks take 28×28"):
        load_predict_images(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_predict_images(tmp_path / "missing")


def test_max_shift_zero_augments_with_flips_only_and_bad_values_are_rejected() -> None:
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    batches = ShardedBatches(images, torch.arange(64), 16, shuffle=False, augment=True, max_shift=0)
    augmented = torch.cat([x for x, _ in batches])
    plain = images.unsqueeze(1).float() / 255
    mirrored = (augmented == plain.flip(-1)).flatten(1).all(1)
    assert ((augmented == plain).flatten(1).all(1) | mirrored).all()  # each image as it is or mirrored, never moved
    assert 0 < mirrored.sum() < 64
    with pytest.raises(ConfigError, match="max_shift must be between 0 and 27"):
        FashionMNISTDataModule(max_shift=30)


def test_an_unwritable_cache_folder_is_skipped_with_one_warning(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import errno

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "cache" / "x.tmp"))

    monkeypatch.setattr(fashion_mnist, "atomic_write", read_only)
    with caplog.at_level("WARNING", logger="fmnist_pl.fashion_mnist"):
        tensors = load_dataset(tiny_data, cache_dir=tmp_path / "cache", require_official=False)
    assert len(tensors.train_labels) == 640  # the run goes on, with the data decoded
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "cannot write the decoded-data cache there" in warning and "going on without it" in warning


def test_errors_about_a_place_name_it_and_others_are_left_alone(tmp_path: Path) -> None:
    import errno

    from fmnist_pl.io import place_error

    denied = place_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "run" / "x.ckpt")))
    assert str(denied).startswith(f"{tmp_path / 'run'}: cannot write there, permission denied")
    full = place_error(OSError(errno.ENOSPC, "No space left on device"), where=tmp_path)  # an open file: no name
    assert str(full).startswith(f"{tmp_path}: cannot write there, no space left on the device")
    assert place_error(FileNotFoundError(errno.ENOENT, "No such file")) is None  # not about a full or closed place
    assert place_error(ValueError("bug")) is None
