"""Never overwrite a run, and never mix two runs' numbers: the checks a run makes on its folder
before it starts (resume=true continues one on purpose)."""

from __future__ import annotations

import json
from pathlib import Path

from condense.schema import ConfigError, RunConfig, RunRecord, to_container, without_roles
from condense.stages.checkpoint import with_new_defaults

RESULT_FILES = ("metrics.json", "synthetic.safetensors", "checkpoint.safetensors", "evaluation_progress.json")


def refuse_to_overwrite(out: Path, resume: bool) -> None:
    """A run never writes over another run's results (resume=true continues one on purpose)."""
    taken = [name for name in RESULT_FILES if (out / name).exists()]
    if taken and not resume:
        raise ConfigError(
            f"output folder {out} already holds a run ({', '.join(taken)}): "
            "choose another hydra.run.dir, or add resume=true to continue that run"
        )


def as_text(value: object) -> str:
    """A setting as comparable text: a node's keys sorted (a filled-in default comes last)."""
    return json.dumps(value, default=str, sort_keys=True)


def finished_run(out: Path, cfg: RunConfig) -> RunRecord | None:
    """The record of a run in `out` that finished every stage with these settings (bookkeeping
    aside), or None; a finished run made with other settings is refused."""
    path = out / "metrics.json"
    if not path.exists():
        return None
    record = RunRecord.from_dict(json.loads(path.read_text()))
    if not record.finished:
        return None
    now = without_roles(to_container(cfg), "bookkeeping")
    # a setting added to condense since the run was made: it ran as the schema's default
    then = without_roles(with_new_defaults(record.config, now), "bookkeeping")
    differ = sorted(k for k in now.keys() | then.keys() if as_text(now.get(k)) != as_text(then.get(k)))
    if differ:
        raise ConfigError(
            f"resume: {out} holds a finished run made with other settings ({', '.join(differ)}): "
            "choose another output folder"
        )
    return record
