"""What `dymu evaluate` compares: the rows of the paper's tables, loaded from an artifact or a run.

A *source* is either one dymu artifact (``model_store/<name>``) or a run directory written by
``dymu baselines`` (``run.json`` + the baselines' directories, see docs/baselines.md). Every row
holds a *controllable-like* method (``.tasks``, ``.config``, ``.control_params``,
``.materialize(r, c, tasks) -> module`` with ``.cost()``) and the ``c`` it is evaluated at.

Rows, in the order of the paper's Tables 1–4: Single-Task (the anchor's streams), PHN, PHN-BN,
Controllable Pareto MTL, the static networks (as one group), dymu without adaptation at c = 0
and 1 (edge hypernet only), dymu at c = 0 and 1. Table 6's ablations are separate rows.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dymu
from dymu.architecture import Architecture
from dymu.cost import Cost
from dymu.errors import ArtifactError

#: Table label of every baseline of a run directory (run.json ``methods`` keys).
BASELINE_LABELS = {
    "phn": "PHN",
    "phn-bn": "PHN-BN",
    "cpmtl": "Controllable Pareto MTL",
}
#: Table 6 label of every ablation flag (the ``[edge]`` switch that was turned off).
ABLATION_LABELS = {
    "reference": "dymu, every ingredient (same anchor and budget)",
    "inactive_loss": "no L_inactive",
    "layer_weighting": "no layer weighting",
    "affinity": "no task affinity A",
    "dichotomy": "no task dichotomy",
}
#: The cost preferences of the dymu rows (the paper's two extremes).
DYMU_C = (0.0, 1.0)


class WithoutAdaptation:
    """dymu with the edge hypernet alone: the arg-max tree, anchor BN (paper's "w/o adaptation").

    Control params are the edge hypernet's only, as in the paper's tables.
    """

    kind = "dymu-noadapt"

    def __init__(self, model: dymu.ControllableModel) -> None:
        self.model = model
        self.config = model.config

    tasks = property(lambda self: self.model.tasks)
    n_tasks = property(lambda self: self.model.n_tasks)

    @property
    def control_params(self) -> int:
        return sum(p.numel() for p in self.model.edge_hypernet.parameters())

    def materialize(
        self, r: Any, c: Any = None, tasks: Iterable[str] | str | None = None
    ) -> dymu.MaterializedModel:
        return self.model.materialize(r, 0.0 if c is None else c, tasks, adapt=False)

    def architecture(self, r: Any, c: Any = None) -> Architecture:
        return self.model.architecture(r, 0.0 if c is None else c)

    def cost(self, architecture: Architecture, input_hw: tuple[int, int] | None = None) -> Cost:
        return self.model.cost(architecture, input_hw)


@dataclass
class Row:
    """One table row: a method evaluated at one ``c`` (None: the method has no cost preference).

    ``members`` replaces the shared preferences for the static group: each network is evaluated
    once, at its own fixed preference r_k.
    """

    key: str
    label: str
    family: str
    method: Any
    c: float | None
    train_seconds: float | None = None
    members: list[Any] | None = None

    def cache_key(self, r: Any, c: Any) -> Hashable | None:
        """Rows whose predictions depend on less than (r, c) share evaluations (exactly)."""
        if self.family == "single-task":
            return (id(self.method),)
        if self.family == "dymu-noadapt":  # the tree alone decides the function
            return (id(self.method.model), self.method.architecture(r, c).id)
        return None

    @property
    def control_params(self) -> int:
        return int(getattr(self.method, "control_params", 0) or 0)


@dataclass
class Source:
    """Everything `dymu evaluate` found at its input path."""

    path: Path
    dymu: dymu.ControllableModel
    train_config: dict[str, Any] | None
    baselines: dict[str, Any] = field(default_factory=dict)
    ablations: dict[str, dymu.ControllableModel] = field(default_factory=dict)
    train_seconds: dict[str, float] = field(default_factory=dict)
    is_run: bool = False
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)  # run.json entries

    @property
    def benchmark(self) -> str | None:
        cfg = self.train_config or {}
        return (cfg.get("data") or {}).get("name")


def _training_record(model: dymu.ControllableModel) -> dict[str, Any]:
    return dict(model.manifest.get("training") or {})


def load_source(
    path: str | Path, device: str = "auto", dymu_model: str | Path | None = None
) -> Source:
    """A dymu artifact, or a run directory (``run.json``) with every method it lists.

    ``dymu_model`` replaces the run's dymu artifact (e.g. a newer version of the same model).
    """
    path = Path(path)
    if (path / "run.json").is_file():
        return _load_run(path, device, dymu_model)
    if dymu_model is not None:
        raise ArtifactError("--dymu applies to a run directory (with run.json) only")
    if not path.exists():
        raise ArtifactError(f"{path} does not exist (expected a dymu artifact or a run directory)")
    model = dymu.load(path, device=device)
    record = _training_record(model)
    seconds = {"dymu": float(record["wall_s"])} if "wall_s" in record else {}
    return Source(path, model, record.get("config"), train_seconds=seconds)


def _load_run(run_dir: Path, device: str, dymu_model: str | Path | None = None) -> Source:
    from training.baselines import load_method

    try:
        run = json.loads((run_dir / "run.json").read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{run_dir / 'run.json'} is not valid JSON: {exc}") from exc
    methods = run.get("methods") or {}
    if "dymu" not in methods:
        raise ArtifactError(f"{run_dir / 'run.json'} lists no 'dymu' method")

    def where(entry: dict[str, Any]) -> Path:
        p = Path(entry["path"])
        return p if p.is_absolute() else run_dir / p

    if dymu_model is not None:
        record = _training_record(dymu.load(dymu_model, device="cpu"))
        stages = record.get("stages") or {}
        methods = {
            **methods,
            "dymu": {
                "path": str(Path(dymu_model).resolve()),
                "kind": "dymu",
                "train_seconds": record.get("wall_s"),
                "steps": sum(s.get("steps") or 0 for s in stages.values()) or None,
            },
        }
    model = dymu.load(where(methods["dymu"]), device=device)
    seconds = {
        name: float(e["train_seconds"])
        for name, e in methods.items()
        if e.get("train_seconds") is not None
    }
    baselines = {
        name: load_method(where(e), device=device) for name, e in methods.items() if name != "dymu"
    }
    ablations = {}
    listed = run.get("ablations") or {}
    folders = sorted(p.name for p in (run_dir / "ablations").glob("*") if p.is_dir())
    order = list(ABLATION_LABELS)  # the control row first, then Table 6's order
    found = set(listed) | set(folders)
    for flag in sorted(found, key=lambda f: (order.index(f) if f in order else len(order), f)):
        entry = listed.get(flag, {"path": f"ablations/{flag}"})
        ablations[flag] = dymu.load(where(entry), device=device)
        if ablations[flag].config == model.config:  # same shapes: share the measured cost tables
            ablations[flag].cost_model = model.cost_model
    config = run.get("config") or _training_record(model).get("config")
    budgets = {
        name: {k: e.get(k) for k in ("path", "train_seconds", "steps")}
        for name, e in [*methods.items(), *listed.items()]
    }
    return Source(run_dir, model, config, baselines, ablations, seconds, True, budgets)


def build_rows(source: Source) -> list[Row]:
    """The rows of the main table, in the paper's order, for everything the source holds."""
    from training.baselines import SingleTask

    model, secs = source.dymu, source.train_seconds
    rows = [Row("single-task", "Single-Task", "single-task", SingleTask(model), None)]
    for name, label in BASELINE_LABELS.items():
        if name in source.baselines:
            rows.append(Row(name, label, name, source.baselines[name], None, secs.get(name)))
    if "static" in source.baselines:
        group = source.baselines["static"]
        members = list(getattr(group, "members", [group]))
        rows.append(
            Row(
                "static",
                f"Static multi-task ({len(members)} nets)",
                "static",
                group,
                None,
                secs.get("static", sum(m.train_seconds for m in members)),
                members=members,
            )
        )
    noadapt = WithoutAdaptation(model)
    for c in DYMU_C:
        rows.append(
            Row(
                f"dymu-noadapt-c{c:g}",
                f"dymu w/o adaptation, c={c:.1f}",
                "dymu-noadapt",
                noadapt,
                c,
                secs.get("dymu"),
            )
        )
    for c in DYMU_C:
        rows.append(Row(f"dymu-c{c:g}", f"dymu, c={c:.1f}", "dymu", model, c, secs.get("dymu")))
    return rows


def ablation_rows(source: Source) -> list[Row]:
    """Table 6: each ablated controller at c = 0 and 1 (with adaptation, like full dymu)."""
    return [
        Row(
            f"ablation-{flag}-c{c:g}",
            f"{ABLATION_LABELS.get(flag, flag)}, c={c:.1f}",
            f"ablation:{flag}",
            model,
            c,
        )
        for flag, model in source.ablations.items()
        for c in DYMU_C
    ]


def held_out_split(
    source: Source, data_dir: str | Path | None = None, calibration: bool = False
) -> tuple[Any, dict]:
    """The split to evaluate on, and a description of it for the report.

    Default: the held-out split of the training config recorded with the run or the artifact
    (``data.val_options``, as :func:`training.data.split_dataset` builds it). ``calibration``:
    that config's calibration split instead (``data.calibration_options``), the split to make
    choices on without reading the held-out one (docs/evaluation.md, "Choosing on the
    calibration split"). ``data_dir``: a split written by ``dymu data`` (``DIR/image/...``) or
    a dataset root (its held-out split), read as the recorded benchmark, resized to the
    model's input size where the loader can.
    """
    from training.config import TrainConfig
    from training.data import DatasetError, build_dataset, get_entry, read_meta, split_dataset

    cfg = TrainConfig.model_validate(source.train_config) if source.train_config else None
    if calibration and data_dir is not None:
        raise DatasetError("the calibration split is the recorded config's: pass no --data")
    if data_dir is None:
        if cfg is None:
            which = "calibration" if calibration else "held-out"
            raise DatasetError(
                f"{source.path} records no training config, so its {which} split is unknown"
                + ("" if calibration else "; pass --data DIR")
            )
        if calibration and cfg.data.calibration_options is None:
            raise DatasetError(f"{source.path}'s training config has no calibration split")
        options = cfg.data.calibration_options if calibration else cfg.data.val_options
        info = {"name": cfg.data.name, "root": cfg.data.root, **options}
        if calibration:
            info["split"] = "calibration"
        return split_dataset(cfg, held_out=not calibration, calibration=calibration), info
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise DatasetError(f"--data {d}: no such directory")
    split_dir = d if (d / "image").is_dir() else None
    name = cfg.data.name if cfg else None
    if name is None and split_dir is not None:
        name = read_meta(split_dir).get("generator")
    if name is None:
        raise DatasetError(f"cannot tell which benchmark {d} holds; the artifact records none")
    entry = get_entry(name)
    options = {
        k: v for k, v in (cfg.data.val_options if cfg else {}).items() if k not in ("n", "seed")
    }  # generation options do not apply to files
    if "size" in entry.options:
        options["size"] = tuple(source.dymu.input_size)
    root, split = (split_dir.parent, split_dir.name) if split_dir else (d, entry.splits[-1])
    dataset = build_dataset(name, split, root, **options)
    return dataset, {"name": name, "root": str(root), "split": split, "n": len(dataset)}
