"""Service benchmark: preference latency, /predict overhead, torch vs ONNX, batching throughput.

Starts `dymu serve` as a separate process per configuration (so the load generator does not
share the server's interpreter) and drives it over HTTP with service.client:

  * POST /preference of a new preference (computed) and of a cached one (cache hit);
  * sequential /predict: client latency, the server's total time and model time
    (total - model = the server's overhead: parsing, decoding, queueing, encoding);
  * 16 concurrent clients for a few seconds, batching on (max batch 8, max wait 2 ms) and off
    (max batch 1): images/s, mean batch size, latency percentiles.

    python benchmarks/service_bench.py                          # model_store/scenes-small
    python benchmarks/service_bench.py --sizes 96x128 288x384 --backends torch onnx --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.client import AsyncDymuClient, DymuClient  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, backend: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {**os.environ, "DYMU_LOG_LEVEL": "warning", **env}
        cmd = [sys.executable, "-m", "dymu.cli", "serve", model, "--port", str(self.port)]
        cmd += ["--backend", backend, "--device", "cpu"]
        self.proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.DEVNULL)
        with DymuClient(self.url) as c:
            c.wait_ready(timeout=300)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def image_png(hw: tuple[int, int]) -> bytes:
    base = Image.open(ROOT / "service" / "example.png").convert("RGB")
    buf = io.BytesIO()
    base.resize((hw[1], hw[0]), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1e3, 2)


def preference_latency(url: str, n: int) -> dict:
    rng = random.Random(0)
    with DymuClient(url) as c:
        new, new_server = [], []
        for _ in range(n):
            r, cc = [rng.random() + 0.01 for _ in range(3)], round(rng.random(), 3)
            t0 = time.perf_counter()
            rec = c.create_preference(r, cc)
            new.append(time.perf_counter() - t0)
            new_server.append(rec.compute_ms / 1e3)
            assert not rec.cached
        hit, hit_server = [], []
        for _ in range(max(n, 100)):
            t0 = time.perf_counter()
            rec = c.create_preference([0.6, 0.3, 0.1], 0.5)
            hit.append(time.perf_counter() - t0)
            hit_server.append(rec.elapsed_ms / 1e3)
    return {
        "new_ms_client": ms(new),
        "new_ms_compute": ms(new_server),
        "hit_ms_client": ms(hit[5:]),
        "hit_ms_server": ms(hit_server[5:]),
    }


def wait_backend(c: DymuClient, pid: str, backend: str) -> None:
    if backend != "onnx":
        return
    deadline = time.monotonic() + 120
    while c.get_preference(pid).backends["onnx"] != "ready":
        if time.monotonic() > deadline:
            raise TimeoutError("ONNX session not ready")
        time.sleep(0.05)


def sequential(url: str, hw: tuple[int, int], repeats: int, backend: str) -> dict:
    img = image_png(hw)
    with DymuClient(url) as c:
        pid = c.create_preference([0.6, 0.3, 0.1], 0.5).preference_id
        wait_backend(c, pid, backend)
        for _ in range(5):
            c.predict(img, preference_id=pid)
        client, total, model, queue = [], [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = c.predict(img, preference_id=pid, decode=False)
            client.append(time.perf_counter() - t0)
            total.append(res.metrics.total_ms / 1e3)
            model.append(res.metrics.model_ms / 1e3)
            queue.append(res.metrics.queue_ms / 1e3)
            assert res.metrics.backend == backend, res.metrics.backend
        npz = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            c.predict(img, preference_id=pid, format="npz")
            npz.append(time.perf_counter() - t0)
    return {
        "client_ms": ms(client),
        "total_ms": ms(total),
        "model_ms": ms(model),
        "queue_ms": ms(queue),
        "overhead_ms": round(ms(total) - ms(model), 2),
        "client_npz_ms": ms(npz),
        "gflops": res.metrics.gflops,
    }


async def _throughput(url: str, hw: tuple[int, int], clients: int, seconds: float, backend):
    with DymuClient(url) as sync:  # the ONNX session of the preference first
        wait_backend(sync, sync.create_preference([0.6, 0.3, 0.1], 0.5).preference_id, backend)
    img = image_png(hw)
    async with AsyncDymuClient(url, timeout=120) as c:
        pid = (await c.create_preference([0.6, 0.3, 0.1], 0.5)).preference_id
        await asyncio.gather(*(c.predict(img, preference_id=pid) for _ in range(clients)))
        latencies, batches, models, backends = [], [], [], set()
        stop = time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                res = await c.predict(img, preference_id=pid, decode=False)
                latencies.append(time.perf_counter() - t0)
                batches.append(res.metrics.batch_size)
                models.append(res.metrics.model_ms)
                backends.add(res.metrics.backend)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    return {
        "images_per_s": round(len(latencies) / wall, 1),
        "mean_batch": round(float(np.mean(batches)), 2),
        "model_ms_per_batch": round(float(np.median(models)), 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "backends": sorted(backends),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="model_store/scenes-small")
    p.add_argument("--sizes", nargs="+", default=["96x128", "288x384"])
    p.add_argument("--backends", nargs="+", default=["torch", "onnx"])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    results: dict = {"model": args.model, "clients": args.clients, "runs": {}}
    for backend in args.backends:
        run: dict = {}
        server = Server(args.model, backend, DYMU_MAX_BATCH_SIZE="8", DYMU_MAX_WAIT_MS="2")
        try:
            run["preference"] = preference_latency(server.url, 30)
            print(backend, "preference", run["preference"], flush=True)
            for hw in sizes:
                key = f"{hw[0]}x{hw[1]}"
                run[key] = {"sequential": sequential(server.url, hw, args.repeats, backend)}
                run[key]["batching_on"] = asyncio.run(
                    _throughput(server.url, hw, args.clients, args.seconds, backend)
                )
                print(backend, key, run[key], flush=True)
        finally:
            server.stop()
        server = Server(args.model, backend, DYMU_MAX_BATCH_SIZE="1", DYMU_MAX_WAIT_MS="0")
        try:
            for hw in sizes:
                key = f"{hw[0]}x{hw[1]}"
                run[key]["batching_off"] = asyncio.run(
                    _throughput(server.url, hw, args.clients, args.seconds, backend)
                )
                print(backend, key, "batching off", run[key]["batching_off"], flush=True)
        finally:
            server.stop()
        results["runs"][backend] = run
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
