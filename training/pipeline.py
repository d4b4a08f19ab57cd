"""The training pipeline (paper §3, App. F): the stages in order, checkpoints, resume, artifact.

:func:`run_training` is the composition: prepare the run (model, data, checkpoint), run each
stage of :data:`training.run.STAGES` that is not done yet (:mod:`training.stages`, through the
one loop of :mod:`training.loop`, checkpointed by :mod:`training.checkpoint`), check the model
(:func:`training.evaluation.checks.method_checks`) and write the artifact.

Data parallelism: under ``torchrun`` each stage runs on P processes with DistributedDataParallel
(:mod:`training.distributed`); rank 0 alone logs, shows progress and writes checkpoints and the
artifact.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import dymu
from dymu.backbones import build_backbone
from dymu.backbones.pretrained import load_encoder
from dymu.config import ModelConfig, TaskSpec
from dymu.device import resolve_device
from dymu.errors import ConfigError

from .checkpoint import CHECKPOINT_META, Position, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import split_dataset
from .distributed import Distributed
from .distributed import from_env as distributed_from_env
from .distributed import shutdown as distributed_shutdown
from .evaluation.checks import method_checks
from .loop import BudgetExhaustedError
from .run import LOG, STAGES, Run
from .stages import TRAINING_STAGES, stage_affinity
from .trees import hard_trees


def model_config(config: TrainConfig, tasks: tuple[TaskSpec, ...]) -> ModelConfig:
    """The model shape of a training config for a dataset's tasks (dymu and the baselines)."""
    return ModelConfig(
        tasks=tasks,
        backbone=config.backbone,
        input_size=config.input_size,
        hypernet=config.hypernet,
    )


def build_model(config: TrainConfig, tasks: tuple[TaskSpec, ...]) -> dymu.ControllableModel:
    torch.manual_seed(config.seed)
    return dymu.create_model(model_config(config, tasks))


def init_encoders(model: dymu.ControllableModel, path: str) -> str:
    """Every stream's encoder from the pretrained file ``path`` (``[backbone] init``), before
    stage 0; the heads keep their initialization. Returns the file's key layout."""
    backbone = build_backbone(model.config.backbone, model.config.in_channels)
    return load_encoder(backbone, [stream.blocks for stream in model.anchor.streams], path)


@dataclass(frozen=True)
class RunRequest:
    """What one rank is asked to do by :func:`run_training` (its arguments, resolved)."""

    config: TrainConfig
    out: Path
    run_dir: Path
    device: torch.device
    dist: Distributed
    resume: bool
    stages: tuple[str, ...]
    progress: bool
    command: str | None
    max_steps: int | None


def run_training(
    config: TrainConfig,
    out: str | Path,
    *,
    run_dir: str | Path | None = None,
    device: str = "auto",
    resume: bool = False,
    stages: tuple[str, ...] = STAGES,
    progress: bool = True,
    command: str | None = None,
    max_steps: int | None = None,
) -> Path | None:
    """Run ``stages`` of ``config`` and write the artifact to ``out`` (``model_store/<name>``).

    ``run_dir`` (default ``runs/<name>``) holds the checkpoint and the CSV log; with ``resume``
    the run continues from its checkpoint. ``max_steps`` bounds the optimizer steps of this
    invocation: when it runs out, a checkpoint is written and None is returned (no artifact).
    Returns the artifact's version directory (on every rank when run by torchrun).
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    dev = resolve_device(device)
    owns_group = not torch.distributed.is_initialized()
    dist = distributed_from_env(dev)
    request = RunRequest(
        config, Path(out), Path(run_dir or Path("runs") / config.name), dist.device(dev), dist,
        resume, tuple(stages), progress, command, max_steps,
    )  # fmt: skip
    completed = False
    try:
        run, position, todo = prepare_run(request)
        result = finish_run(request, run) if run_stages(run, todo, position) else None
        completed = True
        return result
    finally:
        if owns_group:
            distributed_shutdown(completed)


def take_streams(model: dymu.ControllableModel, artifact: str, device: torch.device) -> None:
    """Copy the anchor streams of ``artifact`` into ``model``; one line (a ConfigError) when
    they do not fit the config's tasks or backbone, before any tensor is copied."""
    source = dymu.load(artifact, device=device)
    ours, theirs = list(model.tasks), list(source.tasks)
    if ours != theirs:
        raise ConfigError(f"{artifact}: its tasks {theirs} are not the config's {ours}")
    mine, given = model.anchor.state_dict(), source.anchor.state_dict()
    for key in sorted(mine.keys() | given.keys()):
        a, b = mine.get(key), given.get(key)
        if a is None or b is None or a.shape != b.shape:
            found = "missing" if b is None else f"shape {tuple(b.shape)}"
            wanted = "none" if a is None else f"shape {tuple(a.shape)}"
            raise ConfigError(
                f"{artifact}: its streams do not fit the config's backbone "
                f"({key}: {found} in the artifact, {wanted} in the config)"
            )
    model.anchor.load_state_dict(given)


