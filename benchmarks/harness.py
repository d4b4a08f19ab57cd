"""The benchmark harness: one run loop over the registered cases, one JSON file, one summary.

    from benchmarks import preset, run_bench
    run_bench(preset("quick"), out_dir="bench-results")   # = dymu bench --quick --out ...

Each case is a function ``run(ctx) -> dict`` registered by name with
:func:`benchmarks.registry.register_case`, plus ``markdown(result) -> str`` for the summary. A
case that raises is recorded with its traceback and the others still run; the run then reports
failure.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import dymu
from dymu.device import resolve_device
from dymu.errors import ConfigError
from dymu.store import resolve

from . import machine
from .config import BenchConfig
from .registry import CASES, ROOT, Case, Context, register_case

SCHEMA = "dymu-bench/1"
RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"
__all__ = ["CASES", "ROOT", "Case", "Context", "register_case", "run_bench", "selected_cases"]


def selected_cases(names: tuple[str, ...]) -> list[Case]:
    """The registered cases named (all when ``names`` is empty), in the order of their number."""
    from . import cases  # noqa: F401  (registers the built-in cases; imported only when run)

    ordered = sorted(CASES.values(), key=lambda c: c.number)  # profile (8) reads case 1
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ConfigError(
            f"unknown case(s) {', '.join(unknown)}: "
            f"choose from {', '.join(c.name for c in ordered)}"
        )
    return [c for c in ordered if not names or c.name in names]


def _run_case(case: Case, ctx: Context) -> dict[str, Any]:
    ctx.log(f"[{case.name}] {case.title} ...")
    load0, t0 = machine.loadavg(), time.perf_counter()
    record: dict[str, Any] = {"number": case.number, "title": case.title}
    try:
        record["result"] = case.run(ctx)
        record["status"] = "ok"
    except Exception as exc:  # one broken case must not lose the others' numbers
        record["status"] = "error"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
        ctx.log(f"[{case.name}] FAILED: {record['error']}")
    record["wall_s"] = round(time.perf_counter() - t0, 2)
    record["loadavg_start"], record["loadavg_end"] = load0, machine.loadavg()
    ctx.log(f"[{case.name}] {record['status']} in {record['wall_s']} s")
    return record


def run_bench(
    config: BenchConfig,
    out_dir: str | Path,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the selected cases; write ``results.json`` and ``summary.md`` under ``out_dir``."""
    from .report import headline, summary_markdown

    log = log or (lambda msg: print(msg, flush=True))  # flushed: a full run takes hours
    cases = selected_cases(config.cases)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    t_start = time.perf_counter()
    vdir = resolve(config.model)
    model = dymu.load(vdir, device=device)
    ctx = Context(config, model, vdir, device, out_dir=out, log=log)
    log(f"dymu bench ({config.mode}): {vdir} on {device}, {len(cases)} case(s) -> {out}")
    ctx.peak = {
        "fma": machine.fma_peak(config.threads if device.type == "cpu" else None),
        "matmul": machine.matmul_peak(config.matmul_n, device=torch.device("cpu")),
    }
    if device.type == "cuda":
        ctx.peak["matmul_device"] = machine.matmul_peak(4096, device=device)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": config.mode,
        "command": command,
        "config": config.model_dump(mode="json"),
        "machine": machine.machine_info(),
        "versions": machine.versions(ROOT),
        "device": machine.device_info(device),
        "model": {
            "path": str(vdir),
            "name": model.manifest.get("name"),
            "version": model.manifest.get("version"),
            "tasks": list(model.tasks),
            "n_layers": model.n_layers,
            "input_size": list(model.input_size),
            "anchor_cost": {
                **model.anchor_cost().to_dict(),
                "flop_convention": "1 multiply-add = 2 FLOPs",
            },
        },
        "peak": ctx.peak,
        "cases": {},
    }
    for case in cases:
        report["cases"][case.name] = _run_case(case, ctx)
        if report["cases"][case.name]["status"] == "ok":
            ctx.results[case.name] = report["cases"][case.name]["result"]
        _write(out, report)  # partial results survive an interrupted full run
    report["machine"]["loadavg_end"] = machine.loadavg()
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    report["headline"] = headline(report)
    _write(out, report)
    (out / SUMMARY_FILE).write_text(summary_markdown(report, CASES))
    log(f"dymu bench: {report['wall_s']} s; wrote {out / RESULTS_FILE} and {out / SUMMARY_FILE}")
    return report


def _write(out: Path, report: dict[str, Any]) -> None:
    tmp = out / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    tmp.replace(out / RESULTS_FILE)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
