"""Tiny synthetic Fashion-MNIST stand-ins: real IDX files, small enough for a fast offline suite."""

from __future__ import annotations

import gzip
import struct
import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from fmnist_pl.pipeline.settings import PipelineSettings

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
        "train-images-idx3-ubyte": train_x,
        "train-labels-idx1-ubyte": train_y,
        "t10k-images-idx3-ubyte": test_x,
        "t10k-labels-idx1-ubyte": test_y,
    }
    for stem, array in files.items():
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array), mtime=0))
        else:
            (directory / stem).write_bytes(idx_bytes(array))
    return directory


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_idx_dir(tmp_path / "fmnist")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


USERS_HOME = Path.home()  # as the suite found it, before isolated_home replaces it


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory):
    """The whole session, subprocesses included, runs with a home of its own: the decoded-data cache, Prefect's
    database and anything else a test or the code under test keeps in a home go there, never into the user's."""
    home = tmp_path_factory.mktemp("home")
    patch = pytest.MonkeyPatch()
    for name, value in (("HOME", home), ("PREFECT_HOME", home / ".prefect"), ("XDG_CACHE_HOME", home / ".cache")):
        patch.setenv(name, str(value))
    yield home
    patch.undo()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache folder and never sees the user's data or environment."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("FMNIST_DATA_DIR", raising=False)
    return cache


@pytest.fixture(autouse=True)
def new_run() -> None:
    """Every test starts as a new run: a flow that failed in an earlier test of this process left "stopping" set."""
    from fmnist_pl.pipeline.processes import begin_run

    begin_run()


