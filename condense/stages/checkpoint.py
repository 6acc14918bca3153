"""Checkpoints of the condense stage: the synthetic images, the image optimizer's momentum, the
next iteration and the stats so far, written atomically in safetensors (no code on load).

Every random stream is derived from (seed, stream, iteration) (condense.primitives.seeding), so the
iteration number is the whole RNG state: a resumed run draws exactly what an uninterrupted one
would, and its final set is bitwise the same on the CPU.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

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
    # more state by name (IDM's model queue: `queue.<serial>.<part>`), saved beside the images
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def with_new_defaults(theirs: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's settings, plus the schema's default for each setting added since it was
    written, at the top level or inside a group's node (its run ran with that behaviour), so a
    version upgrade does not block a resume."""
    hints = get_type_hints(RunConfig)
    filled = dict(theirs)
    for spec in fields(RunConfig):
        if spec.name not in ours:
            continue
        default = schema_default(spec, hints[spec.name])
        if spec.name not in theirs:
            if default is not MISSING:
                filled[spec.name] = default
        elif isinstance(default, dict) and isinstance(theirs[spec.name], dict):
            filled[spec.name] = with_missing_keys(theirs[spec.name], default)
    return filled


def schema_default(spec: Any, hint: Any) -> Any:
    """A setting's default as data: its value, its factory's, or its group node class's defaults."""
    if spec.default is not MISSING and spec.default != "???":  # "???": OmegaConf's MISSING
        return asdict(spec.default) if is_dataclass(spec.default) else spec.default
    if spec.default_factory is not MISSING:
        return asdict(spec.default_factory())
    if is_dataclass(hint):
        try:
            return asdict(hint())
        except TypeError:  # a node with required fields has no default to fill in
            return MISSING
    return MISSING


def with_missing_keys(node: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(node)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = with_missing_keys(out[key], value)
    return out


def fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The part of the resolved config a checkpoint must agree with to be resumed (keys that are
    no setting, such as the precision as run, always count)."""
    return {k: v for k, v in config.items() if role_of(k) not in FREE_ROLES and k not in RESUME_MAY_CHANGE}


def save_checkpoint(path: Path, state: CondenseState, config: dict[str, Any]) -> None:
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.extra.items()}
    tensors["images"] = state.images.detach().cpu().contiguous()
    if state.momentum is not None:
        tensors["momentum"] = state.momentum.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "next_iteration": str(state.next_iteration),
        "stats": json.dumps(state.stats),
        "fingerprint": json.dumps(fingerprint(config), sort_keys=True),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def stored_bf16_speedup(path: Path) -> float | None:
    """precision=auto's measured ratio a checkpoint was made under (None: no checkpoint, or not
    an auto run), read from its header: a resumed run decides as it started, never measuring again."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        precision = json.loads(meta.get("fingerprint", "{}")).get("precision_as_run", {})
    except (SafetensorError, OSError, ValueError):
        return None
    ratio = precision.get("auto_bf16_speedup") if isinstance(precision, dict) else None
    return float(ratio) if ratio is not None else None


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
        extra={k: v for k, v in tensors.items() if k not in ("images", "momentum")},
    )
