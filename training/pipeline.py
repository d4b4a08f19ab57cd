"""The three-stage training pipeline (paper §3, App. F; DESIGN.md §2) with checkpoints and resume.

Stages, in order: ``anchor`` (stage 0: N single-task streams), ``affinity`` (stage 0b: RSA),
``edge`` (stage 1: edge hypernet + branching regularizer), ``weight`` (stage 2: weight hypernet).

Determinism: every random draw of step ``s`` of stage ``k`` (batch indices, preference, Gumbel
noise) comes from a generator seeded with ``(seed, k, s)``. A run is therefore repeatable on the
CPU, and resuming from a checkpoint needs only the weights, the optimizer state and the step —
no RNG state — to give the same final weights as an uninterrupted run.

Data parallelism: under ``torchrun`` each stage runs on P processes with DistributedDataParallel
(:mod:`training.distributed`): every rank draws the same global batch indices of step ``s`` and
trains on its shard of them; rank 0 alone logs, shows progress and writes checkpoints and the
artifact.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dymu
from dymu.architecture import Architecture
from dymu.config import ModelConfig, TaskSpec
from dymu.device import resolve_device
from dymu.errors import ConfigError, DymuError

from .branching import (
    RegularizerSwitches,
    branching_regularizer,
    gumbel_temperature,
    sample_preference,
    task_affinity,
)
from .config import TrainConfig
from .data import DATASETS, build_dataset
from .distributed import Distributed
from .distributed import from_env as distributed_from_env
from .distributed import shutdown as distributed_shutdown
from .paths import batched_regularizer, expected_task_losses, path_losses
from .tasks import weighted_task_loss

STAGES = ("trunk", "anchor", "affinity", "edge", "weight")
# Independent random streams: batch indices per stage, and preferences + Gumbel noise. New
# streams come last so that the ids of the others (and so every earlier run) never change.
_STREAM_ID = {
    name: i
    for i, name in enumerate(
        (
            "anchor", "affinity", "edge", "weight", "edge-pref", "weight-pref",
            "baseline", "baseline-pref", "trunk", "edge-paths",
        )
    )
}  # fmt: skip
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_META = "checkpoint.json"
LOG = "train_log.csv"


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator of every random draw of one step (see the module docstring)."""
    return torch.Generator().manual_seed(
        (seed * 1_000_003 + _STREAM_ID[stage] * 7_919 + step) % (2**63 - 1)
    )


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class BudgetExhaustedError(Exception):
    """The step budget of this invocation ran out; a checkpoint was written."""


class StepBatches:
    """Batch-index lists for steps ``start..steps-1`` of a stage (a DataLoader batch_sampler).

    ``batch`` is the global batch; ``dist`` picks this rank's shard of it (all of it when
    single-process), so the indices of a step do not depend on the number of processes.
    """

    def __init__(
        self,
        seed: int,
        stage: str,
        start: int,
        steps: int,
        n: int,
        batch: int,
        dist: Distributed | None = None,
    ) -> None:
        self.seed, self.stage, self.start, self.steps, self.n, self.batch = (
            seed,
            stage,
            start,
            steps,
            n,
            batch,
        )
        self.dist = dist or Distributed()

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            gen = step_generator(self.seed, self.stage, step)
            indices = torch.randint(self.n, (self.batch,), generator=gen).tolist()
            yield self.dist.shard(indices)


@dataclass
class Run:
    """State shared by the stages of one training run."""

    config: TrainConfig
    model: dymu.ControllableModel
    train_set: torch.utils.data.Dataset
    device: torch.device
    run_dir: Path
    progress: bool = True
    affinity: torch.Tensor | None = None
    completed: dict[str, dict[str, Any]] = field(default_factory=dict)
    budget: int | None = None  # optimizer steps left in this invocation (None = no limit)
    dist: Distributed = field(default_factory=Distributed)

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return self.model.config.tasks

    def batches(self, stage: str, start: int, steps: int, batch: int) -> Iterator[dict]:
        self.dist.check_batch(stage, batch)
        sampler = StepBatches(
            self.config.seed, stage, start, steps, len(self.train_set), batch, self.dist
        )
        cuda = self.device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            self.train_set,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.config.data.workers if cuda else 0,
            pin_memory=cuda,
        )
        for batch_ in loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch_.items()}

    def autocast(self) -> Any:
        return torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.config.amp
        )

    def log(self, row: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        path = self.run_dir / LOG
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


# -- checkpoints ----------------------------------------------------------------------------------
def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    state = opt.state_dict()
    tensors = {
        f"opt/{idx}/{name}": v.detach().cpu().contiguous()
        for idx, entry in state["state"].items()
        for name, v in entry.items()
    }
    return tensors, state["param_groups"]


def _restore_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: Any
) -> None:
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


