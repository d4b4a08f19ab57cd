"""Scale-out measurements quoted in docs/scale.md.

* Ray Serve: throughput of 1 vs 2 replicas of the dymu app at 16 concurrent HTTP clients on
  loopback (a local Ray with ``--cpus`` CPUs; 4 preferences, a 96x128 PNG per request).
* torchrun: stage-0 (anchor) step time of a single process vs ``--nproc`` DDP processes (gloo on
  CPU) with the same global batch, from the timestamps of train_log.csv.

``python benchmarks/scale_bench.py [--model-dir model_store/scenes-small] [--cpus 2]
[--requests 320] [--config scenes-small] [--anchor-steps 40] [--what ray,torchrun]``
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PREFERENCES = [("0.6,0.3,0.1", "0.5"), ("0.1,0.8,0.1", "0.2"), ("0.2,0.2,0.6", "0.9"),
               ("1,1,1", "0")]  # fmt: skip


def _png(hw: tuple[int, int], seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


async def _drive(url: str, clients: int, requests: int, hw: tuple[int, int]) -> dict:
    import httpx

    images = [_png(hw, k) for k in range(8)]
    queue = list(range(requests))
    latencies, statuses, hits = [], [], 0

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal hits
        while queue:
            k = queue.pop()
            r, c = PREFERENCES[k % len(PREFERENCES)]
            t0 = time.perf_counter()
            resp = await client.post(
                "/predict", files={"image": images[k % 8]}, data={"r": r, "c": c}
            )
            latencies.append(time.perf_counter() - t0)
            statuses.append(resp.status_code)
            hits += resp.headers.get("x-dymu-cache") == "hit"

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "requests": requests,
        "ok": statuses.count(200),
        "wall_s": round(wall, 2),
        "throughput_rps": round(requests / wall, 1),
        "p50_ms": round(1e3 * statistics.median(lat), 1),
        "p95_ms": round(1e3 * lat[int(0.95 * (len(lat) - 1))], 1),
        "cache_hits": hits,
    }


def bench_ray(model_dir: Path, cpus: int, requests: int, clients: int) -> list[dict]:
    import ray
    from ray import serve

    from dymu.store import read_manifest, resolve
    from service.ray_app import build_app
    from service.settings import Settings

    hw = tuple(read_manifest(resolve(model_dir), verify=False)["input_size"])
    rows = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        for replicas in (1, 2):
            settings = Settings(model_dir=model_dir, backend="torch", max_queue=64)
            serve.run(build_app(settings, replicas), name="dymu", route_prefix="/")
            asyncio.run(_drive(url, clients, 4 * clients, hw))  # warm: every preference cached
            result = asyncio.run(_drive(url, clients, requests, hw))
            rows.append({"engine": "ray", "replicas": replicas, "cpus": cpus,
                         "clients": clients, **result})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            serve.delete("dymu")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def _anchor_step_s(log: Path) -> float:
    """Seconds per anchor step between the first and the last logged step (the first logged
    step, with its warm-up, is the origin)."""
    with open(log) as f:
        rows = [r for r in csv.DictReader(f) if r["stage"] == "anchor"]
    (s0, t0), (s1, t1) = ((int(r["step"]), float(r["time"])) for r in (rows[0], rows[-1]))
    return (t1 - t0) / (s1 - s0)


def bench_torchrun(config: str, nprocs: list[int], anchor_steps: int, threads: int) -> list[dict]:
    """Stage 0 only, stopped by --max-steps (checkpoint, no artifact), one run per P.

    Every process gets ``threads`` intra-op threads (OMP_NUM_THREADS; torchrun sets 1 for P > 1),
    so that P = 1 is not measured with a different thread count than P > 1."""
    from training.config import load_config

    cfg = load_config(config)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="dymu-ddp-"))
    try:
        for p in nprocs:
            run_dir = tmp / f"run{p}"
            cmd = [
                sys.executable,
                "-m",
                "dymu.cli",
                "train",
                config,
                "--stages",
                "anchor",
                "--max-steps",
                str(anchor_steps),
                "--run-dir",
                str(run_dir),
                "--out",
                str(tmp / f"store{p}"),
                "--device",
                "cpu",
                "--quiet",
                "--nproc",
                str(p),
            ]
            t0 = time.perf_counter()
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=env)
            rows.append({
                "engine": "torchrun", "processes": p, "config": config,
                "global_batch": cfg.anchor.batch_size, "steps": anchor_steps,
                "threads_per_process": threads,
                "step_s": round(_anchor_step_s(run_dir / "train_log.csv"), 4),
                "wall_s": round(time.perf_counter() - t0, 1),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=ROOT / "model_store" / "scenes-small")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--config", default="scenes-small")
    ap.add_argument("--anchor-steps", type=int, default=40)
    ap.add_argument("--nproc", default="1,2")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--what", default="ray,torchrun")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    rows = []
    if "ray" in args.what:
        rows += bench_ray(args.model_dir, args.cpus, args.requests, args.clients)
    if "torchrun" in args.what:
        nprocs = [int(p) for p in args.nproc.split(",")]
        rows += bench_torchrun(args.config, nprocs, args.anchor_steps, args.threads)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
