"""The time-to-accuracy options (benchmarks/README.md): each does its job, and stops a test when it no longer does."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_args
from torch import nn

from fmnist_pl import cli
from fmnist_pl.cli import main
from fmnist_pl.data import FashionMNISTDataModule, ShardedBatches
from fmnist_pl.module import FashionMNISTClassifier
from fmnist_pl.networks import BatchNormCNN, PatchWhitening


def test_whitening_filters_decorrelate_the_training_patches() -> None:
    torch.manual_seed(0)
    noise = torch.randn(64, 1, 29, 29)
    images = noise[..., 1:, 1:] + noise[..., :-1, 1:] + noise[..., 1:, :-1]  # neighbouring pixels correlated
    whitening = PatchWhitening()
    whitening.fit(images)
    responses = nn.functional.conv2d(images, whitening.weight[:9])  # the positive half, over unpadded patches
    covariance = responses.permute(1, 0, 2, 3).reshape(9, -1).cov(correction=0) + responses.mean((0, 2, 3)).outer(
        responses.mean((0, 2, 3))
    )
    assert torch.allclose(covariance, torch.eye(9), atol=0.01)  # what the layers after it see is white
    assert torch.equal(whitening.weight[9:], -whitening.weight[:9])
    assert not whitening.weight.requires_grad and whitening.bias.requires_grad


def test_dirac_init_starts_every_trained_convolution_as_the_identity_on_its_inputs() -> None:
    net = BatchNormCNN(whitening=False)  # a trained stem too: seven convolutions, all dirac-initialized
    convs = [m for m in net.modules() if type(m) is nn.Conv2d]
    assert len(convs) == 7
    for conv in convs:
        x = torch.randn(2, conv.in_channels, 9, 9)
        assert torch.allclose(conv(x)[:, : conv.in_channels], x, atol=1e-6)
    off = BatchNormCNN(whitening=False, dirac_init=False)
    assert not torch.equal(off.stem[0].weight[:1], convs[0].weight[:1])  # off: PyTorch's random init


def test_batchnorm_scale_off_is_not_trained() -> None:
    module = FashionMNISTClassifier("bn_cnn", network_options={"batchnorm_scale": False}, optimizer="adamw")
    norms = [m for m in module.network.modules() if isinstance(m, nn.BatchNorm2d)]
    trained = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert norms and all(not n.weight.requires_grad and id(n.weight) not in trained for n in norms)
    assert all(id(n.bias) in trained for n in norms)


def test_bias_lr_scale_multiplies_the_rate_of_biases_and_batchnorm_only() -> None:
    module = FashionMNISTClassifier("bn_cnn", optimizer="adamw", learning_rate=0.01, bias_lr_scale=8.0)
    kernels, others = module.configure_optimizers().param_groups
    assert kernels["lr"] == 0.01 and others["lr"] == pytest.approx(0.08)
    assert all(p.ndim > 1 for p in kernels["params"]) and all(p.ndim <= 1 for p in others["params"])


def test_alternating_flips_mirror_each_image_the_other_way_every_epoch() -> None:
    epoch = [0]
    batches = ShardedBatches(
        torch.zeros(400, 28, 28, dtype=torch.uint8),
        torch.zeros(400, dtype=torch.int64),
        100,
        shuffle=True,
        augment=True,
        max_shift=0,
        alternating_flips=True,
        seed=3,
        epoch=lambda: epoch[0],
    )
    plans = []
    for e in range(3):
        epoch[0] = e
        plans.append(batches.alternating_flip_plan())
    assert 150 < plans[0].sum() < 250  # a random half first
    assert torch.equal(plans[1], ~plans[0]) and torch.equal(plans[2], plans[0])
    # and it is what the batches do: an image with a bright left edge comes out bright on the right when planned
    images = torch.zeros(400, 28, 28, dtype=torch.uint8)
    images[:, :, 0] = 255
    batches.images = images
    epoch[0] = 1
    order = batches._indices()
    flipped = torch.cat([b[:, 0, 0, -1] == 1 for b, _ in batches])
    assert torch.equal(flipped, plans[1][order])


@pytest.mark.integration
def test_ema_weights_are_the_ones_validated_checkpointed_and_tested(tiny_data: Path, tmp_path: Path) -> None:
    options = [
        "--model.network=bn_cnn",
        "--model.optimizer=adamw",
        "--model.learning_rate=0.01",
        "--model.ema_decay=0.9",
        "--model.network_options={widths: [8, 8, 8], whitening: true}",
    ]
    main(
        [
            "fit",
            *tiny_args(
                tiny_data, tmp_path, "--trainer.logger.init_args.version=fit", "--trainer.max_epochs=2", *options
            ),
        ]
    )
    run = tmp_path / "runs" / "fit"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    averaged, current = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert not torch.equal(averaged["network.classifier.weight"], current["network.classifier.weight"])

    # The validation loss in the history is the averaged network's, not the trained one's.
    data = FashionMNISTDataModule(str(tiny_data), require_official=False, val_size=100)
    data.setup()
    images, labels = data.tensors.train_images[:100].unsqueeze(1).float() / 255, data.tensors.train_labels[:100]
    hyper_parameters = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    losses = {}
    for name, weights in (("averaged", averaged), ("current", current)):
        module = FashionMNISTClassifier(**hyper_parameters)
        module.load_state_dict(weights)
        with torch.no_grad():
            losses[name] = nn.functional.cross_entropy(module.eval()(images), labels).item()
    logged = pd.read_csv(run / "history.csv")["val/loss"].iloc[-1]
    assert logged == pytest.approx(losses["averaged"], rel=1e-4) and logged != pytest.approx(
        losses["current"], rel=1e-2
    )

    # The whitening filters are the ones computed from the training images, untouched by two epochs of training.
    fresh = PatchWhitening()
    fresh.fit(BatchNormCNN().normalize(data.train_images_sample(5_000)))
    assert torch.allclose(current["network.stem.0.weight"], fresh.weight, atol=1e-5)
    assert torch.allclose(current["network.stem.0.weight"], averaged["network.stem.0.weight"], atol=1e-6)


@pytest.mark.integration
def test_flip_tta_typed_on_the_command_line_wins_over_the_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    main(
        [
            "fit",
            *tiny_args(
                tiny_data,
                tmp_path,
                "--trainer.logger.init_args.version=fit",
                "--trainer.max_epochs=1",
                "--model.network=cnn",
                "--model.test_time_flip=true",
            ),
        ]
    )
    best = tmp_path / "runs" / "fit" / "checkpoints" / "best.ckpt"
    for flip in ("true", "false"):
        main(
            [
                "test",
                *tiny_args(tiny_data, tmp_path, f"--trainer.logger.init_args.version=test-{flip}"),
                f"--ckpt_path={best}",
                f"--model.test_time_flip={flip}",
            ]
        )
        metrics = pd.read_json(tmp_path / "runs" / f"test-{flip}" / "test_metrics.json", typ="series")
        assert metrics["test_time_flip"] == (flip == "true")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("native", "typed", "expected"),
    [(False, False, "32-true"), (True, False, "bf16-mixed"), (False, True, "bf16-mixed")],
)
def test_a_config_files_bf16_gives_way_to_fp32_on_a_cpu_that_emulates_it(
    tiny_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    native: bool,
    typed: bool,
    expected: str,
) -> None:
    monkeypatch.setattr(cli, "cpu_has_fast_bf16", lambda: native)
    config = tmp_path / "bf16.yaml"
    config.write_text("model:\n  network: cnn\ntrainer:\n  precision: bf16-mixed\n  max_epochs: 1\n")
    main(
        [
            "fit",
            f"--config={config}",
            *tiny_args(
                tiny_data,
                tmp_path,
                "--trainer.logger.init_args.version=fit",
                "--trainer.limit_train_batches=2",
                "--trainer.limit_val_batches=1",
            ),
            *(["--trainer.precision=bf16-mixed"] if typed else []),
        ]
    )
    config_used = (tmp_path / "runs" / "fit" / "config.yaml").read_text()
    assert f"precision: {expected}" in config_used
    assert ("no native bfloat16" in capsys.readouterr().err) == (expected == "32-true")
