"""Case 1: does wall-clock follow FLOPs? time(tree) / time(anchor) vs FLOPs(tree) / FLOPs(anchor).

Trees spanning the cost range (stream 0 shared for the first k layers, k = L-1 .. 0: fully
shared .. fully branched) and the model's arg-max trees at c = 0, 0.5, 1 for uniform and skewed
r, all materialized (BN adapted and folded), timed in alternation with the full anchor in each
round. The reference "anchor" is the fully branched tree materialized the same way (the N
single-task streams with BN folded); the unfolded ``AnchorNet.forward`` is timed beside it.

proportionality = (time ratio) / (FLOP ratio); 1.0 = wall-clock follows FLOPs exactly, > 1 =
the tree saves less time than FLOPs.
"""

from __future__ import annotations

from typing import Any

import torch

from dymu.architecture import Architecture

from ..config import size_label
from ..nets import argmax_trees, distinct, hand_made_trees, materialize
from ..registry import Context, register_case
from ..report import fmt, table
from ..timing import calibrate, interleave, paired_ratio, summarize

ANCHOR_UNFOLDED = "anchor (AnchorNet.forward, BN unfolded)"


def tree_string(arch: Architecture) -> str:
    return " ".join("".join(map(str, row)) for row in arch.parents)


def measure_point(ctx: Context, size: str, batch: int, trees: list) -> dict[str, Any]:
    model, hw = ctx.model, ctx.hw(size)
    x = ctx.images(batch, hw)
    anchor_cost = model.anchor_cost(hw)
    groups = distinct(trees)
    ref = Architecture.fully_branched(model.n_tasks, model.n_layers).id
    with torch.no_grad():
        nets = {aid: materialize(model, ts[0]) for aid, ts in groups.items()}
    variants = {aid: (lambda net=net: net(x)) for aid, net in nets.items()}
    variants[ANCHOR_UNFOLDED] = lambda: model.anchor(x)
    with torch.inference_mode():
        rounds = calibrate(
            variants, ctx.budget(), ctx.config.min_rounds, ctx.config.max_rounds, ctx.sync
        )
        cpu: dict[str, list[float]] = {}
        samples = interleave(variants, rounds, warmup=1, sync=ctx.sync, cpu=cpu)
    rows = []
    for t in trees:
        aid = t.architecture.id
        cost = nets[aid].cost(hw)
        time_ratio = paired_ratio(samples[aid], samples[ref])
        flop_ratio = cost.fraction_of(anchor_cost)
        rows.append(
            {
                "tree": t.name,
                "kind": t.kind,
                "r": list(t.r),
                "c": t.c,
                "architecture_id": aid,
                "parents": tree_string(t.architecture),
                "gflops_per_image": cost.gflops,
                "params": cost.params,
                "flop_ratio": flop_ratio,
                "time_ratio": time_ratio,
                "proportionality": time_ratio / flop_ratio,
                # the same in CPU time: what the tree costs while it runs, preemptions left out
                # (meaningful on the CPU with one intra-op thread; wall-clock is the goal's)
                "cpu_time_ratio": paired_ratio(cpu[aid], cpu[ref]),
                "cpu_proportionality": paired_ratio(cpu[aid], cpu[ref]) / flop_ratio,
                **summarize(samples[aid]),
            }
        )
    return {
        "size": size_label(hw),
        "batch": batch,
        "rounds": rounds,
        "anchor_gflops_per_image": anchor_cost.gflops,
        "reference": ref,
        "anchor_unfolded_over_folded": paired_ratio(samples[ANCHOR_UNFOLDED], samples[ref]),
        "rows": rows,
        "samples_s": samples,
        "cpu_samples_s": cpu,
    }


@torch.no_grad()
def run(ctx: Context) -> dict[str, Any]:
    trees = hand_made_trees(ctx.model) + argmax_trees(ctx.model)
    points = []
    for size, batch in ctx.config.proportionality_points:
        ctx.log(f"  proportionality at {size}, batch {batch}")
        points.append(measure_point(ctx, size, batch, trees))
    worst = max(
        ((p, row) for p in points for row in p["rows"] if row["flop_ratio"] < 1.0),
        key=lambda pr: pr[1]["proportionality"],
        default=(None, None),
    )
    return {
        "points": points,
        "worst": None
        if worst[0] is None
        else {
            "size": worst[0]["size"],
            "batch": worst[0]["batch"],
            "tree": worst[1]["tree"],
            "architecture_id": worst[1]["architecture_id"],
            "parents": worst[1]["parents"],
            "proportionality": worst[1]["proportionality"],
        },
    }


def markdown(result: dict[str, Any]) -> str:
    parts = []
    for p in result["points"]:
        parts.append(
            f"**{p['size']}, batch {p['batch']}** ({p['rounds']} rounds; full anchor "
            f"{p['anchor_gflops_per_image']:.3f} GFLOPs/image; unfolded `AnchorNet.forward` / "
            f"folded anchor = {p['anchor_unfolded_over_folded']:.2f})\n"
        )
        parts.append(
            table(
                [
                    "tree",
                    "parents",
                    "median ms",
                    "time / anchor",
                    "FLOPs / anchor",
                    "ratio",
                    "ratio in CPU time",
                ],
                [
                    [
                        r["tree"],
                        f"`{r['parents']}`",
                        fmt(r["median_ms"]),
                        fmt(r["time_ratio"]),
                        fmt(r["flop_ratio"]),
                        f"**{r['proportionality']:.2f}**",
                        fmt(r.get("cpu_proportionality")),
                    ]
                    for r in p["rows"]
                ],
            )
        )
    if result.get("worst"):
        w = result["worst"]
        parts.append(
            f"Worst ratio: {w['proportionality']:.2f} ({w['tree']}, `{w['parents']}`, "
            f"{w['size']} batch {w['batch']})."
        )
    return "\n".join(parts)


register_case("proportionality", 1, "Proportionality: time ratio vs FLOP ratio", markdown)(run)
