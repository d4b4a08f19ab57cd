"""`dymu tree-map`: the tree the edge stage aims for at each preference, before it trains.

With the tree-table estimator (training/trees.py) the edge stage fits its hypernet to each
preference's best hard tree under the edge objective on the path table (paper Eq. 2 with
Omega of Eq. 6). That map can be computed directly from a model's streams in seconds, so the
objective's knobs (lambda_A, lambda_I, the dichotomy's tau) can be chosen before spending an
edge stage's minutes (docs/training.md, "The tree map"). Per c it gives:

* the mean cost of the best trees over Dir(1) preferences, as a fraction of the anchor (the
  evaluation's resource check reads the same mean off the trained hypernet);
* each task's marginal line (r_i from 0 to 1, the rest split evenly; the evaluation's Fig. 7
  grid): the tree at each point (its index in ``hard_trees``' enumeration), its cost and the
  tasks' table losses;
* whether each task's table loss is non-increasing along its line, the table's version of the
  paper's task control (claim 2), and claim 2's statistic over the Dir(1) preferences: Spearman's
  rho(r_i, loss of task i) pooled over the values of c, as `dymu evaluate` pools c = 0 and 1.

With a **judge split** (``--judge``: dataset options of the training source, e.g. other
writers' digits than the calibration split's) the map's trees are also priced on a second path
table of those images, so one sees whether the trees the map picks on the table's images keep
claim 2 on images the table never saw (docs/training.md, "The tree map").
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Subset

from dymu.architecture import Architecture
from dymu.errors import ConfigError, validation_message
from dymu.preference import sample_preferences
from dymu.store import read_manifest, resolve

from .config import TrainConfig
from .data import split_dataset
from .evaluation.checks import batches
from .evaluation.loop import marginal_grid
from .evaluation.metrics import spearman
from .paths import loss_scaled, path_losses
from .run import Run
from .stages import (
    PATH_CHUNK,
    EdgeObjective,
    applied_lambda_active,
    path_table,
    stage_affinity,
    table_split,
)
from .trees import TreeTable

#: Relative slack of the monotonicity check: table losses are floats summed over images.
MONOTONE_SLACK = 1e-9


@dataclass(frozen=True)
class MapOptions:
    """What the map is computed on: the values of c, the points of each marginal line, and the
    Dir(1) preferences of the mean cost (seeded)."""

    c_values: tuple[float, ...] = (0.0, 0.5, 1.0)
    points: int = 11
    preferences: int = 300
    seed: int = 11


def with_edge(config: TrainConfig, **overrides: float | str | None) -> TrainConfig:
    """``config`` with ``[edge]`` fields replaced (None keeps the config's), validated as the
    TOML file would be."""
    updates = {k: v for k, v in overrides.items() if v is not None}
    try:
        edge = type(config.edge).model_validate({**config.edge.model_dump(), **updates})
    except ValidationError as exc:
        raise ConfigError(f"[edge]: {validation_message(exc.errors())}") from exc
    return config.model_copy(update={"edge": edge})


def best_trees(
    table: TreeTable, r: torch.Tensor, c: float, lambda_active: float, lambda_inactive: float
) -> list[int]:
    """The index of the edge objective's best tree for each row of ``r`` at one ``c``."""
    cs = torch.full((r.shape[0],), float(c), dtype=torch.float64)
    return table.best(r, cs, lambda_active, lambda_inactive).tolist()


def map_trees(
    table: TreeTable,
    names: list[str],
    fraction: Callable[[int], float],
    lambdas: tuple[float, float],
    options: MapOptions = MapOptions(),
    judge: TreeTable | None = None,
) -> dict[str, Any]:
    """The map of the module docstring for a tree table; ``fraction(k)`` is tree k's cost as a
    fraction of the anchor's, ``lambdas`` = (lambda_A, lambda_I). ``judge``: the same trees
    priced on another table (each line point gets ``judged`` losses, and claim 2's rho is read
    on both tables)."""
    n = len(names)
    dense = torch.tensor(
        [r for r, _ in sample_preferences(n, options.preferences, options.seed)],
        dtype=torch.float64,
    )
    grid = marginal_grid(n, options.points)
    line_r = torch.tensor([r for _, _, r in grid], dtype=torch.float64)
    by_c, picks = {}, []
    for c in options.c_values:
        dense_trees = best_trees(table, dense, c, *lambdas)
        picks += dense_trees
        mean = sum(fraction(k) for k in dense_trees) / len(dense)
        lines: dict[str, list[dict[str, Any]]] = {t: [] for t in names}
        for (i, ri, _), k in zip(grid, best_trees(table, line_r, c, *lambdas), strict=True):
            point = {"r_i": ri, "tree": k, "fraction": fraction(k)}
            point["losses"] = dict(zip(names, table.task_losses[k].tolist(), strict=True))
            if judge is not None:
                point["judged"] = dict(zip(names, judge.task_losses[k].tolist(), strict=True))
            lines[names[i]].append(point)
        by_c[str(c)] = {"mean_fraction": mean, "lines": lines, "monotone": _monotone(lines)}
    means = [v["mean_fraction"] for v in by_c.values()]
    pooled = dense.repeat(len(options.c_values), 1)
    control = {"table": control_rho(pooled, table.task_losses[picks], names)}
    if judge is not None:
        control["judged"] = control_rho(pooled, judge.task_losses[picks], names)
    return {
        "control_rho": control,
        "tasks": names,
        "tau": table.tau,
        "lambda_active": lambdas[0],
        "lambda_inactive": lambdas[1],
        "by_c": by_c,
        "last_over_first": means[-1] / means[0] if means[0] > 0 else None,
    }


def control_rho(r: torch.Tensor, losses: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Claim 2's statistic per task: Spearman's rho(r_i, loss_i) over preferences ``r`` (P, N)
    and the losses (P, N) of their trees (None where either is constant)."""
    return {t: spearman(r[:, i].tolist(), losses[:, i].tolist()) for i, t in enumerate(names)}


def _monotone(lines: dict[str, list[dict[str, Any]]]) -> dict[str, bool]:
    """Per task: its own table loss never rises as r_i rises along its line."""
    out = {}
    for task, points in lines.items():
        own = [p["losses"][task] for p in points]
        out[task] = all(b <= a * (1 + MONOTONE_SLACK) for a, b in itertools.pairwise(own))
    return out


def table_key(run: Run, artifact: Path) -> dict[str, str]:
    """What a path table depends on: the streams (the artifact's manifest checksum), the images
    (data options, seed, split, count) and the scale (``path_scale``)."""
    cfg = run.config
    return {
        # prepare_run has just loaded and verified the artifact: its checksums are not read again
        "artifact": str(read_manifest(resolve(artifact), verify=False)["manifest_sha256"]),
        "data": cfg.data.model_dump_json(),
        "seed": str(cfg.seed),
        "split": table_split(run),
        "path_images": str(cfg.edge.path_images),
        "path_scale": cfg.edge.path_scale,
    }


def cached_table(run: Run, key: dict[str, str], cache: Path | None) -> torch.Tensor:
    """The run's path table (training/stages.py), from ``cache`` when it holds the table of
    ``key`` (a safetensors file; written there when absent)."""
    if cache is not None and cache.exists():
        try:
            with safe_open(str(cache), framework="pt") as f:
                found, table = f.metadata() or {}, f.get_tensor("table")
        except Exception as exc:  # safetensors raises its own error types for a bad file
            raise ConfigError(f"{cache} is not a path-table file: {exc}") from exc
        if found != key:
            differ = sorted(k for k in key.keys() | found.keys() if key.get(k) != found.get(k))
            raise ConfigError(
                f"{cache} holds the path table of other settings ({', '.join(differ)} "
                "differ): remove it or pass another --table file"
            )
        return table.to(run.device)
    table = path_table(run)
    if cache is not None:
        save_file({"table": table.detach().cpu().contiguous()}, str(cache), metadata=key)
    return table


def tree_map(
    run: Run,
    table: torch.Tensor,
    options: MapOptions = MapOptions(),
    judge: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The map for a prepared run whose anchor holds the streams and whose ``affinity`` is
    set, on its path ``table``; ``judge`` (:func:`judge_table`) prices the map's trees again."""
    cfg, model = run.config.edge, run.model
    objective = EdgeObjective.build(cfg, run.tasks, run.affinity, run.device)

    def tree_table(t: torch.Tensor) -> TreeTable:
        return TreeTable.build(
            t, model.n_layers, objective.affinity, objective.tau, objective.switches
        )

    trees = tree_table(table)
    anchor = model.anchor_cost().flops
    costs: dict[int, float] = {}

    def fraction(k: int) -> float:
        if k not in costs:
            parents = trees.parents[k].tolist()
            arch = Architecture.from_parents(parents, model.n_tasks, model.n_layers)
            costs[k] = model.cost(arch).flops / anchor
        return costs[k]

    names = [t.name for t in run.tasks]
    lam, measured = applied_lambda_active(cfg, trees, run.config.seed)
    lambdas = (lam, cfg.lambda_inactive)
    judged = None if judge is None else tree_table(judge)
    result = map_trees(trees, names, fraction, lambdas, options, judged)
    result.update(measured, pull_scale=cfg.pull_scale)
    result["path_scale"] = cfg.path_scale
    result["table_split"] = table_split(run)
    result["path_images"] = cfg.path_images
    return result


@torch.no_grad()
def judge_table(run: Run, options: dict[str, Any], images: int) -> tuple[torch.Tensor, int]:
    """w_j T[j, p] (training/paths.py) and the image count, on the first ``images`` images of
    the training source under dataset ``options``: the judge split's prices of every path. The
    benchmark's held-out split comes from another source (another random stream, other digits,
    other files), so no options name it here."""
    data_cfg = run.config.data.model_copy(update={"calibration_options": dict(options)})
    data = split_dataset(run.config.model_copy(update={"data": data_cfg}), calibration=True)
    first = Subset(data, range(min(images, len(data))))
    on_device = (
        {key: v.to(run.device) for key, v in batch.items()} for batch in batches(first, PATH_CHUNK)
    )
    table = path_losses(run.model.anchor.eval(), on_device, run.tasks)
    return loss_scaled(table, run.tasks).to(run.device), len(first)


def tree_map_of(
    config: TrainConfig,
    artifact: Path,
    device: torch.device,
    options: MapOptions = MapOptions(),
    table_cache: Path | None = None,
    judge: tuple[dict[str, Any], int] | None = None,
) -> dict[str, Any]:
    """``config``'s map on the streams of ``artifact`` (in a scratch run directory, removed
    after); the path table is read from or written to ``table_cache`` when given. ``judge`` =
    (dataset options, images): the judge split of :func:`judge_table`."""
    from .distributed import Distributed
    from .pipeline import RunRequest, prepare_run

    anchor = config.anchor.model_copy(update={"pretrained": str(artifact)})
    config = config.model_copy(update={"anchor": anchor})
    with tempfile.TemporaryDirectory(prefix="dymu-tree-map-") as tmp:
        request = RunRequest(
            config, Path(tmp) / "out", Path(tmp) / "run", device, Distributed(),
            resume=False, stages=("affinity", "edge"), progress=False, command=None,
            max_steps=None,
        )  # fmt: skip
        run, _, _ = prepare_run(request)
        run.affinity = stage_affinity(run)
        table = cached_table(run, table_key(run, artifact), table_cache)
        if judge is None:
            return tree_map(run, table, options)
        judged, count = judge_table(run, *judge)
        return {
            **tree_map(run, table, options, judged),
            "judge": {"options": judge[0], "images": count},
        }


def markdown(result: dict[str, Any]) -> str:
    """The map as text: the mean cost per c, then each task's line (its own loss, the cost)."""
    names = result["tasks"]
    lines = [
        f"tau {result['tau']:g}, lambda_A {result['lambda_active']:g}"
        + (
            f" (pull_scale table: {result['lambda_active'] / result['sharing_pull']:g} x the "
            f"full-sharing pull {result['sharing_pull']:g})"
            if result.get("sharing_pull")
            else ""
        )
        + ", "
        f"lambda_I {result['lambda_inactive']:g}; table: {result.get('path_images', '?')} "
        f"{result.get('table_split', '?')} images, path_scale {result.get('path_scale', '?')}",
        "",
        "| c | mean cost (fraction of the anchor) | loss non-increasing in r_i |",
        "|---|---:|---|",
    ]
    for c, v in result["by_c"].items():
        mono = ", ".join(f"{t} {'yes' if ok else 'NO'}" for t, ok in v["monotone"].items())
        lines.append(f"| {c} | {v['mean_fraction']:.3f} | {mono} |")
    if result["last_over_first"] is not None:
        lines += ["", f"last c / first c: {result['last_over_first']:.3f}"]
    lines += ["", *_control_lines(result)]
    for c, v in result["by_c"].items():
        lines += ["", f"c = {c}: each task's own table loss / the tree's cost, r_i from 0 to 1"]
        for task in names:
            pts = v["lines"][task]
            cells = " ".join(f"{p['losses'][task]:.2f}/{p['fraction']:.2f}" for p in pts)
            lines.append(f"  {task}: {cells}")
            if "judged" in pts[0]:
                lines.append(
                    f"  {task} judged: " + " ".join(f"{p['judged'][task]:.3f}" for p in pts)
                )
    return "\n".join(lines)


def _control_lines(result: dict[str, Any]) -> list[str]:
    """Claim 2's rho on the table and, with a judge split, on the judge's images."""

    def cells(rho: dict[str, float | None]) -> str:
        return ", ".join(f"{t} {'n/a' if v is None else f'{v:+.2f}'}" for t, v in rho.items())

    rho = result["control_rho"]
    c_values = ", ".join(result["by_c"])
    out = [f"claim 2's rho(r_i, loss), Dir(1) preferences at c = {c_values} pooled:"]
    out.append(f"  on the table: {cells(rho['table'])}")
    if "judge" in result:
        judge = result["judge"]
        where = f"{judge['images']} images of {json.dumps(judge['options'])}"
        out.append(f"  judged on {where}: {cells(rho['judged'])}")
    return out
