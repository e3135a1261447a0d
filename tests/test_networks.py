"""The registered architectures: the study's two (layers, Keras initialization, L2 penalty) and BatchNormCNN."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fmnist_pl.configs import profile_config
from fmnist_pl.module import FashionMNISTClassifier
from fmnist_pl.networks import (
    NETWORKS,
    BatchNormCNN,
    PatchWhitening,
    StudyDenseNet,
    StudyLeNetCNN,
    count_trainable_parameters,
)


@pytest.mark.parametrize(
    ("network", "parameters"), [(StudyDenseNet, 2_261_465), (StudyLeNetCNN, 116_859), (BatchNormCNN, 292_636)]
)
def test_trainable_parameters_are_pinned(network: type[nn.Module], parameters: int) -> None:
    net = network()
    assert count_trainable_parameters(net) == parameters
    assert net(torch.rand(5, 1, 28, 28)).shape == (5, 10)


def test_layers_and_activations_are_the_studys() -> None:
    dense = StudyDenseNet()
    widths = [m.out_features for m in dense.modules() if isinstance(m, nn.Linear)]
    assert widths == [750, 750, 750, 500, 250, 125, 75, 50, 10, 10, 10, 10]
    assert sum(isinstance(m, nn.ReLU) for m in dense.modules()) == 11
    cnn = StudyLeNetCNN()
    convs = [(m.out_channels, m.kernel_size, m.padding) for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [(6, (5, 5), (2, 2)), (36, (5, 5), (0, 0)), (108, (5, 5), (0, 0))]
    assert sum(isinstance(m, nn.AvgPool2d) for m in cnn.modules()) == 2
    assert sum(isinstance(m, nn.Tanh) for m in cnn.modules()) == 7  # 3 conv + 4 dense
    assert [m.out_features for m in cnn.classifier if isinstance(m, nn.Linear)] == [84, 42, 21, 10, 10]


@pytest.mark.parametrize("network", [StudyDenseNet, StudyLeNetCNN])
def test_initialization_is_keras_glorot_uniform_with_zero_biases(network: type[nn.Module]) -> None:
    torch.manual_seed(0)
    for layer in network().modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            receptive = layer.weight[0, 0].numel()
            fan_in, fan_out = layer.weight.shape[1] * receptive, layer.weight.shape[0] * receptive
            limit = math.sqrt(6 / (fan_in + fan_out))
            assert torch.all(layer.bias == 0)
            assert layer.weight.abs().max() <= limit
            if layer.weight.numel() > 5_000:  # enough samples for the uniform's std to show
                assert layer.weight.std().item() == pytest.approx(limit / math.sqrt(3), rel=0.05)


def test_dense_penalty_covers_every_kernel_and_no_bias() -> None:
    module = FashionMNISTClassifier(network="dense", l2_penalty=1e-6)
    kernels = [m.weight for m in module.network.modules() if isinstance(m, nn.Linear)]
    assert len(module.network.penalized_weights()) == 12
    expected = 1e-6 * sum((w**2).sum() for w in kernels)
    assert module.l2_term().item() == pytest.approx(expected.item(), rel=1e-6)


def test_cnn_penalty_touches_only_dense_kernels() -> None:
    module = FashionMNISTClassifier(network="cnn", l2_penalty=1e-3)
    module.l2_term().backward()
    for name, parameter in module.network.named_parameters():
        penalized = name.startswith("classifier") and name.endswith("weight")
        if penalized:  # d/dW of c*sum(W**2) is 2cW
            assert torch.allclose(parameter.grad, 2e-3 * parameter.detach())
        else:
            assert parameter.grad is None or torch.all(parameter.grad == 0), name


def test_optimizer_is_adam_with_keras_epsilon_and_no_decoupled_decay() -> None:
    module = FashionMNISTClassifier(network="cnn", learning_rate=1e-3)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["eps"], group["betas"], group["weight_decay"]) == (1e-3, 1e-7, (0.9, 0.999), 0)


def test_cnn_runs_channels_last_with_the_same_arithmetic() -> None:
    torch.manual_seed(0)
    cnn = StudyLeNetCNN()
    assert all(
        c.weight.is_contiguous(memory_format=torch.channels_last) for c in cnn.features if isinstance(c, nn.Conv2d)
    )
    images = torch.rand(8, 1, 28, 28)
    reference = nn.Sequential(cnn.features, cnn.classifier)  # the same layers, fed a contiguous NCHW batch
    plain_weights = {k: v.contiguous() for k, v in cnn.state_dict().items()}
    fresh = StudyLeNetCNN()
    fresh.load_state_dict(plain_weights)  # a checkpoint's plain tensors keep the network's layout when loaded
    assert fresh.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fresh(images), reference(images.contiguous()), atol=1e-5)


def test_registry_names_every_network_once_and_each_builds() -> None:
    assert {"dense", "cnn", "bn_cnn"} <= set(NETWORKS)  # the study's two networks and the modern CNN, among others
    for name, network in NETWORKS.items():
        assert network()(torch.rand(3, 1, 28, 28)).shape == (3, 10)
        assert profile_config("fast", name) is not None, f"{name} has no fmnist_pl/configs/fast_{name}.yaml"
    from fmnist_pl.networks import register

    with pytest.raises(ValueError, match="registered twice"):
        register("cnn")(nn.Identity)


def test_batchnorm_cnn_layers_and_channels_last() -> None:
    net = BatchNormCNN()  # the shipped network: a whitening stem (1 -> 18 filters), then 32/64/128
    convs = [(m.in_channels, m.out_channels, m.kernel_size, m.bias) for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c_in, c_out) for c_in, c_out, *_ in convs] == [
        (1, 18),
        (18, 32),
        (32, 32),
        (32, 64),
        (64, 64),
        (64, 128),
        (128, 128),
    ]
    assert isinstance(net.stem[0], PatchWhitening) and not net.stem[0].weight.requires_grad
    # BatchNorm's shift is the trained convolutions' bias; BatchNorm's scale stays 1.
    assert all(kernel == (3, 3) and bias is None for _, _, kernel, bias in convs[1:])
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6 and not any(n.weight.requires_grad for n in norms)
    # Each stage pools straight after its first convolution, before BatchNorm: 28 -> 14 -> 7 -> 3 pixels.
    layers = list(net.features)
    pools = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(isinstance(layers[i - 1], nn.Conv2d) for i in pools)
    assert net.features(torch.rand(2, 18, 28, 28)).shape == (2, 128, 3, 3)
    assert all(
        c.weight.is_contiguous(memory_format=torch.channels_last) for c in net.modules() if isinstance(c, nn.Conv2d)
    )
    assert net.penalized_weights() == []  # regularized by the optimizer's weight decay instead
