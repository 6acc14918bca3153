"""DC's network zoo, sized for any image shape: ConvNet family, MLP, LeNet, AlexNet, VGG11, ResNet18.

Each builder takes the input shape (channels, height, width), the class count and a
`NetworkConfig`. Poolings are skipped once a feature map is down to 1 pixel, so the 8x8 digits
go through every architecture; 28x28 inputs get DC's extra padding so they behave as 32x32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from condense.schema import ConfigError, NetworkConfig, require_choice

Shape = tuple[int, int, int]
NORMS = ("instance", "batch", "layer", "group", "none")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "sigmoid": nn.Sigmoid,
    "leakyrelu": lambda: nn.LeakyReLU(0.01),
    "swish": nn.SiLU,
}
POOLINGS = ("avg", "max", "none")


def make_norm(kind: str, channels: int, size: int | None = None) -> nn.Module:
    """DC's norms. 'instance' is GroupNorm with one group per channel (affine). 'layer' is DC's
    nn.LayerNorm over (C, H, W) with a (C, H, W) affine where the map size is given (the
    ConvNet, DC's only LayerNorm network); elsewhere one-group GroupNorm (per-channel affine)."""
    if kind == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        if size is not None:
            return nn.LayerNorm([channels, size, size], elementwise_affine=True)
        return nn.GroupNorm(1, channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(4 if channels % 4 == 0 else 1, channels, affine=True)
    return nn.Identity()


def make_pool(kind: str, size: int) -> tuple[nn.Module, int]:
    """A 2x2 pooling and the new spatial size; none once the map is down to one pixel."""
    if kind == "none" or size < 2:
        return nn.Identity(), size
    pool = nn.AvgPool2d(2, 2) if kind == "avg" else nn.MaxPool2d(2, 2)
    return pool, size // 2


def first_padding(size: int, base: int) -> int:
    """DC pads 28x28 inputs by 3 in the first 3x3 conv so they are pooled like 32x32 ones."""
    return base + 2 if size == 28 else base


class ConvNet(nn.Module):
    """depth x [3x3 conv -> norm -> activation -> 2x2 pool], then one linear classifier."""

    def __init__(self, shape: Shape, num_classes: int, cfg: NetworkConfig) -> None:
        super().__init__()
        channels, size, _ = shape
        layers: list[nn.Module] = []
        for d in range(cfg.depth):
            padding = first_padding(size, 1) if d == 0 else 1
            layers.append(nn.Conv2d(channels, cfg.width, 3, padding=padding))
            size = size + 2 * padding - 2
            channels = cfg.width
            layers += [make_norm(cfg.norm, channels, size), ACTIVATIONS[cfg.activation]()]
            pool, size = make_pool(cfg.pooling, size)
            layers.append(pool)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * size * size, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class MLP(nn.Module):
    def __init__(self, shape: Shape, num_classes: int, cfg: NetworkConfig) -> None:
        super().__init__()
        c, h, w = shape
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, 128),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(128, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class SequentialNet(nn.Module):
    """A conv feature stack sized by a dry run, then a stack of linear layers."""

    def __init__(self, shape: Shape, features: nn.Sequential, hidden: list[int], num_classes: int):
        super().__init__()
        self.features = features
        with torch.no_grad():
            flat = features(torch.zeros(2, *shape)).flatten(1).shape[1]
        dims = [flat, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.head = nn.Sequential(*layers)
        self.classifier = nn.Linear(dims[-1], num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def conv_stack(shape: Shape, plan: list[tuple[int, int, int] | str], norm: str) -> nn.Sequential:
    """Convs given as (out, kernel, padding) and 'M' for a 2x2 max-pool (skipped at 1 pixel)."""
    channels, size, _ = shape
    layers: list[nn.Module] = []
    for step in plan:
        if step == "M":
            pool, size = make_pool("max", size)
            layers.append(pool)
            continue
        out, kernel, padding = step  # type: ignore[misc]
        layers += [
            nn.Conv2d(channels, out, kernel, padding=padding),
            make_norm(norm, out),
            nn.ReLU(inplace=True),
        ]
        channels, size = out, size + 2 * padding - kernel + 1
    return nn.Sequential(*layers)


def lenet(shape: Shape, num_classes: int, cfg: NetworkConfig) -> nn.Module:
    # DC pads 28x28 inputs by 2; tiny inputs (digits) need padding in both 5x5 convs to survive.
    plan = [(6, 5, 0 if shape[1] >= 32 else 2), "M", (16, 5, 2 if shape[1] < 16 else 0), "M"]
    return SequentialNet(shape, conv_stack(shape, plan, cfg.norm), [120, 84], num_classes)


def alexnet(shape: Shape, num_classes: int, cfg: NetworkConfig) -> nn.Module:
    plan = [
        (128, 5, 4 if shape[1] == 28 else 2),
        "M",
        (192, 5, 2),
        "M",
        (256, 3, 1),
        (192, 3, 1),
        (192, 3, 1),
        "M",
    ]
    return SequentialNet(shape, conv_stack(shape, plan, cfg.norm), [], num_classes)


def vgg11(shape: Shape, num_classes: int, cfg: NetworkConfig) -> nn.Module:
    p = first_padding(shape[1], 1)
    plan = [
        (64, 3, p),
        "M",
        (128, 3, 1),
        "M",
        (256, 3, 1),
        (256, 3, 1),
        "M",
        (512, 3, 1),
        (512, 3, 1),
        "M",
        (512, 3, 1),
        (512, 3, 1),
        "M",
    ]
    return SequentialNet(shape, conv_stack(shape, plan, cfg.norm), [], num_classes)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, avg_pool: bool) -> None:
        super().__init__()
        # ResNet18BN_AP (DC's BasicBlock_AP): a stride-1 conv, its norm and ReLU, then 2x2 average
        # pooling, in place of a strided conv.
        conv_stride = 1 if avg_pool else stride
        self.down = nn.AvgPool2d(2, 2) if avg_pool and stride > 1 else nn.Identity()
        self.conv1 = nn.Conv2d(cin, cout, 3, conv_stride, 1, bias=False)
        self.bn1 = make_norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            sc_down = nn.AvgPool2d(2, 2) if avg_pool and stride > 1 else nn.Identity()
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, conv_stride, bias=False), sc_down, make_norm(norm, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down(torch.relu(self.bn1(self.conv1(x))))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, shape: Shape, num_classes: int, cfg: NetworkConfig, avg_pool: bool = False):
        super().__init__()
        size = shape[1]
        self.stem = nn.Sequential(
            nn.Conv2d(shape[0], 64, 3, 1, 1, bias=False),
            make_norm(cfg.norm, 64),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            # Strides stop once the map is one pixel, so 8x8 inputs still fit.
            s = stride if size >= 2 else 1
            size = size // s
            blocks += [
                BasicBlock(cin, cout, s, cfg.norm, avg_pool),
                BasicBlock(cout, cout, 1, cfg.norm, avg_pool),
            ]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        # ResNet18BN_AP flattens its last map (512 x 4 x 4 at 32 px, 3 x 3 at 28) straight into the
        # classifier, as DC's does; the strided ResNet18 pools it globally.
        self.global_pool = not avg_pool
        self.classifier = nn.Linear(512 if self.global_pool else 512 * size * size, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        if self.global_pool:
            out = nn.functional.adaptive_avg_pool2d(out, 1)
        return out.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


Builder = Callable[[Shape, int, NetworkConfig], nn.Module]


@dataclass(frozen=True)
class Architecture:
    """One network of the zoo: its builder and how DC's tables name it."""

    build: Builder
    display: str  # DC's name without the norm suffix
    plain_norm: str = "instance"  # the norm DC's zoo gives it when nothing else is said
    norm_in_name: bool = True  # false where the network has no norm layers to name (the MLP)
    without_bn: str | None = None  # eval_mode S's network once BatchNorm is out; None: this one


NETWORKS: dict[str, Architecture] = {
    "convnet": Architecture(ConvNet, "ConvNet"),
    "mlp": Architecture(MLP, "MLP", plain_norm="none", norm_in_name=False),
    "lenet": Architecture(lenet, "LeNet", plain_norm="none"),
    "alexnet": Architecture(alexnet, "AlexNet", plain_norm="none"),
    "vgg11": Architecture(vgg11, "VGG11"),
    "resnet18": Architecture(ResNet18, "ResNet18"),
    "resnet18_ap": Architecture(
        lambda shape, n, cfg: ResNet18(shape, n, cfg, avg_pool=True), "ResNet18_AP", without_bn="resnet18"
    ),
}
NORM_SUFFIX = {"batch": "BN", "layer": "LN", "group": "GN", "none": "NN", "instance": ""}


def plain_norm(name: str) -> str:
    """The norm DC's zoo gives a network when nothing else is said (instance outside the zoo)."""
    row = NETWORKS.get(name)
    return row.plain_norm if row else "instance"


def without_batchnorm(cfg: NetworkConfig) -> NetworkConfig:
    """DC's eval_mode S: the condensing network with its BatchNorm taken out (the name cut before
    'BN': ConvNetBN -> ConvNet, AlexNetBN -> AlexNet, ResNet18BN_AP -> ResNet18)."""
    if cfg.norm != "batch":
        return cfg
    row = NETWORKS.get(cfg.name)
    name = row.without_bn if row and row.without_bn else cfg.name
    return replace(cfg, name=name, norm=plain_norm(name))


def display_name(cfg: NetworkConfig) -> str:
    """DC's names: ConvNet, ConvNetBN, AlexNetBN, ResNet18BN_AP, ... (a name outside the zoo,
    which validate_network refuses, is shown as it is)."""
    row = NETWORKS.get(cfg.name)
    base = row.display if row else cfg.name
    if (row and not row.norm_in_name) or cfg.norm == plain_norm(cfg.name):
        return base
    suffix = NORM_SUFFIX[cfg.norm]
    return f"{base[:-3]}{suffix}_AP" if base.endswith("_AP") else f"{base}{suffix}"


def validate_network(cfg: NetworkConfig, where: str) -> None:
    require_choice(cfg.name, NETWORKS, f"{where}.name")
    require_choice(cfg.norm, NORMS, f"{where}.norm")
    require_choice(cfg.activation, ACTIVATIONS, f"{where}.activation")
    require_choice(cfg.pooling, POOLINGS, f"{where}.pooling")
    if cfg.width < 1 or cfg.depth < 1:
        raise ConfigError(f"{where}.width/depth must be >= 1 (got {cfg.width}/{cfg.depth})")


# Modules whose parameters and buffers PyTorch initialises without randomness (ones, zeros).
DETERMINISTIC_INIT = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


@torch.no_grad()
def init_parameters(net: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default init for every layer of the zoo, drawn from `gen` instead of the global
    RNG: conv and linear weights kaiming-uniform with a=sqrt(5), biases uniform in
    +-1/sqrt(fan_in); norm layers ones and zeros. A layer type it does not know is refused, so a
    new network cannot silently keep uninitialised memory."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=gen)
            if module.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(module.bias, -bound, bound, generator=gen)
        elif isinstance(module, DETERMINISTIC_INIT):
            module.reset_parameters()
        elif (
            next(module.parameters(recurse=False), None) is not None
            or next(module.buffers(recurse=False), None) is not None
        ):
            raise TypeError(f"init_parameters does not know how to initialise {type(module).__name__}")


def build_network(
    cfg: NetworkConfig, shape: Shape, num_classes: int, seed: int, device: torch.device
) -> nn.Module:
    """A freshly initialised network whose init draws from its own seed only. It is built on the
    meta device (no memory, no draws from the global RNG, so threads building networks side by
    side need no lock), then initialised on the CPU, whatever the device, for reproducibility."""
    with torch.device("meta"):
        net = NETWORKS[cfg.name].build(shape, num_classes, cfg)
    net = net.to_empty(device="cpu")
    init_parameters(net, torch.Generator().manual_seed(seed))
    return net.to(device)


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def freeze_batchnorm(net: nn.Module) -> None:
    """Put BatchNorm layers in eval mode so a matching step uses fixed statistics."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
