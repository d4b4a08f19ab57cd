"""Benchmark of the scenes generator on one core: ``python -m training.data.bench_scenes``.

Pins the process to one CPU (``os.sched_setaffinity``) and limits numpy's and torch's thread
pools to one thread, renders ``--n`` images (default 1,000) at ``--size`` (default 96x128) and
prints images per second. The requirement is 1,000 images at 96x128 in under 20 s (50 images/s);
the target is under 1 s per 100 images (100 images/s).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

from .cli import parse_size
from .scenes import render_scenes


def _single_thread() -> str:
    notes = []
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        notes.append(f"pinned to CPU {cpu}")
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        notes.append("BLAS threads 1")
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(1)
    return ", ".join(notes) or "not pinned"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.data.bench_scenes", description=__doc__)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--size", default="96x128")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    size = parse_size(args.size)
    how = _single_thread()
    render_scenes(4, args.seed, size, start=10**6)  # warm-up
    t0 = time.perf_counter()
    render_scenes(args.n, args.seed, size)
    dt = time.perf_counter() - t0
    print(
        f"scenes: {args.n} images at {size[0]}x{size[1]} in {dt:.2f} s = "
        f"{args.n / dt:.0f} images/s, {100 * dt / args.n:.2f} s per 100 images ({how})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
