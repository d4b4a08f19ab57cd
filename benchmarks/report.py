"""The markdown summary and the headline ratios, checked against the issue's goals."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

#: name -> (comparison, target, what it is)
GOALS: dict[str, tuple[str, float, str]] = {
    "proportionality": ("<=", 1.15, "time ratio / FLOP ratio of the arg-max trees, worst point"),
    "switch_over_predict": ("<=", 0.1, "preference switch / one predict (batch 1, model size)"),
    "server_overhead": ("<=", 0.15, "HTTP /predict latency / direct call - 1 (batching off)"),
    "onnx_over_torch": (">=", 2.0, "ONNX Runtime speed-up over eager torch at batch 8"),
    "fma_fraction": (
        ">=",
        0.6,
        "served tree's GFLOP per CPU-second (wall-clock on a GPU) / the FP32 FMA peak",
    ),
    "fma_fraction_288x384": (">=", 0.6, "the same at 288x384, batch 8, fastest backend"),
    "request_overhead": ("<=", 0.15, "round trip / server model time - 1, binary reply (OIP)"),
    "request_overhead_json": ("<=", 0.30, "the same with a JSON-PNG reply"),
    "request_overhead_small": ("<=", 0.35, "the same, binary reply, at the model's input size"),
    "clients_over_model": (">=", 0.8, "server images/s at 16 clients / the model alone"),
}
#: case 4's variant of each served backend
SERVED_VARIANT = {
    "onnx": "onnx, folded",
    "torch-cl": "torch channels-last, folded",
    "torch": "torch eager, folded",
}
_OPS = {"<=": operator.le, ">=": operator.ge}


def fmt(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _goal(name: str, value: float | None, where: str, **extra: Any) -> dict[str, Any]:
    op, target, what = GOALS[name]
    met = None if value is None else bool(_OPS[op](value, target))
    return {
        "value": value,
        "goal": f"{op} {target:g}",
        "met": met,
        "what": what,
        "where": where,
        **extra,
    }


def _proportionality(res: Mapping[str, Any]) -> dict[str, Any]:
    by_c: dict[str, list[dict[str, Any]]] = {}
    for p in res["points"]:
        for row in p["rows"]:
            if row["kind"] == "arg-max":
                by_c.setdefault(f"{row['c']:g}", []).append(
                    {
                        "size": p["size"],
                        "batch": p["batch"],
                        "tree": row["tree"],
                        "flop_ratio": row["flop_ratio"],
                        "time_ratio": row["time_ratio"],
                        "value": row["proportionality"],
                        "cpu_value": row.get("cpu_proportionality"),
                    }
                )
    worst = max((v for vals in by_c.values() for v in vals), key=lambda v: v["value"])
    per_c = {c: max(vals, key=lambda v: v["value"]) for c, vals in by_c.items()}
    return _goal(
        "proportionality",
        worst["value"],
        f"{worst['tree']} at {worst['size']} batch {worst['batch']}",
        by_c={c: v["value"] for c, v in per_c.items()},
        cpu_time_by_c={
            c: max((v["cpu_value"] for v in vals if v["cpu_value"] is not None), default=None)
            for c, vals in by_c.items()
        },
        by_c_where={c: f"{v['tree']} at {v['size']} batch {v['batch']}" for c, v in per_c.items()},
        all_points=by_c,
    )


def _backend_point(res: Mapping[str, Any]) -> dict[str, Any]:
    points = res["points"]
    return next((p for p in points if p["batch"] == 8), points[-1])


def headline(report: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's headline ratios from this run, each with its goal and whether it is met."""
    ok = {k: v["result"] for k, v in report["cases"].items() if v["status"] == "ok"}
    h: dict[str, Any] = {}
    if "proportionality" in ok:
        h["proportionality"] = _proportionality(ok["proportionality"])
    if "switch" in ok:
        s = ok["switch"]["sizes"][0]
        h["switch_over_predict"] = _goal(
            "switch_over_predict",
            s["switch_over_predict"],
            f"{s['size']}, predict on {s['served_backend']}",
            parts=s["over_predict"],
        )
    if "server" in ok:
        run = ok["server"]["runs"][0]
        rows = {r["variant"]: r for r in run["sizes"][0]["rows"]}
        off = rows["http JSON-PNG, batching off"]
        h["server_overhead"] = _goal(
            "server_overhead",
            off["overhead"],
            f"{run['backend']} backend, {run['sizes'][0]['size']}, JSON-PNG, batching off",
            batching_on=rows["http JSON-PNG, batching on"]["overhead"],
            npz=rows["http npz, batching off"]["overhead"],
            server_side=off["server_overhead"],
        )
    if "backends" in ok:
        p = _backend_point(ok["backends"])
        rows = {r["backend"]: r for r in p["rows"]}
        where = f"{p['size']}, batch {p['batch']}"
        h["onnx_over_torch"] = _goal("onnx_over_torch", p.get("onnx_over_torch"), where)
        served = rows.get("onnx, folded") or rows["torch eager, folded"]
        h["fma_fraction"] = _goal(
            "fma_fraction",
            served.get("fraction_of_fma_peak_cpu_time") or served["fraction_of_fma_peak"],
            f"{served['backend']}, {where}",
            wall_clock=served["fraction_of_fma_peak"],
            gflop_per_s=served["gflop_per_s"],
            gflop_per_cpu_s=served.get("gflop_per_cpu_s"),
            of_matmul=served["fraction_of_matmul"],
            fma_peak_gflops=(report.get("peak") or {}).get("fma", {}).get("gflops"),
        )
    if "request_path" in ok:
        h.update(_request_path(ok["request_path"], ok.get("backends")))
    return h


