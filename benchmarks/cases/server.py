"""Case 5: the server end to end against the direct model call.

Two ``dymu serve`` processes per backend (real uvicorn, loopback, their own interpreters):
batching on (max batch 8, max wait 2 ms) and off (max batch 1). The benchmark process drives them
with ``service.client``; the direct call is the same preference's ``Runner.run`` built by the
service's own runtime (``LoadedModel.build_entry``) in this process, on the same decoded,
normalized image. Per round, in rotating order: direct call, JSON-with-PNG and npz responses
from each server. Then closed-loop load: 1/4/16 concurrent clients for a few seconds against
each server, alternating the two.

overhead = client latency / direct call - 1 (everything HTTP adds: upload, multipart parsing,
PNG decoding, queueing/batch wait, output encoding, download). The server's own view
(total - model time) is reported beside it.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dymu.preference import sample_preferences

from ..config import size_label
from ..registry import ROOT, Context, register_case
from ..report import fmt, table
from ..timing import interleave, paired_ratio, summarize
from .server_oip import oip_variant
from .switch import served_preference

BATCHING = {
    "on": {"DYMU_MAX_BATCH_SIZE": "8", "DYMU_MAX_WAIT_MS": "2"},
    "off": {"DYMU_MAX_BATCH_SIZE": "1", "DYMU_MAX_WAIT_MS": "0"},
}


#: ``dymu serve ARGS``: the subcommand itself, added to a bare parser so that it runs from a plain
#: checkout too (``dymu.cli`` finds subcommands through installed entry points).
SERVE = (
    "import argparse, sys; from service.cli import add_serve_command; "
    "p = argparse.ArgumentParser(prog='dymu'); add_serve_command(p.add_subparsers()); "
    "a = p.parse_args(['serve', *sys.argv[1:]]); sys.exit(a.func(a))"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``dymu serve`` in a subprocess on a free loopback port (the code of ``root``)."""

    def __init__(
        self, model_dir: Path, backend: str, device: str, env: dict[str, str], root: Path = ROOT
    ) -> None:
        self.port = free_port()
        self.env = env
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", SERVE, str(model_dir), "--port", str(self.port)]
        cmd += ["--backend", backend, "--device", device, "--log-level", "warning"]
        environ = {**os.environ, **env}
        # ``python -c`` imports from its working directory first: ``root``'s service/ and dymu/
        self.proc = subprocess.Popen(cmd, env=environ, cwd=root, stdout=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        from service.client import DymuClient

        deadline = time.monotonic() + timeout
        with DymuClient(self.url, timeout=10) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"dymu serve exited with {self.proc.returncode}")
                try:
                    state = client.ready()
                    if state.ready:
                        return
                    if state.status == "failed":
                        raise RuntimeError(f"dymu serve failed to load: {state.detail}")
                except httpx.TransportError:  # not listening yet
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.url} not ready after {timeout} s")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def image_png(hw: tuple[int, int]) -> bytes:
    from PIL import Image

    base = Image.open(ROOT / "service" / "example.png").convert("RGB")
    buf = io.BytesIO()
    base.resize((hw[1], hw[0]), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def wait_onnx(client: Any, pid: str, backend: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while backend == "onnx" and client.get_preference(pid).backends.get("onnx") != "ready":
        if time.monotonic() > deadline:
            raise TimeoutError("the server's ONNX session did not become ready")
        time.sleep(0.05)


def direct_runner(ctx: Context, backend: str, r: list[float], c: float) -> Any:
    """The service's own runtime in this process: the model call the server makes."""
    from service.metrics import Metrics
    from service.runtime import LoadedModel
    from service.settings import Settings

    settings = Settings(
        model_dir=ctx.model_dir,
        backend=backend,
        device=str(ctx.device),
        torch_threads=ctx.config.threads,
        onnx_threads=ctx.config.threads,
    )
    loaded = LoadedModel(ctx.model, settings, Metrics())
    entry = loaded.build_entry(*loaded.parse(r, c))
    runner = entry.runners[tuple(range(len(loaded.tasks)))]
    if backend == "onnx" and not runner.wait_onnx(timeout=300):
        raise RuntimeError(f"ONNX session failed: {runner.onnx_error}")
    return loaded, runner


def sequential(ctx: Context, backend: str, servers: dict, size: str) -> dict[str, Any]:
    from service.client import DymuClient
    from service.imaging import decode_image

    hw = ctx.hw(size)
    png = image_png(hw)
    r, c = served_preference(ctx.model.n_tasks)
    loaded, runner = direct_runner(ctx, backend, r, c)
    x = loaded.image_tensor(decode_image(png, 2048 * 2048))[None]
    variants: dict[str, Any] = {"direct": lambda: runner.run(x)}
    server_ms: dict[str, list[tuple[float, float, str]]] = {}
    clients = {}
    for mode, server in servers.items():
        client = clients[mode] = DymuClient(server.url, timeout=120)
        pid = client.create_preference(r, c).preference_id
        wait_onnx(client, pid, backend)
        for fmt_ in ("json", "npz"):
            key = f"http {'JSON-PNG' if fmt_ == 'json' else 'npz'}, batching {mode}"
            log = server_ms[key] = []

            def call(client=client, pid=pid, fmt_=fmt_, log=log) -> None:
                res = client.predict(png, preference_id=pid, format=fmt_, decode=False)
                log.append((res.metrics.total_ms, res.metrics.model_ms, res.metrics.backend))

            variants[key] = call
        key = f"http OIP binary, batching {mode}"  # raw pixels in, raw FP32 out (server_oip.py)
        variants[key] = oip_variant(server.url, png, pid, server_ms.setdefault(key, []))
    try:
        samples = interleave(variants, ctx.config.server_rounds, warmup=2)
    finally:
        for client in clients.values():
            client.close()
    rows = []
    for key, s in samples.items():
        row = {"variant": key, **summarize(s)}
        if key != "direct":
            logged = server_ms[key][-len(s) :]
            total = statistics.median(t for t, _, _ in logged)
            model = statistics.median(m for _, m, _ in logged)
            row.update(
                overhead=paired_ratio(s, samples["direct"]) - 1.0,
                server_total_ms=total,
                server_model_ms=model,
                server_overhead=total / model - 1.0 if model else None,
                backends=sorted({b for _, _, b in logged}),
            )
        rows.append(row)
    return {
        "size": size_label(hw),
        "rounds": ctx.config.server_rounds,
        "rows": rows,
        "samples_s": samples,
    }


async def _load(url: str, pid: str, png: bytes, clients: int, seconds: float) -> dict[str, Any]:
    from service.client import AsyncDymuClient

    async with AsyncDymuClient(url, timeout=120) as c:
        await asyncio.gather(
            *(c.predict(png, preference_id=pid, decode=False) for _ in range(clients))
        )
        latencies: list[float] = []
        batches: list[int] = []
        backends: set[str] = set()
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                res = await c.predict(png, preference_id=pid, decode=False)
                latencies.append(time.perf_counter() - t0)
                batches.append(res.metrics.batch_size)
                backends.add(res.metrics.backend)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    return {
        "clients": clients,
        "images": len(latencies),
        "wall_s": wall,
        "images_per_s": len(latencies) / wall,
        "mean_batch": float(np.mean(batches)),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "backends": sorted(backends),
        "latencies_s": latencies,
    }


def throughput(ctx: Context, backend: str, servers: dict, size: str) -> list[dict[str, Any]]:
    from service.client import DymuClient

    png = image_png(ctx.hw(size))
    r, c = served_preference(ctx.model.n_tasks)
    pids = {}
    for mode, server in servers.items():
        with DymuClient(server.url, timeout=120) as client:
            pids[mode] = client.create_preference(r, c).preference_id
            wait_onnx(client, pids[mode], backend)
    rows = []
    for clients in ctx.config.server_clients:
        for mode, server in servers.items():  # alternate on/off at each concurrency
            res = asyncio.run(
                _load(server.url, pids[mode], png, clients, ctx.config.server_seconds)
            )
            rows.append({"size": size_label(ctx.hw(size)), "batching": mode, **res})
    return rows


def preference_latency(ctx: Context, url: str, n_new: int) -> dict[str, Any]:
    """POST /preference: a new preference (computed) vs a cached one, over HTTP."""
    from service.client import DymuClient

    fresh = sample_preferences(ctx.model.n_tasks, n_new, ctx.config.seed + 1, c=0.5)
    r, c = served_preference(ctx.model.n_tasks)
    new, hit, compute = [], [], []
    with DymuClient(url, timeout=120) as client:
        client.create_preference(r, c)
        for r_new, c_new in fresh:
            t0 = time.perf_counter()
            rec = client.create_preference(r_new, c_new)
            new.append(time.perf_counter() - t0)
            compute.append(rec.compute_ms / 1e3)
            t0 = time.perf_counter()
            client.create_preference(r, c)
            hit.append(time.perf_counter() - t0)
    return {
        "new_client": summarize(new),
        "new_compute": summarize(compute),
        "hit_client": summarize(hit),
        "samples_s": {"new": new, "hit": hit, "compute": compute},
    }


def run(ctx: Context) -> dict[str, Any]:
    from service.backends import resolve_backend

    device = "cpu" if ctx.device.type == "cpu" else str(ctx.device)
    runs = []
    for name in ctx.config.server_backends:
        backend = resolve_backend(name)
        ctx.log(f"  server: starting 2 x dymu serve --backend {backend}")
        threads = (
            {}
            if ctx.config.threads is None
            else {
                "DYMU_TORCH_THREADS": str(ctx.config.threads),
                "DYMU_ONNX_THREADS": str(ctx.config.threads),
            }
        )
        servers = {
            mode: ServerProcess(ctx.model_dir, backend, device, {**env, **threads})
            for mode, env in BATCHING.items()
        }
        try:
            for server in servers.values():
                server.wait_ready()
            result: dict[str, Any] = {"backend": backend, "sizes": [], "throughput": []}
            result["preference"] = preference_latency(
                ctx, servers["on"].url, ctx.config.server_rounds
            )
            for size in ctx.config.server_sizes:
                ctx.log(f"  server {backend}: sequential and load at {size}")
                result["sizes"].append(sequential(ctx, backend, servers, size))
                result["throughput"] += throughput(ctx, backend, servers, size)
        finally:
            for server in servers.values():
                server.stop()
        runs.append(result)
    return {"runs": runs, "batching": BATCHING}


def markdown(result: dict[str, Any]) -> str:
    parts = []
    for run_ in result["runs"]:
        b = run_["backend"]
        p = run_["preference"]
        parts.append(
            f"**backend {b}**: POST /preference new {p['new_client']['median_ms']:.1f} ms "
            f"(compute {p['new_compute']['median_ms']:.1f} ms), cache hit "
            f"{p['hit_client']['median_ms']:.2f} ms (client side)\n"
        )
        for s in run_["sizes"]:
            parts.append(f"Sequential /predict at {s['size']} ({s['rounds']} rounds):\n")
            parts.append(
                table(
                    [
                        "variant",
                        "median ms",
                        "overhead vs direct",
                        "server total ms",
                        "server model ms",
                        "server overhead",
                    ],
                    [
                        [
                            r["variant"],
                            fmt(r["median_ms"]),
                            _pct(r.get("overhead")),
                            fmt(r.get("server_total_ms")),
                            fmt(r.get("server_model_ms")),
                            _pct(r.get("server_overhead")),
                        ]
                        for r in s["rows"]
                    ],
                )
            )
        parts.append(f"Throughput, {b} (closed loop, JSON-PNG responses):\n")
        parts.append(
            table(
                ["size", "clients", "batching", "images/s", "mean batch", "p50 ms", "p95 ms"],
                [
                    [
                        t["size"],
                        t["clients"],
                        t["batching"],
                        fmt(t["images_per_s"], 1),
                        fmt(t["mean_batch"]),
                        fmt(t["p50_ms"], 1),
                        fmt(t["p95_ms"], 1),
                    ]
                    for t in run_["throughput"]
                ],
            )
        )
    return "\n".join(parts)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:+.0f} %"


register_case("server", 5, "Server end to end vs the direct call", markdown)(run)
