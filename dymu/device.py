"""Device selection shared by loading, training and serving: ``auto`` = CUDA when present."""

from __future__ import annotations

import torch

from .errors import ConfigError, DymuError


def resolve_device(
    device: str | torch.device, error: type[DymuError] = ConfigError
) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:<i>`` as a torch device; ``error`` on anything else
    or on CUDA without a CUDA device (callers choose the error type their API promises)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise error(f"bad device {device!r}: use auto, cpu or cuda[:i]") from exc
    if dev.type not in ("cpu", "cuda"):
        raise error(f"bad device {device!r}: use auto, cpu or cuda[:i]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error("device 'cuda' was asked for but no CUDA device is available")
    return dev
