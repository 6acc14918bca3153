"""Where a condensation iteration spends its time, and what heap reuse and bf16 change.

Run by hand (not in CI), alone on the machine:

    python benchmarks/hot_path.py --reps 5 --out benchmarks/results/hot_path.md

`--levers bf16` (or heap_reuse, or both) runs only those comparisons.

It times, in one process and interleaved (so machine noise hits both variants alike), the pieces
of DC's loop on Fashion-MNIST with ConvNet-3: the real-gradient pass on 256 images, the
synthetic part of one class at IPC 10 (forward, create_graph backward, distance, backward to the
images), one inner SGD step on 100 synthetic images, and a 10,000-image test pass. Two levers,
each against its absence: heap reuse (fp32, glibc's default allocator settings vs freed memory
kept in the heap) and bf16 autocast (with heap reuse, fp32 vs bf16). It also reports the cosine
between the bf16 and fp32 real gradients, the precision question a bf16 fast path must answer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from results_file import machine_description, write_results

from condense.method.distance import gradient_distance, matched_parameters
from condense.primitives.compute import set_heap_reuse
from condense.primitives.dataset import fashion_mnist_available, load_dataset
from condense.primitives.network import build_network
from condense.schema import DatasetConfig, DistanceConfig, NetworkConfig


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: allocator and oneDNN primitive caches
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


LEVERS = ("heap_reuse", "bf16")


def table(title: str, without: str, with_: str, ratio: str, rows: list) -> list[str]:
    """A markdown section of medians and ratios; nothing when the comparison did not run."""
    if not rows:
        return []
    return [
        f"## {title}",
        "",
        f"| piece | {without} median (s) | {with_} median (s) | ratio {ratio} |",
        "|---|---|---|---|",
        *[f"| {n} | {a:.3f} | {b:.3f} | {r:.2f} |" for n, a, b, r in rows],
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hot_path.md"))
    parser.add_argument(
        "--levers", nargs="+", choices=LEVERS, default=list(LEVERS), help="which comparisons to run"
    )
    args = parser.parse_args()
    if not fashion_mnist_available():
        raise SystemExit("error: Fashion-MNIST not found: apt-get install dataset-fashion-mnist")
    torch.set_num_threads(2)
    cfg = DatasetConfig(
        name="fashion_mnist",
        channels=1,
        image_size=28,
        num_classes=10,
        mean=[0.2861],
        std=[0.3530],
        root="/nonexistent",
    )
    data = load_dataset(cfg)
    net = build_network(NetworkConfig(), (1, 28, 28), 10, seed=0, device=torch.device("cpu"))
    params = matched_parameters(net, DistanceConfig())
    real = data.train.images[data.train.labels == 0][:256]
    y_real = torch.zeros(len(real), dtype=torch.long)
    syn = torch.randn(10, 1, 28, 28, requires_grad=True)
    syn_all = torch.randn(100, 1, 28, 28)
    y_all = torch.arange(10).repeat_interleave(10)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    g_real = torch.autograd.grad(F.cross_entropy(net(real), y_real), params)

    def real_pass(bf16: bool) -> list[torch.Tensor]:
        with autocast(bf16):
            loss = F.cross_entropy(net(real), y_real)
        return list(torch.autograd.grad(loss, params))

    def syn_part(bf16: bool) -> None:
        with autocast(bf16):
            loss = F.cross_entropy(net(syn), y_real[:10])
        g = torch.autograd.grad(loss, params, create_graph=True)
        gradient_distance(g, g_real, DistanceConfig()).backward()

    def inner_step(bf16: bool) -> None:
        with autocast(bf16):
            loss = F.cross_entropy(net(syn_all), y_all)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    @torch.no_grad()
    def test_pass(bf16: bool) -> None:
        net.eval()
        with autocast(bf16):
            for i in range(0, len(data.test.images), 1024):
                net(data.test.images[i : i + 1024])
        net.train()

    pieces = (
        ("real pass (256 images)", real_pass),
        ("synthetic part, one class, IPC 10", syn_part),
        ("inner SGD step (100 images)", inner_step),
        ("test pass (10,000 images)", test_pass),
    )

    def compare(without: Callable[[Callable], object], with_: Callable[[Callable], object]) -> list:
        rows = []
        for name, fn in pieces:
            a_times, b_times = [], []
            for _ in range(args.reps):  # interleaved: noise hits both alike
                a_times.append(median_seconds(lambda f=fn: without(f), 1))
                b_times.append(median_seconds(lambda f=fn: with_(f), 1))
            a, b = statistics.median(a_times), statistics.median(b_times)
            rows.append((name, a, b, b / a))
        return rows

    def fp32_heap(reuse: bool) -> Callable[[Callable], object]:
        def run(fn: Callable) -> object:
            set_heap_reuse(reuse)
            return fn(False)

        return run

    heap_rows = compare(fp32_heap(False), fp32_heap(True)) if "heap_reuse" in args.levers else []
    set_heap_reuse(True)
    bf16_rows, cosines = [], []
    if "bf16" in args.levers:
        bf16_rows = compare(lambda f: f(False), lambda f: f(True))
        g32, g16 = real_pass(False), real_pass(True)
        cosines = [
            float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0)) for a, b in zip(g32, g16, strict=True)
        ]

    lines = [
        "# Hot path of one condensation iteration (Fashion-MNIST, ConvNet-3, 2 threads)",
        "",
        f"Command: `python benchmarks/hot_path.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {machine_description(f'{torch.get_num_threads()} threads')}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        *table("Heap reuse (fp32)", "glibc defaults", "heap reuse", "reuse/defaults", heap_rows),
        *table("bf16 autocast (heap reuse on)", "fp32", "bf16 autocast", "bf16/fp32", bf16_rows),
    ]
    if cosines:
        lines += [
            "Cosine between bf16 and fp32 real gradients per matched layer: "
            + ", ".join(f"{c:.4f}" for c in cosines),
            "",
        ]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
