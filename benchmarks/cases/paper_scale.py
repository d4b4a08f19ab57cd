"""Case 7: paper scale. ResNet-34 DeepLabv3+ streams x 3 (NYU-v2's tasks) at 288x384.

FLOPs and params come from the cost model on a shape-only (meta) copy, so they are exact and
cost nothing; the paper's Single-Task row of Table 3 (NYU-v2) is 64.47 M params and 58.78
GFLOPs. dymu counts 1 multiply-add = 2 FLOPs; the case reports the paper's figure against both
that and multiply-adds, says which convention it implies, and splits encoder nodes from heads
(the paper measures "the memory of the activated nodes in the anchor net"). Latency: the three
single-task streams (fully branched tree, BN folded, random weights) and the fully shared tree.
"""

from __future__ import annotations

from typing import Any

import torch

import dymu
from dymu.architecture import Architecture
from dymu.config import BackboneConfig, ModelConfig
from dymu.cost import CostModel

from ..registry import Context, register_case
from ..report import fmt, table
from ..timing import interleave, paired_ratio, summarize

PAPER = {"params": 64.47e6, "gflops": 58.78, "source": "Table 3 (NYU-v2), Single-Task row"}
TOLERANCE = 0.05
BACKBONE = BackboneConfig(name="resnet34_deeplab", options={"output_stride": 16})
#: Head widths beside the default (ASPP 256, decoder 256), to show what the paper's head may be.
HEAD_VARIANTS: dict[str, dict[str, int]] = {
    "DeepLabv3+ (ASPP 256, decoder 256), the repository default": {},
    "ASPP 128, decoder 256": {"aspp_channels": 128},
    "ASPP 256, decoder 128": {"decoder_channels": 128},
}


def paper_config(hw: tuple[int, int], options: dict[str, int] | None = None) -> ModelConfig:
    from training.data.nyuv2 import nyuv2_tasks

    backbone = BACKBONE.model_copy(update={"options": {**BACKBONE.options, **(options or {})}})
    return ModelConfig(tasks=nyuv2_tasks(), backbone=backbone, input_size=hw)


def count(config: ModelConfig) -> dict[str, Any]:
    """Analytic cost of the 3 streams, split into encoder nodes and heads."""
    cm = CostModel(config)
    table_ = cm.node_costs()
    total = cm.anchor_cost()
    nodes_flops = sum(map(sum, table_.node_flops))
    nodes_params = sum(map(sum, table_.node_params))
    gflops_2 = total.flops / 1e9
    gmacs = gflops_2 / 2
    rel = {
        "params_total": total.params / PAPER["params"] - 1,
        "params_encoder_nodes": nodes_params / PAPER["params"] - 1,
        "gflops_as_2_flops_per_mac": gflops_2 / PAPER["gflops"] - 1,
        "gflops_as_macs": gmacs / PAPER["gflops"] - 1,
    }
    return {
        "params_total": total.params,
        "params_encoder_nodes": nodes_params,
        "params_heads": sum(table_.head_params),
        "gflops_2_flops_per_mac": gflops_2,
        "gmacs": gmacs,
        "gflops_encoder_nodes": nodes_flops / 1e9,
        "gflops_heads": sum(table_.head_flops) / 1e9,
        "relative_to_paper": rel,
        "within_5pct": {k: abs(v) <= TOLERANCE for k, v in rel.items()},
    }


def implied_convention(default: dict[str, Any]) -> str:
    rel = default["relative_to_paper"]
    two, mac = abs(rel["gflops_as_2_flops_per_mac"]), abs(rel["gflops_as_macs"])
    enc = default["gflops_encoder_nodes"] / PAPER["gflops"] - 1
    if mac < two:
        return (
            "multiply-adds (the 'GFLOPs' of thop/ptflops-style counters, 1 MAC = 1 FLOP): "
            f"counted that way the network is {rel['gflops_as_macs']:+.1%} off the paper; at "
            f"1 MAC = 2 FLOPs it is {rel['gflops_as_2_flops_per_mac']:+.1%} off, and the three "
            f"encoders alone already are {enc:+.1%}"
        )
    return f"2 FLOPs per multiply-add ({rel['gflops_as_2_flops_per_mac']:+.1%} off the paper)"


