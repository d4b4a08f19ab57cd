"""Where the time goes: torch.profiler on the tree with the worst proportionality, and on the
anchor it is compared with, at the same size and batch (from this run's case 1).

Operators are grouped into convolutions (what the FLOP count measures) and everything else
(bilinear resizing, concatenation, activations, additions, normal normalization, Python glue);
a tree that saves conv FLOPs but keeps the heads' non-conv work saves less time than FLOPs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from dymu.architecture import Architecture

from ..nets import Tree, materialize, uniform_r
from ..registry import Context, register_case
from ..report import fmt, table

CONV_OPS = (
    "aten::conv",
    "aten::_convolution",
    "aten::mkldnn_convolution",
    "aten::_slow_conv2d",
    "aten::slow_conv",
    "aten::thnn_conv",
    "aten::_nnpack",
    "aten::cudnn_conv",
)
#: Profiles taken per network, alternating between the networks; the one with the least total
#: time is kept, since on a shared machine a preemption inside one operator would otherwise be
#: charged to that operator.
REPEATS = 5


def _profile_once(ctx: Context, net: torch.nn.Module, x: torch.Tensor, rounds: int) -> Any:
    activities = [ProfilerActivity.CPU]
    if ctx.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch.inference_mode():
        net(x)
        ctx.sync()
        with profile(activities=activities) as prof:
            for _ in range(rounds):
                net(x)
            ctx.sync()
    return prof.key_averages()


def _summary(runs: list[Any], rounds: int) -> dict[str, Any]:
    totals = [sum(e.self_cpu_time_total for e in events) for events in runs]
    events = runs[totals.index(min(totals))]
    total = min(totals) / rounds / 1e3
    conv = sum(e.self_cpu_time_total for e in events if e.key.startswith(CONV_OPS)) / rounds / 1e3
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "self_cpu_ms_per_call": total,
        "conv_ms_per_call": conv,
        "non_conv_ms_per_call": total - conv,
        "conv_share": conv / total if total else None,
        "profiles_taken": REPEATS,
        "totals_ms_per_call": [t / rounds / 1e3 for t in totals],
        "top_ops": [
            {
                "op": e.key,
                "self_cpu_ms_per_call": e.self_cpu_time_total / rounds / 1e3,
                "calls_per_forward": e.count / rounds,
            }
            for e in top
        ],
        "table": events.table(sort_by="self_cpu_time_total", row_limit=15),
    }


def run(ctx: Context) -> dict[str, Any]:
    worst = (ctx.results.get("proportionality") or {}).get("worst")
    model = ctx.model
    n, layers = model.n_tasks, model.n_layers
    if worst is None:  # case 1 not run: profile the fully shared tree at the model's size
        worst = {
            "size": "x".join(map(str, model.input_size)),
            "batch": 1,
            "tree": "fully shared",
            "proportionality": None,
            "parents": None,
        }
        arch = Architecture.fully_shared(n, layers)
    else:
        arch = Architecture.from_parents(
            [[int(ch) for ch in row] for row in worst["parents"].split()],
            n_tasks=n,
            n_layers=layers,
        )
    hw = ctx.hw(worst["size"])
    x = ctx.images(worst["batch"], hw)
    r = tuple(uniform_r(n))
    with torch.no_grad():
        tree = materialize(model, Tree(worst["tree"], arch, r, 0.0, "profiled"))
        anchor = materialize(
            model, Tree("anchor", Architecture.fully_branched(n, layers), r, 0.0, "profiled")
        )
    rounds = ctx.config.profile_rounds
    runs: dict[str, list[Any]] = {"tree": [], "anchor": []}
    for _ in range(REPEATS):  # alternate, so both see the same spells of load
        runs["tree"].append(_profile_once(ctx, tree, x, rounds))
        runs["anchor"].append(_profile_once(ctx, anchor, x, rounds))
    out = {"point": worst, **{name: _summary(r, rounds) for name, r in runs.items()}}
    for name in ("tree", "anchor"):
        (ctx.out_dir / f"profile_{name}.txt").write_text(out[name]["table"])
    return out


def markdown(result: dict[str, Any]) -> str:
    p = result["point"]
    text = (
        f"Profiled: {p['tree']} at {p['size']}, batch {p['batch']} (proportionality "
        f"{fmt(p['proportionality'])}), and the anchor; torch.profiler, self CPU time per "
        f"forward, the least loaded of {REPEATS} profiles (full tables: profile_tree.txt, "
        "profile_anchor.txt).\n\n"
    )
    text += table(
        ["network", "total ms", "conv ms", "non-conv ms", "conv share"],
        [
            [
                name,
                fmt(result[name]["self_cpu_ms_per_call"]),
                fmt(result[name]["conv_ms_per_call"]),
                fmt(result[name]["non_conv_ms_per_call"]),
                fmt(result[name]["conv_share"]),
            ]
            for name in ("tree", "anchor")
        ],
    )
    text += "\nTop operators of the tree:\n\n" + table(
        ["op", "self ms / forward", "calls / forward"],
        [
            [f"`{o['op']}`", fmt(o["self_cpu_ms_per_call"], 3), fmt(o["calls_per_forward"], 0)]
            for o in result["tree"]["top_ops"]
        ],
    )
    return text


register_case("profile", 8, "Profile of the worst proportionality", markdown)(run)
