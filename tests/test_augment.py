"""DSA: siamese means the same transform on both batches; gradients reach the images through
every op; DC's evaluation augmentation keeps shapes."""

from __future__ import annotations

import pytest
import torch

from condense.primitives.augment import OPS, crop_scale_rotate, dsa, for_dataset, siamese_augment, translate
from condense.schema import AugmentConfig, EvalAugmentConfig


def one_op(op: str) -> AugmentConfig:
    return AugmentConfig(name="dsa", strategy=[op])


@pytest.mark.parametrize("op", OPS)
def test_siamese_transforms_are_identical_across_batches(op: str) -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 16, 16, generator=gen)
    real = torch.cat([image, torch.randn(7, 3, 16, 16, generator=gen)])  # different sizes
    syn = image.clone()
    aug = siamese_augment(one_op(op))
    assert aug is not None
    for seed in range(5):
        torch.testing.assert_close(aug(real, seed)[0], aug(syn, seed)[0], rtol=0, atol=0)


def test_all_ops_mode_is_siamese_and_applies_every_op_in_sequence() -> None:
    """DSA's 'M' mode: every op of the strategy, in order, with one seed's parameters."""
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 16, 16, generator=gen)
    real = torch.cat([image, torch.randn(5, 3, 16, 16, generator=gen)])
    strategy = ["color", "crop", "scale"]
    every = AugmentConfig(name="dsa", strategy=strategy, mode="all")
    aug = siamese_augment(every)
    assert aug is not None
    torch.testing.assert_close(aug(real, 3)[0], aug(image.clone(), 3)[0], rtol=0, atol=0)
    # the same draws, applied op after op, by hand
    by_hand = torch.Generator().manual_seed(3)
    x = image.clone()
    from condense.primitives.augment import OP_FUNCTIONS

    for op in strategy:
        x = OP_FUNCTIONS[op](x, every, by_hand, 1)
    torch.testing.assert_close(aug(image.clone(), 3), x, rtol=0, atol=0)
    single = dsa(image, 3, AugmentConfig(name="dsa", strategy=strategy))
    assert not torch.equal(single, x)


def test_different_seeds_give_different_transforms() -> None:
    x = torch.randn(2, 3, 16, 16)
    cfg = AugmentConfig(name="dsa")
    outs = {tuple(dsa(x, s, cfg).flatten()[:50].tolist()) for s in range(10)}
    assert len(outs) > 5


@pytest.mark.parametrize("op", OPS)
def test_gradients_flow_through_every_op(op: str) -> None:
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    for seed in range(4):
        out = dsa(x, seed, one_op(op), per_image=True)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), x)
        assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_flip_is_dropped_for_digits() -> None:
    cfg = AugmentConfig(name="dsa")
    assert "flip" not in for_dataset(cfg, allow_flip=False).strategy
    assert for_dataset(cfg, allow_flip=True).strategy == cfg.strategy


def test_translate_moves_pixels_and_pads_with_zero() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    moved = translate(x, torch.tensor([1]), torch.tensor([0]))
    assert torch.equal(moved[0, 0, 1:], x[0, 0, :3]) and torch.equal(moved[0, 0, 0], torch.zeros(4))


def test_evaluation_augmentation_keeps_shape_and_varies() -> None:
    x = torch.randn(6, 1, 28, 28)
    cfg = EvalAugmentConfig(enabled=True)
    a, b = crop_scale_rotate(x, 0, cfg), crop_scale_rotate(x, 1, cfg)
    assert a.shape == x.shape and not torch.equal(a, b)


def test_cutout_hole_has_the_configured_size() -> None:
    from condense.primitives.augment import cutout

    cfg = AugmentConfig(name="dsa", cutout=0.5)
    x = torch.ones(64, 1, 32, 32)
    out = cutout(x, cfg, torch.Generator().manual_seed(0), 64)
    holes = (out == 0).sum(dim=(1, 2, 3))
    # away from the border a hole is exactly 16 x 16; clipped ones are smaller, never larger
    assert int(holes.max()) == 16 * 16 and bool((holes <= 256).all())


def test_evaluation_augmentation_applies_one_op_per_image() -> None:
    # With scale and rotation neutralised, an image is either shifted (the crop op) or untouched.
    x = torch.randn(200, 1, 28, 28)
    out = crop_scale_rotate(x, 0, EvalAugmentConfig(enabled=True, crop=4, scale=0.0, rotate=0.0))
    untouched = (out - x).abs().flatten(1).max(dim=1).values < 1e-5
    assert 0.4 < float(untouched.float().mean()) < 0.95


def test_protocol_trains_longer_when_augmenting() -> None:

    from tests.conftest import compose_config, run_config

    def epochs(*overrides: str) -> int:
        return run_config(list(overrides)).evaluation.epochs

    assert epochs("dataset=fashion_mnist") == 300
    assert epochs("dataset=mnist") == 1000
    assert epochs("dataset=mnist", "dataset.eval_augment.epochs=50") == 50
    assert epochs("augment=dsa", "augment.eval_epochs=70") == 70
    assert epochs("augment=dsa", "evaluation=cross_arch") == 1000
    # The rule is visible config, not code that runs behind the user's back...
    assert "train_longer_when_augmenting" in str(
        compose_config([])["evaluation"]._get_node("epochs")._value()
    )
    # ...and a value given on the command line is the value used, augmenting or not.
    assert epochs("augment=dsa", "evaluation.epochs=5") == 5
    assert epochs("dataset=mnist", "evaluation.epochs=7") == 7
    assert epochs("augment=dsa", "budget=cpu") == 1000


def test_dc_style_evaluation_augmentation_is_dcs_three_ops() -> None:
    """DC's augment(): one op per image; a crop fills with the batch's channel mean and shifts
    by +4..-3; a scale keeps the shape; a rotation fills with the mean."""
    from condense.primitives.augment import dc_crop, dc_crop_scale_rotate, dc_rotate, dc_scale

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 28, 28, generator=gen)
    cfg = EvalAugmentConfig(enabled=True, style="dc")
    out = dc_crop_scale_rotate(x, 0, cfg)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert torch.equal(out, dc_crop_scale_rotate(x, 0, cfg))  # the seed is the whole randomness
    fill = torch.tensor([5.0])
    img = torch.zeros(1, 8, 8)
    shifts = set()
    for seed in range(200):
        cropped = dc_crop(img, fill, 4, torch.Generator().manual_seed(seed))
        rows = (cropped[0] == 5.0).all(dim=1)
        top = int(rows[:4].sum()) if rows[0] else -int(rows.flip(0)[:4].sum())
        shifts.add(top)
    assert shifts == set(range(-3, 5))  # offsets 0..7 of a 4-pixel pad
    assert dc_scale(torch.ones(1, 28, 28), 0.2, torch.Generator().manual_seed(1)).shape == (1, 28, 28)
    turned = dc_rotate(torch.ones(1, 28, 28), 45, 3.0, torch.Generator().manual_seed(2))
    assert turned.shape == (1, 28, 28)
