"""Typed configuration of a benchmark run, with the three presets ``tiny``, ``quick`` and ``full``.

``quick`` finishes in under 2 minutes on 2 CPU cores; ``full`` measures every case at every size
with more rounds; ``tiny`` (for the test suite) runs every code path of every case with a model
given by ``--model`` (a tiny one) and as few samples as make a median.

Image sizes are ``"model"`` (the model's own input size) or ``"HxW"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["tiny", "quick", "full"]
Point = tuple[str, int]  # (image size, batch)

DEFAULT_MODEL = Path("model_store/scenes-small")


class BenchConfig(BaseModel):
    """Everything one run measures and how hard it tries; ``preset(mode)`` gives the defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = "quick"
    model: Path = Field(DEFAULT_MODEL, description="a store (newest version) or version dir")
    device: str = "auto"
    cases: tuple[str, ...] = ()  # empty: every registered case
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="intra-op threads (None: library default)")

    # timing effort: rounds are fitted to a time budget per measured point
    point_budget_s: float = 4.0
    min_rounds: int = 5
    max_rounds: int = 60

    # 1 proportionality, 2 peers, 4 backends: (size, batch) points
    proportionality_points: tuple[Point, ...] = (("model", 1), ("model", 16), ("288x384", 1))
    peers_points: tuple[Point, ...] = (("model", 1), ("model", 16))
    backends_points: tuple[Point, ...] = (("model", 1), ("model", 8), ("288x384", 8))

    # 3 preference switch
    switch_sizes: tuple[str, ...] = ("model",)
    switch_rounds: int = 15
    export_rounds: int = 2

    # 5 server
    server_backends: tuple[str, ...] = ("auto",)
    server_sizes: tuple[str, ...] = ("model",)
    server_rounds: int = 20
    server_clients: tuple[int, ...] = (1, 4, 16)
    server_seconds: float = 2.0
    # 5c request path: overhead over the server's model time, and clients vs the model alone
    request_sizes: tuple[str, ...] = ("288x384", "model")
    request_rounds: int = 60  # per-request ratios of ~6 ms requests: 20 left +-5 points
    request_load_sizes: tuple[str, ...] = ("model",)
    request_clients: int = 16
    request_seconds: float = 3.0
    request_load_rounds: int = 3
    # 5b overload: degrade vs refuse (docs/benchmarks.md, "Overload")
    overload_clients: int = 64
    overload_seconds: float = 10.0
    overload_timeout_s: float = 5.0
    overload_queue: int = 32

    # 6 scaling
    scaling_ns: tuple[int, ...] = (2, 3, 5, 10, 20)
    scaling_size: str = "48x64"
    scaling_batch: int = 2
    scaling_rounds: int = 3

    # 7 paper scale
    paper_size: str = "288x384"
    paper_latency_size: str | None = "288x384"
    paper_rounds: int = 2

    # machine peak and profiling
    matmul_n: int = 1024
    profile_rounds: int = 5


PRESETS: dict[str, dict] = {
    "tiny": dict(
        threads=1,  # no intra-op threads waiting on each other when the test machine is busy
        point_budget_s=0.2,
        min_rounds=2,
        max_rounds=3,
        proportionality_points=(("model", 2),),
        peers_points=(("model", 2),),
        backends_points=(("model", 2),),
        switch_rounds=3,
        export_rounds=1,
        server_rounds=3,
        server_clients=(1, 2),
        server_seconds=0.3,
        request_sizes=("model",),
        request_rounds=3,
        request_clients=2,
        request_seconds=0.3,
        request_load_rounds=1,
        overload_clients=4,
        overload_seconds=0.5,
        overload_queue=2,
        scaling_ns=(2, 3),
        scaling_size="24x32",
        scaling_batch=2,
        scaling_rounds=2,
        paper_latency_size=None,
        paper_rounds=1,
        matmul_n=128,
        profile_rounds=1,
    ),
    "quick": {},
    "full": dict(
        point_budget_s=30.0,
        min_rounds=7,
        max_rounds=200,
        proportionality_points=(
            ("model", 1),
            ("model", 16),
            ("288x384", 1),
            ("288x384", 16),
        ),
        peers_points=(("model", 1), ("model", 16), ("288x384", 1), ("288x384", 16)),
        backends_points=(("model", 1), ("model", 8), ("288x384", 1), ("288x384", 8)),
        switch_sizes=("model", "288x384"),
        switch_rounds=60,
        export_rounds=6,
        server_backends=("onnx", "torch"),
        server_sizes=("model", "288x384"),
        server_rounds=60,
        server_seconds=6.0,
        request_rounds=200,
        request_load_sizes=("model", "288x384"),
        request_seconds=6.0,
        request_load_rounds=5,
        overload_seconds=30.0,
        scaling_size="96x128",
        scaling_batch=8,
        scaling_rounds=5,
        paper_rounds=5,
        matmul_n=2048,
        profile_rounds=10,
    ),
}


def preset(mode: Mode = "quick", **overrides: object) -> BenchConfig:
    """The preset of ``mode`` with ``overrides`` (None values are ignored)."""
    fields = {**PRESETS[mode], **{k: v for k, v in overrides.items() if v is not None}}
    return BenchConfig(mode=mode, **fields)


def parse_size(size: str, model_hw: tuple[int, int]) -> tuple[int, int]:
    """``"model"`` -> the model's input size; ``"HxW"`` -> (H, W)."""
    if size == "model":
        return tuple(model_hw)
    try:
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError as exc:
        raise ValueError(f"image size must be 'model' or 'HxW', got {size!r}") from exc
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    return h, w


def size_label(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"
