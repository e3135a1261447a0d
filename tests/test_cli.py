"""The `fmnist-pl` command: fit → test round trip, result files, packaged configs, errors, determinism."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import N_TEST, N_TRAIN, TINY_RUN_SEEDS, tiny_args, tiny_run_settings

from fmnist_pl import layout
from fmnist_pl.cli import main
from fmnist_pl.configs import packaged_configs, profile_config
from fmnist_pl.data import CLASS_NAMES
from fmnist_pl.hardware import cpu_has_fast_bf16
from fmnist_pl.networks import NETWORKS


def fit(data: Path, out: Path, *extra: str) -> Path:
    """Run `fmnist-pl fit` on the tiny data; return the run folder."""
    main(["fit", *tiny_args(data, out, "--trainer.logger.init_args.version=fit", *extra)])
    return out / "runs" / "fit"


def shared_fit(tiny_run: Path, network: str) -> tuple[Path, str]:
    """The tiny data and `--ckpt_path` of the network's first-seed fit in the shared pipeline run: `fmnist-pl fit`
    with its packaged fast config (options after the config override it: 2 epochs), as a user runs it."""
    training = layout.RunFolder(tiny_run).training(network, TINY_RUN_SEEDS[0])
    return Path(tiny_run_settings(tiny_run).data_dir), f"--ckpt_path={training.path / layout.BEST_CHECKPOINT}"


def epoch_metrics(run: Path) -> pd.DataFrame:
    """metrics.csv folded to one row per epoch (Lightning writes train and val rows separately)."""
    return pd.read_csv(run / "metrics.csv").groupby("epoch").first()


@pytest.mark.integration
def test_fit_then_test_from_the_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    run = fit(tiny_data, tmp_path, "--model.network=cnn", "--trainer.max_epochs=4")
    metrics = epoch_metrics(run)
    assert list(metrics.index) == [0, 1, 2, 3]
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "epoch_seconds"} <= set(metrics.columns)
    assert metrics["val/acc"].iloc[-1] > 0.5  # it learned the synthetic classes (chance is 0.1)
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert pd.read_csv(run / "confusion_matrix_val.csv", index_col=0).to_numpy().sum() == 100

    main(
        [
            "test",
            *tiny_args(tiny_data, tmp_path, "--trainer.logger.init_args.version=test"),
            f"--ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
        ]
    )
    tested = tmp_path / "runs" / "test"
    result = json.loads((tested / "test_metrics.json").read_text())
    matrix = pd.read_csv(tested / "confusion_matrix_test.csv", index_col=0)
    assert list(matrix.index) == list(CLASS_NAMES) == list(matrix.columns)
    assert matrix.to_numpy().sum() == N_TEST == result["images"]
    assert result["accuracy"] == pytest.approx(matrix.to_numpy().trace() / N_TEST)
    assert result["network"] == "cnn" and result["trainable_parameters"] == 116_859
    assert result["accuracy"] > 0.5


@pytest.mark.integration
def test_evaluate_writes_what_test_and_predict_write_in_one_command(tiny_run: Path, tmp_path: Path) -> None:
    config = f"--config={profile_config('fast', 'bn_cnn')}"  # a network evaluated with flip TTA
    tiny_data, checkpoint = shared_fit(tiny_run, "bn_cnn")
    for command in ("test", "predict"):
        main(
            [
                command,
                config,
                *tiny_args(tiny_data, tmp_path, f"--trainer.logger.init_args.version={command}"),
                checkpoint,
            ]
        )
    main(
        [
            "evaluate",
            config,
            *tiny_args(tiny_data, tmp_path, "--trainer.logger.init_args.version=evaluate"),
            checkpoint,
            "--predict_splits=[train]",
        ]
    )
    evaluated, runs = layout.EvaluationFolder(tmp_path / "runs" / "evaluate"), tmp_path / "runs"
    tested = json.loads((runs / "test" / "test_metrics.json").read_text())
    metrics = json.loads(evaluated.test_metrics.read_text())
    assert metrics["test_time_flip"] is True
    assert {k: v for k, v in metrics.items() if k != "test_images_per_second"} == {
        k: v for k, v in tested.items() if k != "test_images_per_second"
    }
    assert evaluated.confusion_test.read_text() == (runs / "test" / "confusion_matrix_test.csv").read_text()
    predicted = pd.read_csv(evaluated.predictions("test"))
    pd.testing.assert_frame_equal(predicted, pd.read_csv(runs / "predict" / "predictions.csv"))
    train = pd.read_csv(evaluated.predictions("train"))
    assert len(train) == N_TRAIN - 100  # the training split, less the 100 validation images
    # The training split is predicted without flip TTA: each image's probabilities are its plain softmax.
    main(
        [
            "predict",
            config,
            *tiny_args(tiny_data, tmp_path, "--trainer.logger.init_args.version=plain"),
            checkpoint,
            "--data.predict_split=train",
            "--model.test_time_flip=false",
        ]
    )
    pd.testing.assert_frame_equal(train, pd.read_csv(runs / "plain" / "predictions.csv"))


@pytest.mark.integration
@pytest.mark.parametrize("network", list(NETWORKS))
def test_every_registered_network_tests_and_predicts_from_its_packaged_config(
    tiny_run: Path, tmp_path: Path, network: str
) -> None:
    config = f"--config={profile_config('fast', network)}"
    tiny_data, checkpoint = shared_fit(tiny_run, network)
    main(["test", config, *tiny_args(tiny_data, tmp_path, "--trainer.logger.init_args.version=test"), checkpoint])
    metrics = json.loads((tmp_path / "runs" / "test" / "test_metrics.json").read_text())
    assert metrics["network"] == network and metrics["images"] == N_TEST
    assert metrics["flops_per_image"] > 0 and metrics["trainable_parameters"] > 0
    packaged = yaml.safe_load(profile_config("fast", network).read_text())
    # bn_cnn's config asks for bf16-mixed: kept where the CPU computes bf16 natively, fp32 where it would emulate it.
    asked = packaged["trainer"].get("precision", "32-true")
    assert metrics["precision"] == (asked if cpu_has_fast_bf16() or not asked.startswith("bf16") else "32-true")
    assert metrics["test_time_flip"] == packaged["model"].get("test_time_flip", False)
    main(["predict", config, *tiny_args(tiny_data, tmp_path, "--trainer.logger.init_args.version=predict"), checkpoint])
    predictions = pd.read_csv(tmp_path / "runs" / "predict" / "predictions.csv")
    assert len(predictions) == N_TEST and predictions["predicted"].between(0, 9).all()
    probabilities = predictions[[f"p_{name}" for name in CLASS_NAMES]].to_numpy()
    assert probabilities.sum(axis=1) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.integration
def test_same_seed_gives_identical_metrics(tiny_data: Path, tmp_path: Path) -> None:
    runs = [
        epoch_metrics(
            fit(
                tiny_data,
                tmp_path / str(i),
                "--model.network=cnn",
                "--trainer.max_epochs=2",
                "--seed_everything=7",
                "--data.augment=true",
            )
        ).drop(columns=["epoch_seconds", "step"])
        for i in range(2)
    ]
    pd.testing.assert_frame_equal(runs[0], runs[1])
    other = epoch_metrics(
        fit(
            tiny_data,
            tmp_path / "other",
            "--model.network=cnn",
            "--trainer.max_epochs=2",
            "--seed_everything=8",
            "--data.augment=true",
        )
    ).drop(columns=["epoch_seconds", "step"])
    assert not runs[0].equals(other)


def test_packaged_reference_configs_hold_the_studys_settings() -> None:
    dense = yaml.safe_load(packaged_configs()["reference_dense"].read_text())
    cnn = yaml.safe_load(packaged_configs()["reference_cnn"].read_text())
    for config, lr, l2 in ((dense, 1e-4, 1e-6), (cnn, 1e-3, 1e-3)):
        assert (config["model"]["learning_rate"], config["model"]["l2_penalty"]) == (lr, l2)
        assert config["model"]["adam_epsilon"] == 1e-7
        assert (config["data"]["batch_size"], config["data"]["val_size"], config["trainer"]["max_epochs"]) == (
            32,
            5000,
            30,
        )


def test_print_config_resolves_a_packaged_config_by_name(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "reference_dense", "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["network"] == "dense" and printed["trainer"]["max_epochs"] == 30


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.network=mlp"], "Expected a typing.Literal['dense', 'cnn', 'bn_cnn']. Got value: mlp"),
        (["--data.val_size=60000"], "val_size must be between 1 and 59,999"),
        (["--ckpt_path=/no/such.ckpt"], "checkpoint /no/such.ckpt does not exist"),
        (["--config=reference_resnet"], "neither a file nor a packaged config"),
    ],
)
def test_bad_values_stop_with_one_line_before_training(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *tiny_args(tiny_data, tmp_path), *args])
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("(`fmnist-pl")]
    assert err[-1].startswith("fmnist-pl: error: ") and message in err[-1]
    assert not (tmp_path / "runs").exists()  # nothing was trained or written


@pytest.mark.integration
def test_console_entry_points_answer_help(capsys: pytest.CaptureFixture) -> None:
    result = subprocess.run([sys.executable, "-m", "fmnist_pl", "--help"], capture_output=True, text=True, check=True)
    assert all(cmd in result.stdout for cmd in ("fit", "validate", "test", "predict", "export", "serve"))
    for command in ("export", "serve"):  # the same main(), in this process: a Python start-up less each
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code in (0, None) and f"usage: fmnist-pl {command}" in capsys.readouterr().out


@pytest.mark.integration
def test_resumed_fit_continues_the_same_history_as_an_uninterrupted_one(tiny_data: Path, tmp_path: Path) -> None:
    straight = fit(tiny_data, tmp_path / "straight", "--trainer.max_epochs=3")
    interrupted = fit(tiny_data, tmp_path / "resumed", "--trainer.max_epochs=2")
    fit(
        tiny_data,
        tmp_path / "resumed",
        "--trainer.max_epochs=3",
        f"--ckpt_path={interrupted / 'checkpoints' / 'last.ckpt'}",
    )
    columns = ["epoch", "train/loss", "train/acc", "val/loss", "val/acc"]
    expected = pd.read_csv(straight / "history.csv")[columns]
    resumed = pd.read_csv(interrupted / "history.csv")[columns]
    assert list(resumed["epoch"]) == [0, 1, 2]  # no epoch lost or repeated
    pd.testing.assert_frame_equal(resumed, expected)  # same batches, same optimizer state: same numbers


@pytest.mark.integration
def test_last_checkpoint_follows_every_epoch_even_without_improvement(tiny_data: Path, tmp_path: Path) -> None:
    import torch

    run = fit(tiny_data, tmp_path, "--trainer.max_epochs=3", "--model.learning_rate=1e-9")  # validation never improves
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert best["epoch"] == 0 and last["epoch"] == 2
    assert [row["epoch"] for row in last["callbacks"]["EpochHistory"]["rows"]] == [0, 1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.integration
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_training_metrics_are_the_exact_per_image_means_of_the_epoch(
    tiny_data: Path, tmp_path: Path, label_smoothing: float
) -> None:
    import torch
    import torch.nn.functional as F

    from fmnist_pl.data import FashionMNISTDataModule
    from fmnist_pl.module import FashionMNISTClassifier

    # A learning rate so small that the weights the epoch ends with are the ones every batch saw.
    run = fit(
        tiny_data,
        tmp_path,
        "--trainer.max_epochs=1",
        "--model.learning_rate=1e-12",
        f"--model.label_smoothing={label_smoothing}",
    )
    logged = pd.read_csv(run / "history.csv").iloc[0]
    model = FashionMNISTClassifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt").eval()
    data = FashionMNISTDataModule(data_dir=str(tiny_data), require_official=False, val_size=100, batch_size=32)
    data.prepare_data()
    data.setup("fit")
    images, labels = (torch.cat(t) for t in zip(*data.train_dataloader(), strict=True))
    assert len(labels) == 540  # 16 full batches and one of 28: the sums must weight by batch size
    with torch.no_grad():
        logits = model(images)
    # Plain cross-entropy whatever the smoothing used for training, so runs stay comparable with the study.
    assert logged["train/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert logged["train/acc"] == pytest.approx((logits.argmax(dim=1) == labels).float().mean().item(), abs=1e-9)


def test_the_seed_reaches_the_data_module_as_an_argument(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fmnist_pl.data import FashionMNISTDataModule

    seen = []

    class Seen(Exception):
        pass

    def stop_before_loading(self: FashionMNISTDataModule) -> None:
        seen.append(self.hparams.seed)
        raise Seen  # nothing trains

    monkeypatch.setattr(FashionMNISTDataModule, "prepare_data", stop_before_loading)
    for seed in (5, 6):
        with pytest.raises(Seen):
            main(["fit", *tiny_args(tiny_data, tmp_path), f"--seed_everything={seed}"])
    assert seen == [5, 6]


def test_evaluate_needs_a_checkpoint(tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:  # evaluating an untrained network is never what was meant
        main(["evaluate", *tiny_args(tiny_data, tmp_path)])
    assert exit_.value.code == 2
    assert "required: evaluate.ckpt_path" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_command_reuses_the_memory_it_frees_instead_of_faulting_each_large_block_in_anew() -> None:
    """A 64 MB tensor (a 1,000-image batch of bn_cnn's activations is 50 MB) made and freed 20 times: in plain
    Python glibc maps each one afresh, page by page; once `fmnist-pl`'s entry point has run, the heap reuses it."""
    probe = (
        "import contextlib, io, resource, sys, torch\n"
        "if sys.argv[1] == 'fmnist-pl':\n"
        "    from fmnist_pl.cli import main\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(['report', '--help'])\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20):\n"
        "    torch.ones(16 * 2**20)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    faults = {
        mode: int(
            subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True).stdout
        )
        for mode in ("python", "fmnist-pl")
    }
    assert faults["python"] > 20 * 16_000 and faults["fmnist-pl"] * 5 < faults["python"], faults
