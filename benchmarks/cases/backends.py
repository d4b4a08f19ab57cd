"""Case 4: the same tree on each backend: torch eager vs ONNX Runtime, BN folded vs not,
channels-last on and off (and, on CUDA, float16 autocast: the service's torch path there).

ONNX sessions are the service's own (``service.backends.export_onnx`` + ``OnnxSession``: weights
as graph inputs, so ORT cannot fold BN itself; the unfolded graph keeps BatchNormalization).
Achieved GFLOP/s use the cost model's FLOPs (1 MAC = 2 FLOPs) and are compared with the CPU's
FMA peak and a measured large matmul (``peak`` in the JSON).
"""

from __future__ import annotations

from typing import Any

import torch

from dymu.materialize import clone_module

from ..config import size_label
from ..machine import fma_fractions
from ..registry import Context, register_case
from ..report import fmt, table
from ..timing import calibrate, interleave, median_s, paired_ratio, summarize
from .switch import onnx_ok, served_preference

EAGER = "torch eager, folded"


def _channels_last(net: torch.nn.Module) -> torch.nn.Module:
    return clone_module(net).to(memory_format=torch.channels_last)


def _variants(ctx: Context, folded: Any, unfolded: Any, x: torch.Tensor, hw: Any) -> tuple:
    """The timed callables by backend label, ONNX Runtime's providers and the skipped graphs."""
    from service.backends import OnnxSession, export_onnx

    folded_cl, unfolded_cl = _channels_last(folded), _channels_last(unfolded)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    variants: dict[str, Any] = {
        EAGER: lambda: folded(x),
        "torch eager, unfolded": lambda: unfolded(x),
        "torch channels-last, folded": lambda: folded_cl(x_cl),
        "torch channels-last, unfolded": lambda: unfolded_cl(x_cl),
    }
    if ctx.device.type == "cuda":

        def fp16() -> Any:
            with torch.autocast("cuda", dtype=torch.float16):
                return folded_cl(x_cl)

        variants["torch channels-last, folded, fp16 autocast (served)"] = fp16
    providers, skipped = {}, {}
    if onnx_ok():
        xn = x.cpu().numpy()
        for label, net in (("folded", folded), ("unfolded", unfolded)):
            session = OnnxSession(export_onnx(net, hw), ctx.device, ctx.config.threads)
            try:
                weights = session.weights(net)
            except RuntimeError as exc:  # a graph input no module tensor feeds
                skipped[f"onnx, {label}"] = str(exc)
                continue
            variants[f"onnx, {label}"] = lambda s=session, w=weights: s.run(xn, w)
            providers[label] = session.provider
    return variants, providers, skipped


def _row(ctx: Context, name: str, samples: dict, cpu: dict, flops: float) -> dict[str, Any]:
    """One backend's timings, its achieved GFLOP/s and its shares of the peaks."""
    med = summarize(samples[name])
    gflops_s = flops / (med["median_ms"] / 1e3) / 1e9
    # per CPU-second: what the computation reaches while it runs (preemptions left out)
    cpu_s = median_s(cpu[name])
    on_cpu = ctx.device.type == "cpu"
    fma = ctx.peak.get("fma", {}) if on_cpu else {}
    mm = (ctx.peak.get("matmul_device") or ctx.peak.get("matmul") or {}).get("gflops")
    of_peak, of_peak_cpu = fma_fractions(
        flops / 1e9, med["median_ms"] / 1e3, cpu_s if on_cpu else None, fma
    )
    return {
        "backend": name,
        **med,
        "cpu_median_ms": cpu_s * 1e3,
        "gflop_per_s": gflops_s,
        "gflop_per_cpu_s": flops / cpu_s / 1e9 if on_cpu else None,
        "fraction_of_fma_peak": of_peak,
        "fraction_of_fma_peak_cpu_time": of_peak_cpu,
        "fraction_of_matmul": gflops_s / mm if mm else None,
        "speedup_over_eager": paired_ratio(samples[EAGER], samples[name]),
    }


def _speedups(samples: dict) -> dict[str, Any]:
    """The point's paired ratios: folding, channels-last, and ONNX Runtime against torch."""
    out = {
        "fold_speedup_eager": paired_ratio(samples["torch eager, unfolded"], samples[EAGER]),
        "channels_last_speedup": paired_ratio(
            samples[EAGER], samples["torch channels-last, folded"]
        ),
    }
    if "onnx, folded" in samples:
        out["onnx_over_torch"] = paired_ratio(samples[EAGER], samples["onnx, folded"])
    if "onnx, unfolded" in samples:
        out["fold_speedup_onnx"] = paired_ratio(samples["onnx, unfolded"], samples["onnx, folded"])
    return out


def measure_point(ctx: Context, size: str, batch: int) -> dict[str, Any]:
    model, hw = ctx.model, ctx.hw(size)
    r, c = served_preference(model.n_tasks)
    with torch.no_grad():
        folded = model.materialize(r, c)
        unfolded = model.materialize(r, c, fold_bn=False)
        variants, providers, skipped = _variants(ctx, folded, unfolded, ctx.images(batch, hw), hw)
    with torch.inference_mode():
        rounds = calibrate(
            variants, ctx.budget(), ctx.config.min_rounds, ctx.config.max_rounds, ctx.sync
        )
        cpu: dict[str, list[float]] = {}
        samples = interleave(variants, rounds, warmup=1, sync=ctx.sync, cpu=cpu)
    flops = folded.cost(hw).flops * batch
    return {
        "size": size_label(hw),
        "batch": batch,
        "rounds": rounds,
        "preference": {"r": r, "c": c},
        "architecture_id": folded.architecture.id,
        "gflops_per_image": folded.cost(hw).gflops,
        "onnx_providers": providers,
        "skipped": skipped,
        "rows": [_row(ctx, name, samples, cpu, flops) for name in samples],
        "samples_s": samples,
        "cpu_samples_s": cpu,
        **_speedups(samples),
    }


def run(ctx: Context) -> dict[str, Any]:
    points = []
    for size, batch in ctx.config.backends_points:
        ctx.log(f"  backends at {size}, batch {batch}")
        points.append(measure_point(ctx, size, batch))
    return {"points": points}


def markdown(result: dict[str, Any]) -> str:
    parts = []
    for p in result["points"]:
        head = (
            f"**{p['size']}, batch {p['batch']}** ({p['rounds']} rounds; tree "
            f"`{p['architecture_id']}`, {p['gflops_per_image']:.3f} GFLOPs/image"
        )
        if "onnx_over_torch" in p:
            head += f"; onnx / torch eager = **{p['onnx_over_torch']:.2f}x**"
        parts.append(head + ")\n")
        for name, why in p.get("skipped", {}).items():
            parts.append(f"{name}: not run ({why}).\n")
        parts.append(
            table(
                [
                    "backend",
                    "median ms",
                    "GFLOP/s",
                    "of FMA peak",
                    "GFLOP per CPU-s",
                    "of FMA peak (CPU time)",
                    "x eager",
                ],
                [
                    [
                        r["backend"],
                        fmt(r["median_ms"]),
                        fmt(r["gflop_per_s"], 1),
                        fmt(r["fraction_of_fma_peak"], 3),
                        fmt(r["gflop_per_cpu_s"], 1),
                        fmt(r["fraction_of_fma_peak_cpu_time"], 3),
                        fmt(r["speedup_over_eager"]),
                    ]
                    for r in p["rows"]
                ],
            )
        )
    return "\n".join(parts)


register_case(
    "backends", 4, "Backends: torch eager vs ONNX Runtime, folding, channels-last", markdown
)(run)
