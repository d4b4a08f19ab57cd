"""Case 6: scaling with the number of tasks N (random weights: only shapes matter for time).

For N = 2, 3, 5, 10, 20 streams of the benchmarked model's backbone: anchor memory (weights and
buffers), hypernet size (the paper's "Control Params"), switch time (``materialize`` of a new
preference) and the time of one soft-forward training step of stage 1 (the pipeline's own
:func:`training.stages.edge_loss`: edge hypernet -> Gumbel-softmax nu -> all N x L nodes mixed ->
sum r_i w_i L_i + Omega -> backward -> Adam) against one training step of a single stream
(stage 0), timed in alternation.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F

import dymu
from dymu.config import ModelConfig, TaskSpec
from dymu.preference import sample_preferences

from ..registry import Context, register_case
from ..report import fmt, table
from ..timing import interleave, paired_ratio, summarize

KINDS = (
    TaskSpec(name="segmentation", kind="segmentation", classes=6),
    TaskSpec(name="depth", kind="depth", loss_scale=3.0),
    TaskSpec(name="normals", kind="normals", loss_scale=10.0),
)


def scaling_config(ctx: Context, n: int, hw: tuple[int, int]) -> ModelConfig:
    """N dense tasks (segmentation, depth, normals, repeated) on the benchmarked backbone."""
    tasks = [KINDS[i % 3].model_copy(update={"name": f"{KINDS[i % 3].name}{i}"}) for i in range(n)]
    return ModelConfig(tasks=tasks, backbone=ctx.model.config.backbone, input_size=hw)


def targets(tasks: tuple[TaskSpec, ...], batch: int, hw: tuple[int, int], g: torch.Generator):
    out = {}
    for t in tasks:
        if t.kind == "segmentation":
            out[t.name] = torch.randint(0, t.classes, (batch, *hw), generator=g)
        elif t.kind == "depth":
            out[t.name] = torch.rand(batch, 1, *hw, generator=g) + 0.1
        else:
            out[t.name] = F.normalize(torch.randn(batch, 3, *hw, generator=g), dim=1)
    return out


def training_steps(model: dymu.ControllableModel, x: torch.Tensor, y: dict, seed: int):
    """(stage-1 soft step, stage-0 one-stream step) as closures over real training code.

    The soft step is the pipeline's own (:func:`training.stages.edge_loss` with the default
    ``[edge]`` options, no affinity) followed by Adam, as stage 1 runs it.
    """
    from training.config import EdgeStage
    from training.stages import EdgeObjective, edge_loss
    from training.tasks import weighted_task_loss

    tasks = model.config.tasks
    model.anchor.eval().requires_grad_(False)
    hyper = model.edge_hypernet.train().requires_grad_(True)
    edge = EdgeStage()
    opt_edge = torch.optim.Adam(hyper.parameters(), lr=edge.lr)
    stream = model.anchor.streams[0]
    opt_stream = torch.optim.Adam(stream.parameters(), lr=1e-3)
    objective = EdgeObjective.build(edge, tasks, None, x.device)
    batch = {"image": x, **y}
    gen = torch.Generator().manual_seed(seed)

    def soft_step() -> None:
        loss, _ = edge_loss(hyper, model.anchor, objective, 0, batch, gen)
        opt_edge.zero_grad(set_to_none=True)
        loss.backward()
        opt_edge.step()

    def stream_step() -> None:
        stream.train().requires_grad_(True)
        out = model.anchor(x, tasks=[0])
        loss, _ = weighted_task_loss(tasks[:1], out, y)
        opt_stream.zero_grad(set_to_none=True)
        loss.backward()
        opt_stream.step()
        stream.eval().requires_grad_(False)

    return soft_step, stream_step


def measure_n(ctx: Context, n: int) -> dict[str, Any]:
    cfg = ctx.config
    hw = ctx.hw(cfg.scaling_size)
    torch.manual_seed(cfg.seed)
    model = dymu.create_model(scaling_config(ctx, n, hw)).to(ctx.device).eval()
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.scaling_batch, model.config.in_channels, *hw, generator=g).to(ctx.device)
    y = {
        k: v.to(ctx.device)
        for k, v in targets(model.config.tasks, cfg.scaling_batch, hw, g).items()
    }
    prefs = itertools.cycle(sample_preferences(n, 32, cfg.seed))

    def switch() -> None:
        with torch.no_grad():
            model.materialize(*next(prefs))

    soft_step, stream_step = training_steps(model, x, y, cfg.seed)
    samples = interleave(
        {"switch": switch, "soft step": soft_step, "one-stream step": stream_step},
        cfg.scaling_rounds,
        warmup=1,
        sync=ctx.sync,
    )
    anchor = model.anchor
    nbytes = sum(t.numel() * t.element_size() for t in (*anchor.parameters(), *anchor.buffers()))
    cost = model.anchor_cost(hw)
    return {
        "n_tasks": n,
        "anchor_params": sum(p.numel() for p in anchor.parameters()),
        "anchor_mib": nbytes / 2**20,
        "control_params": model.control_params,
        "anchor_gflops_per_image": cost.gflops,
        "switch": summarize(samples["switch"]),
        "soft_step": summarize(samples["soft step"]),
        "one_stream_step": summarize(samples["one-stream step"]),
        "soft_over_one_stream": paired_ratio(samples["soft step"], samples["one-stream step"]),
        "samples_s": samples,
    }


def run(ctx: Context) -> dict[str, Any]:
    rows = []
    for n in ctx.config.scaling_ns:
        ctx.log(f"  scaling N = {n}")
        rows.append(measure_n(ctx, n))
    return {
        "size": ctx.config.scaling_size,
        "batch": ctx.config.scaling_batch,
        "backbone": ctx.model.config.backbone.model_dump(mode="json"),
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    head = (
        f"Backbone `{result['backbone']['name']}`, training steps at {result['size']}, batch "
        f"{result['batch']}.\n"
    )
    return (
        head
        + "\n"
        + table(
            [
                "N",
                "anchor params",
                "anchor MiB",
                "hypernet params",
                "switch ms",
                "soft step ms",
                "one-stream step ms",
                "soft / one stream",
            ],
            [
                [
                    r["n_tasks"],
                    f"{r['anchor_params']:,}",
                    fmt(r["anchor_mib"], 1),
                    f"{r['control_params']:,}",
                    fmt(r["switch"]["median_ms"], 1),
                    fmt(r["soft_step"]["median_ms"], 1),
                    fmt(r["one_stream_step"]["median_ms"], 1),
                    fmt(r["soft_over_one_stream"], 1),
                ]
                for r in result["rows"]
            ],
        )
    )


register_case("scaling", 6, "Scaling with the number of tasks N", markdown)(run)