def prepare_run(request: RunRequest) -> tuple[Run, Position | None, tuple[str, ...]]:
    """The run's state (model, training split, checkpoint if resuming) and the stages to run."""
    config, run_dir, dev, stages = request.config, request.run_dir, request.device, request.stages
    if not request.resume and (run_dir / CHECKPOINT_META).exists():
        raise ConfigError(
            f"{run_dir} already holds a checkpoint: pass --resume to continue it, "
            "or remove it / choose another --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset = split_dataset(config)
    model = build_model(config, tuple(dataset.tasks)).to(dev)
    if config.edge.estimator == "trees" and "edge" in stages:
        hard_trees(model.n_tasks, model.n_layers)  # too many trees: say so before stage 0
    if config.anchor.pretrained:  # whatever the stages: the controller trains on these streams
        take_streams(model, config.anchor.pretrained, dev)
        stages = tuple(s for s in stages if s not in ("trunk", "anchor"))
    elif config.backbone.init and ("anchor" in stages or "trunk" in stages):
        init_encoders(model, config.backbone.init)
    if not config.trunk.steps:  # the common trunk is off: the paper's independent streams
        stages = tuple(s for s in stages if s != "trunk")
    selecting = config.anchor.select_every is not None and "anchor" in stages
    if selecting and config.data.calibration_options is None:
        raise ConfigError(
            "[anchor] select_every measures the streams on the calibration split: "
            "set [data] calibration_options (docs/training.md, 'Stream selection')"
        )
    adapting = config.weight.images == "calibration" and "weight" in stages
    if adapting and config.data.calibration_options is None:
        raise ConfigError(
            "[weight] images = 'calibration' trains stage 2 on the calibration split: set "
            "[data] calibration_options (docs/training.md, \"The weight stage's images and "
            'preferences")'
        )
    calibration = None
    if config.data.calibration_options is not None and ("edge" in stages or selecting or adapting):
        calibration = split_dataset(config, calibration=True)
    run = Run(
        config, model, dataset, dev, run_dir, request.progress,
        budget=request.max_steps, dist=request.dist, calibration_set=calibration,
    )  # fmt: skip
    position = load_checkpoint(run) if request.resume else None
    if request.resume and position is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir}")
    if not request.resume and (run_dir / LOG).exists() and request.dist.is_main:
        (run_dir / LOG).unlink()
    return run, position, stages


def run_stages(run: Run, stages: tuple[str, ...], position: Position | None) -> bool:
    """Run the stages not yet completed, checkpointing after each; False if the budget ran out."""
    for stage in stages:
        if stage in run.completed:
            continue
        start, opt_state = 0, None
        if position is not None and position.stage == stage:
            start, opt_state = position.step, position.optimizer_state
        t0 = time.perf_counter()
        try:
            if stage == "affinity":
                run.affinity = stage_affinity(run)
            else:
                TRAINING_STAGES[stage](run, start, opt_state)
        except BudgetExhaustedError:
            return False
        run.completed[stage] = {
            "wall_s": round(time.perf_counter() - t0, 2),
            "steps": getattr(getattr(run.config, stage), "steps", None),
            "resumed_at": start or None,
            **run.notes.pop(stage, {}),
        }
        following = STAGES[STAGES.index(stage) + 1] if stage != STAGES[-1] else stage
        save_checkpoint(run, following, 0, None)
    return True


def compute_record(device: torch.device | str) -> dict[str, Any]:
    """Where a model was trained, as its manifest's ``training`` entry records it: the device,
    torch's version and its CPU threads. On a CPU the thread count decides how each reduction
    is split, so a run repeats bit for bit only with the same threads as well as the same
    config, seed and data (docs/training.md, "Reproducibility")."""
    return {
        "device": str(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def training_record(request: RunRequest, run: Run) -> dict[str, Any]:
    """The artifact's ``training`` entry: how the model was made."""
    config = request.config
    return {
        "command": request.command or " ".join(shlex.quote(a) for a in sys.argv),
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "data": {"name": config.data.name, "root": config.data.root, **config.data.options},
        "stages": run.completed,
        "wall_s": round(sum(v["wall_s"] for v in run.completed.values()), 2),
        "processes": request.dist.world,
        **compute_record(run.device),
    }


def finish_run(request: RunRequest, run: Run) -> Path:
    """Check the model on the held-out split and write the artifact (rank 0; the others wait)."""
    config, dist, model = request.config, request.dist, run.model
    training = training_record(request, run)
    if not dist.is_main:  # rank 0 alone evaluates and writes; the others learn where
        return Path(dist.broadcast(None))
    metrics: dict[str, Any] = {}
    if config.check_preferences:
        t0 = time.perf_counter()
        model.eval()
        metrics["checks"] = method_checks(
            model, split_dataset(config, held_out=True), config.check_preferences, config.seed
        )
        metrics["checks"]["wall_s"] = round(time.perf_counter() - t0, 2)
    log = request.run_dir / LOG
    vdir = dymu.save(
        model.cpu(),
        request.out,
        task_affinity=run.affinity,
        training=training,
        metrics=metrics,
        extra_files={LOG: log} if log.exists() else {},
        input_normalization={"mean": run.train_set.mean, "std": run.train_set.std},
    )
    return Path(dist.broadcast(str(vdir)))
