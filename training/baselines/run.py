"""``dymu baselines``: dymu, every baseline and the Table-6 ablation, trained into one run dir.

Layout (docs/baselines.md)::

    RUN_DIR/run.json            {"config": ..., "methods": {name: {"path", "kind",
                                 "train_seconds", "steps"}}, "ablations": {flag: {...}}}
    RUN_DIR/dymu/               dymu store dir (or run.json points to an existing artifact)
    RUN_DIR/<baseline>/         phn, phn-bn, cpmtl: model.safetensors + manifest.json
    RUN_DIR/static/k<i>/        the K static networks (+ static/manifest.json)
    RUN_DIR/ablations/<flag>/   dymu store dirs, one regularizer ingredient off each, and
                                ablations/reference/ with all on (same anchor and budget)

Paths in run.json are relative to RUN_DIR. The run continues where it stopped: methods already
recorded in run.json (or already written) are not trained again, dymu's own training resumes
from its checkpoint, and a static set keeps the networks it has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dymu.errors import ArtifactError, ConfigError
from dymu.store import list_versions, read_manifest, resolve

from ..checkpoint import CHECKPOINT_META
from ..config import TrainConfig
from ..data import split_dataset
from ..pipeline import run_training
from .methods import BASELINES
from .store import _read_manifest, load_method
from .train import train_baseline

RUN_JSON = "run.json"
WORK = ".work"
#: The switches of the branching regularizer that the ablation turns off one at a time (Table 6).
ABLATION_FLAGS = ("inactive_loss", "layer_weighting", "affinity", "dichotomy")
#: The ablation's control row: the same controller training with every ingredient on, on the
#: same anchor and budget (the run's dymu model may have had another budget or anchor).
REFERENCE = "reference"


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run.json of ``run_dir`` (ConfigError if there is none or it is unreadable)."""
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: no {RUN_JSON}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc


def load_run(run_dir: str | os.PathLike, device: str = "auto") -> dict[str, Any]:
    """Every method of a run directory, loaded: ``{name: controllable-like}``."""
    run = read_run(run_dir)
    return {
        name: load_method(Path(run_dir) / entry["path"], device=device)
        for name, entry in run["methods"].items()
    }


def _write_run(run_dir: Path, run: dict[str, Any]) -> None:
    tmp = run_dir / f".{RUN_JSON}.tmp"
    tmp.write_text(json.dumps(run, indent=2) + "\n")
    os.replace(tmp, run_dir / RUN_JSON)


def _rel(path: Path, run_dir: Path) -> str:
    return os.path.relpath(Path(path).resolve(), run_dir.resolve())


def _dymu_entry(vdir: Path, run_dir: Path, kind: str = "dymu") -> dict[str, Any]:
    """run.json entry of a dymu artifact: its path, training seconds and optimizer steps."""
    training = read_manifest(vdir, verify=True).get("training", {})
    stages = training.get("stages", {})
    return {
        "path": _rel(vdir, run_dir),
        "kind": kind,
        "train_seconds": training.get("wall_s"),
        "steps": sum(s.get("steps") or 0 for s in stages.values()),
    }


def _train_dymu(
    config: TrainConfig, store: Path, work: Path, device: str, progress: bool, command: str
) -> Path:
    """Train (or resume, or adopt an already written) dymu model into the store dir."""
    if list_versions(store):
        return resolve(store)
    vdir = run_training(
        config,
        store,
        run_dir=work,
        device=device,
        resume=(work / CHECKPOINT_META).exists(),
        progress=progress,
        command=command,
    )
    assert vdir is not None  # no step budget was given
    return vdir


def ablation_config(config: TrainConfig, flag: str, anchor: Path) -> TrainConfig:
    """``config`` with the anchor taken from ``anchor`` and the regularizer ingredient ``flag``
    switched off; the held-out checks are skipped (the evaluation measures the ablations)."""
    if flag not in (*ABLATION_FLAGS, REFERENCE):
        raise ConfigError(f"unknown ablation {flag!r}; known: {[*ABLATION_FLAGS, REFERENCE]}")
    edge = config.edge if flag == REFERENCE else config.edge.model_copy(update={flag: False})
    return config.model_copy(
        update={
            "anchor": config.anchor.model_copy(update={"pretrained": str(anchor)}),
            "edge": edge,
            "check_preferences": 0,
        }
    )


def run_baselines(
    config: TrainConfig,
    out: str | os.PathLike,
    *,
    methods: tuple[str, ...] = tuple(BASELINES),
    dymu_model: str | os.PathLike | None = None,
    ablations: bool = False,
    device: str = "auto",
    progress: bool = True,
    command: str = "dymu baselines",
) -> Path:
    """Train everything into ``out`` (see the module docstring); returns the run.json path."""
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; known: {sorted(BASELINES)}")
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    dumped = config.model_dump(mode="json")
    if (run_dir / RUN_JSON).exists():
        run = read_run(run_dir)
        if run.get("config") != dumped:
            raise ConfigError(
                f"{run_dir} holds a run of another config (or --steps-scale); "
                "continue it with the same ones, or choose another --out"
            )
    else:
        run = {"config": dumped, "methods": {}, "ablations": {}}
    run.setdefault("ablations", {})

    if dymu_model is not None:
        run["methods"]["dymu"] = _dymu_entry(resolve(dymu_model), run_dir)
    elif "dymu" not in run["methods"]:
        vdir = _train_dymu(
            config, run_dir / "dymu", run_dir / WORK / "dymu", device, progress, command
        )
        run["methods"]["dymu"] = _dymu_entry(vdir, run_dir)
    _write_run(run_dir, run)

    dataset = None
    for name in methods:
        if name in run["methods"]:
            continue
        target = run_dir / name
        written = name != "static" and _read_manifest(target) is not None
        if not written:
            if dataset is None:
                dataset = split_dataset(config)
            train_baseline(
                name, config, target, device=device, progress=progress, dataset=dataset,
                command=command,
            )  # fmt: skip
        manifest = _read_manifest(target)
        if manifest is None:
            raise ArtifactError(f"{target} was not written as a baseline directory")
        run["methods"][name] = {
            "path": name,
            "kind": name,
            "train_seconds": manifest.get("train_seconds"),
            "steps": manifest.get("steps"),
        }
        _write_run(run_dir, run)

    if ablations:
        anchor = Path(run_dir / run["methods"]["dymu"]["path"]).resolve()
        for flag in (*ABLATION_FLAGS, REFERENCE):
            if flag in run["ablations"]:
                continue
            vdir = _train_dymu(
                ablation_config(config, flag, anchor),
                run_dir / "ablations" / flag,
                run_dir / WORK / f"ablation-{flag}",
                device,
                progress,
                command,
            )
            run["ablations"][flag] = _dymu_entry(vdir, run_dir, kind="ablation")
            _write_run(run_dir, run)
    return run_dir / RUN_JSON
