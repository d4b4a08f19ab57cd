"""Case 5c: the request path at the speed of the model (issue 15, items 2 and 4).

**Overhead** (item 2): one ``dymu serve`` with batching off, one client sending sequential
requests; per request, client round trip / the server's own model time
(``X-Dymu-Model-Time-Ms``, or ``model_ms`` of an OIP reply) - 1, the median over rounds. The
variants alternate within each round: ``/predict`` with a PNG in and an npz reply, the same with
raw pixels in (an NPY file: no PNG decode), the same with JSON-PNG, and the Open Inference
Protocol with raw pixels in and binary FP32 out. The client is
:mod:`benchmarks.lean_http` (bodies encoded once, one keep-alive connection, stdlib
``http.client``); the npz variant is also sent through ``service.client`` (httpx), to show
what a general-purpose client adds. With ``DYMU_BENCH_BASELINE=<source tree>`` (a checkout or
``git archive`` holding ``service/`` and ``dymu/``) a second server runs that tree's code and
its variants join the same rounds: before and after in one run.

**16 clients vs the model alone** (item 4): a server with batching on (max batch 8, wait 2 ms)
under ``request_clients`` closed-loop clients on one asyncio loop (lean raw HTTP/1.1, OIP binary
requests and replies) for ``request_seconds``; then, in this process, the same tree on the same
backend with the same threads (the service's own ``Runner``) at the batch size the server formed
(images / batches, rounded) for as long. Ratio = server images/s / model-alone images/s, paired
per round. The clients run in this process on the same cores (not pinned: docs/benchmarks.md,
"Issue 15, item 4"). On a multi-core CPU run a third server joins the rounds: one inference
worker per core with one intra-op thread each (``WORKERS``), against the model alone (the run's
threads) at the batch that server formed.
"""

from __future__ import annotations

import asyncio
import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import size_label
from ..lean_http import Call, Sync, closed_loop, form_call, oip_call, server_times
from ..registry import Context, register_case
from ..report import fmt, table
from ..timing import interleave, paired_ratio, summarize
from .server import BATCHING, ServerProcess, direct_runner, image_png, wait_onnx
from .switch import served_preference

BASELINE_ENV = "DYMU_BENCH_BASELINE"
#: Item 4's second server on a multi-core CPU run: one inference worker per core, each with one
#: intra-op thread (batches in flight side by side instead of one batch on every core).
WORKERS = "this tree, 1 thread per worker"
FORMATS = ("npz", "JSON-PNG", "OIP binary")
#: Raw pixels in (an NPY file), npz out: /predict with no PNG to decode. Only this tree's server
#: has it (a baseline tree may predate NPY images).
RAW = "npz, NPY in"


def _threads_env(ctx: Context) -> dict[str, str]:
    t = ctx.config.threads
    return {} if t is None else {"DYMU_TORCH_THREADS": str(t), "DYMU_ONNX_THREADS": str(t)}


def _prepare(server: ServerProcess, backend: str, r: list[float], c: float) -> dict[str, str]:
    """The served preference's id, the model's name and the backend the server chose."""
    from service.client import DymuClient

    with DymuClient(server.url, timeout=120) as client:
        pid = client.create_preference(r, c).preference_id
        wait_onnx(client, pid, backend)
        info = client.model()
    return {"pid": pid, "model": str(info.name), "backend": info.backend}


