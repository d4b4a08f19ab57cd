"""Typed errors of dymu's public API.

Every error a user can cause (a bad preference, an unknown task, an image of the wrong shape, a
broken artifact) is one of these, raised before any tensor op runs, with a one-line message. The
service maps them to HTTP status codes in one place and the CLI prints them as one line.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any


class DymuError(Exception):
    """Base class of every error dymu raises on purpose."""


class ConfigError(DymuError, ValueError):
    """A model or backbone configuration that cannot be built."""


class PreferenceError(DymuError, ValueError):
    """A preference (r, c) outside its domain: r not on/towards the simplex, c not in [0, 1]."""


class BudgetError(PreferenceError):
    """A compute budget that is malformed, given together with c, or that no tree of the
    preference fits (:class:`BudgetInfeasibleError`); see :mod:`dymu.budget`."""


class BudgetInfeasibleError(BudgetError):
    """A budget below the cheapest tree of the preference's r; carries that cheapest cost."""

    def __init__(self, message: str, cheapest_flops: int, cheapest_c: float) -> None:
        super().__init__(message)
        self.cheapest_flops = cheapest_flops
        self.cheapest_c = cheapest_c


class TaskError(DymuError, ValueError):
    """Unknown, duplicate or empty task selection."""


class InputError(DymuError, ValueError):
    """An input tensor the model cannot take (rank, channel count, dtype)."""


class ArchitectureError(DymuError, ValueError):
    """A tree (parents per layer) that does not fit the anchor net."""


class ArtifactError(DymuError):
    """A model artifact that is missing, incomplete, tampered with or of an unknown format."""


def validation_message(
    errors: Sequence[Mapping[str, Any]],
    limit: int = 1,
    skip: Collection[str] = (),
    root: str = "value",
) -> str:
    """The first ``limit`` errors of a pydantic validation as ``"loc.path: message; ..."``.

    ``errors`` is ``exc.errors()`` of a pydantic ``ValidationError`` (or of FastAPI's request
    validation); location parts in ``skip`` are left out, and an empty location reads ``root``.
    """
    parts = []
    for err in errors[:limit]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in skip) or root
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
