"""The shared LightningModule without a Trainer: the loss, flip test-time augmentation, metrics and optimizers."""

from __future__ import annotations

import pydantic
import pytest
import torch
import torch.nn.functional as F

from fmnist_pl.errors import ConfigError, one_line
from fmnist_pl.module import FashionMNISTClassifier


def batch(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


@pytest.mark.parametrize("network", ["dense", "cnn"])
def test_training_loss_is_cross_entropy_plus_the_keras_l2_term(network: str) -> None:
    torch.manual_seed(0)
    module = FashionMNISTClassifier(network=network, l2_penalty=1e-3, label_smoothing=0.1)
    images, labels = batch()
    loss = module.training_step((images, labels), 0)
    expected = F.cross_entropy(module(images), labels, label_smoothing=0.1) + 1e-3 * sum(
        (w**2).sum() for w in module.network.penalized_weights()
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # The epoch totals count images and report the plain (unsmoothed) cross-entropy.
    assert module.train_images.item() == 12
    assert module.train_loss_sum.item() / 12 == pytest.approx(F.cross_entropy(module(images), labels).item(), rel=1e-5)


def test_no_l2_term_for_a_network_regularized_by_weight_decay() -> None:
    module = FashionMNISTClassifier(network="bn_cnn", l2_penalty=1e-3)
    assert module.l2_term() == 0.0


def test_flip_tta_averages_the_plain_and_mirrored_probabilities() -> None:
    torch.manual_seed(0)
    plain = FashionMNISTClassifier(network="cnn").eval()
    tta = FashionMNISTClassifier(network="cnn", test_time_flip=True).eval()
    tta.load_state_dict(plain.state_dict())
    images, labels = batch()
    with torch.no_grad():
        expected = (plain(images).softmax(1) + plain(images.flip(-1)).softmax(1)) / 2
        out = tta.predict_step((images, labels), 0)
        _, untouched = plain.class_probabilities(images)
    assert torch.allclose(out["probabilities"], expected, atol=1e-6)
    assert torch.equal(out["predicted"], expected.argmax(1))
    assert torch.allclose(untouched, plain(images).softmax(1))  # off: the plain softmax
    assert not torch.allclose(out["probabilities"], untouched)  # a mirror image is another input


def test_test_metrics_with_tta_keep_the_accuracy_without_it() -> None:
    torch.manual_seed(0)
    module = FashionMNISTClassifier(network="cnn", test_time_flip=True).eval()
    logged = {}
    module.log = lambda name, metric, **kwargs: logged.update({name: metric})  # no Trainer: keep what is logged
    images, labels = batch(40)
    with torch.no_grad():
        module.evaluation_step((images, labels), "test")
        plain_correct = (module(images).argmax(1) == labels).float().mean().item()
        _, probabilities = module.class_probabilities(images)
    results = {name: metric.compute().item() for name, metric in logged.items()}
    assert results["test/acc_without_flip"] == pytest.approx(plain_correct)
    assert results["test/acc"] == pytest.approx((probabilities.argmax(1) == labels).float().mean().item())
    assert module.confusion_matrix("test").sum() == 40
    assert results["test/loss"] == pytest.approx(F.cross_entropy(module(images), labels).item(), rel=1e-5)


def test_adamw_decays_weights_but_not_biases_or_batchnorm() -> None:
    module = FashionMNISTClassifier(network="bn_cnn", optimizer="adamw", learning_rate=1e-2, weight_decay=5e-4)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, others = optimizer.param_groups
    assert decayed["weight_decay"] == 5e-4 and others["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in others["params"])
    # Every trained parameter is in one group; the frozen ones (whitening filters, BatchNorm scales) in none.
    grouped = {id(p) for group in (decayed, others) for p in group["params"]}
    assert len(decayed["params"]) + len(others["params"]) == len(grouped)
    assert grouped == {id(p) for p in module.parameters() if p.requires_grad}
    assert any(not p.requires_grad for p in module.parameters())  # the shipped bn_cnn has frozen parameters


def test_sgd_is_nesterov() -> None:
    optimizer = FashionMNISTClassifier(network="cnn", optimizer="sgd", learning_rate=0.1).configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"network": "resnet"}, "network: Input should be 'dense', 'cnn' or 'bn_cnn' (given 'resnet')"),
        ({"learning_rate": 0.0}, "learning_rate: Input should be greater than 0 (given 0.0)"),
        ({"l2_penalty": -1.0}, "l2_penalty: Input should be greater than or equal to 0 (given -1.0)"),
        ({"weight_decay": -1.0}, "weight_decay: Input should be greater than or equal to 0 (given -1.0)"),
        ({"warmup_fraction": 1.0}, "warmup_fraction: Input should be less than 1 (given 1.0)"),
        ({"label_smoothing": 1.0}, "label_smoothing: Input should be less than 1 (given 1.0)"),
        ({"ema_decay": 1.0}, "ema_decay: Input should be less than 1 (given 1.0)"),
        (
            {"network": "bn_cnn", "network_options": {"depth": 5}},
            "model.network_options {'depth': 5} do not fit network 'bn_cnn': BatchNormCNN.__init__() got an unexpected keyword argument 'depth'",
        ),
    ],
)
def test_bad_options_are_rejected_in_one_line(kwargs: dict, message: str) -> None:
    # The types hold the constraints, for Python callers as for the CLI; errors.one_line is what the CLI prints.
    with pytest.raises((pydantic.ValidationError, ConfigError)) as error:
        FashionMNISTClassifier(**kwargs)
    assert one_line(error.value) == message