def _rgb(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _calls(png: bytes, rgb: np.ndarray, served: dict[str, str], raw: bool) -> dict[str, Call]:
    pid = served["pid"]
    calls = {
        "npz": form_call(png, {"preference_id": pid, "format": "npz"}),
        "JSON-PNG": form_call(png, {"preference_id": pid, "format": "json"}),
        "OIP binary": oip_call(served["model"], rgb, pid),
    }
    if raw:
        buf = io.BytesIO()
        np.save(buf, rgb, allow_pickle=False)
        fields = {"preference_id": pid, "format": "npz"}
        calls[RAW] = form_call(buf.getvalue(), fields, "application/octet-stream")
    return calls


def overhead(ctx: Context, backend: str, servers: dict[str, ServerProcess], size: str) -> dict:
    from service.client import DymuClient

    hw = ctx.hw(size)
    png = image_png(hw)
    rgb = _rgb(png)
    r, c = served_preference(ctx.model.n_tasks)
    variants: dict[str, Any] = {}
    logs: dict[str, list[tuple[float, float, int]]] = {}
    closers: list[Any] = []
    backends: dict[str, str] = {}
    for label, server in servers.items():
        served = _prepare(server, backend, r, c)
        backends[label] = served["backend"]
        conn = Sync("127.0.0.1", server.port)
        closers.append(conn)
        for name, call in _calls(png, rgb, served, raw=label == "this tree").items():
            log = logs[f"{name}, {label}"] = []

            def send(conn: Sync = conn, call: Call = call, log: list = log) -> None:
                log.append(server_times(*conn.send(call)))

            variants[f"{name}, {label}"] = send
        if label == "this tree":
            client = DymuClient(server.url, timeout=120)
            closers.append(client)
            log = logs["npz via httpx (service.client), this tree"] = []

            def via_httpx(client: Any = client, pid: str = served["pid"], log: list = log) -> None:
                res = client.predict(png, preference_id=pid, format="npz", decode=False)
                m = res.metrics
                log.append((m.model_ms, m.total_ms, m.batch_size))

            variants["npz via httpx (service.client), this tree"] = via_httpx
    try:
        samples = interleave(variants, ctx.config.request_rounds, warmup=2)
    finally:
        for closer in closers:
            closer.close()
    rows = [_overhead_row(key, s, logs[key][-len(s) :]) for key, s in samples.items()]
    out: dict[str, Any] = {"size": size_label(hw), "served_backends": backends, "rows": rows}
    out["samples_s"] = samples
    if "baseline" in servers:  # round trip after / before, paired per round
        out["after_over_before"] = {
            f: paired_ratio(samples[f"{f}, this tree"], samples[f"{f}, baseline"])
            for f in FORMATS
        }
    return out


def _overhead_row(key: str, s: list[float], logged: list[tuple[float, float, int]]) -> dict:
    model = [m for m, _, _ in logged]
    return {
        "variant": key,
        **summarize(s),
        "overhead": statistics.median(rt * 1e3 / m - 1.0 for rt, m in zip(s, model)),
        "server_overhead": statistics.median(t / m - 1.0 for m, t, _ in logged),
        "server_model_ms": statistics.median(model),
        "server_total_ms": statistics.median(t for _, t, _ in logged),
    }


def against_model(ctx: Context, backend: str, servers: dict[str, ServerProcess], size: str) -> dict:
    """Item 4: server images/s under concurrent clients vs the model alone at its batch."""
    hw = ctx.hw(size)
    rgb = _rgb(image_png(hw))
    r, c = served_preference(ctx.model.n_tasks)
    served = {label: _prepare(server, backend, r, c) for label, server in servers.items()}
    mine = served["this tree"]
    loaded, runner = direct_runner(ctx, mine["backend"], r, c)
    x1 = loaded.image_tensor(rgb)
    cfg = ctx.config
    rounds = []
    for _ in range(cfg.request_load_rounds):
        seen, busy = {}, {}
        for label, server in servers.items():
            call = oip_call(served[label]["model"], rgb, served[label]["pid"])
            clients, seconds = cfg.request_clients, cfg.request_seconds
            before = _model_seconds(server)
            seen[label] = asyncio.run(closed_loop("127.0.0.1", server.port, call, clients, seconds))
            busy[label] = (_model_seconds(server) - before) / seen[label].wall_s
        res = seen["this tree"]
        per_batch = _mean_batch(res)
        batch = max(1, round(per_batch))
        alone = _model_alone(runner, x1[None].repeat(batch, 1, 1, 1), cfg.request_seconds)
        model_ips = batch / statistics.median(alone)
        rd = {
            "server_images_per_s": res.images_per_s,
            "images": len(res.latencies_s),
            "mean_batch": per_batch,
            "mean_batch_per_image": float(np.mean(res.batches)),
            "batch": batch,
            "model_images_per_s": model_ips,
            "ratio": res.images_per_s / model_ips,
            "model_busy": busy["this tree"],
            "p50_ms": float(np.percentile(res.latencies_s, 50) * 1e3),
            "p95_ms": float(np.percentile(res.latencies_s, 95) * 1e3),
            "model_samples_s": alone,
        }
        if "baseline" in seen:
            rd["baseline_images_per_s"] = seen["baseline"].images_per_s
            rd["baseline_ratio"] = seen["baseline"].images_per_s / model_ips
            rd["baseline_model_busy"] = busy["baseline"]
        if WORKERS in seen:  # against the model alone at the batch that server formed
            wb = max(1, round(_mean_batch(seen[WORKERS])))
            w_alone = alone if wb == batch else _model_alone(
                runner, x1[None].repeat(wb, 1, 1, 1), cfg.request_seconds
            )  # fmt: skip
            rd["workers_images_per_s"] = seen[WORKERS].images_per_s
            rd["workers_batch"] = wb
            rd["workers_ratio"] = seen[WORKERS].images_per_s / (wb / statistics.median(w_alone))
        rounds.append(rd)
    out = {
        "size": size_label(hw),
        "clients": cfg.request_clients,
        "seconds": cfg.request_seconds,
        "backend": mine["backend"],
        "served_backends": {label: s["backend"] for label, s in served.items()},
        "threads": cfg.threads,
        "ratio": statistics.median(rd["ratio"] for rd in rounds),
        "rounds": rounds,
    }
    if "baseline" in servers:
        out["baseline_ratio"] = statistics.median(rd["baseline_ratio"] for rd in rounds)
    if WORKERS in servers:
        out["workers"] = servers[WORKERS].env.get("DYMU_INFERENCE_WORKERS")
        out["workers_ratio"] = statistics.median(rd["workers_ratio"] for rd in rounds)
    return out


def _model_seconds(server: ServerProcess) -> float:
    """The server's model time so far: the sum of its ``dymu_model_inference_seconds``. Over a
    load window, its growth / the window is how busy the model kept its inference thread."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "dymu_model_inference_seconds"
        for sample in family.samples
        if sample.name.endswith("_sum")
    )


def _mean_batch(res: Any) -> float:
    """The server's mean batch, per batch (each image reports the size of its batch)."""
    return len(res.batches) / sum(1.0 / b for b in res.batches)


def _model_alone(runner: Any, x: Any, seconds: float) -> list[float]:
    """Seconds per ``runner.run(x)`` (the whole call: forward and outputs as arrays)."""
    runner.run(x)
    times: list[float] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(times) < 3:
        t0 = time.perf_counter()
        runner.run(x)
        times.append(time.perf_counter() - t0)
    return times


def _servers(ctx: Context, backend: str, batching: str) -> dict[str, ServerProcess]:
    device = "cpu" if ctx.device.type == "cpu" else str(ctx.device)
    env = {**BATCHING[batching], **_threads_env(ctx)}
    model_dir = Path(ctx.model_dir).resolve()
    roots: dict[str, tuple[Path | None, dict[str, str]]] = {"this tree": (None, env)}
    baseline = os.environ.get(BASELINE_ENV)
    if baseline:
        roots["baseline"] = (Path(baseline), env)
    cores = ctx.config.threads or len(os.sched_getaffinity(0))
    if batching == "on" and device == "cpu" and cores > 1:  # one worker per core instead
        one = {"DYMU_TORCH_THREADS": "1", "DYMU_ONNX_THREADS": "1"}
        roots[WORKERS] = (None, {**env, **one, "DYMU_INFERENCE_WORKERS": str(cores)})
    servers = {}
    try:
        for label, (root, env_) in roots.items():  # one at a time: auto measures at warm-up
            kw = {} if root is None else {"root": root}
            servers[label] = ServerProcess(model_dir, backend, device, env_, **kw)
            servers[label].wait_ready()
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def run(ctx: Context) -> dict[str, Any]:
    from service.backends import resolve_backend

    backend = resolve_backend(ctx.config.server_backends[0])
    out: dict[str, Any] = {"backend": backend, "threads": ctx.config.threads, "overhead": []}
    out["baseline"] = os.environ.get(BASELINE_ENV)
    servers = _servers(ctx, backend, "off")
    try:
        for size in ctx.config.request_sizes:
            ctx.log(f"  request path: overhead at {size}")
            out["overhead"].append(overhead(ctx, backend, servers, size))
    finally:
        for server in servers.values():
            server.stop()
    servers = _servers(ctx, backend, "on")
    try:
        out["load"] = []
        for size in ctx.config.request_load_sizes:
            ctx.log(f"  request path: {ctx.config.request_clients} clients vs the model at {size}")
            out["load"].append(against_model(ctx, backend, servers, size))
    finally:
        for server in servers.values():
            server.stop()
    return out


def markdown(result: dict[str, Any]) -> str:
    parts = [
        f"Backend `{result['backend']}`, threads {result['threads']}; overhead = client round "
        "trip / the server's model time - 1 (median of per-request ratios); server's own = its "
        "total time / model time - 1.\n"
    ]
    for o in result["overhead"]:
        served = ", ".join(f"{k}: {v}" for k, v in o["served_backends"].items())
        parts.append(f"Sequential, batching off, {o['size']} (served backend: {served}):\n")
        heads = ["variant", "round trip ms", "server model ms", "overhead", "server's own"]
        rows = [
            [
                r["variant"],
                fmt(r["median_ms"]),
                fmt(r["server_model_ms"]),
                _pct(r["overhead"]),
                _pct(r["server_overhead"]),
            ]
            for r in o["rows"]
        ]
        parts.append(table(heads, rows))
        if "after_over_before" in o:
            ratios = ", ".join(f"{k} {v:.2f}x" for k, v in o["after_over_before"].items())
            parts.append(f"Round trip, this tree / baseline (paired per round): {ratios}\n")
    for ld in result.get("load", []):
        parts.append(
            f"{ld['clients']} clients (OIP binary), batching on, {ld['size']}, backend "
            f"{ld['backend']}: server / model alone = **{ld['ratio']:.2f}** (median of rounds)"
            + (f"; baseline {ld['baseline_ratio']:.2f}" if "baseline_ratio" in ld else "")
            + (
                f"; {ld['workers']} workers of 1 thread each: {ld['workers_ratio']:.2f} (against "
                "the model alone at the batch that server formed)"
                if "workers_ratio" in ld
                else ""
            )
            + "\n"
        )
        heads = ["server img/s", "mean batch", "model alone img/s at batch", "ratio", "p50 ms"]
        heads += ["model busy", "baseline: img/s, ratio, model busy"]
        rows = [
            [
                fmt(rd["server_images_per_s"], 1),
                fmt(rd["mean_batch"]),
                f"{fmt(rd['model_images_per_s'], 1)} at {rd['batch']}",
                fmt(rd["ratio"]),
                fmt(rd["p50_ms"], 1),
                _share(rd.get("model_busy")),
                _baseline_load(rd),
            ]
            for rd in ld["rounds"]
        ]
        parts.append(table(heads, rows))
    return "\n".join(parts)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:+.0f} %"


def _share(x: float | None) -> str:
    return "" if x is None else f"{x * 100:.0f} %"


def _baseline_load(rd: dict[str, Any]) -> str:
    if "baseline_images_per_s" not in rd:
        return ""
    busy = _share(rd.get("baseline_model_busy"))
    return f"{fmt(rd['baseline_images_per_s'], 1)}, {fmt(rd['baseline_ratio'])}, {busy}"


register_case("request_path", 5, "Request path: overhead and 16 clients vs the model", markdown)(
    run
)
