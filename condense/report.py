"""`condense-report`: paper-style tables and plots from run folders' metrics.json files.

    condense-report multirun/2026-11-22/10-00-00            (a sweep)
    condense-report outputs/run_a outputs/run_b --out report/

Rows are the variants: runs pool into one row only when their resolved configs (and resolved
precision) are equal but for the seed; a row is named by the set's label, which names every
method choice (`dc`, `dc+real_batch=adaptive`), and by whatever else differs between runs with
that label (`dc lr_img=0.2`). Columns are dataset x
IPC x evaluated architecture, cells are mean +- std over every seed and model. The random subset
evaluated beside each set is a row of its own, counted once per seed and evaluation protocol.
Runs evaluated with ranking=dd_ranking add a table of DD-Ranking's metrics, one row per run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condense.schema import RunRecord as StoredRecord
from condense.schema import baseline_protocol_keys, card_line, keys_with_role, precision_tag

# The table's columns: a run's dataset and IPC name its column, never its row.
COLUMN_KEYS = ("dataset", "ipc")
# Keys of a run's resolved config that never tell two variants apart: the seed (pooled over), the
# bookkeeping (condense/schema.py ROLES) and the columns.
NOT_PROTOCOL = (*keys_with_role("seed", "bookkeeping"), *COLUMN_KEYS)
# The keys a baseline set's numbers (the random subset) depend on besides the seed and the
# columns: how its models are built, trained and tested. Other keys vary its rows only by name.
BASELINE_PROTOCOL = (*baseline_protocol_keys(), "precision")


@dataclass
class ReportRun:
    folder: Path
    label: str  # what the run's set is called (metrics.json "label", computed from its choices)
    protocol: dict[str, str]  # flattened resolved config, less NOT_PROTOCOL, plus the precision
    dataset: str
    ipc: int
    seed: int
    accuracies: dict[str, dict[str, list[float]]]  # set label -> architecture -> accuracies
    condense_seconds: float | None
    # the evaluation stage's seconds on the run's own set (its random subset not counted)
    evaluate_seconds: float | None = None
    losses: list[float] = field(default_factory=list)
    iteration_seconds: list[float] = field(default_factory=list)  # each condense iteration's own
    card: str = "not recorded (a run made before protocol cards)"  # the protocol card, one line
    # iterations done -> accuracies of every evaluated model then (evaluation.at_iterations)
    at_iterations: dict[int, list[float]] = field(default_factory=dict)
    ranking: dict[str, Any] | None = None  # DD-Ranking's metrics (metrics.json "ranking")
    models: dict[str, Any] | None = None  # the models' count and intervals (evaluation_models)


def time_to_set(run: ReportRun) -> float | None:
    """Wall time from nothing to an evaluated set: condensation plus the set's evaluation; None for
    a loaded set (stage=evaluate), whose making was not timed here and must not look free."""
    if run.evaluate_seconds is None or run.condense_seconds is None:
        return None
    return run.condense_seconds + run.evaluate_seconds


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Dotted key -> value (as text) for every leaf of a nested config."""
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(node, sort_keys=True)}


def is_under(key: str, roots: tuple[str, ...]) -> bool:
    return any(key == root or key.startswith(root + ".") for root in roots)


def protocol_of(stored: StoredRecord) -> dict[str, str]:
    flat = {k: v for k, v in flatten(stored.config).items() if not is_under(k, NOT_PROTOCOL)}
    return {**flat, "precision": precision_tag(stored.precision)}


def iteration_seconds(history: list[dict[str, Any]]) -> list[float]:
    """Each iteration's own seconds, or none at all where some record lacks them: a list with
    holes would shift every later iteration's time onto an earlier one."""
    if not all("seconds" in h for h in history):
        return []
    return [float(h["seconds"]) for h in history]


def load_run(path: Path) -> ReportRun | None:
    """One run's record, or None for a run that never reached evaluation (reported as failed)."""
    stored = StoredRecord.from_dict(json.loads(path.read_text()))
    if not stored.evaluation:
        return None
    config = stored.config
    return ReportRun(
        folder=path.parent,
        label=stored.label or str(config["method"]["name"]),  # older files: the preset
        protocol=protocol_of(stored),
        dataset=config["dataset"]["name"],
        ipc=int((stored.set or {}).get("ipc") or config["ipc"]),  # a loaded set: its own IPC
        seed=int(config["seed"]),
        accuracies={
            label: {arch: r["accuracies"] for arch, r in per_arch.items()}
            for label, per_arch in stored.evaluation.items()
        },
        condense_seconds=(stored.condense or {}).get("seconds"),
        evaluate_seconds=stored.own_seconds(),
        losses=[h["match_loss"] for h in stored.history],
        iteration_seconds=iteration_seconds(stored.history),
        at_iterations={
            int(done): [a for r in per_arch.values() for a in r["accuracies"]]
            for done, per_arch in stored.evaluation_at.items()
        },
        **({"card": card_line(stored.protocol_card)} if stored.protocol_card else {}),
        ranking=stored.ranking,
        models=stored.evaluation_models,
    )