def load_checkpoint(run: Run) -> tuple[str, int, dict[str, torch.Tensor], Any] | None:
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
    return meta["stage"], meta["step"], tensors, meta["param_groups"]


# -- the stages -----------------------------------------------------------------------------------
LossFn = Callable[[nn.Module, int, dict], tuple[torch.Tensor, dict[str, float]]]


def _train(
    run: Run,
    stage: str,
    module: nn.Module,
    cfg: Any,
    start: int,
    opt_state: Any,
    loss_fn: LossFn,
    lr_at: Callable[[int], float],
    weight_decay: float = 0.0,
    find_unused: bool = False,
    stream: str | None = None,
) -> None:
    """The one training loop of every stage: Adam on ``module``, progress bar, log, checkpoints.

    ``loss_fn(net, step, batch) -> (loss, stats)`` is all a stage supplies; ``net`` is
    ``module`` itself, or ``module`` under DistributedDataParallel when run by torchrun (the
    stage must call ``net``, not ``module``, so that the gradients are averaged across ranks).
    ``stream`` names the random stream of the batch indices when it is not ``stage`` (the
    baselines: one stream for every method, so that they all see the same batches).
    """
    from tqdm import tqdm

    module.train().requires_grad_(True)
    net = run.dist.wrap(module, find_unused=find_unused)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=weight_decay)
    if opt_state is not None:
        _restore_optimizer(opt, *opt_state)
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
        run.batches(stream or stage, start, steps, cfg.batch_size), start=start
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
                    **{k: stats.get(k, "") for k in _LOG_FIELDS},
                }
            )
        if run.budget is not None:
            run.budget -= 1
            if run.budget <= 0 and step + 1 < steps:
                save_checkpoint(run, stage, step + 1, opt)
                bar.close()
                raise BudgetExhaustedError(f"stopped in stage {stage} after step {step + 1}")
        if (step + 1) % run.config.checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(run, stage, step + 1, opt)
    bar.close()
    _freeze(run.dist.unwrap(net))


_LOG_FIELDS = ("loss", "task_loss", "omega", "active_loss", "inactive_loss", "zeta")


def _task_stats(per_task: dict[str, torch.Tensor]) -> dict[str, float]:
    return {f"loss/{k}": v.item() for k, v in per_task.items()}


