"""Interleaved timing: every compared variant runs once per round, in a rotating order.

The machine is shared and noisy. Timing variant A for a minute and then variant B for a minute
compares two different minutes of load; timing them in alternation within each round lets both
see the same load. Ratios are therefore taken *per round* (A_i / B_i, both measured seconds
apart) and summarized by their median, which a burst of load in one round cannot move much.
Every raw sample is kept for the JSON report.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

Variant = Callable[[], Any]


def synchronizer(device: torch.device | str | None) -> Callable[[], None]:
    """A function that waits for queued device work (CUDA kernels run asynchronously)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def time_once(fn: Variant, number: int = 1, sync: Callable[[], None] | None = None) -> float:
    """Seconds per call of ``fn``, averaged over ``number`` back-to-back calls."""
    return time_pair(fn, number, sync)[0]


def time_pair(
    fn: Variant, number: int = 1, sync: Callable[[], None] | None = None
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per call, over ``number`` calls.

    CPU time leaves out the time the process was not running: on a loaded machine it is what
    the computation itself cost, where wall time adds every preemption.
    """
    sync = sync or (lambda: None)
    sync()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(number):
        fn()
    sync()
    return (time.perf_counter() - t0) / number, (time.process_time() - c0) / number


def interleave(
    variants: Mapping[str, Variant],
    rounds: int,
    *,
    warmup: int = 1,
    number: int | Mapping[str, int] = 1,
    sync: Callable[[], None] | None = None,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Raw seconds per call, ``rounds`` samples for each variant, taken in alternation.

    Round ``i`` runs the variants in the order rotated by ``i``, so no variant is always the one
    that runs first (after an idle period) or right after the heaviest one. ``cpu``, if given,
    receives the CPU seconds per call of each variant, sample for sample.
    """
    names = list(variants)
    per = {n: number if isinstance(number, int) else number.get(n, 1) for n in names}
    for _ in range(warmup):
        for n in names:
            variants[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            wall, cpu_s = time_pair(variants[n], per[n], sync)
            samples[n].append(wall)
            if cpu is not None:
                cpu.setdefault(n, []).append(cpu_s)
    return samples


def rounds_for(per_round_s: float, budget_s: float, min_rounds: int, max_rounds: int) -> int:
    """How many rounds fit in ``budget_s`` when one round takes ``per_round_s``."""
    if per_round_s <= 0:
        return max_rounds
    return int(min(max_rounds, max(min_rounds, budget_s // per_round_s)))


def calibrate(
    variants: Mapping[str, Variant],
    budget_s: float,
    min_rounds: int,
    max_rounds: int,
    sync: Callable[[], None] | None = None,
) -> int:
    """Rounds for a budget, from one timed call of each variant (after one warm-up call)."""
    one = sum(time_once(fn, 1, sync) for fn in variants.values())
    return rounds_for(one, budget_s, min_rounds, max_rounds)


def summarize(samples: Sequence[float]) -> dict[str, float | int]:
    """Median and spread of raw seconds, in milliseconds."""
    xs = sorted(samples)
    n = len(xs)
    if n == 0:
        return {"n": 0}
    q = statistics.quantiles(xs, n=10) if n >= 2 else [xs[0]] * 9
    return {
        "n": n,
        "median_ms": statistics.median(xs) * 1e3,
        "p10_ms": q[0] * 1e3,
        "p90_ms": q[-1] * 1e3,
        "min_ms": xs[0] * 1e3,
        "max_ms": xs[-1] * 1e3,
    }


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a_i / b_i``: a ratio taken within each round."""
    if not a or len(a) != len(b):
        raise ValueError("paired_ratio needs two sample lists of the same, non-zero length")
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def median_s(samples: Sequence[float]) -> float:
    return statistics.median(samples)
