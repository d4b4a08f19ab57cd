"""`dymu evaluate`'s report: every number (JSON), the paper's tables (markdown), the claims check.

:func:`evaluate_source` runs the rows of :mod:`training.evaluation.methods` through the
:class:`~training.evaluation.loop.Evaluator` and the sweeps behind the figures;
:func:`write_report` writes ``report.json``, ``report.md`` and the PNG figures to a folder.

The five qualitative claims of the paper (§4.4–4.6) are checked with rules fixed here, before any
number is seen, and printed as holds / does not hold with the numbers:

1. resource use falls with c: dymu's mean GFLOPs over the cost preferences at c = 0, 0.5, 1 is
   non-increasing and lower at c = 1 than at c = 0;
2. a task's loss falls as its preference rises: for every task, Spearman's ρ between r_i and
   w_i L_i over dymu's P preferences at c = 0 and c = 1 (2P points) is negative;
3. HV(dymu) > HV(PHN-BN) > HV(PHN), at c = 0 and at c = 1;
4. uniformity(dymu) > uniformity(PHN-BN), at c = 0 and at c = 1;
5. adaptation raises HV: HV(dymu) > HV(dymu w/o adaptation), at c = 0 and at c = 1.

A claim whose rows are missing (a single artifact has no PHN rows) is "not evaluated". Claims 2
and 4 also carry a 95 % bootstrap interval over the P preferences (ρ per task; the uniformity
margin per c), which the verdict does not use: an interval that spans 0 says the rule was
decided by which preferences were drawn (docs/evaluation.md, "How sure a claim is").
"""

from __future__ import annotations

import functools
import json
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .loop import (
    Evaluator,
    RowResult,
    finite,
    marginal_grid,
    mean_cost,
    pair_grid,
    preferences,
    simplex_grid,
)
from .methods import ABLATION_LABELS, DYMU_C, Row, Source, ablation_rows, build_rows
from .metrics import bootstrap_interval, hypervolume, spearman, uniformity

FLOP_CONVENTION = "1 multiply-add = 2 FLOPs (torch.utils.flop_counter.FlopCounterMode), per image"
LOSS_CONVENTION = (
    "losses are w_i * L_i: the unscaled split-level task loss times the task's loss scale "
    "(the terms of the training objective sum_i r_i w_i L_i); metrics[task]['loss'] is unscaled"
)
RESOURCE_C = (0.0, 0.5, 1.0)
#: Methods drawn on the pairwise trade-off curves (Figs. 13–14) besides dymu.
CURVE_BASELINES = ("phn", "phn-bn", "cpmtl")


def _row_json(res: RowResult, reference: Sequence[float]) -> dict[str, Any]:
    row = res.row
    out = {
        "label": row.label,
        "family": row.family,
        "c": row.c,
        "hypervolume": res.hv.value,
        "hypervolume_exact": res.hv.exact,
        "hypervolume_method": res.hv.method,
        "points_inside_reference": res.hv.n_inside,
        "reference_point": list(reference),
        "uniformity": res.uniformity,
        "inference_params": res.params,
        "gflops": res.gflops,
        "control_params": row.control_params,
        "delta_m": finite(res.delta_m),
        "train_seconds": row.train_seconds,
        "metrics_mean": _mean_metrics(res),
        "per_preference": [p.to_dict() for p in res.points],
    }
    out.update(res.extra)
    return out


def _mean_metrics(res: RowResult) -> dict[str, dict[str, float | None]]:
    tasks = res.points[0].metrics
    return {
        t: {m: finite(statistics.fmean(p.metrics[t][m] for p in res.points)) for m in tasks[t]}
        for t in tasks
    }


def _static_hv_curve(
    res: RowResult, names: Sequence[str], reference: Sequence[float], seed: int, draws: int = 20
) -> list[dict[str, float]]:
    """HV of random subsets of the static networks against their summed training time (Fig. 6)."""
    members = res.row.members or []
    rng = random.Random(seed)
    idx = list(range(len(members)))
    curve = []
    for size in range(1, len(members) + 1):
        hvs, secs = [], []
        for _ in range(draws):
            pick = rng.sample(idx, size)
            hvs.append(hypervolume([res.points[k].vector(names) for k in pick], reference).value)
            secs.append(sum(float(members[k].train_seconds) for k in pick))
        curve.append(
            {
                "networks": size,
                "train_seconds": statistics.fmean(secs),
                "hv_mean": statistics.fmean(hvs),
                "hv_std": statistics.pstdev(hvs),
            }
        )
    return curve


