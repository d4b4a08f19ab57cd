"""Case 5b: the server under overload, degrading (``DYMU_OVERLOAD=degrade``) vs refusing.

``overload_clients`` (64) closed-loop clients for ``overload_seconds`` against ``dymu serve``
(real uvicorn, loopback, its own interpreter), with a queue of ``overload_queue`` images, a
request timeout of ``overload_timeout_s`` and the settings of :data:`SERVER_ENV`. Every
request asks for uniform r at c = 0 and allows degrading (the ``X-Dymu-Allow-Degrade`` header
and the body field); the server decides. Off, it queues and refuses as ever (a refused client
waits its Retry-After, as a well-behaved client does); on, past the queue threshold it runs
c = ``DYMU_DEGRADE_C`` (1). Two models: the one under test (``--model``, the shipped one by
default) and one of the same configuration whose controller makes c move compute
(benchmarks/frugal.py; its FLOPs(c = 1) / FLOPs(c = 0) is recorded). Off and on alternate.

Reported per run: requests served within the request timeout, 503s (and the clients' p50 and
p95 latency of them: a full server answers before it reads the body; and the p50 that one more
lean client in its own process sees, a request every 50 ms), 5xx, p95 latency of the
served ones, mean FLOPs per served request, and how many ran degraded.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..frugal import save_frugal
from ..lean_http import ProbeProcess, form_call
from ..registry import Context, register_case
from ..report import fmt, table
from .server import ServerProcess, image_png

MODES = {
    "off": {},
    "on": {"DYMU_OVERLOAD": "degrade", "DYMU_DEGRADE_C": "1"},
    # the control: admitted past the limit as "on" is, but degraded to c = 0 (the same tree)
    "on, c=0": {"DYMU_OVERLOAD": "degrade", "DYMU_DEGRADE_C": "0"},
}
#: Both modes: batching off and one intra-op thread (the fastest closed-loop setting on 2 CPU
#: cores, case 5; the load generator needs the other core), degrade past 4 images waiting.
#: The lean probe (benchmarks.lean_http.ProbeProcess): one more client, in its own process, on a
#: new connection every 50 ms, so that the 503's latency is the server's and not the load's
#: client loop's.
PROBE_INTERVAL_S = 0.05
PROBE_FIELDS = {"r": "1,1,1", "c": "0", "format": "npz"}
SERVER_ENV = {
    "DYMU_MAX_BATCH_SIZE": "1",
    "DYMU_MAX_WAIT_MS": "0",
    "DYMU_CACHE_MAX_ENTRIES": "8",
    "DYMU_DEGRADE_QUEUE_DEPTH": "4",
}


async def _drive(url: str, png: bytes, clients: int, seconds: float, timeout: float) -> dict:
    import httpx

    served: list[tuple[float, int, bool]] = []  # (latency s, FLOPs, degraded)
    refused: list[float] = []  # latency of each 503, s (issue 15: p50 <= 20 ms)
    codes: dict[str, int] = {}
    stop = time.perf_counter() + seconds
    headers = {"X-Dymu-Allow-Degrade": "1"}
    data = {"r": "1,1,1", "c": "0", "format": "npz", "allow_degrade": "true"}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async with httpx.AsyncClient(base_url=url, timeout=timeout + 10, limits=limits) as http:

        async def worker() -> None:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                files = {"image": ("x.png", png, "image/png")}
                try:
                    res = await http.post("/predict", files=files, data=data, headers=headers)
                except httpx.HTTPError as exc:
                    codes[type(exc).__name__] = codes.get(type(exc).__name__, 0) + 1
                    continue
                dt = time.perf_counter() - t0
                key = str(res.status_code)
                codes[key] = codes.get(key, 0) + 1
                if res.status_code == 200 and dt <= timeout:
                    flops = int(res.headers["x-dymu-flops"])
                    served.append((dt, flops, res.headers.get("x-dymu-degraded") == "1"))
                elif res.status_code == 503:
                    refused.append(dt)
                    await asyncio.sleep(float(res.headers.get("retry-after", "1")))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.array([s[0] for s in served]) * 1e3 if served else np.array([np.nan])
    return {
        "served_in_time": len(served),
        "wall_s": wall,
        "served_per_s": len(served) / wall,
        "status_counts": codes,
        "http_503": codes.get("503", 0),
        "http_5xx": sum(n for k, n in codes.items() if k.isdigit() and k.startswith("5")),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "mean_gflops": float(np.mean([s[1] for s in served]) / 1e9) if served else None,
        "degraded": sum(1 for s in served if s[2]),
        "p50_503_ms": float(np.percentile(refused, 50) * 1e3) if refused else None,
        "p95_503_ms": float(np.percentile(refused, 95) * 1e3) if refused else None,
    }


def _probe_summary(seen: list[tuple[int, float]]) -> dict[str, Any]:
    refused = [dt for status, dt in seen if status == 503]
    return {
        "probe_requests": len(seen),
        "probe_503": len(refused),
        "probe_p50_503_ms": float(np.percentile(refused, 50) * 1e3) if refused else None,
    }


def _measure(ctx: Context, label: str, model_dir: Path, device: str) -> list[dict[str, Any]]:
    cfg = ctx.config
    env = {**SERVER_ENV, "DYMU_MAX_QUEUE": str(cfg.overload_queue),
           "DYMU_REQUEST_TIMEOUT_S": str(cfg.overload_timeout_s)}  # fmt: skip
    env["DYMU_TORCH_THREADS"] = str(cfg.threads or 1)
    png = image_png(ctx.hw("model"))
    rows = []
    for mode, extra in MODES.items():
        ctx.log(f"  overload: {label}, degrade {mode}, {cfg.overload_clients} clients")
        server = ServerProcess(model_dir, "torch", device, {**env, **extra})
        try:
            server.wait_ready()
            probe = ProbeProcess(
                "127.0.0.1", server.port, form_call(png, PROBE_FIELDS), cfg.overload_seconds,
                PROBE_INTERVAL_S,
            ).start()  # fmt: skip
            res = asyncio.run(
                _drive(
                    server.url, png, cfg.overload_clients, cfg.overload_seconds,
                    cfg.overload_timeout_s,
                )
            )  # fmt: skip
            res.update(_probe_summary(probe.result()))
        finally:
            server.stop()
        rows.append({"model": label, "degrade": mode, **res})
    return rows


def run(ctx: Context) -> dict[str, Any]:
    device = "cpu" if ctx.device.type == "cpu" else str(ctx.device)
    cfg = ctx.config
    with tempfile.TemporaryDirectory(prefix="dymu-frugal-") as tmp:
        frugal_dir, ratio = save_frugal(ctx.model.config, Path(tmp) / "frugal", cfg.seed)
        ctx.log(f"  overload: frugal model FLOPs(c=1)/FLOPs(c=0) = {ratio:.3f}")
        runs = _measure(ctx, "shipped", ctx.model_dir, device)
        runs += _measure(ctx, "frugal", frugal_dir, device)
    gains = {}
    for label in ("shipped", "frugal"):
        row = {r["degrade"]: r["served_in_time"] for r in runs if r["model"] == label}
        gains[label] = {
            "on / off": row["on"] / row["off"] if row["off"] else None,
            "on / (on, c=0)": row["on"] / row["on, c=0"] if row["on, c=0"] else None,
        }
    return {
        "clients": cfg.overload_clients,
        "seconds": cfg.overload_seconds,
        "request_timeout_s": cfg.overload_timeout_s,
        "max_queue": cfg.overload_queue,
        "degrade_c": 1.0,
        "server_env": SERVER_ENV,
        "frugal_c_ratio": ratio,
        "served_gain": gains,
        "runs": runs,
    }


def markdown(result: dict[str, Any]) -> str:
    head = (
        f"{result['clients']} closed-loop clients for {result['seconds']:g} s, queue "
        f"{result['max_queue']}, request timeout {result['request_timeout_s']:g} s, "
        f"{result.get('server_env', {})}; every "
        f"request r uniform at c = 0 and allowing degrade; degrade on runs c = "
        f"{result['degrade_c']:g}. Frugal model: FLOPs(c = 1) / FLOPs(c = 0) = "
        f"{result['frugal_c_ratio']:.3f}.\n"
    )
    rows = [
        [
            r["model"], r["degrade"], r["served_in_time"], fmt(r["served_per_s"], 1),
            r["http_503"], fmt(r.get("p50_503_ms"), 1), fmt(r.get("probe_p50_503_ms"), 1),
            r["http_5xx"], fmt(r["p95_ms"], 1),
            fmt(r["mean_gflops"], 4) if r["mean_gflops"] is not None else "",
            r["degraded"],
        ]
        for r in result["runs"]
    ]  # fmt: skip
    gains = "; ".join(
        f"{k}: " + ", ".join(f"{n} {v:.2f}x" for n, v in g.items() if v is not None)
        for k, g in result["served_gain"].items()
    )
    cols = ["model", "degrade", "served in time", "per s", "503", "503 p50 ms",
            "503 p50 ms, lean probe", "5xx", "p95 ms", "mean GFLOPs", "degraded"]  # fmt: skip
    return head + "\n" + table(cols, rows) + f"\nServed in time: {gains}\n"


register_case("overload", 5, "Server under overload: degrade vs refuse", markdown)(run)
