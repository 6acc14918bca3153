"""Every preset's numbers at a fixed seed, as fingerprints to compare before and after a change.

Each preset in conf/method/ (plus a few variants that reach other code: cross-architecture
evaluation, intermediate evaluation, a stage=evaluate reload) runs on digits at budget=smoke under
precision=fp32, one job at a time, in a fresh folder. A fingerprint is the SHA-256 of the synthetic
set's image and label tensors and the list of every evaluated model's accuracy: equal fingerprints
mean bitwise-equal sets and accuracies.

    python benchmarks/fingerprints.py --out before.json            # on the old commit
    python benchmarks/fingerprints.py --out after.json --compare before.json

The compare prints one line per case (same / DIFFERENT / new) and exits 1 if any differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
COMMON = ["dataset=digits", "budget=smoke", "precision=fp32", "device=cpu", "logger=none", "progress=false"]
EXTRA_CASES = {
    "dc+cross_arch": ["method=dc", "evaluation=cross_arch"],
    "ours_mda+at_iterations": ["method=ours_mda", "iterations=2", "evaluation.at_iterations=[0,1]"],
    "dsa+convnet_bn": ["method=dsa", "network=convnet_bn"],
    "dc+straightforward": ["method=dc", "fast=false"],
}


def presets() -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))


def cases() -> dict[str, list[str]]:
    return {name: [f"method={name}"] for name in presets()} | EXTRA_CASES


def digest_run(folder: Path) -> dict[str, object]:
    """The set's tensors' hash and every model's accuracy, read off a finished run's files."""
    tensors = load_file(str(folder / "synthetic.safetensors"))
    digest = hashlib.sha256()
    for name in ("images", "labels"):
        digest.update(tensors[name].contiguous().numpy().tobytes())
    metrics = json.loads((folder / "metrics.json").read_text())
    accuracies = {
        f"{set_name}/{arch}": result["accuracies"]
        for set_name, per_arch in metrics.get("evaluation", {}).items()
        for arch, result in per_arch.items()
        if isinstance(result, dict) and "accuracies" in result
    }
    at = metrics.get("evaluation_at", {})
    accuracies |= {
        f"at{done}/{arch}": result["accuracies"] for done, per in at.items() for arch, result in per.items()
    }
    return {"set": digest.hexdigest()[:16], "accuracies": accuracies}


def run_case(overrides: list[str], work: Path) -> dict[str, object]:
    folder = work / "run"
    command = [sys.executable, "-m", "condense", *COMMON, *overrides, f"hydra.run.dir={folder}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    result = digest_run(folder)
    reload = [*COMMON, "stage=evaluate", f"synthetic={folder / 'synthetic.safetensors'}"]
    again = work / "again"
    subprocess.run(
        [sys.executable, "-m", "condense", *reload, *overrides, f"hydra.run.dir={again}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if (again / "metrics.json").exists():
        metrics = json.loads((again / "metrics.json").read_text())
        result["reloaded"] = {
            f"{s}/{a}": r["accuracies"]
            for s, per in metrics.get("evaluation", {}).items()
            for a, r in per.items()
            if isinstance(r, dict) and "accuracies" in r
        }
    return result


def compare(now: dict[str, dict], before: dict[str, dict]) -> bool:
    same = True
    for name in sorted(now.keys() | before.keys()):
        a, b = now.get(name), before.get(name)
        if b is None and a is not None:  # a case added since (a new preset): nothing to compare
            print(f"{'new':<9} {name}")
            continue
        verdict = "same" if a == b else "DIFFERENT"
        same &= a == b
        print(f"{verdict:<9} {name}")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="case names to run (default: all)")
    args = parser.parse_args()
    results = {}
    for name, overrides in cases().items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as work:
            results[name] = run_case(overrides, Path(work))
        print(f"{name}: {json.dumps(results[name])[:120]}", flush=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.compare is not None:
        before = json.loads(args.compare.read_text())
        if args.only:  # compare the cases this call ran, not the ones it left out
            before = {name: before.get(name) for name in results}
        sys.exit(0 if compare(results, before) else 1)


if __name__ == "__main__":
    main()
