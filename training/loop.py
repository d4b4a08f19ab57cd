"""The one training loop every stage (and every baseline) runs: Adam on one module, a progress
bar, the CSV log, the step budget and the periodic checkpoints."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dymu.errors import DymuError

from .checkpoint import restore_optimizer, save_checkpoint
from .run import Run

#: ``loss_fn(net, step, batch) -> (loss, stats)``: all that a stage supplies to the loop.
LossFn = Callable[[nn.Module, int, dict], tuple[torch.Tensor, dict[str, float]]]
#: The columns of the CSV log besides stage, step, lr and time.
LOG_FIELDS = (
    "loss", "task_loss", "omega", "active_loss", "inactive_loss", "zeta", "tree_agreement",
)  # fmt: skip


class BudgetExhaustedError(Exception):
    """The step budget of this invocation ran out; a checkpoint was written."""


def freeze(module: nn.Module) -> None:
    """Eval mode, no gradients: a trained stage's module, fixed for the stages after it."""
    module.eval().requires_grad_(False)


def task_stats(per_task: dict[str, torch.Tensor]) -> dict[str, float]:
    """The per-task losses of a step as log columns ``loss/<task>``."""
    return {f"loss/{k}": v.item() for k, v in per_task.items()}


def train_stage(
    run: Run,
    stage: str,
    module: nn.Module,
    cfg: Any,
    start: int,
    opt_state: Any,
    loss_fn: LossFn,
    lr_at: Callable[[int], float],
    *,
    weight_decay: float = 0.0,
    find_unused: bool = False,
    stream: str | None = None,
    after_step: Callable[[int], None] | None = None,
    calibration: bool = False,
) -> None:
    """The one training loop of every stage: Adam on ``module``, progress bar, log, checkpoints.

    ``loss_fn(net, step, batch) -> (loss, stats)`` is all a stage supplies; ``net`` is
    ``module`` itself, or ``module`` under DistributedDataParallel when run by torchrun (the
    stage must call ``net``, not ``module``, so that the gradients are averaged across ranks).
    ``stream`` names the random stream of the batch indices when it is not ``stage`` (the
    baselines: one stream for every method, so that they all see the same batches).
    ``after_step(step)`` runs after each step, before its checkpoint (stage 0's stream
    selection, training/selection.py). ``calibration``: batches from the calibration split.
    """
    from tqdm import tqdm  # tqdm is a training extra: importing training must not need it

    module.train().requires_grad_(True)
    net = run.dist.wrap(module, find_unused=find_unused)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=weight_decay)
    if opt_state is not None:
        restore_optimizer(opt, *opt_state)
    steps = cfg.steps
    bar = tqdm(
        total=steps,
        initial=start,
        desc=f"{stage:>6}",
        disable=not (run.progress and run.dist.is_main),
        dynamic_ncols=True,
        unit="step",
    )
    for step, batch in enumerate(
        run.batches(stream or stage, start, steps, cfg.batch_size, calibration), start=start
    ):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, stats = loss_fn(net, step, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats = run.dist.mean({"loss": loss.item(), **stats})
        if not all(math.isfinite(v) for v in stats.values()):
            raise DymuError(f"stage {stage}: non-finite loss at step {step}: {stats}")
        bar.update(1)
        if step % run.config.log_every == 0 or step == steps - 1:
            bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if k in ("loss", "zeta")})
            run.log(
                {
                    "stage": stage,
                    "step": step,
                    "lr": lr_at(step),
                    "time": time.time(),
                    **{k: stats.get(k, "") for k in LOG_FIELDS},
                }
            )
        if after_step is not None:
            after_step(step)
        if run.budget is not None:
            run.budget -= 1
            if run.budget <= 0 and step + 1 < steps:
                save_checkpoint(run, stage, step + 1, opt)
                bar.close()
                raise BudgetExhaustedError(f"stopped in stage {stage} after step {step + 1}")
        if (step + 1) % run.config.checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(run, stage, step + 1, opt)
    bar.close()
    freeze(run.dist.unwrap(net))
