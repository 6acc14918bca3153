"""Differentiable augmentation in plain torch: DSA's siamese ops and DC's evaluation augmentation.

Every transform is drawn from an integer seed. In a matching step the real and the synthetic
batch are augmented with the same seed and one parameter set for the whole batch, so both see
exactly the same transform (DSA's siamese rule, which also works for batches of different sizes).
Training a network (inner loop, evaluation) draws one parameter set per image instead.

Written in plain torch rather than kornia: replaying one parameter set across two batches of
different sizes, and the per-op sampling DSA uses, are a few lines here, and every op stays
differentiable with respect to the images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from condense.schema import AugmentConfig, ConfigError, ConvNetBNRuleConfig, EvalAugmentConfig, require_choice

# Draws a transform for a batch from an integer seed (the same seed, the same transform).
Augment = Callable[[torch.Tensor, int], torch.Tensor]

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


def uniform(n: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """n uniform numbers in [0, 1) shaped to broadcast over (N, C, H, W)."""
    return torch.rand(n, 1, 1, 1, generator=gen).to(device=like.device, dtype=like.dtype)


def color(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, n: int) -> torch.Tensor:
    x = x + (uniform(n, gen, x) - 0.5) * cfg.brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (uniform(n, gen, x) * cfg.saturation) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (uniform(n, gen, x) + cfg.contrast) + mean


def affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.to(device=x.device, dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def scale(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, n: int) -> torch.Tensor:
    lo = 1.0 / cfg.scale
    sx = torch.rand(n, generator=gen) * (cfg.scale - lo) + lo
    sy = torch.rand(n, generator=gen) * (cfg.scale - lo) + lo
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return affine(x, theta)


def rotate(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, n: int) -> torch.Tensor:
    angle = (torch.rand(n, generator=gen) - 0.5) * 2 * cfg.rotate * math.pi / 180
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros(n)
    theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
    return affine(x, theta)


def flip(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, n: int) -> torch.Tensor:
    mask = uniform(n, gen, x) < cfg.flip_p
    return torch.where(mask, x.flip(3), x)


def crop(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, n: int) -> torch.Tensor:
    """Translate by up to crop_pad of the side, filling with zeros (a padded random crop)."""
    h, w = x.shape[2:]
    ph, pw = int(h * cfg.crop_pad + 0.5), int(w * cfg.crop_pad + 0.5)
    dy = torch.randint(-ph, ph + 1, (n,), generator=gen)
    dx = torch.randint(-pw, pw + 1, (n,), generator=gen)
    return translate(x, dy, dx)


def translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Shift every image by whole pixels (one shift, or one per image); gradients flow."""
    h, w = x.shape[2:]
    ys = torch.arange(h).view(1, h, 1) - dy.view(-1, 1, 1)
    xs = torch.arange(w).view(1, 1, w) - dx.view(-1, 1, 1)
    inside = ((ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)).unsqueeze(1).to(x.device, x.dtype)
    ys, xs = ys.clamp(0, h - 1).expand(-1, h, w), xs.clamp(0, w - 1).expand(-1, h, w)
    flat = (ys * w + xs).reshape(ys.shape[0], 1, h * w).to(x.device)
    flat = flat.expand(x.shape[0], x.shape[1], -1)
    moved = torch.gather(x.reshape(x.shape[0], x.shape[1], h * w), 2, flat).view_as(x)
    return moved * inside


def cutout(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, n: int) -> torch.Tensor:
    h, w = x.shape[2:]
    ch, cw = int(h * cfg.cutout + 0.5), int(w * cfg.cutout + 0.5)
    # The hole's top-left corner; it is exactly ch x cw pixels before clipping at the border.
    top = torch.randint(0, h + (1 - ch % 2), (n,), generator=gen).view(-1, 1, 1) - ch // 2
    left = torch.randint(0, w + (1 - cw % 2), (n,), generator=gen).view(-1, 1, 1) - cw // 2
    ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    hole = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
    return x * (~hole).unsqueeze(1).to(x.device, x.dtype)


OP_FUNCTIONS: dict[str, Callable[[torch.Tensor, AugmentConfig, torch.Generator, int], torch.Tensor]] = {
    "color": color,
    "crop": crop,
    "cutout": cutout,
    "flip": flip,
    "scale": scale,
    "rotate": rotate,
}