class SharedTrunk(nn.Module):
    """The anchor read through the fully shared tree (one module, so DDP can wrap it)."""

    def __init__(self, anchor: nn.Module) -> None:
        super().__init__()
        self.anchor = anchor
        self.tree = Architecture.fully_shared(anchor.n_tasks, anchor.num_layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.anchor.forward_tree(x, self.tree)


def copy_trunk(anchor: nn.Module) -> None:
    """Stream 0's layers below the top (the trained trunk) into every other stream."""
    for j in range(1, anchor.n_tasks):
        for layer in range(anchor.num_layers - 1):
            anchor.node(layer, j).load_state_dict(anchor.node(layer, 0).state_dict())


def stage_trunk(run: Run, start: int, opt_state: Any = None) -> None:
    """Before stage 0: the fully shared tree on sum_i w_i L_i, then copied into every stream."""
    cfg = run.config.trunk

    def loss_fn(net: nn.Module, step: int, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        with run.autocast():
            out = net(batch["image"])
        total, per_task = weighted_task_loss(run.tasks, out, batch, None)
        return total, _task_stats(per_task)

    trunk = SharedTrunk(run.model.anchor)
    # The other streams' lower layers are unused until the copy: DDP must look for them.
    _train(
        run, "trunk", trunk, cfg, start, opt_state, loss_fn, lambda s: cfg.lr,
        weight_decay=cfg.weight_decay, find_unused=True,
    )  # fmt: skip
    copy_trunk(run.model.anchor)


def stage_anchor(run: Run, start: int, opt_state: Any = None) -> None:
    """Stage 0: each stream trained alone on its own task (sum of independent losses)."""
    cfg, anchor = run.config.anchor, run.model.anchor

    def loss_fn(net: nn.Module, step: int, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        with run.autocast():
            out = net(batch["image"])
        total, per_task = weighted_task_loss(run.tasks, out, batch, None)
        return total, _task_stats(per_task)

    _train(
        run,
        "anchor",
        anchor,
        cfg,
        start,
        opt_state,
        loss_fn,
        lambda s: cfg.lr,
        weight_decay=cfg.weight_decay,
    )


@torch.no_grad()
def stage_affinity(run: Run) -> torch.Tensor:
    """Stage 0b: RSA task affinity over K training images (App. D)."""
    anchor = run.model.anchor.eval()
    k = min(run.config.affinity.images, len(run.train_set))
    gen = step_generator(run.config.seed, "affinity", 0)
    idx = torch.randperm(len(run.train_set), generator=gen)[:k].tolist()
    feats: list[list[list[torch.Tensor]]] = [
        [[] for _ in range(anchor.n_tasks)] for _ in range(anchor.num_layers)
    ]
    for chunk in range(0, k, 16):
        x = collate([run.train_set[i] for i in idx[chunk : chunk + 16]])["image"].to(run.device)
        for j in range(anchor.n_tasks):
            y = x
            for l in range(anchor.num_layers):
                y = anchor.node(l, j)(y)
                feats[l][j].append(y.float().cpu())
    return task_affinity(
        [[torch.cat(f) for f in per_task] for per_task in feats], run.config.affinity.score
    )


def _gumbel_softmax(logits: torch.Tensor, tau: float, gen: torch.Generator) -> torch.Tensor:
    """nu = softmax((logits + g) / tau), g ~ Gumbel(0, 1) drawn from ``gen`` (repeatable)."""
    u = torch.rand(logits.shape, generator=gen).to(logits.device).clamp(1e-10, 1 - 1e-10)
    return torch.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)


def _freeze(module: nn.Module) -> None:
    module.eval().requires_grad_(False)


def stage_edge(run: Run, start: int, opt_state: Any = None) -> None:
    """Stage 1: edge hypernet; loss = sum_i r_i w_i L_i + Omega(r, c) (DESIGN.md §2)."""
    cfg, model = run.config.edge, run.model
    if cfg.estimator == "paths":
        return stage_edge_paths(run, start, opt_state)
    _freeze(model.anchor)
    hyper = model.edge_hypernet
    n = model.n_tasks
    tau = cfg.tau if cfg.tau is not None else 0.6 / n
    switches = RegularizerSwitches(
        cfg.inactive_loss, cfg.layer_weighting, cfg.affinity, cfg.dichotomy
    )
    affinity = (run.affinity if run.affinity is not None else torch.ones(n, n)).to(run.device)

    def loss_fn(net: nn.Module, step: int, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        gen = step_generator(run.config.seed, "edge-pref", step)
        r, c = sample_preference(n, cfg.eta, gen)
        r = r.to(run.device)
        zeta = gumbel_temperature(
            step, cfg.temperature_start, cfg.temperature_decay, cfg.temperature_period()
        )
        logits = net(r, c.to(run.device))
        if cfg.logit_bound is not None:  # monotonic: the arg-max tree is unchanged
            logits = cfg.logit_bound * torch.tanh(logits / cfg.logit_bound)
        nu = _gumbel_softmax(logits, zeta, gen)
        with run.autocast():
            out = model.anchor.forward_soft(batch["image"], list(nu))
        task_total, per_task = weighted_task_loss(run.tasks, out, batch, r)
        probs = nu.float() if cfg.regularize_samples else torch.softmax(logits.float(), dim=-1)
        omega, reg = branching_regularizer(
            list(probs),
            r,
            c,
            affinity,
            tau,
            cfg.lambda_active,
            cfg.lambda_inactive,
            switches,
            cfg.regularizer,
        )
        stats = {"task_loss": task_total.item(), "omega": omega.item(), "zeta": zeta, **reg}
        return task_total + omega, {**stats, **_task_stats(per_task)}

    _train(run, "edge", hyper, cfg, start, opt_state, loss_fn, cfg.lr_at)


@torch.no_grad()
def path_table(run: Run) -> torch.Tensor:
    """w_j T[j, p] on ``path_images`` training images (training/paths.py), seeded by the run."""
    k = min(run.config.edge.path_images, len(run.train_set))
    gen = step_generator(run.config.seed, "edge-paths", 0)
    idx = torch.randperm(len(run.train_set), generator=gen)[:k].tolist()
    batches = (
        {
            key: v.to(run.device)
            for key, v in collate([run.train_set[i] for i in idx[s : s + 16]]).items()
        }
        for s in range(0, k, 16)
    )
    table = path_losses(run.model.anchor.eval(), batches, run.tasks)
    scales = torch.tensor([t.loss_scale for t in run.tasks], dtype=table.dtype)
    return (table * scales.unsqueeze(1)).to(run.device)


@torch.no_grad()
def branched_init_(hyper: nn.Module, bias: float) -> None:
    """Every child's logit for its own stream's parent starts ``bias`` above the others.

    The expected loss of a path is a product of parent choices, so from a uniform start the
    regularizer's pull toward one shared path wins before any task's own path can emerge
    (docs/results-training.md); starting at the anchor lets sharing grow where it pays.
    """
    n = hyper.n_tasks
    for head in hyper.heads:
        head.bias.copy_((torch.eye(n) * bias).flatten().to(head.bias))


def stage_edge_paths(run: Run, start: int, opt_state: Any = None) -> None:
    """Stage 1 with the path-table estimator: E_tree[sum_i r_i w_i L_i] + Omega, exactly.

    Each step draws ``preferences`` (r, c) pairs and minimizes the mean over them of the
    expected weighted task loss of the hypernet's tree distribution (from the path table) plus
    the path reading of the branching regularizer, both on softmax(logits).
    """
    cfg, model = run.config.edge, run.model
    _freeze(model.anchor)
    n = model.n_tasks
    tau = cfg.tau if cfg.tau is not None else 0.6 / n
    switches = RegularizerSwitches(
        cfg.inactive_loss, cfg.layer_weighting, cfg.affinity, cfg.dichotomy
    )
    affinity = (run.affinity if run.affinity is not None else torch.ones(n, n)).to(run.device)
    table = path_table(run)
    if start == 0 and cfg.branched_init:
        branched_init_(model.edge_hypernet, cfg.branched_init)
    dense = round(cfg.dense_fraction * cfg.preferences)

    def loss_fn(net: nn.Module, step: int, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        gen = step_generator(run.config.seed, "edge-pref", step)
        prefs = [
            sample_preference(n, 1.0 if k < dense else cfg.eta, gen) for k in range(cfg.preferences)
        ]
        r = torch.stack([p[0] for p in prefs]).to(run.device)
        c = torch.stack([p[1] for p in prefs]).to(run.device)
        logits = net(r, c)
        if cfg.logit_bound is not None:
            logits = cfg.logit_bound * torch.tanh(logits / cfg.logit_bound)
        probs = torch.softmax(logits.float(), dim=-1)
        task = (r * expected_task_losses(probs, table)).sum(-1)
        omega, l_act, l_inact = batched_regularizer(
            probs, r, c, affinity, tau, cfg.lambda_active, cfg.lambda_inactive, switches
        )
        stats = {
            "task_loss": task.mean().item(),
            "omega": omega.mean().item(),
            "active_loss": l_act.mean().item(),
            "inactive_loss": l_inact.mean().item(),
        }
        return (task + omega).mean(), stats

    _train(run, "edge", model.edge_hypernet, cfg, start, opt_state, loss_fn, cfg.lr_at)


def stage_weight(run: Run, start: int, opt_state: Any = None) -> None:
    """Stage 2: weight hypernet on the arg-max trees inference will use; loss = sum r_i w_i L_i."""
    cfg, model = run.config.weight, run.model
    _freeze(model.anchor)
    _freeze(model.edge_hypernet)
    hyper = model.weight_hypernet
    n = model.n_tasks

    def loss_fn(net: nn.Module, step: int, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        gen = step_generator(run.config.seed, "weight-pref", step)
        r, c = (t.to(run.device) for t in sample_preference(n, cfg.eta, gen))
        with torch.no_grad():
            arch = Architecture.from_logits(model.edge_hypernet(r, c).cpu())
        deltas = net(r, c, arch.node_list())
        with run.autocast():
            out = model.anchor.forward_tree(batch["image"], arch, deltas)
        total, per_task = weighted_task_loss(run.tasks, out, batch, r)
        return total, _task_stats(per_task)

    # Only the used nodes' heads get gradients in a step: DDP must look for unused parameters.
    _train(run, "weight", hyper, cfg, start, opt_state, loss_fn, cfg.lr_at, find_unused=True)


# -- the whole run --------------------------------------------------------------------------------
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


def split_dataset(config: TrainConfig, held_out: bool = False) -> Any:
    """The training split (``data.options``) or the held-out one (``data.val_options``)."""
    entry = DATASETS.get(config.data.name)
    if entry is None:
        raise ConfigError(f"unknown dataset {config.data.name!r}; known: {sorted(DATASETS)}")
    options = dict(config.data.val_options if held_out else config.data.options)
    if not entry.needs_root and config.data.root is None and "size" in entry.options:
        options.setdefault("size", tuple(config.input_size))
    split = entry.splits[-1] if held_out else entry.splits[0]
    return build_dataset(config.data.name, split, config.data.root, **options)


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
    try:
        return _run_stages(
            config, out, Path(run_dir or Path("runs") / config.name), dist.device(dev), dist,
            resume, stages, progress, command, max_steps,
        )  # fmt: skip
    finally:
        if owns_group:
            distributed_shutdown()


def _run_stages(
    config: TrainConfig,
    out: str | Path,
    run_dir: Path,
    dev: torch.device,
    dist: Distributed,
    resume: bool,
    stages: tuple[str, ...],
    progress: bool,
    command: str | None,
    max_steps: int | None,
) -> Path | None:
    """The body of :func:`run_training` on one rank."""
    if not resume and (run_dir / CHECKPOINT_META).exists():
        raise ConfigError(
            f"{run_dir} already holds a checkpoint: pass --resume to continue it, "
            "or remove it / choose another --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset = split_dataset(config)
    model = build_model(config, tuple(dataset.tasks)).to(dev)
    if config.anchor.pretrained and "anchor" in stages:
        source = dymu.load(config.anchor.pretrained, device=dev)
        model.anchor.load_state_dict(source.anchor.state_dict())
        stages = tuple(s for s in stages if s not in ("trunk", "anchor"))
    if not config.trunk.steps:  # the common trunk is off: the paper's independent streams
        stages = tuple(s for s in stages if s != "trunk")
    run = Run(config, model, dataset, dev, run_dir, progress, budget=max_steps, dist=dist)
    position = load_checkpoint(run) if resume else None
    if resume and position is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir}")
    if not resume and (run_dir / LOG).exists() and dist.is_main:
        (run_dir / LOG).unlink()

    runners = {
        "trunk": stage_trunk,
        "anchor": stage_anchor,
        "edge": stage_edge,
        "weight": stage_weight,
    }
    for stage in stages:
        if stage in run.completed:
            continue
        start, opt_state = 0, None
        if position is not None and position[0] == stage:
            start = position[1]
            opt_state = (position[2], position[3]) if position[3] is not None else None
        t0 = time.perf_counter()
        try:
            if stage == "affinity":
                run.affinity = stage_affinity(run)
            else:
                runners[stage](run, start, opt_state)
        except BudgetExhaustedError:
            return None
        run.completed[stage] = {
            "wall_s": round(time.perf_counter() - t0, 2),
            "steps": getattr(getattr(config, stage), "steps", None),
            "resumed_at": start or None,
        }
        following = STAGES[STAGES.index(stage) + 1] if stage != STAGES[-1] else stage
        save_checkpoint(run, following, 0, None)

    training = {
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "data": {"name": config.data.name, "root": config.data.root, **config.data.options},
        "stages": run.completed,
        "wall_s": round(sum(v["wall_s"] for v in run.completed.values()), 2),
        "device": str(dev),
        "processes": dist.world,
        "torch": torch.__version__,
    }
    if not dist.is_main:  # rank 0 alone evaluates and writes; the others learn where
        return Path(dist.broadcast(None))
    metrics: dict[str, Any] = {}
    if config.check_preferences:
        from .evaluate import method_checks

        t0 = time.perf_counter()
        model.eval()
        metrics["checks"] = method_checks(
            model, split_dataset(config, held_out=True), config.check_preferences, config.seed
        )
        metrics["checks"]["wall_s"] = round(time.perf_counter() - t0, 2)
    extra = {LOG: run_dir / LOG} if (run_dir / LOG).exists() else {}
    vdir = dymu.save(
        model.cpu(),
        out,
        task_affinity=run.affinity,
        training=training,
        metrics=metrics,
        extra_files=extra,
        input_normalization={"mean": dataset.mean, "std": dataset.std},
    )
    return Path(dist.broadcast(str(vdir)))
