"""condense-export: condense's sets in another tool's file layout, so the other tool's own evaluator
can judge them (the parity check: "we condense differently" against "we evaluate differently").

    condense-export RUN_A/synthetic.safetensors RUN_B/synthetic.safetensors --out res_DC_FMNIST.pt

Layout `dc` is DC's, DSA's and DM's result file: torch.save of {'data': [[images, labels], ...
one pair per experiment], 'accs_all_exps': {}}, images (N, C, H, W) in the dataset's normalised
space, labels (N,) class indices; condense reads it back with `reader.layout=dc`. An IDM set is
written as it trains (its sub-images expanded). Sets those codes cannot train on as intended are
refused in one line: soft labels, ZCA-whitened images, sets of different datasets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from condense.primitives.files import atomic_write
from condense.primitives.synthetic import SyntheticSet, load_synthetic
from condense.schema import ConfigError


def dc_pair(syn: SyntheticSet, path: Path) -> list[torch.Tensor]:
    """One experiment of a DC result file: the set as models train on it."""
    if syn.soft_labels is not None:
        raise ConfigError(f"{path}: its soft labels have no place in DC's layout (hard labels only)")
    if syn.transform != "normalise":
        raise ConfigError(f"{path}: its images are {syn.transform}, DC's code normalises with mean and std")
    trained = syn.expanded()
    return [trained.images.detach().cpu().float().contiguous(), trained.labels.cpu().long().contiguous()]


def export_dc(paths: list[Path], out: Path) -> int:
    """Write the sets as the experiments of one DC result file; returns how many."""
    sets = [load_synthetic(p) for p in paths]
    datasets = {(s.dataset, tuple(s.images.shape[1:]), tuple(s.mean), tuple(s.std)) for s in sets}
    if len(datasets) > 1:
        raise ConfigError(f"the sets come from {len(datasets)} datasets or normalisations: export them apart")
    content = {"data": [dc_pair(s, p) for s, p in zip(sets, paths, strict=True)], "accs_all_exps": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: torch.save(content, tmp))
    return len(sets)


LAYOUTS = {"dc": export_dc}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="condense-export", description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+", type=Path, help="synthetic.safetensors files, an experiment each")
    parser.add_argument("--out", type=Path, required=True, help="the file to write (e.g. res_DC_....pt)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="dc")
    args = parser.parse_args(argv)
    try:
        count = LAYOUTS[args.layout](args.sets, args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"condense-export: {count} set(s) written to {args.out} ({args.layout} layout)")


if __name__ == "__main__":
    main()
