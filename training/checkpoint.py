"""Checkpoints of a training run: the model, the optimizer state and the position, in
safetensors (tensors) + JSON (everything else), each written atomically (temp file + rename)."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from dymu.errors import ConfigError

from .run import Run

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_META = "checkpoint.json"


class Position(NamedTuple):
    """Where a checkpointed run stopped: the stage, its next step, and its optimizer state."""

    stage: str
    step: int
    tensors: dict[str, torch.Tensor]
    param_groups: Any

    @property
    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], Any] | None:
        """``(tensors, param_groups)`` for :func:`restore_optimizer`, or None between stages."""
        return None if self.param_groups is None else (self.tensors, self.param_groups)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    state = opt.state_dict()
    tensors = {
        f"opt/{idx}/{name}": v.detach().cpu().contiguous()
        for idx, entry in state["state"].items()
        for name, v in entry.items()
    }
    return tensors, state["param_groups"]


def restore_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: Any
) -> None:
    """Load the optimizer state a checkpoint holds (``opt/<param>/<name>`` tensors + groups)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run: Run, stage: str, step: int, opt: torch.optim.Optimizer | None) -> None:
    """Model + optimizer + position, written atomically (temp file + rename); rank 0 only."""
    if not run.dist.is_main:
        return
    tensors = {
        f"model/{k}": v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()
    }
    groups = None
    if opt is not None:
        opt_tensors, groups = _flatten_optimizer(opt)
        tensors.update(opt_tensors)
    meta = {
        "stage": stage,
        "step": step,
        "param_groups": groups,
        "completed": run.completed,
        "affinity": None if run.affinity is None else run.affinity.tolist(),
        "config": run.config.model_dump(mode="json"),
    }
    tmp = run.run_dir / (CHECKPOINT + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, run.run_dir / CHECKPOINT)
    tmp_meta = run.run_dir / (CHECKPOINT_META + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, run.run_dir / CHECKPOINT_META)


def load_checkpoint(run: Run) -> Position | None:
    """Restore ``run``'s model, completed stages and affinity; None when there is no checkpoint."""
    meta_path = run.run_dir / CHECKPOINT_META
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta["config"] != run.config.model_dump(mode="json"):
        raise ConfigError(
            f"{run.run_dir}: the checkpoint was made with another config; "
            "resume with the same config and --steps-scale, or start afresh"
        )
    tensors = load_file(str(run.run_dir / CHECKPOINT))
    run.model.load_state_dict(
        {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    )
    run.completed = meta["completed"]
    if meta["affinity"] is not None:
        run.affinity = torch.tensor(meta["affinity"])
    return Position(meta["stage"], meta["step"], tensors, meta["param_groups"])
