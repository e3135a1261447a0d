"""The architectures, as plain nn.Modules, in one registry: the study's two networks and a modern small CNN.

Adding a network is one class decorated with `@register("name")` plus its config file(s) `<profile>_<name>.yaml`;
the CLI, the pipeline, the report and the tests take the list of networks from `NETWORKS`. Torch alone, no
Lightning: the pipeline's own process sizes and checks networks with these and never loads Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fmnist_pl.errors import ConfigError, first_line

NETWORKS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a network available as `--model.network <name>` and in the pipeline."""

    def add(network: type[nn.Module]) -> type[nn.Module]:
        if name in NETWORKS:
            raise ValueError(f"network name {name!r} is registered twice")
        NETWORKS[name] = network
        return network

    return add


def keras_init_(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases, Keras' defaults (PyTorch's are Kaiming-uniform with random biases)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)


@register("dense")
class StudyDenseNet(nn.Module):
    """The study's 12-layer dense ReLU network: 784 → 750, 750, 750, 500, 250, 125, 75, 50, 10, 10, 10 → 10."""

    hidden_widths = (750, 750, 750, 500, 250, 125, 75, 50, 10, 10, 10)

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = 28 * 28
        for width in self.hidden_widths:
            layers += [nn.Linear(width_in, width), nn.ReLU()]
            width_in = width
        layers.append(nn.Linear(width_in, 10))  # logits; softmax lives in the loss
        self.layers = nn.Sequential(*layers)
        keras_init_(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)

    def penalized_weights(self) -> list[torch.Tensor]:
        """The weight matrices the study's L2 penalty applies to: every dense layer's kernel."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Linear)]


@register("cnn")
class StudyLeNetCNN(nn.Module):
    """The study's LeNet-5-style CNN: three 5×5 tanh convolutions with average pooling, then a tanh dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.Tanh(),
            nn.AvgPool2d(2),  # 28×28×6 → 14×14×6
            nn.Conv2d(6, 36, 5),
            nn.Tanh(),
            nn.AvgPool2d(2),  # 10×10×36 → 5×5×36
            nn.Conv2d(36, 108, 5),
            nn.Tanh(),
            nn.Flatten(),  # 1×1×108 → 108
        )
        self.classifier = nn.Sequential(
            nn.Linear(108, 84),
            nn.Tanh(),
            nn.Linear(84, 42),
            nn.Tanh(),
            nn.Linear(42, 21),
            nn.Tanh(),
            nn.Linear(21, 10),
            nn.Tanh(),
            nn.Linear(10, 10),  # logits
        )
        keras_init_(self)
        # Channels-last weights and inputs take oneDNN's faster convolution kernels: +15-25 % CNN training
        # throughput on CPU (batch 32-256), the same arithmetic. load_state_dict keeps this layout.
        self.features.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=torch.channels_last)
        return self.classifier(self.features(images))

    def penalized_weights(self) -> list[torch.Tensor]:
        """The study penalized only the dense layers' kernels, not the convolutions."""
        return [m.weight for m in self.classifier if isinstance(m, nn.Linear)]


def conv_bn_gelu(channels_in: int, channels_out: int, pool: bool = False) -> list[nn.Module]:
    """3×3 convolution (no bias: BatchNorm's shift replaces it), optionally 2×2 max-pooling, BatchNorm, GELU.

    Pooling straight after the convolution, before BatchNorm and GELU, runs those two on a quarter of the pixels:
    on a 2-core CPU that made a training step 2.8 times cheaper than pooling after them (benchmarks/README.md).
    """
    pooling = [nn.MaxPool2d(2)] if pool else []
    return [
        nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
        *pooling,
        nn.BatchNorm2d(channels_out),
        nn.GELU(),
    ]


class PatchWhitening(nn.Conv2d):
    """A frozen first convolution that whitens 3×3 pixel patches: its filters are the eigenvectors of the training
    images' patch covariance, scaled by 1/sqrt(eigenvalue), each also negated (so GELU after it loses nothing).
    Computed once from training images (`fit`), never trained: it decorrelates the inputs so that the layers after
    it learn in fewer steps (airbench's first layer). Only its bias is trained."""

    def __init__(self, patch: int = 3, epsilon: float = 5e-4) -> None:
        super().__init__(1, 2 * patch * patch, patch, padding=patch // 2)
        self.weight.requires_grad_(False)
        self.epsilon = epsilon
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        """Set the filters from N×1×28×28 (normalized) training images."""
        size = self.kernel_size[0]
        patches = images.float().unfold(2, size, 1).unfold(3, size, 1).reshape(-1, size * size)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / (eigenvalues[:, None] + self.epsilon).sqrt()).reshape(-1, 1, size, size)
        self.weight.copy_(torch.cat((filters, -filters)))