def tiny_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """CLI arguments for a fast CPU run on the tiny dataset."""
    return [
        f"--data.data_dir={data_dir}",
        "--data.require_official=false",
        "--data.val_size=100",
        "--data.batch_size=32",
        "--data.eval_batch_size=50",
        f"--trainer.logger.init_args.save_dir={out_dir}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


FLOW_FILE = Path(__file__).resolve().parents[1] / "flows" / "full_pipeline.py"  # what users run, as a script


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """A real local Prefect server (temporary database) for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def pipeline(prefect_api: str):
    """The pipeline's flow module (fmnist_pl/pipeline/flow.py), talking to the session's Prefect server."""
    from fmnist_pl.pipeline import flow

    return flow


def tiny_settings(data: Path, out: Path, **overrides: object) -> PipelineSettings:
    """Pipeline settings for a fast CPU run on the tiny dataset (2 epochs of every network, seed 0)."""
    from fmnist_pl.pipeline.settings import PipelineSettings

    base = {
        "data_dir": str(data),
        "require_official": False,
        "val_size": 100,
        "epochs": 2,
        "accelerator": "cpu",
        "output_dir": str(out),
    }
    return PipelineSettings(**{**base, **overrides})


TINY_RUN_SEEDS = [0, 1]


# The suite's costliest fixtures: the shared pipeline run (`tiny_run`, about 100 s on 2 busy cores) and test_cluster's
# Dask cluster on loopback (its three processes). Their tests are one xdist group, so each is built once.
SHARED_FIXTURES = ("tiny_run", "loopback_cluster")
SHARED_GROUP = "shared-fixtures"


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    """Every test of a shared fixture (SHARED_FIXTURES) is in one xdist group (`--dist loadgroup` in pyproject.toml):
    they all run on one worker, so each fixture is built once, not once per worker that meets it. The integration
    tests come first (a stable sort): the short unit tests then fill the end, instead of a 60-80 s sweep test that
    started last keeping one worker busy while the other waits."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is None)
    shared = [item for item in items if set(SHARED_FIXTURES) & set(getattr(item, "fixturenames", ()))]
    for item in shared:
        item.add_marker(pytest.mark.xdist_group(SHARED_GROUP))
    result = yield  # xdist's hook: it files each marked test under its group, by its node ID
    if getattr(config.option, "loadgroup", False) and shared and not shared[0].nodeid.endswith(f"@{SHARED_GROUP}"):
        # pytest 9.2's node IDs no longer take xdist's group (pytest-xdist#1386); pyproject.toml pins pytest below it
        message = "xdist ignored the test groups: each worker builds the shared fixtures"
        warnings.warn(pytest.PytestWarning(message), stacklevel=1)
    return result


@pytest.fixture(scope="session")
def tiny_run(pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one real pipeline run the flow, report and step-reuse tests share: every network, seeds 0 and 1, on
    the tiny data (`<root>/fmnist`), into `<root>/outputs`; returns its run folder. Read it, or rerun its settings
    (`tiny_run_settings`), which reuses every step; to change its files, work on a copy (`copy_of_tiny_run`)."""
    root = tmp_path_factory.mktemp("tiny-run")
    data = write_idx_dir(root / "fmnist")
    return Path(pipeline.full_pipeline(tiny_settings(data, root / "outputs", seeds=TINY_RUN_SEEDS)))


def tiny_run_settings(run: Path, out: Path | None = None, **overrides: object) -> PipelineSettings:
    """The shared run's settings, into `out` (default: its own output folder). A subset of its networks and seeds
    reuses its steps: a step's key never depends on which other networks or seeds a run trains."""
    return tiny_settings(run.parent.parent / "fmnist", out or run.parent, **{"seeds": TINY_RUN_SEEDS, **overrides})


def copy_of_tiny_run(run: Path, destination: Path) -> Path:
    """A copy of the shared run's whole output folder (`cp -a`: links stay links), for a test that changes files;
    returns the output folder."""
    import shutil

    shutil.copytree(run.parent, destination, symlinks=True)
    return destination


def write_fake_run(root: Path, accuracies: dict[str, float], seeds: tuple[int, ...] = (0,)) -> Path:
    """A finished pipeline run folder made of files alone (no training): each network's and seed's history, test
    metrics, confusion matrix and predictions, laid out as the pipeline lays them out. A network classifies each
    image right with probability `accuracies[network]` (a different draw per seed). Returns the run folder."""
    import json
    import os

    import pandas as pd

    from fmnist_pl import layout
    from fmnist_pl.data import CLASS_NAMES

    data = write_idx_dir(root / "data")
    _, test_labels = make_split(N_TEST, 1)
    _, train_labels = make_split(N_TRAIN, 0)
    run = layout.RunFolder(root / "outputs" / "run")
    run.path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    steps: dict = {"download": {"source_dir": str(data), "sha256": {"fake": "0" * 64}, "wall_seconds": 0.1}}
    for i, (network, accuracy) in enumerate(accuracies.items()):
        for seed in seeds:
            training = layout.TrainingFolder(root / "outputs" / "steps" / f"train-{network}-seed{seed}-key")
            evaluation = layout.EvaluationFolder(root / "outputs" / "steps" / f"evaluate-{network}-seed{seed}-key")
            training.path.mkdir(parents=True)
            evaluation.path.mkdir(parents=True)
            pd.DataFrame(
                {
                    "epoch": [0, 1],
                    "train/loss": [1.0, 0.5],
                    "train/acc": [0.6, 0.8],
                    "val/loss": [0.9, 0.6],
                    "val/acc": [0.7, accuracy],
                    "lr": [1e-3, 1e-4],
                    "epoch_seconds": [2.0, 2.0],
                }
            ).to_csv(training.history, index=False)
            for split, labels in (("test", test_labels), ("train", train_labels[100:])):
                predicted = np.where(rng.random(len(labels)) < accuracy, labels, (labels + 1) % 10)
                frame = pd.DataFrame({"label": labels, "predicted": predicted, "confidence": 0.9})
                for k, name in enumerate(CLASS_NAMES):
                    frame[f"p_{name}"] = (predicted == k).astype(float)
                frame.index.name = "index"
                frame.to_csv(evaluation.predictions(split))
                if split == "test":
                    matrix = np.zeros((10, 10), dtype=int)
                    np.add.at(matrix, (labels, predicted), 1)
                    pd.DataFrame(matrix, CLASS_NAMES, CLASS_NAMES).to_csv(evaluation.confusion_test)
                    metrics = {
                        "network": network,
                        "accuracy": np.trace(matrix) / len(labels),
                        "loss": 0.5,
                        "images": len(labels),
                        "test_time_flip": network == "bn_cnn",
                        "accuracy_without_flip": np.trace(matrix) / len(labels) - 0.01 * (network == "bn_cnn"),
                        "trainable_parameters": 1000 * (i + 1),
                        "flops_per_image": 10**6 * (i + 1),
                        "test_images_per_second": 5000,
                    }
                    evaluation.test_metrics.write_text(json.dumps(metrics))
            steps[layout.step_name("train", network, seed)] = {
                "dir": str(training.path),
                "wall_seconds": 10.0 * (i + 1),
            }
            steps[layout.step_name("evaluate", network, seed)] = {"dir": str(evaluation.path), "wall_seconds": 1.0}
            for link, target in (
                (run.training(network, seed).path, training.path),
                (run.evaluation(network, seed).path, evaluation.path),
            ):
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(target, link.parent))
    record = {
        "run_dir": str(run.path),
        "status": "completed",
        "networks": list(accuracies),
        "seeds": list(seeds),
        "steps": steps,
        "settings": {"require_official": False},
        "configs": {},
    }
    run.record.write_text(json.dumps(record))
    return run.path


@pytest.fixture
def mount(tmp_path: Path):
    """mount(name, options) -> a fresh tmpfs folder mounted with `options` (size=3m, ro, ...), unmounted after."""
    mounted = []

    def make(name: str, options: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)