def find_runs(folders: list[Path]) -> tuple[list[ReportRun], list[Path]]:
    runs, failed = [], []
    for folder in folders:
        for path in sorted(folder.rglob("metrics.json")):
            record = load_run(path)
            if record is None:
                failed.append(path.parent)
            else:
                runs.append(record)
        # A job folder with a Hydra config but no metrics crashed before writing any.
        for hydra_dir in sorted(folder.rglob(".hydra")):
            if not (hydra_dir.parent / "metrics.json").exists():
                failed.append(hydra_dir.parent)
    return runs, failed


def varying_keys(runs: list[ReportRun]) -> list[str]:
    """The protocol keys that differ between some runs, in a stable order."""
    keys = sorted({k for r in runs for k in r.protocol})
    return [k for k in keys if len({r.protocol.get(k) for r in runs}) > 1]


def naming_keys(runs: list[ReportRun], varying: list[str]) -> list[str]:
    """The varying keys a row has to show besides the set's label: those that differ between runs
    with one label (the label already names every method choice)."""
    by_label: dict[str, list[ReportRun]] = defaultdict(list)
    for run in runs:
        by_label[run.label].append(run)
    return [k for k in varying if any(len({r.protocol.get(k) for r in rs}) > 1 for rs in by_label.values())]


def short(key: str, value: str) -> str:
    """`real_batch=adaptive` for a group's name, `lr_img=0.2` for a value."""
    text = value.strip('"')
    return f"{key.removesuffix('.name')}={text}"


def variant_label(run: ReportRun, naming: list[str]) -> str:
    return " ".join([run.label, *(short(k, run.protocol.get(k, "unset")) for k in naming)])


def baseline_label(run: ReportRun, label: str, naming: list[str]) -> str:
    """A baseline set's row (the random subset): its models depend on the evaluation protocol,
    so rows split where that differs, never by the condensing method's settings."""
    keys = [k for k in naming if is_under(k, BASELINE_PROTOCOL)]
    return " ".join([label, *(short(k, run.protocol.get(k, "unset")) for k in keys)])


Rows = dict[str, dict[str, list[float]]]


def build_table(runs: list[ReportRun]) -> tuple[list[str], Rows, dict[str, str]]:
    """Columns and rows: row label -> column label -> pooled accuracies (in %). Runs pool into a
    row only when their protocols are equal (they differ at most in the seed); a baseline's
    numbers from one seed and protocol count once, however many runs evaluated it beside them.
    Also each row's protocol card."""
    varying = varying_keys(runs)
    naming = naming_keys(runs, varying)
    rows: Rows = defaultdict(lambda: defaultdict(list))
    cards: dict[str, str] = {}
    columns: list[str] = []
    seen_baselines: set[tuple[str, str, int, str]] = set()
    for run in runs:
        for set_name, per_arch in run.accuracies.items():
            if set_name == run.label:
                row = variant_label(run, naming)
            else:
                row = baseline_label(run, set_name, naming)
                baseline_protocol = json.dumps(
                    {k: v for k, v in run.protocol.items() if is_under(k, BASELINE_PROTOCOL)}
                )
                key = (row, f"{run.dataset} ipc{run.ipc}", run.seed, baseline_protocol)
                if key in seen_baselines:
                    continue
                seen_baselines.add(key)
            cards.setdefault(row, run.card)
            for arch, accs in per_arch.items():
                column = f"{run.dataset} ipc{run.ipc} {arch}"
                if column not in columns:
                    columns.append(column)
                rows[row][column] += [100 * a for a in accs]
    return columns, rows, cards


def cell(values: list[float]) -> str:
    if not values:
        return ""
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} +- {std:.2f}"


def card_numbers(cards: dict[str, str]) -> dict[str, int]:
    """Each distinct protocol card's footnote number, in order of first appearance."""
    numbers: dict[str, int] = {}
    for card in cards.values():
        numbers.setdefault(card, len(numbers) + 1)
    return numbers