def dsa(x: torch.Tensor, seed: int, cfg: AugmentConfig, per_image: bool = False) -> torch.Tensor:
    """DSA from `seed`: one op of the strategy sampled per call (augment.mode=single, DSA's 'S',
    its default) or every op in sequence (mode=all, DSA's 'M'), parameters drawn from the same
    seed, so the same seed gives the same transform whatever the batch size (siamese)."""
    gen = torch.Generator().manual_seed(seed)
    draws = x.shape[0] if per_image else 1
    if cfg.mode == "all":
        for op in cfg.strategy:
            x = OP_FUNCTIONS[op](x, cfg, gen, draws)
        return x
    op = cfg.strategy[int(torch.randint(len(cfg.strategy), (1,), generator=gen))]
    return OP_FUNCTIONS[op](x, cfg, gen, draws)


def for_dataset(cfg: AugmentConfig, allow_flip: bool) -> AugmentConfig:
    """The strategy a dataset allows (no flip for digits)."""
    if allow_flip or "flip" not in cfg.strategy:
        return cfg
    from dataclasses import replace

    return replace(cfg, strategy=[op for op in cfg.strategy if op != "flip"])


def siamese_augment(cfg: AugmentConfig) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """The matching step's augmentation: same seed, same transform for real and synthetic."""
    if cfg.name == "none":
        return None
    return lambda x, seed: dsa(x, seed, cfg, per_image=False)


def training_augment(cfg: AugmentConfig) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """Augmentation while training a network on the synthetic set (inner loop, evaluation)."""
    if cfg.name == "none":
        return None
    return lambda x, seed: dsa(x, seed, cfg, per_image=True)


def crop_scale_rotate(x: torch.Tensor, seed: int, cfg: EvalAugmentConfig) -> torch.Tensor:
    """A batched affine version of DC's evaluation augmentation (`dataset.eval_augment.style=
    affine`): each image gets one of a random crop (shift -crop..crop), a random scale (per
    axis) or a random rotation (whole degrees), bilinear, empty pixels 0 (the dataset mean in
    normalised space). DC's own differs in shift range, fills and interpolation (`style=dc`)."""
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    choice = torch.randint(0, 3, (n,), generator=gen)
    dy = torch.randint(-cfg.crop, cfg.crop + 1, (n,), generator=gen) * (choice == 0)
    dx = torch.randint(-cfg.crop, cfg.crop + 1, (n,), generator=gen) * (choice == 0)
    sy = torch.where(choice == 1, 1 + (torch.rand(n, generator=gen) - 0.5) * 2 * cfg.scale, 1.0)
    sx = torch.where(choice == 1, 1 + (torch.rand(n, generator=gen) - 0.5) * 2 * cfg.scale, 1.0)
    degrees = torch.randint(-int(cfg.rotate), int(cfg.rotate) + 1, (n,), generator=gen) * (choice == 2)
    angle = degrees * math.pi / 180
    zero = torch.zeros(n)
    theta = torch.stack(
        [
            torch.stack([torch.cos(angle) / sx, torch.sin(angle) / sx, zero], 1),
            torch.stack([-torch.sin(angle) / sy, torch.cos(angle) / sy, zero], 1),
        ],
        1,
    )
    return affine(translate(x, dy, dx), theta)