def _resource_usage(
    model: Any, cost_prefs: Sequence[Sequence[float]], simplex_steps: int
) -> dict[str, Any]:
    """Mean FLOPs and params per c in RESOURCE_C, and the FLOPs fraction over a simplex grid."""
    n = model.n_tasks
    anchor = model.anchor_cost()
    resource = {}
    grid = simplex_grid(n, simplex_steps)
    for c in RESOURCE_C:
        costs = [model.cost(model.architecture(r, c)) for r in grid]
        mean_g, mean_p = mean_cost(model, c, cost_prefs)
        resource[f"{c:g}"] = {
            "c": c,
            "mean_gflops": mean_g,
            "mean_params": mean_p,
            "mean_fraction_flops": mean_g * 1e9 / anchor.flops,
            "grid": [
                {
                    "r": r,
                    "fraction_flops": x.flops / anchor.flops,
                    "fraction_params": x.params / anchor.params,
                }
                for r, x in zip(grid, costs, strict=True)
            ],
        }
    return resource


def _showcase_trees(model: Any, names: Sequence[str]) -> dict[str, Any]:
    """The trees of the uniform and (up to four) one-hot preferences at every c of DYMU_C."""
    n = len(names)
    trees = {}
    showcase = [("uniform", [1 / n] * n)] + [
        (f"one-hot {names[i]}", [1.0 if j == i else 0.0 for j in range(n)])
        for i in range(min(n, 4))
    ]
    for label, r in showcase:
        for c in DYMU_C:
            arch = model.architecture(r, c)
            trees[f"{label}, c={c:.1f}"] = {
                "r": r,
                "c": c,
                "parents": arch.to_dict()["parents"],
                "gflops": model.cost(arch).gflops,
            }
    return trees


def _method_result(
    ev: Evaluator,
    row: Row,
    prefs: Any,
    reference: Sequence[float],
    cost_prefs: Any,
    names: list[str],
    seed: int,
) -> RowResult:
    """One method's row; Single-Task's metrics become the Δ_m reference of the rows after it
    (build_rows puts it first)."""
    res = ev.row_result(row, prefs, reference, cost_prefs)
    if row.family == "single-task":
        ev.single_task = res.points[0].metrics
        res.delta_m = 0.0
    if row.family == "static":
        res.extra["hv_vs_train_time"] = _static_hv_curve(res, names, reference, seed)
    return res


