"""Every network of the zoo runs forward and backward on every dataset shape."""

from __future__ import annotations

import pytest
import torch

from condense.primitives.network import NETWORKS, build_network, display_name, has_batchnorm
from condense.schema import NetworkConfig
from tests.conftest import CONF_DIR, run_config

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar": (3, 32, 32)}
NETWORK_FILES = sorted(p.stem for p in (CONF_DIR / "network").glob("*.yaml"))


@pytest.mark.parametrize("option", NETWORK_FILES)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_network_runs_on_every_shape(option: str, shape: tuple[int, int, int]) -> None:
    cfg = run_config([f"network={option}"]).network
    net = build_network(cfg, shape, 10, seed=0, device=torch.device("cpu"))
    x = torch.randn(4, *shape, requires_grad=True)
    out = net(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert has_batchnorm(net) == (cfg.norm == "batch")


def test_same_seed_same_weights_and_global_rng_untouched() -> None:
    cfg = NetworkConfig()
    state = torch.random.get_rng_state()
    a = build_network(cfg, (1, 28, 28), 10, seed=3, device=torch.device("cpu"))
    b = build_network(cfg, (1, 28, 28), 10, seed=3, device=torch.device("cpu"))
    c = build_network(cfg, (1, 28, 28), 10, seed=4, device=torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (torch.cat([p.flatten() for p in n.parameters()]) for n in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


@pytest.mark.parametrize(
    "norm,activation,pooling",
    [
        (n, a, p)
        for n in ("instance", "batch", "layer", "group", "none")
        for a in ("relu", "sigmoid", "leakyrelu", "swish")
        for p in ("avg", "max", "none")
    ][::5],
)
def test_convnet_options(norm: str, activation: str, pooling: str) -> None:
    cfg = NetworkConfig(norm=norm, activation=activation, pooling=pooling, width=8, depth=2)
    net = build_network(cfg, (1, 28, 28), 10, seed=0, device=torch.device("cpu"))
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_convnet_28_behaves_as_32() -> None:
    """DC's padding: a 28x28 input reaches the classifier at the same size as a 32x32 one."""
    a = build_network(NetworkConfig(), (1, 28, 28), 10, 0, torch.device("cpu"))
    b = build_network(NetworkConfig(), (3, 32, 32), 10, 0, torch.device("cpu"))
    assert a.classifier.in_features == b.classifier.in_features == 128 * 4 * 4


def test_display_names_follow_dc() -> None:
    names = {display_name(run_config([f"network={o}"]).network) for o in NETWORK_FILES}
    assert {
        "ConvNet",
        "ConvNetBN",
        "MLP",
        "LeNet",
        "LeNetBN",
        "AlexNet",
        "AlexNetBN",
        "VGG11",
        "VGG11BN",
        "ResNet18",
        "ResNet18BN",
        "ResNet18BN_AP",
    } == names
    assert set(NETWORKS) >= {
        "convnet",
        "mlp",
        "lenet",
        "alexnet",
        "vgg11",
        "resnet18",
        "resnet18_ap",
    }
