"""Tiny synthetic Fashion-MNIST stand-ins: real IDX files, small enough for a fast offline suite."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

N_TRAIN, N_TEST = 640, 101  # 101: odd and prime, so no device count divides the test set evenly


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialize a uint8 array (N or N×28×28) in the IDX format."""
    magic = 0x00000801 if array.ndim == 1 else 0x00000803
    return (
        struct.pack(">II", magic, len(array)) + struct.pack(f">{array.ndim - 1}I", *array.shape[1:]) + array.tobytes()
    )


def make_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images a network can learn: class k is a bright horizontal band at rows 2k..2k+5, plus noise."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 * label : 2 * label + 6, 4:24] = 220
    return images, labels


def write_idx_dir(directory: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, gz: bool = True) -> Path:
    """Write the four Fashion-MNIST IDX files (gzip'd or not) of a tiny synthetic dataset into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    (train_x, train_y), (test_x, test_y) = make_split(n_train, 0), make_split(n_test, 1)
    files = {
        "train-images-idx3-ubyte": train_x, "train-labels-idx1-ubyte": train_y,
        "t10k-images-idx3-ubyte": test_x, "t10k-labels-idx1-ubyte": test_y,
    }  # fmt: skip
    for stem, array in files.items():
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array), mtime=0))
        else:
            (directory / stem).write_bytes(idx_bytes(array))
    return directory


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_idx_dir(tmp_path / "fmnist")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache folder and never sees the user's data or environment."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("FMNIST_DATA_DIR", raising=False)
    return cache


def tiny_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """CLI arguments for a fast CPU run on the tiny dataset."""
    return [
        f"--data.data_dir={data_dir}", "--data.require_official=false", "--data.val_size=100",
        "--data.batch_size=32", "--data.eval_batch_size=50",
        f"--trainer.logger.init_args.save_dir={out_dir}", "--trainer.accelerator=cpu", "--trainer.devices=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra,
    ]  # fmt: skip


FLOW_FILE = Path(__file__).resolve().parents[1] / "flows" / "full_pipeline.py"


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """A real local Prefect server (temporary database) for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def pipeline(prefect_api: str):
    """flows/full_pipeline.py as a module, talking to the session's Prefect server."""
    spec = importlib.util.spec_from_file_location("full_pipeline", FLOW_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