def dc_crop(img: torch.Tensor, fill: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """DC's crop: pad by `pad` with each channel's batch mean, take an H x W window at offsets
    drawn from 0..2*pad-1 (so shifts run from +pad to -(pad-1))."""
    c, h, w = img.shape
    canvas = fill.view(c, 1, 1).expand(c, h + 2 * pad, w + 2 * pad).clone()
    canvas[:, pad : pad + h, pad : pad + w] = img
    r, s = (int(v) for v in torch.randint(0, 2 * pad, (2,), generator=gen))
    return canvas[:, r : r + h, s : s + w]


def dc_scale(img: torch.Tensor, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """DC's scale: height and width each int(U(1-ratio, 1+ratio) x H), nearest-neighbour resize,
    centred on a zero canvas, centre-cropped back to H x W."""
    c, h, w = img.shape
    sh, sw = (int((1 - ratio + 2 * ratio * float(u)) * h) for u in torch.rand(2, generator=gen))
    resized = F.interpolate(img[None], size=[sh, sw])[0]  # default mode: nearest
    side = max(sh, sw, h, w)
    canvas = img.new_zeros(c, side, side)
    r, s = (side - sh) // 2, (side - sw) // 2
    canvas[:, r : r + sh, s : s + sw] = resized
    r, s = (side - h) // 2, (side - w) // 2
    return canvas[:, r : r + h, s : s + w]


def dc_rotate(img: torch.Tensor, degrees: float, fill: float, gen: torch.Generator) -> torch.Tensor:
    """DC's rotate: scipy.ndimage.rotate by a whole angle in [-degrees, degrees) with cubic
    splines, the canvas enlarged to fit and filled with the mean of the channel means, then
    centre-cropped back to H x W."""
    from scipy.ndimage import rotate as scipy_rotate

    angle = int(torch.randint(-int(degrees), int(degrees), (1,), generator=gen))
    turned = scipy_rotate(img.cpu().numpy(), angle=angle, axes=(-2, -1), cval=fill)
    h, w = img.shape[-2:]
    r, s = (turned.shape[-2] - h) // 2, (turned.shape[-1] - w) // 2
    return torch.from_numpy(turned[:, r : r + h, s : s + w].copy()).to(img)


def dc_crop_scale_rotate(x: torch.Tensor, seed: int, cfg: EvalAugmentConfig) -> torch.Tensor:
    """DC's evaluation augmentation exactly as its utils.py augment() (MNIST's crop_scale_rotate):
    each image gets one of crop, scale or rotate, chosen uniformly; fills use the batch's
    per-channel means. Draws come from `seed`, never from the global RNG."""
    gen = torch.Generator().manual_seed(seed)
    fill = x.mean(dim=(0, 2, 3))
    ops = (
        lambda img: dc_crop(img, fill, cfg.crop, gen),
        lambda img: dc_scale(img, cfg.scale, gen),
        lambda img: dc_rotate(img, cfg.rotate, float(fill.mean()), gen),
    )
    return torch.stack([ops[int(torch.randint(0, 3, (1,), generator=gen))](img) for img in x])


def dc_crop_noise(x: torch.Tensor, seed: int, pad: int, noise: float) -> torch.Tensor:
    """DC's crop_noise strategy (its augment() for an evaluated ConvNetBN): each image gets, chosen
    uniformly, DC's crop (mean-filled) or Gaussian noise of std `noise` added. Draws come from
    `seed`, never from the global RNG."""
    gen = torch.Generator().manual_seed(seed)
    fill = x.mean(dim=(0, 2, 3))
    ops = (
        lambda img: dc_crop(img, fill, pad, gen),
        lambda img: img + noise * torch.randn(img.shape, generator=gen).to(img),
    )
    return torch.stack([ops[int(torch.randint(0, 2, (1,), generator=gen))](img) for img in x])


def convnet_bn_augment(rule: ConvNetBNRuleConfig) -> Augment:
    """The evaluation augmentation DC's get_daparam gives an evaluated ConvNetBN."""
    return lambda x, seed: dc_crop_noise(x, seed, rule.crop, rule.noise)


# dataset.eval_augment.style: DC's exact augment() or condense's batched affine version.
EVAL_AUGMENT_STYLES: dict[str, Callable[[torch.Tensor, int, EvalAugmentConfig], torch.Tensor]] = {
    "dc": dc_crop_scale_rotate,
    "affine": crop_scale_rotate,
}


def evaluation_augment(
    dataset_aug: EvalAugmentConfig, dsa_cfg: AugmentConfig
) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """DSA wins when it is on (as in DSA's protocol); otherwise the dataset's own augmentation."""
    if dsa_cfg.name != "none":
        return training_augment(dsa_cfg)
    if dataset_aug.enabled:
        style = EVAL_AUGMENT_STYLES[dataset_aug.style]
        return lambda x, seed: style(x, seed, dataset_aug)
    return None


def validate_eval_augment(cfg: EvalAugmentConfig) -> None:
    require_choice(cfg.style, EVAL_AUGMENT_STYLES, "dataset.eval_augment.style")


def validate_augment(cfg: AugmentConfig) -> None:
    require_choice(cfg.name, ("none", "dsa"), "augment")
    require_choice(cfg.mode, ("single", "all"), "augment.mode")
    unknown = [op for op in cfg.strategy if op not in OPS]
    if unknown or not cfg.strategy:
        raise ConfigError(
            f"augment.strategy={list(cfg.strategy)}: use a non-empty subset of {', '.join(OPS)}"
        )
