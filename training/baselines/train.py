"""Training of the baselines with the pipeline's own loop, data, losses and batches.

Every baseline is trained by :func:`training.loop.train_stage` (Adam, progress bar, CSV log) on
the config's training split, with the loss of dymu's hypernet stages,
``sum_i r_i w_i L_i`` (:func:`training.tasks.weighted_task_loss`): the dynamic baselines draw
``r ~ Dir(eta)`` per step (:func:`dymu.preference.sample_preference`, as dymu), a static
network keeps its fixed ``r_k``. All baselines see the same batches (one random stream).
"""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dymu.backbones import build_backbone
from dymu.backbones.pretrained import load_encoder
from dymu.device import resolve_device
from dymu.errors import ArtifactError, ConfigError
from dymu.preference import sample_preference, sample_simplex

from ..config import HypernetStage, TrainConfig
from ..data import split_dataset
from ..loop import task_stats, train_stage
from ..pipeline import compute_record, model_config
from ..run import LOG, Run, step_generator
from ..tasks import weighted_task_loss
from .methods import BASELINES, PHN, Baseline, GeneratorOptions, StaticMTL
from .store import MANIFEST, _read_manifest, load_method, save_baseline, save_static_set


def generator_options(config: TrainConfig) -> GeneratorOptions:
    """Hypernetwork sizes: dymu's weight-hypernet MLP (App. G) plus the chunking options."""
    return GeneratorOptions(
        embed_dim=config.hypernet.embed_dim,
        hidden=config.hypernet.weight_hidden,
        chunk_size=config.baselines.chunk_size,
        chunk_embed_dim=config.baselines.chunk_embed_dim,
    )


def static_preferences(n_tasks: int, count: int, seed: int) -> list[tuple[float, ...]]:
    """The K fixed preferences: uniform on the simplex (Dir(1)), as in the paper's Fig. 6."""
    g = torch.Generator().manual_seed(seed)
    r = sample_simplex(n_tasks, 1.0, g, count=count, dtype=torch.float64)
    return [tuple(row.tolist()) for row in r]


def init_encoder(model: Baseline) -> Baseline:
    """The shared encoder from ``[backbone] init`` when the config names one, as dymu's streams.

    PHN generates every weight of its network, so a pretrained encoder has nothing to start
    from there; the other baselines train the encoder's own weights and start from the file.
    """
    path = model.config.backbone.init
    if path and not isinstance(model, PHN):
        backbone = build_backbone(model.config.backbone, model.config.in_channels)
        load_encoder(backbone, [model.net.blocks], path)
    return model