def _marginal_lines(
    ev: Evaluator, dymu_rows: list[Row], marg: list, names: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """Each task's loss along r_i with the rest split evenly, per dymu row (the marginal grid)."""
    marginal = {}
    for row in dymu_rows:
        ev.describe(f"marginal {row.label}")
        marginal[row.key] = [
            {
                "task": names[i],
                "r_i": ri,
                **ev.point(row.method, r, row.c, row.cache_key(r, row.c)).to_dict(),
            }
            for i, ri, r in marg
        ]
    return marginal


def _tradeoff_curves(
    ev: Evaluator, curve_rows: list[Row], pairs: list, names: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """Every pair of tasks traded against each other (the pair grid), per curve row."""
    curves = {}
    for row in curve_rows:
        ev.describe(f"pairs {row.label}")
        curves[row.key] = [
            {"pair": [names[i], names[j]], "t": t, **ev.point(row.method, r, row.c).to_dict()}
            for i, j, t, r in pairs
        ]
    return curves


def evaluate_source(
    source: Source,
    dataset: Any,
    *,
    reference: Sequence[float],
    n_preferences: int = 20,
    seed: int = 0,
    cost_preferences: int = 1000,
    curve_points: int = 5,
    simplex_steps: int = 20,
    batch_size: int = 50,
    device: str = "cpu",
    progress: bool = True,
    dataset_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every number of the report for ``source`` on ``dataset`` (see the module docstring)."""
    from tqdm import tqdm

    model = source.dymu
    tasks = model.config.tasks
    names = [t.name for t in tasks]
    n = len(names)
    rows = build_rows(source)
    ablations = ablation_rows(source)
    prefs = preferences(n, n_preferences, seed)
    cost_prefs = preferences(n, cost_preferences, seed + 1)
    marg = marginal_grid(n, max(2, curve_points + 1))
    pairs = pair_grid(n, max(2, curve_points))
    dymu_rows = [r for r in rows if r.family in ("dymu", "dymu-noadapt")]
    curve_rows = [r for r in rows if r.family in (*CURVE_BASELINES, "dymu")]
    total = sum(len(r.members) if r.members else n_preferences for r in rows + ablations)
    total += len(marg) * len(dymu_rows) + len(pairs) * len(curve_rows)

    t0 = time.perf_counter()
    bar = tqdm(total=total, disable=not progress, unit="pref", dynamic_ncols=True)
    ev = Evaluator(dataset, tasks, batch_size=batch_size, device=device, progress=bar)
    results = [_method_result(ev, row, prefs, reference, cost_prefs, names, seed) for row in rows]
    ablation_results = [ev.row_result(row, prefs, reference, cost_prefs) for row in ablations]
    marginal = _marginal_lines(ev, dymu_rows, marg, names)
    curves = _tradeoff_curves(ev, curve_rows, pairs, names)
    bar.close()

    anchor = model.anchor_cost()
    resource = _resource_usage(model, cost_prefs, simplex_steps)
    trees = _showcase_trees(model, names)

    by_key = {res.row.key: res for res in results}
    report: dict[str, Any] = {
        "source": str(source.path),
        "is_run_dir": source.is_run,
        "benchmark": source.benchmark,
        "dataset": dataset_info or {},
        "tasks": [t.model_dump(mode="json") for t in tasks],
        "n_preferences": n_preferences,
        "seed": seed,
        "cost_preferences": cost_preferences,
        "flop_convention": FLOP_CONVENTION,
        "loss_convention": LOSS_CONVENTION,
        "reference_point": list(reference),
        "hypervolume_exact": all(r.hv.exact for r in results),
        "anchor_cost": {"flops": anchor.flops, "gflops": anchor.gflops, "params": anchor.params},
        "primary_method": "dymu-c0",
        "methods": {res.row.key: _row_json(res, reference) for res in results},
        "ablations": {res.row.key: _row_json(res, reference) for res in ablation_results},
        "resource_usage": resource,
        "marginal": marginal,
        "tradeoff_curves": curves,
        "trees": trees,
        "train_seconds": source.train_seconds,
        "training_budgets": source.budgets,
        "evaluations": ev.evaluations,
        "images": ev.n_images,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    primary = report["methods"]["dymu-c0"]
    for k in ("hypervolume", "uniformity", "per_preference"):
        report[k] = primary[k]
    report["claims"] = check_claims(report, by_key)
    return report


# -- claims ----------------------------------------------------------------------------------
def _same_preferences(*point_lists: Sequence[Any]) -> bool:
    """Whether the rows were measured at the same preferences, in the same order."""
    first = point_lists[0]
    return all(
        len(pts) == len(first) and all(p.r == q.r for p, q in zip(pts, first, strict=True))
        for pts in point_lists[1:]
    )


def _task_rho(points: Sequence[Any], i: int, name: str) -> float | None:
    """Spearman's ρ between task i's preference r_i and its loss over ``points`` (claim 2)."""
    return spearman([p.r[i] for p in points], [p.losses[name] for p in points])


def _interval_text(interval: tuple[float, float] | None, fmt: str = "+.3f") -> str:
    return "n/a" if interval is None else f"{interval[0]:{fmt}} … {interval[1]:{fmt}}"


def rho_intervals(
    c0: Sequence[Any], c1: Sequence[Any], names: Sequence[str]
) -> dict[str, tuple[float, float] | None]:
    """Claim 2's ρ per task, its 95 % bootstrap interval: preferences resampled with both of
    their points (c = 0 and c = 1), as the rule pools them."""

    def rho(i: int) -> Any:
        def stat(idx: Any) -> float | None:
            return _task_rho([c0[k] for k in idx] + [c1[k] for k in idx], i, names[i])

        return stat

    return {t: bootstrap_interval(rho(i), len(c0)) for i, t in enumerate(names)}


def margin_interval(
    ours: Sequence[Any], theirs: Sequence[Any], names: Sequence[str]
) -> tuple[float, float] | None:
    """Claim 4's margin, mean uniformity(ours) − mean uniformity(theirs), its 95 % bootstrap
    interval with the two rows' points at each preference resampled as a pair."""
    diff = [
        uniformity(a.r, a.vector(names)) - uniformity(b.r, b.vector(names))
        for a, b in zip(ours, theirs, strict=True)
    ]
    return bootstrap_interval(lambda idx: statistics.fmean(diff[k] for k in idx), len(diff))


def _split_name(dataset: dict[str, Any]) -> str:
    return "calibration" if dataset.get("split") == "calibration" else "held-out"


def _claim(name: str, holds: bool | None, text: str, numbers: dict[str, Any]) -> dict[str, Any]:
    return {"claim": name, "holds": holds, "text": text, "numbers": numbers}


def check_claims(report: dict[str, Any], rows: dict[str, RowResult]) -> list[dict[str, Any]]:
    """The paper's five qualitative claims with the rules of the module docstring."""
    names = [t["name"] for t in report["tasks"]]
    return [
        _claim_resource(report),
        _claim_task_control(rows, names),
        _claim_hv(rows),
        _claim_uniformity(rows, names),
        _claim_adaptation(rows),
    ]


def _row_hv(rows: dict[str, RowResult], key: str) -> float | None:
    return rows[key].hv.value if key in rows else None


def _claim_resource(report: dict[str, Any]) -> dict[str, Any]:
    g = {k: v["mean_gflops"] for k, v in report["resource_usage"].items()}
    falls = g["0"] >= g["0.5"] >= g["1"] and g["0"] > g["1"]
    return _claim(
        "resource use falls with c",
        falls,
        f"dymu mean GFLOPs at c = 0 / 0.5 / 1: {g['0']:.4f} / {g['0.5']:.4f} / {g['1']:.4f}",
        {"mean_gflops_by_c": g},
    )


def _claim_task_control(rows: dict[str, RowResult], names: list[str]) -> dict[str, Any]:
    c0, c1 = rows["dymu-c0"].points, rows["dymu-c1"].points
    rho = {t: _task_rho([*c0, *c1], i, t) for i, t in enumerate(names)}
    holds = all(v is not None and v < 0 for v in rho.values())
    rho_ci = rho_intervals(c0, c1, names) if _same_preferences(c0, c1) else {}
    text = "Spearman rho(r_i, w_i L_i) over dymu's preferences at c = 0 and 1: " + ", ".join(
        f"{t} {v:+.3f}" if v is not None else f"{t} n/a" for t, v in rho.items()
    )
    if rho_ci:
        text += "; 95 % bootstrap intervals: " + ", ".join(
            f"{t} {_interval_text(ci)}" for t, ci in rho_ci.items()
        )
    return _claim(
        "task loss falls as its preference rises",
        holds,
        text,
        {"spearman_rho": rho, "interval_95": rho_ci},
    )


def _claim_hv(rows: dict[str, RowResult]) -> dict[str, Any]:
    hv = functools.partial(_row_hv, rows)
    if "phn" in rows and "phn-bn" in rows:
        per_c = {f"{c:g}": hv(f"dymu-c{c:g}") > hv("phn-bn") > hv("phn") for c in DYMU_C}
        return _claim(
            "HV(dymu) > HV(PHN-BN) > HV(PHN)",
            all(per_c.values()),
            f"HV dymu c=0 {hv('dymu-c0'):.4g}, c=1 {hv('dymu-c1'):.4g}; "
            f"PHN-BN {hv('phn-bn'):.4g}; PHN {hv('phn'):.4g}",
            {
                "dymu_c0": hv("dymu-c0"),
                "dymu_c1": hv("dymu-c1"),
                "phn_bn": hv("phn-bn"),
                "phn": hv("phn"),
                "holds_at_c": per_c,
            },
        )
    return _claim(
        "HV(dymu) > HV(PHN-BN) > HV(PHN)",
        None,
        "the input has no "
        + " / ".join(n for n in ("PHN", "PHN-BN") if n.lower() not in rows)
        + " row"
        + "".join(f"; HV dymu c={c:.0f} {hv(f'dymu-c{c:g}'):.4g}" for c in DYMU_C)
        + (f", PHN-BN {hv('phn-bn'):.4g}" if "phn-bn" in rows else "")
        + (f", PHN {hv('phn'):.4g}" if "phn" in rows else ""),
        {},
    )


def _claim_uniformity(rows: dict[str, RowResult], names: list[str]) -> dict[str, Any]:
    if "phn-bn" not in rows:
        return _claim(
            "uniformity(dymu) > uniformity(PHN-BN)", None, "the input has no PHN-BN row", {}
        )
    unif = {key: rows[key].uniformity for key in ("dymu-c0", "dymu-c1", "phn-bn")}
    per_c = {f"{c:g}": unif[f"dymu-c{c:g}"] > unif["phn-bn"] for c in DYMU_C}
    base = rows["phn-bn"].points
    margin_ci = {
        f"{c:g}": margin_interval(rows[f"dymu-c{c:g}"].points, base, names)
        for c in DYMU_C
        if _same_preferences(rows[f"dymu-c{c:g}"].points, base)
    }
    text = (
        f"uniformity dymu c=0 {unif['dymu-c0']:.4f}, c=1 {unif['dymu-c1']:.4f}; "
        f"PHN-BN {unif['phn-bn']:.4f}"
    )
    if margin_ci:
        text += "; 95 % bootstrap intervals of the margin: " + ", ".join(
            f"c={c} {_interval_text(ci, '+.4f')}" for c, ci in margin_ci.items()
        )
    return _claim(
        "uniformity(dymu) > uniformity(PHN-BN)",
        all(per_c.values()),
        text,
        {
            "dymu_c0": unif["dymu-c0"],
            "dymu_c1": unif["dymu-c1"],
            "phn_bn": unif["phn-bn"],
            "holds_at_c": per_c,
            "margin_interval_95": margin_ci,
        },
    )


def _claim_adaptation(rows: dict[str, RowResult]) -> dict[str, Any]:
    hv = functools.partial(_row_hv, rows)
    per_c = {f"{c:g}": hv(f"dymu-c{c:g}") > hv(f"dymu-noadapt-c{c:g}") for c in DYMU_C}
    return _claim(
        "adaptation raises HV",
        all(per_c.values()),
        "HV with / without adaptation: "
        + "; ".join(
            f"c={c:.0f} {hv(f'dymu-c{c:g}'):.4g} / {hv(f'dymu-noadapt-c{c:g}'):.4g}" for c in DYMU_C
        ),
        {
            f"c{c:g}": {"with": hv(f"dymu-c{c:g}"), "without": hv(f"dymu-noadapt-c{c:g}")}
            for c in DYMU_C
        }
        | {"holds_at_c": per_c},
    )


# -- markdown --------------------------------------------------------------------------------
def _params(p: float) -> str:
    return f"{p / 1e6:.3f}M"


def _hv(entry: dict[str, Any]) -> str:
    return f"{entry['hypervolume']:.4g}" + ("" if entry["hypervolume_exact"] else " (approx.)")


def _md_header(report: dict[str, Any], ref: str, names: list[str]) -> list[str]:
    return [
        f"# Evaluation of `{report['source']}`",
        "",
        *([f"Made by `{report['command']}`.", ""] if report.get("command") else []),
        f"Benchmark `{report['benchmark']}`, {_split_name(report['dataset'])} split: "
        f"{json.dumps(report['dataset'])} "
        f"({report['images']} images). P = {report['n_preferences']} preferences r uniform on "
        f"the simplex (seed {report['seed']}); params and GFLOPs are means over "
        f"{report['cost_preferences']} preferences; {FLOP_CONVENTION}. Loss vectors: "
        f"{LOSS_CONVENTION}. Reference point [{ref}] ({', '.join(names)}). Hypervolume "
        + (
            "exact (moocore)."
            if report["hypervolume_exact"]
            else 'approximate (moocore.hv_approx, marked "approx.").'
        ),
        "",
    ]


def _md_methods(report: dict[str, Any], ref: str) -> list[str]:
    """The paper's table (Tables 1-4): HV, uniformity, params, GFLOPs, control params."""
    lines = [
        f"| Method | HV ↑ [{ref}] | Unif. ↑ | Inference Params ↓ | GFLOPs ↓ | Control Params |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for entry in report["methods"].values():
        lines.append(
            f"| {entry['label']} | {_hv(entry)} | {entry['uniformity']:.3f} | "
            f"{_params(entry['inference_params'])} | {entry['gflops']:.4f} | "
            f"{_params(entry['control_params']) if entry['control_params'] else '–'} |"
        )
    note = (
        "Single-Task ignores r: its uniformity is the level of a method without control. The "
        "static row is K networks, each evaluated once at its own preference r_k."
    )
    return [*lines, "", note]


def _md_metrics(report: dict[str, Any], names: list[str]) -> list[str]:
    lines = ["", "## Task metrics (mean over the preferences) and Δ_m against Single-Task", ""]
    metric_cols = [
        (t, m)
        for t in names
        for m in next(iter(report["methods"].values()))["metrics_mean"][t]
        if m != "loss"
    ]
    lines.append("| Method | " + " | ".join(f"{t} {m}" for t, m in metric_cols) + " | Δ_m (%) |")
    lines.append("|---|" + "---:|" * (len(metric_cols) + 1))
    for entry in report["methods"].values():
        vals = [entry["metrics_mean"][t][m] for t, m in metric_cols]
        dm = entry["delta_m"]
        lines.append(
            f"| {entry['label']} | "
            + " | ".join("–" if v is None else f"{v:.4g}" for v in vals)
            + f" | {'–' if dm is None else f'{dm:+.2f}'} |"
        )
    return lines


def _md_ablation(report: dict[str, Any]) -> list[str]:
    """Table 6: each ablation's pair of rows (c = 0, c = 1), beside the full model's."""
    if not report["ablations"]:
        return []
    lines = [
        "",
        "## Ablation (paper Table 6)",
        "",
        "| Method | HV c=0 | HV c=1 | Unif. c=0 | Unif. c=1 | Params c=0 | Params c=1 "
        "| GFLOPs c=0 | GFLOPs c=1 |",
        "|---|" + "---:|" * 8,
    ]
    groups = {}
    if not any(k.startswith("ablation-reference-") for k in report["ablations"]):
        groups["dymu"] = ("dymu-c0", "dymu-c1")  # no control row trained: the run's dymu
    for key in report["ablations"]:
        flag = key[len("ablation-") :].rsplit("-c", 1)[0]
        groups.setdefault(
            ABLATION_LABELS.get(flag, flag), (f"ablation-{flag}-c0", f"ablation-{flag}-c1")
        )
    everything = {**report["methods"], **report["ablations"]}
    for label, (k0, k1) in groups.items():
        a, b = everything[k0], everything[k1]
        lines.append(
            f"| {label} | {_hv(a)} | {_hv(b)} | {a['uniformity']:.3f} | {b['uniformity']:.3f} "
            f"| {_params(a['inference_params'])} | {_params(b['inference_params'])} "
            f"| {a['gflops']:.4f} | {b['gflops']:.4f} |"
        )
    return lines


def _md_budgets(report: dict[str, Any]) -> list[str]:
    if not report.get("training_budgets"):
        return []
    lines = [
        "",
        "## Training budgets (run.json)",
        "",
        "| method | optimizer steps | training seconds (this machine) | path |",
        "|---|---:|---:|---|",
    ]
    for name, b in report["training_budgets"].items():
        secs = "–" if b["train_seconds"] is None else f"{b['train_seconds']:.0f}"
        lines.append(f"| {name} | {b['steps'] or '–'} | {secs} | `{b['path']}` |")
    return lines


def _md_resource_and_claims(report: dict[str, Any]) -> list[str]:
    """Fig. 5's resource use against c, the claims' verdicts and the figures' files."""
    lines = [
        "",
        "## Resource use of dymu against c (paper Fig. 5)",
        "",
        "| c | mean GFLOPs | fraction of the anchor's FLOPs |",
        "|---:|---:|---:|",
    ]
    for v in report["resource_usage"].values():
        lines.append(f"| {v['c']:.1f} | {v['mean_gflops']:.4f} | {v['mean_fraction_flops']:.3f} |")
    lines += ["", "## The paper's claims", ""]
    for cl in report["claims"]:
        verdict = {True: "holds", False: "does not hold", None: "not evaluated"}[cl["holds"]]
        lines.append(f"- **{cl['claim']}**: {verdict} — {cl['text']}")
    if report.get("figures"):
        lines += ["", "## Figures", ""]
        lines += [f"- `{f}`: {what}" for f, what in report["figures"].items()]
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the paper's table, metrics and Δ_m, Table 6, resource, claims."""
    ref = ", ".join(f"{v:g}" for v in report["reference_point"])
    names = [t["name"] for t in report["tasks"]]
    lines = [
        *_md_header(report, ref, names),
        *_md_methods(report, ref),
        *_md_metrics(report, names),
        *_md_ablation(report),
        *_md_budgets(report),
        *_md_resource_and_claims(report),
        "",
    ]
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: such metrics (e.g. mIoU of a split without labels) -> null."""
    if isinstance(value, float):
        return finite(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(report: dict[str, Any], out: str | Path) -> list[Path]:
    """``report.json``, ``report.md`` and the figures in ``out``; returns the files written."""
    from .figures import write_figures

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["figures"] = write_figures(report, out)
    (out / "report.json").write_text(json.dumps(_json_safe(report), indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    return [out / "report.json", out / "report.md", *(out / f for f in report["figures"])]
