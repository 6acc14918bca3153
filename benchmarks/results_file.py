"""Where a benchmark's table goes: a markdown file in the repo (with its command) and stdout."""

from __future__ import annotations

from pathlib import Path


def write_results(out: Path, lines: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