def _fit(
    model: Baseline,
    config: TrainConfig,
    dataset: Any,
    device: torch.device,
    budget: HypernetStage,
    work_dir: Path,
    desc: str,
    progress: bool,
) -> float:
    """Train ``model`` in place for ``budget``; returns the wall seconds of the loop."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    run = Run(config, model, dataset, device, work_dir, progress)
    fixed = torch.tensor(model.r) if isinstance(model, StaticMTL) else None

    def loss_fn(net: Any, step: int, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        if fixed is None:
            gen = step_generator(config.seed, "baseline-pref", step)
            r = sample_preference(model.n_tasks, budget.eta, gen)[0]
        else:
            r = fixed
        r = r.to(device=device, dtype=torch.float32)
        with run.autocast():
            out = net(batch["image"], r)
        total, per_task = weighted_task_loss(run.tasks, out, batch, r)
        return total, task_stats(per_task)

    weight_decay = config.baselines.weight_decay
    if weight_decay is None:
        weight_decay = config.anchor.weight_decay
    t0 = time.perf_counter()
    train_stage(
        run,
        desc,
        model,
        budget,
        0,
        None,
        loss_fn,
        budget.lr_at,
        weight_decay=weight_decay,
        stream="baseline",
    )
    return round(time.perf_counter() - t0, 2)


def _record(
    config: TrainConfig, budget: HypernetStage, seconds: float, device: torch.device, command: str
) -> dict[str, Any]:
    return {
        "command": command,
        "seed": config.seed,
        "steps": budget.steps,
        "batch_size": budget.batch_size,
        "lr": budget.lr,
        "lr_decay": budget.lr_decay,
        "lr_decay_every": budget.decay_every(),
        "eta": budget.eta,
        "train_seconds": seconds,
        **compute_record(device),
        "data": {"name": config.data.name, "root": config.data.root, **config.data.options},
        "config": config.model_dump(mode="json"),
    }


def train_baseline(
    name: str,
    cfg: TrainConfig,
    out: str | Path,
    *,
    steps: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    dataset: Any = None,
    command: str | None = None,
) -> Path:
    """Train baseline ``name`` (a key of :data:`BASELINES`) and write it to ``out``.

    ``steps`` overrides the budget of ``cfg.baselines`` (per network, for ``static`` each of the
    K). ``dataset`` is the training split if already built. For ``static``, ``out`` receives the
    K networks ``k0 .. k{K-1}`` and the set's manifest; members already written there (same
    preference) are kept, so an interrupted run continues where it stopped. Returns ``out``.
    """
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
    if steps is not None and steps < 1:
        raise ConfigError(f"steps must be positive, got {steps}")
    dev = resolve_device(device, error=ConfigError)
    out = Path(out)
    dataset = split_dataset(cfg) if dataset is None else dataset
    mcfg = model_config(cfg, tuple(dataset.tasks))
    options = generator_options(cfg)
    command = command or " ".join(shlex.quote(a) for a in sys.argv)
    norm = {"mean": list(dataset.mean), "std": list(dataset.std)}
    budget = cfg.baseline_budget(static=name == "static")
    if steps is not None:
        budget = budget.model_copy(update={"steps": steps})

    if name != "static":
        if out.exists():
            raise ArtifactError(f"{out} already exists; remove it or choose another directory")
        torch.manual_seed(cfg.seed)
        model = init_encoder(BASELINES[name](mcfg, options)).to(dev)
        work = out.parent / f".work-{out.name}"
        seconds = _fit(model, cfg, dataset, dev, budget, work, name, progress)
        record = _record(cfg, budget, seconds, dev, command)
        path = save_baseline(
            model.cpu(), out, training=record, input_normalization=norm, extra_files=_log(work)
        )
        shutil.rmtree(work, ignore_errors=True)
        return path

    out.mkdir(parents=True, exist_ok=True)
    members: list[tuple[str, StaticMTL]] = []
    prefs = static_preferences(mcfg.n_tasks, cfg.baselines.static_count, cfg.seed)
    for k, r in enumerate(prefs):
        member_dir = out / f"k{k}"
        done = _existing_member(member_dir, r)
        if done is not None:
            members.append((member_dir.name, done))
            continue
        if member_dir.exists():
            shutil.rmtree(member_dir)
        torch.manual_seed(cfg.seed)
        model = init_encoder(StaticMTL(mcfg, options, r=r)).to(dev)
        work = out / f".work-k{k}"
        model.train_seconds = _fit(model, cfg, dataset, dev, budget, work, f"static k{k}", progress)
        record = _record(cfg, budget, model.train_seconds, dev, command)
        save_baseline(
            model.cpu(),
            member_dir,
            training=record,
            input_normalization=norm,
            extra_files=_log(work),
        )
        shutil.rmtree(work, ignore_errors=True)
        model.manifest = _read_manifest(member_dir) or model.manifest
        members.append((member_dir.name, model))
    return save_static_set(out, members)


def _log(work: Path) -> dict[str, Path]:
    return {LOG: work / LOG} if (work / LOG).exists() else {}


def _existing_member(member_dir: Path, r: tuple[float, ...]) -> StaticMTL | None:
    """A static network already written for preference ``r`` (resuming a set), else None."""
    if not (member_dir / MANIFEST).is_file():
        return None
    manifest = _read_manifest(member_dir)
    if manifest is None or manifest.get("r") is None:
        return None
    if max(abs(a - b) for a, b in zip(manifest["r"], r, strict=True)) > 1e-9:
        return None
    return load_method(member_dir, device="cpu")
