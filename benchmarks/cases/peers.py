"""Case 2: dymu's trees beside what one would deploy without dymu, in the same run.

* the N single-task networks run one after another (each its own stream, BN folded);
* a hard-shared network of the same backbone: stream 0's encoder feeding all N heads (what PHN
  and PHN-BN serve; their hypernetworks only change its weights);
* dymu trees: fully shared, and the model's arg-max trees for uniform and skewed r at c = 0, 1.

Latency (median per batch), throughput (images/s) and params; every variant is timed once per
round, in rotating order.
"""

from __future__ import annotations

from typing import Any

import torch

from dymu.shared import HardSharedNet

from ..config import size_label
from ..nets import (
    Tree,
    argmax_trees,
    hand_made_trees,
    materialize,
    single_task_nets,
)
from ..registry import Context, register_case
from ..report import fmt, table
from ..timing import calibrate, interleave, paired_ratio, summarize

SINGLE = "N single-task networks, one after another"
HARD = "hard-shared network (PHN / PHN-BN)"


def _dymu_trees(ctx: Context) -> list[Tree]:
    shared = [t for t in hand_made_trees(ctx.model) if t.name == "fully shared"]
    picked = [t for t in argmax_trees(ctx.model) if t.c in (0.0, 1.0)]
    return shared + picked


def measure_point(ctx: Context, size: str, batch: int) -> dict[str, Any]:
    model, hw = ctx.model, ctx.hw(size)
    x = ctx.images(batch, hw)
    with torch.no_grad():
        singles = single_task_nets(model)
        hard = HardSharedNet.from_anchor(model.anchor)
        trees = _dymu_trees(ctx)
        nets = {}
        for t in trees:  # one net per distinct tree; the names keep every preference
            nets.setdefault(t.architecture.id, materialize(model, t))
    costs = {SINGLE: model.anchor_cost(hw), HARD: model.cost_model.hard_shared_cost(hw)}
    variants = {SINGLE: lambda: [net(x) for net in singles], HARD: lambda: hard(x)}
    names = {}
    for t in trees:
        key = f"dymu tree {t.architecture.id}"
        names.setdefault(key, []).append(t.name)
        variants[key] = lambda net=nets[t.architecture.id]: net(x)
        costs[key] = nets[t.architecture.id].cost(hw)
    with torch.inference_mode():
        rounds = calibrate(
            variants, ctx.budget(), ctx.config.min_rounds, ctx.config.max_rounds, ctx.sync
        )
        samples = interleave(variants, rounds, warmup=1, sync=ctx.sync)
    rows = []
    for key in variants:
        s = summarize(samples[key])
        rows.append(
            {
                "network": key,
                "preferences": names.get(key, []),
                "gflops_per_image": costs[key].gflops,
                "params": costs[key].params,
                "images_per_s": batch / (s["median_ms"] / 1e3),
                "time_over_single_task": paired_ratio(samples[key], samples[SINGLE]),
                **s,
            }
        )
    return {
        "size": size_label(hw),
        "batch": batch,
        "rounds": rounds,
        "rows": rows,
        "samples_s": samples,
    }


def run(ctx: Context) -> dict[str, Any]:
    points = []
    for size, batch in ctx.config.peers_points:
        ctx.log(f"  peers at {size}, batch {batch}")
        points.append(measure_point(ctx, size, batch))
    return {"points": points}


def markdown(result: dict[str, Any]) -> str:
    parts = []
    for p in result["points"]:
        parts.append(f"**{p['size']}, batch {p['batch']}** ({p['rounds']} rounds)\n")
        parts.append(
            table(
                ["network", "GFLOPs/image", "params", "median ms", "images/s", "time / N single"],
                [
                    [
                        r["network"]
                        + (f" ({'; '.join(r['preferences'])})" if r["preferences"] else ""),
                        fmt(r["gflops_per_image"], 3),
                        f"{r['params']:,}",
                        fmt(r["median_ms"]),
                        fmt(r["images_per_s"], 1),
                        fmt(r["time_over_single_task"]),
                    ]
                    for r in p["rows"]
                ],
            )
        )
    return "\n".join(parts)


register_case("peers", 2, "Peers: single-task streams, hard-shared network, dymu trees", markdown)(
    run
)