@register("bn_cnn")
class BatchNormCNN(nn.Module):
    """A small modern CNN for accuracy per CPU-minute: a 3×3 stem at 28×28 pixels, then three stages of two 3×3
    conv-BatchNorm-GELU layers that each max-pool after their first convolution (28→14→7→3), global max-pooling and
    one linear layer. Its options are the time-to-accuracy levers of benchmarks/README.md."""

    # Pixel statistics of the Fashion-MNIST training set (after /255): centred inputs suit the first convolution.
    pixel_mean, pixel_std = 0.286, 0.353

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128),
        whitening: bool = True,
        dirac_init: bool = True,
        batchnorm_scale: bool = False,
    ) -> None:
        """The defaults are the network the project ships and reports (`fast_bn_cnn`, the README's results); each
        option turns one lever of benchmarks/README.md's "Time to 94 %" off or changes it.

        Args:
        widths: channels of each stage.
        whitening: the stem is a frozen patch-whitening convolution (`PatchWhitening`), set from the training
            images when a fit starts, instead of a trained convolution.
        dirac_init: start every 3×3 convolution as the identity on its first input-many filters (dirac), so each
            stage first passes its input through and learns a change to it.
        batchnorm_scale: train BatchNorm's scale; off keeps it at 1 (only the shift is learned), as airbench does.
        """
        super().__init__()
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be positive channel counts, got {widths}")
        self.stem = (
            nn.Sequential(PatchWhitening(), nn.GELU()) if whitening else nn.Sequential(*conv_bn_gelu(1, widths[0]))
        )
        channels_in = self.stem[0].out_channels
        stages: list[nn.Module] = []
        for width in widths:
            stages += conv_bn_gelu(channels_in, width, pool=True) + conv_bn_gelu(width, width)
            channels_in = width
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Linear(channels_in, 10)
        for layer in self.modules():
            if isinstance(layer, nn.BatchNorm2d) and not batchnorm_scale:
                layer.weight.requires_grad_(False)  # stays 1
            if dirac_init and type(layer) is nn.Conv2d:  # not the whitening filters
                nn.init.dirac_(layer.weight[: layer.in_channels])
        self.to(memory_format=torch.channels_last)  # oneDNN's fast convolution layout on CPU

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] to centred, unit-variance pixels."""
        return (images - self.pixel_mean) / self.pixel_std

    def fit_to_data(self, images: torch.Tensor) -> None:
        """Set what is computed from training images (the whitening filters) before training starts."""
        if isinstance(self.stem[0], PatchWhitening):
            self.stem[0].fit(self.normalize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(images).contiguous(memory_format=torch.channels_last))
        return self.classifier(self.features(x).amax(dim=(2, 3)))  # global max-pool

    def penalized_weights(self) -> list[torch.Tensor]:
        """No Keras-style L2 term: this network is regularized by its optimizer's decoupled weight decay."""
        return []


def count_trainable_parameters(network: nn.Module) -> int:
    """Number of trainable parameters, as Keras' model.summary() counts them."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def forward_flops(network: nn.Module) -> int:
    """FLOPs of one image's forward pass (a multiply-add counts 2), as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(network.parameters())
    was_training = network.training
    network.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(torch.zeros(1, 1, 28, 28, device=parameter.device, dtype=parameter.dtype))
    network.train(was_training)
    return int(counter.get_total_flops())


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `fmnist-pl fit`, checked: loadable, and its weights fit the current architecture of
    the network it names. Anything else is one ConfigError naming the file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, random bytes, not a zip: torch raises many kinds of error for these
        raise ConfigError(
            f"checkpoint {path} is damaged or not a checkpoint ({type(e).__name__}); "
            "pass a .ckpt file written by `fmnist-pl fit`"
        ) from e
    network = checkpoint.get("hyper_parameters", {}).get("network") if isinstance(checkpoint, dict) else None
    if network not in NETWORKS or "state_dict" not in checkpoint:
        raise ConfigError(f"checkpoint {path} was not written by `fmnist-pl fit` (no network or weights in it)")
    weights = {k.removeprefix("network."): v for k, v in checkpoint["state_dict"].items() if k.startswith("network.")}
    try:
        NETWORKS[network](**(checkpoint["hyper_parameters"].get("network_options") or {})).load_state_dict(weights)
    except (RuntimeError, TypeError) as e:  # TypeError: options the current network no longer takes
        raise ConfigError(
            f"checkpoint {path}: its weights do not fit the current {network!r} architecture ({first_line(e)})"
        ) from e
    return checkpoint
