"""The dymu inference service: FastAPI over a model runtime, preference cache and metrics.

``create_app(settings)`` builds the ASGI app (:mod:`service.app`), ``Settings`` reads
``DYMU_*`` environment variables (:mod:`service.settings`), ``DymuClient`` /
``AsyncDymuClient`` talk to it (:mod:`service.client`) and ``dymu serve`` runs it
(:mod:`service.cli`). See docs/service.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncDymuClient", "DymuAPIError", "DymuClient", "Settings", "create_app"]

_LAZY = {
    "create_app": ".app",
    "Settings": ".settings",
    "DymuClient": ".client",
    "AsyncDymuClient": ".client",
    "DymuAPIError": ".client",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that `dymu --help` (which imports service.cli) does not import FastAPI or torch.
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'service' has no attribute {name!r}")
