"""Switch and predict timings of the core: what a preference change costs, what a tree saves.

For a few preferences (uniform / skewed r, c in {0, 0.5, 1}) and hand-made trees spanning the
cost range, measures on this machine:

* materialize: hypernets (edge + weight) + tree + copy of the used nodes + BN folding;
* predict: the materialized tree's forward vs the full anchor's forward (all N streams), at
  batch 1, as the median of repeated runs, with the FLOP ratio beside the time ratio.

Trees from an untrained controller are arbitrary; the hand-made trees (fully shared, half
shared, fully branched) are the ones that show how time follows FLOPs.

    python benchmarks/materialize.py [--size 96 128] [--repeats 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import dymu
from dymu.architecture import Architecture
from dymu.config import ModelConfig, dense_tasks


def median_time(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def half_shared(n: int, layers: int) -> Architecture:
    """Share stream 0 for the lower half of the layers, then branch."""
    rows = [(0,) * n if b < (layers - 1) // 2 else tuple(range(n)) for b in range(layers - 1)]
    return Architecture.from_parents(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--model", default=None, help="artifact to time (default: random scenes model)")
    ap.add_argument("--json", default=None, help="write every number here")
    args = ap.parse_args()

    torch.manual_seed(0)
    if args.model:
        model = dymu.load(args.model)
    else:
        model = dymu.create_model(ModelConfig(tasks=dense_tasks())).eval()
    hw = tuple(args.size) if args.size else model.input_size
    x = torch.randn(args.batch, 3, *hw, device=model.device)
    anchor_cost = model.anchor_cost(hw)
    with torch.no_grad():
        t_anchor = median_time(lambda: model.anchor(x), args.repeats)

    rows = []
    cases: list[tuple[str, list[float], float, Architecture | None]] = [
        (f"{label} c={c}", r, c, None)
        for label, r in (("uniform r", [1, 1, 1]), ("r=0.8/0.1/0.1", [0.8, 0.1, 0.1]))
        for c in (0.0, 0.5, 1.0)
    ]
    n, layers = model.n_tasks, model.n_layers
    cases += [
        ("fully shared", [1, 1, 1], 1.0, Architecture.fully_shared(n, layers)),
        ("half shared", [1, 1, 1], 0.5, half_shared(n, layers)),
        ("fully branched", [1, 1, 1], 0.0, Architecture.fully_branched(n, layers)),
    ]
    for name, r, c, arch in cases:
        t_hyper = median_time(
            lambda r=r, c=c: (model.architecture(r, c), model.bn_deltas(r, c)), args.repeats
        )
        t_mat = median_time(
            lambda r=r, c=c, a=arch: model.materialize(r, c, architecture=a),
            max(5, args.repeats // 3),
            warmup=1,
        )
        net = model.materialize(r, c, architecture=arch)
        with torch.no_grad():
            t_pred = median_time(lambda net=net: net(x), args.repeats)
        cost = net.cost(hw)
        rows.append(
            {
                "case": name,
                "tree": " ".join("".join(map(str, p)) for p in net.architecture.parents),
                "hypernets_ms": t_hyper * 1e3,
                "materialize_ms": t_mat * 1e3,
                "predict_ms": t_pred * 1e3,
                "anchor_ms": t_anchor * 1e3,
                "time_ratio": t_pred / t_anchor,
                "flop_ratio": cost.fraction_of(anchor_cost),
                "gflops": cost.gflops,
                "params": cost.params,
            }
        )

    print(
        f"# core timings — {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {model.device}, "
        f"input {args.batch}x3x{hw[0]}x{hw[1]}"
    )
    print(f"full anchor: {anchor_cost.gflops:.3f} GFLOPs/image, predict {t_anchor * 1e3:.2f} ms\n")
    print(
        "| case | tree | hypernets ms | materialize ms | predict ms "
        "| time / anchor | time / branched tree | FLOPs / anchor |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    # The anchor runs eager with BN unfolded; the folded fully branched tree is the fair
    # reference for how a tree's time follows its FLOPs.
    t_branched = next(row["predict_ms"] for row in rows if row["case"] == "fully branched")
    for row in rows:
        row["time_ratio_branched"] = row["predict_ms"] / t_branched
        print(
            f"| {row['case']} | {row['tree']} | {row['hypernets_ms']:.2f} | "
            f"{row['materialize_ms']:.1f} | {row['predict_ms']:.2f} | {row['time_ratio']:.2f} | "
            f"{row['time_ratio_branched']:.2f} | {row['flop_ratio']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "input": [args.batch, 3, *hw],
                    "torch": torch.__version__,
                    "device": str(model.device),
                    "anchor_ms": t_anchor * 1e3,
                    "anchor_gflops": anchor_cost.gflops,
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
