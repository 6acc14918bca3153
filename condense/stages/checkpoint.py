"""Checkpoints of the condense stage: the synthetic images, the image optimizer's momentum, the
next iteration and the stats so far, written atomically in safetensors (no code on load).

Every random stream is derived from (seed, stream, iteration) (condense.primitives.seeding), so the
iteration number is the whole RNG state: a resumed run draws exactly what an uninterrupted one
would, and its final set is bitwise the same on the CPU.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from condense.primitives.files import atomic_write
from condense.schema import ConfigError, RunConfig, role_of

FORMAT = "condense.checkpoint/1"
CHECKPOINT = "checkpoint.safetensors"
# A resumption may change what does not shape the condensed images (schema.ROLES: how sets are
# judged, what is read, the bookkeeping), run longer, and move to another device.
FREE_ROLES = ("evaluation", "input", "bookkeeping")
RESUME_MAY_CHANGE = ("iterations", "device")


@dataclass
class CondenseState:
    images: torch.Tensor
    momentum: torch.Tensor | None
    next_iteration: int
    stats: dict[str, Any]


def with_new_defaults(theirs: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's settings, plus the schema's default for each top-level setting added since it
    was written (its run ran with that behaviour), so a version upgrade does not block a resume."""
    added = {}
    for spec in fields(RunConfig):
        if spec.name in ours and spec.name not in theirs:
            if spec.default is not MISSING:
                added[spec.name] = spec.default
            elif spec.default_factory is not MISSING:
                added[spec.name] = asdict(spec.default_factory())
    return {**added, **theirs}


def fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The part of the resolved config a checkpoint must agree with to be resumed (keys that are
    no setting, such as the precision as run, always count)."""
    return {
        k: v for k, v in config.items() if role_of(k) not in FREE_ROLES and k not in RESUME_MAY_CHANGE
    }


def save_checkpoint(path: Path, state: CondenseState, config: dict[str, Any]) -> None:
    tensors = {"images": state.images.detach().cpu().contiguous()}
    if state.momentum is not None:
        tensors["momentum"] = state.momentum.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "next_iteration": str(state.next_iteration),
        "stats": json.dumps(state.stats),
        "fingerprint": json.dumps(fingerprint(config), sort_keys=True),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_checkpoint(path: Path, config: dict[str, Any]) -> CondenseState:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"checkpoint {path} is corrupted ({err}): delete it to start over") from err
    if meta.get("format") != FORMAT or "images" not in tensors:
        raise ConfigError(f"checkpoint {path} is not a condense checkpoint: delete it to start over")
    ours = json.loads(json.dumps(fingerprint(config), sort_keys=True))
    stored = fingerprint(json.loads(meta["fingerprint"]))  # older files kept more keys
    theirs = json.loads(json.dumps(with_new_defaults(stored, ours), sort_keys=True))
    if theirs != ours:
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ConfigError(
            f"resume: the checkpoint in {path.parent} was made with other settings ({', '.join(differ)}): "
            "use the same settings or a new output folder"
        )
    return CondenseState(
        images=tensors["images"],
        momentum=tensors.get("momentum"),
        next_iteration=int(meta["next_iteration"]),
        stats=json.loads(meta["stats"]),
    )