def _request_path(res: Mapping[str, Any], backends: Mapping[str, Any] | None) -> dict[str, Any]:
    """Issue 15's items 2-4 from case 5c (and case 4 at 288x384, batch 8, when it ran)."""
    h: dict[str, Any] = {}
    first, small = res["overhead"][0], res["overhead"][-1]
    rows = {r["variant"]: r for r in first["rows"]}
    oip, small_oip = "OIP binary, this tree", {r["variant"]: r for r in small["rows"]}
    h["request_overhead"] = _goal(
        "request_overhead",
        rows[oip]["overhead"],
        f"{first['size']}, OIP binary, batching off",
        npz=rows["npz, this tree"]["overhead"],
        npz_npy_in=(rows.get("npz, NPY in, this tree") or {}).get("overhead"),
        server_side=rows[oip]["server_overhead"],
    )
    h["request_overhead_json"] = _goal(
        "request_overhead_json", rows["JSON-PNG, this tree"]["overhead"], f"{first['size']}"
    )
    h["request_overhead_small"] = _goal(
        "request_overhead_small",
        small_oip[oip]["overhead"],
        f"{small['size']}, OIP binary",
        npz=small_oip["npz, this tree"]["overhead"],
        npz_npy_in=(small_oip.get("npz, NPY in, this tree") or {}).get("overhead"),
    )
    if res.get("load"):
        load = res["load"][0]
        where = f"{load['size']}, {load['clients']} clients, {load['backend']}"
        h["clients_over_model"] = _goal("clients_over_model", load["ratio"], where)
    points = (backends or {}).get("points", [])
    point = next((p for p in points if (p["size"], p["batch"]) == ("288x384", 8)), None)
    rows4 = [r for r in point["rows"] if r["backend"] in SERVED_VARIANT.values()] if point else []
    if rows4:  # the fastest servable backend there (what auto would pick at that size)
        row = max(rows4, key=lambda r: r["gflop_per_s"])
        h["fma_fraction_288x384"] = _goal(
            "fma_fraction_288x384",
            row.get("fraction_of_fma_peak_cpu_time") or row["fraction_of_fma_peak"],
            f"{row['backend']}, 288x384, batch 8 (the fastest servable backend there)",
            wall_clock=row["fraction_of_fma_peak"],
        )
    return h


def summary_markdown(report: Mapping[str, Any], cases: Mapping[str, Any]) -> str:
    m, v, d = report["machine"], report["versions"], report["device"]
    ort = (v.get("onnxruntime") or {}).get("version", "not installed")
    peak = report.get("peak") or {}
    fma, mm = peak.get("fma") or {}, peak.get("matmul") or {}
    lines = [
        f"# dymu bench ({report['mode']})",
        "",
        f"Command: `{report.get('command') or 'run_bench(...)'}`  ",
        f"Model: `{report['model']['path']}` ({', '.join(report['model']['tasks'])}; input "
        f"{'x'.join(map(str, report['model']['input_size']))})  ",
        f"Machine: {m['cpu_model']}, {m['cores_available']} cores, {m.get('memory_gib')} GiB; "
        f"device {d['device']}{' (' + d['name'] + ')' if d.get('name') else ''}, "
        f"{d['torch_threads']} torch threads  ",
        f"Versions: torch {v['torch']}, onnxruntime {ort}, python {v['python']}, "
        f"commit {(v.get('git_commit') or '?')[:10]}  ",
        f"Load average (1/5/15 min): {m.get('loadavg')} at start, {m.get('loadavg_end')} at end; "
        f"wall time {report.get('wall_s')} s  ",
        f"FP32 FMA peak: {fmt(fma.get('gflops'), 1)} GFLOP/s = {fma.get('derivation')}; "
        f"measured {mm.get('n')}x{mm.get('n')} matmul: {fmt(mm.get('gflops'), 1)} GFLOP/s "
        f"({fmt(mm.get('gflops_per_cpu_s'), 1)} per CPU-second)",
        "",
        "All FLOPs: 1 multiply-add = 2 FLOPs. Ratios are medians of per-round ratios (variants "
        "alternate within each round).",
        "",
        "## Headline",
        "",
    ]
    rows = []
    for name, g in report.get("headline", {}).items():
        met = {True: "yes", False: "**no**", None: "n/a"}[g["met"]]
        rows.append([name, fmt(g["value"], 3), g["goal"], met, g["where"]])
    lines.append(table(["ratio", "value", "goal", "met", "where"], rows))
    prop = report.get("headline", {}).get("proportionality")
    if prop:
        lines.append(
            "Proportionality by c (worst point): "
            + ", ".join(f"c={c}: {val:.2f}" for c, val in prop["by_c"].items())
            + "; in CPU time: "
            + ", ".join(f"c={c}: {fmt(val)}" for c, val in prop.get("cpu_time_by_c", {}).items())
            + "\n"
        )
    for name, rec in report["cases"].items():
        lines += [f"## {rec['number']}. {rec['title']}", ""]
        lines.append(f"_{rec['wall_s']} s, load {rec['loadavg_start']} -> {rec['loadavg_end']}_\n")
        if rec["status"] == "ok":
            lines.append(cases[name].markdown(rec["result"]))
        else:
            lines.append(f"FAILED: `{rec['error']}`\n")
    return "\n".join(lines) + "\n"