def latency(ctx: Context, hw: tuple[int, int]) -> dict[str, Any]:
    torch.manual_seed(ctx.config.seed)
    model = dymu.create_model(paper_config(hw)).to(ctx.device).eval()
    n, layers = model.n_tasks, model.n_layers
    with torch.no_grad():
        branched = model.materialize(
            [1, 1, 1], 0, architecture=Architecture.fully_branched(n, layers), adapt=False
        )
        shared = model.materialize(
            [1, 1, 1], 0, architecture=Architecture.fully_shared(n, layers), adapt=False
        )
    x = ctx.images(1, hw)
    with torch.inference_mode():
        samples = interleave(
            {"3 single-task streams": lambda: branched(x), "fully shared tree": lambda: shared(x)},
            ctx.config.paper_rounds,
            warmup=1,
            sync=ctx.sync,
        )
    out = {"size": f"{hw[0]}x{hw[1]}", "batch": 1, "rows": []}
    for name, net in (("3 single-task streams", branched), ("fully shared tree", shared)):
        s = summarize(samples[name])
        flops = net.cost(hw).flops
        out["rows"].append(
            {
                "network": name,
                "gflops_per_image": flops / 1e9,
                "gflop_per_s": flops / (s["median_ms"] / 1e3) / 1e9,
                **s,
            }
        )
    out["shared_over_branched"] = paired_ratio(
        samples["fully shared tree"], samples["3 single-task streams"]
    )
    out["samples_s"] = samples
    return out


def run(ctx: Context) -> dict[str, Any]:
    hw = ctx.hw(ctx.config.paper_size)
    variants = {name: count(paper_config(hw, opts)) for name, opts in HEAD_VARIANTS.items()}
    default = next(iter(variants.values()))
    result: dict[str, Any] = {
        "size": f"{hw[0]}x{hw[1]}",
        "backbone": BACKBONE.model_dump(mode="json"),
        "paper": PAPER,
        "tolerance": TOLERANCE,
        "counts": variants,
        "implied_convention": implied_convention(default),
        "latency": None,
    }
    if ctx.config.paper_latency_size:
        ctx.log(f"  paper scale: latency at {ctx.config.paper_latency_size}")
        result["latency"] = latency(ctx, ctx.hw(ctx.config.paper_latency_size))
    return result


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for name, c in result["counts"].items():
        rel = c["relative_to_paper"]
        rows.append(
            [
                name,
                f"{c['params_total'] / 1e6:.2f} M ({rel['params_total']:+.1%})",
                f"{c['params_encoder_nodes'] / 1e6:.2f} M ({rel['params_encoder_nodes']:+.1%})",
                f"{c['gflops_2_flops_per_mac']:.2f} ({rel['gflops_as_2_flops_per_mac']:+.1%})",
                f"{c['gmacs']:.2f} ({rel['gflops_as_macs']:+.1%})",
            ]
        )
    text = (
        f"ResNet-34 DeepLabv3+ x 3 at {result['size']} (output stride 16) against the paper's "
        f"{result['paper']['params'] / 1e6:.2f} M params / {result['paper']['gflops']} GFLOPs:\n\n"
        + table(
            ["heads", "params (all)", "params (encoder nodes)", "GFLOPs, 1 MAC = 2", "GMACs"],
            rows,
        )
        + f"\nImplied convention: {result['implied_convention']}.\n"
    )
    lat = result.get("latency")
    if lat:
        text += f"\nLatency at {lat['size']}, batch 1:\n\n" + table(
            ["network", "GFLOPs/image", "median ms", "GFLOP/s"],
            [
                [
                    r["network"],
                    fmt(r["gflops_per_image"], 2),
                    fmt(r["median_ms"], 0),
                    fmt(r["gflop_per_s"], 1),
                ]
                for r in lat["rows"]
            ],
        )
    return text


register_case("paper_scale", 7, "Paper scale: ResNet-34 DeepLabv3+ x 3 at 288x384", markdown)(run)