def ranking_lines(runs: list[ReportRun], numbers: dict[str, int]) -> list[str]:
    """DD-Ranking's metrics beside the set's accuracy, one row per ranked run: HLR and IOR in
    points, LRS and ARS in percent, the whole-dataset reference with its source."""
    ranked = [r for r in runs if r.ranking]
    if not ranked:
        return []
    lines = [
        "",
        "Fairness metrics (DD-Ranking; HLR, IOR in points, LRS, ARS in %)",
        "",
        "| set | column | accuracy (%) | HLR | IOR | LRS | ARS | whole dataset (%) | reference | protocol |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in ranked:
        rk = run.ranking or {}
        ref = rk["full_reference"]
        number = numbers.setdefault(run.card, len(numbers) + 1)
        lines.append(
            f"| {run.label} | {run.dataset} ipc{run.ipc} {rk['architecture']} "
            f"| {100 * rk['accuracies']['set_own']:.2f} | {100 * rk['hlr']:.2f} | {100 * rk['ior']:.2f} "
            f"| {100 * rk['lrs']:.2f} | {100 * rk['ars']:.2f} | {100 * ref['accuracy']:.2f} "
            f"| {ref['source']} | [{number}] |"
        )
    return lines


def model_count_lines(runs: list[ReportRun]) -> list[str]:
    """For runs with evaluation.num_models=auto: how many paired models the rule took and the
    widest 95 % interval it reached, one row per run."""
    auto = [r for r in runs if r.models and r.models.get("rule") == "auto"]
    if not auto:
        return []
    lines = [
        "",
        "Paired models chosen by evaluation.num_models=auto (intervals: full 95 % width, in points)",
        "",
        "| run | set | seed | models | widest interval | target | reached |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in auto:
        m = run.models or {}
        widest = "none" if m.get("widest") is None else f"{m['widest']:.2f}"
        reached = "yes" if m.get("reached_target") else "no"
        lines.append(
            f"| {run.folder.name} | {run.label} | {run.seed} | {m['models']} | {widest} "
            f"| < {m['target_width']:g} | {reached} |"
        )
    return lines


def write_tables(
    columns: list[str], rows: Rows, cards: dict[str, str], out: Path, runs: list[ReportRun] | None = None
) -> tuple[Path, Path]:
    """The table with a protocol column: rows under different protocol cards are never read as
    comparable, and each card is footnoted in full below the tables; DD-Ranking's metrics of
    `runs` that have them follow the accuracy table."""
    md, csv_path = out / "table.md", out / "table.csv"
    numbers = card_numbers(cards)
    lines = ["| variant | " + " | ".join(columns) + " | protocol |", "|---|" + "---|" * (len(columns) + 1)]
    lines += [
        f"| {row} | " + " | ".join(cell(cols.get(c, [])) for c in columns) + f" | [{numbers[cards[row]]}] |"
        for row, cols in rows.items()
    ]
    lines += ranking_lines(runs or [], numbers)
    lines += model_count_lines(runs or [])
    lines += ["", *(f"[{n}] {card}  " for card, n in numbers.items())]
    md.write_text("\n".join(lines) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "column", "mean", "std", "n", "protocol"])
        for row, cols in rows.items():
            for c in columns:
                values = cols.get(c, [])
                if values:
                    std = statistics.pstdev(values) if len(values) > 1 else 0.0
                    mean = f"{statistics.fmean(values):.4f}"
                    writer.writerow([row, c, mean, f"{std:.4f}", len(values), cards[row]])
    return md, csv_path


def save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy(columns: list[str], rows: Rows, path: Path) -> Path:
    """Bars per variant (one per column) with the std as error bars."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    width = 0.8 / max(len(columns), 1)
    for j, column in enumerate(columns):
        values = [rows[r].get(column, []) for r in rows]
        means = [statistics.fmean(v) if v else float("nan") for v in values]
        stds = [statistics.pstdev(v) if len(v) > 1 else 0.0 for v in values]
        xs = [i + j * width for i in range(len(rows))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=column)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], list(rows), rotation=20, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_losses(runs: list[ReportRun], naming: list[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        if run.losses:
            ax.plot(run.losses, label=f"{variant_label(run, naming)} seed {run.seed}", lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("matching loss")
    if ax.lines:
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def accuracy_time_points(runs: list[ReportRun], naming: list[str]) -> dict[str, list[tuple[float, float]]]:
    """Variant -> (condense + evaluate seconds, mean accuracy %) of each of its runs."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in runs:
        accs = [a for per in run.accuracies.get(run.label, {}).values() for a in per]
        seconds = time_to_set(run)
        if accs and seconds is not None:
            points[variant_label(run, naming)].append((seconds, 100 * statistics.fmean(accs)))
    return dict(points)


def plot_accuracy_vs_time(runs: list[ReportRun], naming: list[str], path: Path) -> Path:
    """Accuracy against the wall time to an evaluated set (condense + evaluate), so a recipe's
    speed claim is one picture: one colour per variant, every run of it a point."""
    import matplotlib.pyplot as plt

    points = accuracy_time_points(runs, naming)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, xy in points.items():
        ax.scatter([x for x, _ in xy], [y for _, y in xy], label=label)
    ax.set_xlabel("wall time: condense + evaluate (s)")
    ax.set_ylabel("test accuracy (%)")
    if points:
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def seconds_to(run: ReportRun, done: int) -> float:
    """Condensation seconds of the first `done` iterations (each iteration's own time: the
    intermediate evaluations between them pause the clock); NaN (a point not drawn) where the
    run's history does not time every one of them (files older than the per-iteration seconds):
    a partial sum would place the point too early."""
    if len(run.iteration_seconds) < done:
        return math.nan
    return sum(run.iteration_seconds[:done])


def learned_curves(
    runs: list[ReportRun], naming: list[str], x: Callable[[ReportRun, int], float]
) -> dict[str, list[tuple[float, float]]]:
    """Variant -> (x, mean accuracy %) at each evaluation.at_iterations point, pooled over seeds
    and models; x (the iteration or the seconds to it) is the mean over the variant's runs."""
    pooled: dict[str, dict[int, tuple[list[float], list[float]]]] = defaultdict(dict)
    for run in runs:
        for done, accs in run.at_iterations.items():
            xs, ys = pooled[variant_label(run, naming)].setdefault(done, ([], []))
            xs.append(x(run, done))
            ys.extend(100 * a for a in accs)
    return {
        label: [(statistics.fmean(xs), statistics.fmean(ys)) for _, (xs, ys) in sorted(points.items())]
        for label, points in pooled.items()
    }


def plot_curves(
    curves: dict[str, list[tuple[float, float]]], xlabel: str, path: Path, target: float | None = None
) -> Path:
    """One line per variant; `target` a dashed horizontal line (an accuracy to reach)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    if curves:
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def plot_accuracy_vs_iteration(runs: list[ReportRun], naming: list[str], path: Path) -> Path:
    """The set's accuracy as it is learned (evaluation.at_iterations), one line per variant."""
    return plot_curves(learned_curves(runs, naming, lambda _, done: float(done)), "iteration", path)


def plot_accuracy_vs_condense_seconds(
    runs: list[ReportRun], naming: list[str], path: Path, target: float | None = None
) -> Path:
    """The same points against the condensation seconds spent to reach them: time to quality."""
    curves = learned_curves(runs, naming, seconds_to)
    return plot_curves(curves, "condensation seconds", path, target)


def write_plots(runs: list[ReportRun], columns: list[str], rows: Rows, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    naming = naming_keys(runs, varying_keys(runs))
    plots = [
        plot_accuracy(columns, rows, out / "accuracy.png"),
        plot_losses(runs, naming, out / "loss.png"),
        plot_accuracy_vs_time(runs, naming, out / "accuracy_vs_time.png"),
    ]
    if any(run.at_iterations for run in runs):
        plots.append(plot_accuracy_vs_iteration(runs, naming, out / "accuracy_vs_iteration.png"))
        seconds_png = out / "accuracy_vs_condense_seconds.png"
        plots.append(plot_accuracy_vs_condense_seconds(runs, naming, seconds_png))
    return plots


def report(folders: list[Path], out: Path) -> dict[str, Any]:
    runs, failed = find_runs(folders)
    if not runs:
        raise SystemExit(
            f"error: no finished run (metrics.json with evaluation) under {', '.join(map(str, folders))}"
        )
    out.mkdir(parents=True, exist_ok=True)
    columns, rows, cards = build_table(runs)
    md, csv_path = write_tables(columns, rows, cards, out, runs)
    plots = write_plots(runs, columns, rows, out)
    return {
        "runs": len(runs),
        "failed": [str(f) for f in failed],
        "table": md,
        "csv": csv_path,
        "plots": plots,
        "markdown": md.read_text(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="condense-report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run or multirun folders")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: FOLDER/report)")
    args = parser.parse_args(argv)
    missing = [f for f in args.folders if not f.exists()]
    if missing:
        sys.exit(f"error: folder {missing[0]} does not exist: give a run or multirun folder")
    out = args.out or args.folders[0] / "report"
    result = report(args.folders, out)
    print(result["markdown"])
    print(f"{result['runs']} runs; wrote {result['table']}, {result['csv']}")
    for p in result["plots"]:
        print(f"wrote {p}")
    for f in result["failed"]:
        print(f"failed or unfinished run: {f}")


if __name__ == "__main__":
    main()
