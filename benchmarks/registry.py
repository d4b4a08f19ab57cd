"""The registry of benchmark cases and what every case receives (:class:`Context`).

A case module registers ``run(ctx) -> dict`` with :func:`register_case`; the built-in cases are
registered by importing :mod:`benchmarks.cases`, which :mod:`benchmarks.harness` does. This
module imports no case, so the cases can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import dymu

from .config import BenchConfig, parse_size
from .timing import synchronizer

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Context:
    """What every case gets: the config, the loaded model, the device and earlier results."""

    config: BenchConfig
    model: dymu.ControllableModel
    model_dir: Path
    device: torch.device
    out_dir: Path = Path(".")
    results: dict[str, Any] = field(default_factory=dict)
    peak: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = lambda msg: print(msg, flush=True)

    @property
    def sync(self) -> Callable[[], None]:
        return synchronizer(self.device)

    def hw(self, size: str) -> tuple[int, int]:
        return parse_size(size, self.model.input_size)

    def images(self, batch: int, hw: tuple[int, int], seed: int | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        x = torch.randn(batch, self.model.config.in_channels, *hw, generator=g)
        return x.to(self.device)

    def budget(self, points: int = 1) -> float:
        return self.config.point_budget_s / max(points, 1)


@dataclass(frozen=True)
class Case:
    name: str
    number: int  # the case number
    title: str
    run: Callable[[Context], dict[str, Any]]
    markdown: Callable[[dict[str, Any]], str]


CASES: dict[str, Case] = {}


def register_case(
    name: str, number: int, title: str, markdown: Callable[[dict[str, Any]], str]
) -> Callable[[Callable[[Context], dict[str, Any]]], Callable[[Context], dict[str, Any]]]:
    """Register ``run(ctx) -> dict`` as case ``name``; cases run in the order of ``number``."""

    def add(fn: Callable[[Context], dict[str, Any]]) -> Callable[[Context], dict[str, Any]]:
        CASES[name] = Case(name, number, title, fn, markdown)
        return fn

    return add
