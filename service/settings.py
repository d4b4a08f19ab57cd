"""Settings of the dymu service: every field is an environment variable ``DYMU_<FIELD>``.

``dymu serve`` flags override the environment; the environment overrides these defaults.
Lists are JSON in the environment, e.g. ``DYMU_DEFAULT_R='[0.6, 0.3, 0.1]'`` or
``DYMU_DEFAULT_R='{"depth": 1}'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dymu.budget import parse_budget

Backend = Literal["auto", "torch", "torch-cl", "onnx"]
Overload = Literal["refuse", "degrade"]
#: The inline bound (ms) when ``idle_inline_model_ms`` is unset: with one inference worker, with
#: several (:attr:`Settings.inline_model_ms`).
INLINE_MODEL_MS_ONE_WORKER, INLINE_MODEL_MS_WORKERS = 50.0, 10.0


class Settings(BaseSettings):
    """Configuration of one server process (see docs/service.md for the full table)."""

    model_config = SettingsConfigDict(env_prefix="DYMU_", extra="ignore")

    # -- what to serve and where ----------------------------------------------------------------
    model_dir: Path = Field(
        Path("model_store/scenes-small"),
        description="model_store/<name> (newest version) or a version directory",
    )
    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535)
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda or cuda:<i>")
    backend: Backend = Field(
        "auto",
        description="auto = the fastest of torch, torch-cl (channels-last) and onnx, measured "
        "at warm-up on the default tree",
    )
    log_level: str = "info"

    # -- the default preference and start-up ----------------------------------------------------
    default_r: list[float] | dict[str, float] | None = Field(
        None, description="default task importance (None = uniform)"
    )
    default_c: float = Field(0.0, description="default frugality c in [0, 1]")
    warmup: bool = Field(True, description="run one prediction before reporting ready")
    exit_on_load_error: bool = Field(
        True,
        description="exit (non-zero, one line naming the file) when the artifact fails to load "
        "or verify at start; false: stay up, live but not ready",
    )

    # -- preference cache -----------------------------------------------------------------------
    cache_max_entries: int = Field(64, ge=1, description="preferences kept (LRU)")
    cache_max_bytes: int = Field(
        512 * 2**20, ge=1, description="bytes of materialized weights kept (LRU)"
    )

    # -- batching, queue, timeouts --------------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, description="1 turns batching off")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits to fill")
    max_queue: int = Field(64, ge=1, description="queued images; beyond it: 503 + Retry-After")
    request_timeout_s: float = Field(30.0, gt=0, description="per /predict request")
    inference_workers: int = Field(1, ge=1, le=64, description="threads running batches")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads")
    onnx_threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads")
    onnx_max_sessions: int = Field(32, ge=1, description="ONNX sessions kept (one per tree)")
    inline_io_bytes: int = Field(
        65_536,
        ge=0,
        description="a request step whose image data is at most this many bytes (H x W x 3 per "
        "image: as a PNG/JPEG header declares, raw OIP pixels, the reply's outputs) runs on the "
        "event loop: for it a hop to an I/O thread costs more than the work (0: always hop)",
    )
    idle_inline_bytes: int = Field(
        1_048_576,
        ge=0,
        description="when no other prediction is in flight, a request step (one job, not "
        "encodings run side by side) of up to this many bytes of image data runs on the event "
        "loop too: with nothing else to serve, a hop to a thread is only latency (0: never)",
    )
    idle_inline_model_ms: float | None = Field(
        None,
        ge=0,
        description="when no other prediction is in flight and nothing waits for a batch, a "
        "one-image request whose (preference, tasks, size) last ran in at most this many ms runs "
        "on the event loop instead of an inference thread: the hop costs 0.15-0.45 ms and a "
        "batch window waits for no one, while the loop (health checks, a request arriving "
        f"meanwhile) waits up to this long (0: never; unset: {INLINE_MODEL_MS_ONE_WORKER:g} with "
        "one inference worker, whom a request arriving meanwhile would wait for anyway, "
        f"{INLINE_MODEL_MS_WORKERS:g} with several)",
    )
    gil_switch_interval_ms: float = Field(
        0.5,
        ge=0,
        description="the interpreter's switch interval while the service runs (Python's is 5 ms): "
        "how long an inference thread back from the model waits for the GIL while the event "
        "loop runs Python (0: keep the interpreter's)",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 503")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's headers must arrive within this (else closed)"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request's body must arrive within this (else 408, closed)"
    )
    drain_timeout_s: float | None = Field(
        None,
        gt=0,
        description="on SIGTERM, how long in-flight requests may finish (None: the request "
        "timeout + 5 s; never less than the request timeout)",
    )

    # -- degrade under load (docs/service.md, "Degrade under load") ---------------------------
    overload: Overload = Field(
        "refuse",
        description="refuse: a full server answers 503 (as always); degrade: requests that allow "
        "it run at degrade_c (or degrade_budget) once the queue is over the threshold",
    )
    degrade_c: float = Field(1.0, description="the c a degraded request runs at")
    degrade_budget: dict[str, float] | None = Field(
        None,
        description='instead of degrade_c: a budget ({"max_gflops": x} or {"max_fraction": f}); '
        "a degraded request runs the lowest c of its r that fits (the cheapest tree if none does)",
    )
    degrade_queue_depth: int | None = Field(
        None,
        ge=0,
        description="images waiting above which requests that allow it are degraded "
        "(None: max_queue // 2)",
    )

    # -- input limits ---------------------------------------------------------------------------
    max_body_bytes: int = Field(16 * 2**20, ge=1024, description="larger bodies: 413")
    max_pixels: int = Field(2048 * 2048, ge=1, description="larger images: 413")
    input_mean: tuple[float, float, float] | None = Field(
        None, description="per-channel mean of [0, 1] RGB (None: from the model's dataset)"
    )
    input_std: tuple[float, float, float] | None = Field(
        None, description="per-channel std of [0, 1] RGB (None: from the model's dataset)"
    )

    # -- admin ----------------------------------------------------------------------------------
    admin_token: SecretStr | None = Field(
        None, description="enables /admin/* (Bearer token); unset = admin surface off"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("device must be auto, cpu, cuda or cuda:<index>")

    @field_validator("default_c", "degrade_c")
    @classmethod
    def _c(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("c must be in [0, 1]")
        return v

    @field_validator("degrade_budget")
    @classmethod
    def _budget(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            parse_budget(v)  # the core's reason (a BudgetError is a ValueError)
        return v

    @property
    def degrade_threshold(self) -> int:
        """Images waiting above which a request that allows it is degraded."""
        if self.degrade_queue_depth is not None:
            return self.degrade_queue_depth
        return self.max_queue // 2

    @property
    def inline_model_ms(self) -> float:
        """``idle_inline_model_ms``, or when unset: with one inference worker a request that
        arrives during an inline run would wait for that worker anyway, so the loop may be held
        for a whole 288x384 prediction on a small CPU (35-50 ms); with several, that request
        could have run beside it, so only quick models run inline."""
        if self.idle_inline_model_ms is not None:
            return self.idle_inline_model_ms
        one = self.inference_workers == 1
        return INLINE_MODEL_MS_ONE_WORKER if one else INLINE_MODEL_MS_WORKERS

    @field_validator("input_std")
    @classmethod
    def _std(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and min(v) <= 0:
            raise ValueError("input_std must be positive")
        return v

    @property
    def drain_s(self) -> float:
        """Seconds in-flight requests get after SIGTERM: at least the request timeout."""
        return max(self.drain_timeout_s or self.request_timeout_s + 5.0, self.request_timeout_s)

    @field_validator("admin_token")
    @classmethod
    def _token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().strip():
            return None  # an empty DYMU_ADMIN_TOKEN leaves the admin surface off
        return v
