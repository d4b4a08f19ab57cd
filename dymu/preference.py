"""Validation, normalization and sampling of a user preference (r, c) and of a task subset.

This is the one place that decides what a valid preference is; the training code, the service
and the CLI all call :func:`normalize_preference` and :func:`resolve_tasks`. It is also the one
sampler of preferences (:func:`sample_preference`, :func:`sample_preferences`): training,
evaluation, the baselines and the benchmarks all draw r from the Dirichlet here.

* ``r`` is task importance. Any non-negative vector with a positive, finite sum is accepted and
  normalized onto the simplex; a mapping ``{task: weight}`` counts missing tasks as 0.
* ``c`` is frugality in [0, 1] (0 = spend what helps the tasks, 1 = share as much as possible).
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import DymuError, PreferenceError, TaskError

#: Decimal places kept by :meth:`Preference.key`; preferences closer than this share a cache key.
KEY_DECIMALS = 6
#: Dirichlet concentration of r in training (paper App. G: eta = 0.2): most draws favour one or
#: two tasks, so the hypernets see the corners of the simplex as well as its middle.
TRAINING_ETA = 0.2


@dataclass(frozen=True)
class Preference:
    """A validated preference: ``r`` on the simplex (sums to 1), ``c`` in [0, 1]."""

    r: tuple[float, ...]
    c: float

    @property
    def n_tasks(self) -> int:
        return len(self.r)

    def key(self) -> tuple[tuple[float, ...], float]:
        """Canonical rounded form, usable as a cache key."""
        return tuple(round(v, KEY_DECIMALS) for v in self.r), round(self.c, KEY_DECIMALS)

    def tensors(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, c)`` as tensors of shape (N,) and () for the hypernets."""
        return (
            torch.tensor(self.r, device=device, dtype=dtype),
            torch.tensor(self.c, device=device, dtype=dtype),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"r": list(self.r), "c": self.c}


def check_task_names(
    names: Iterable[str],
    model_tasks: Sequence[str],
    error: type[DymuError] = TaskError,
    prefix: str = "",
) -> None:
    """Raise ``error`` naming every name of ``names`` that is not one of ``model_tasks``.

    The one check of task names (a task subset, the keys of ``r`` as a mapping, a shared
    network's tasks), so every caller says the same thing.
    """
    unknown = [t for t in names if t not in model_tasks]
    if unknown:
        raise error(f"{prefix}unknown task(s) {unknown}; the model's tasks are {list(model_tasks)}")


def _as_floats(r: Any, tasks: Sequence[str]) -> list[float]:
    if isinstance(r, Mapping):
        check_task_names(r, tasks, PreferenceError, prefix="r names ")
        return [_as_float(r.get(t, 0.0), f"r[{t!r}]") for t in tasks]
    if isinstance(r, torch.Tensor):
        r = r.detach().cpu().reshape(-1).tolist() if r.ndim <= 1 else r
        if isinstance(r, torch.Tensor):
            raise PreferenceError(f"r must be a vector, got a tensor of shape {tuple(r.shape)}")
    if isinstance(r, (str, bytes)) or not isinstance(r, Iterable):
        raise PreferenceError(f"r must be a list of {len(tasks)} numbers or a {{task: weight}} map")
    values = list(r)
    if len(values) != len(tasks):
        raise PreferenceError(
            f"r has {len(values)} entries but the model has {len(tasks)} tasks {list(tasks)}"
        )
    return [_as_float(v, f"r[{i}]") for i, v in enumerate(values)]


def _as_float(v: Any, what: str) -> float:
    # reprlib: a value from a request can be nested arbitrarily deep; its repr must not be.
    if isinstance(v, bool) or (not isinstance(v, (int, float)) and not hasattr(v, "__float__")):
        raise PreferenceError(f"{what} must be a number, got {reprlib.repr(v)}")
    try:
        f = float(v)
    except (TypeError, ValueError) as exc:
        raise PreferenceError(f"{what} must be a number, got {reprlib.repr(v)}") from exc
    if not math.isfinite(f):
        raise PreferenceError(f"{what} must be finite, got {f}")
    return f


def as_number(v: Any, what: str) -> float:
    """A finite number as a request sent it (bools, strings and NaN/inf are refused with
    :class:`PreferenceError`): the one check of r's weights, c and a budget's value."""
    return _as_float(v, what)


def normalize_preference(r: Any, c: Any, tasks: Sequence[str]) -> Preference:
    """Validate ``(r, c)`` against the model's ``tasks`` and normalize ``r`` onto the simplex.

    Raises :class:`PreferenceError` with the reason for: wrong length, unknown task names in the
    mapping form, non-numbers, NaN/inf, negative entries, an all-zero ``r``, or ``c`` outside
    [0, 1].
    """
    values = _as_floats(r, tasks)
    negative = [i for i, v in enumerate(values) if v < 0]
    if negative:
        raise PreferenceError(f"r must be non-negative; entries {negative} are negative")
    try:
        total = math.fsum(values)
    except OverflowError as exc:  # huge finite weights whose sum is not finite
        raise PreferenceError(f"r is too large to normalize: {exc}") from exc
    if total <= 0:
        raise PreferenceError("r must have a positive sum (all task weights are zero)")
    return Preference(r=tuple(v / total for v in values), c=normalize_c(c))


def normalize_c(c: Any) -> float:
    """Validate the frugality ``c``: a finite number in [0, 1] (:class:`PreferenceError` if not)."""
    cf = _as_float(c, "c")
    if not 0.0 <= cf <= 1.0:
        raise PreferenceError(f"c must be in [0, 1], got {cf}")
    return cf


#: Integer units per 1.0 of a :data:`CanonicalKey` (millionths: :data:`KEY_DECIMALS` places).
KEY_SCALE = 10**KEY_DECIMALS
#: ``(r, c)`` in :data:`KEY_SCALE` units: the exact, hashable identity of a canonical preference.
CanonicalKey = tuple[tuple[int, ...], int]


def canonical_key(pref: Preference) -> CanonicalKey:
    """``(r, c)`` of :meth:`Preference.key` (6 decimals) as integers: exact, hashable."""
    r, c = pref.key()
    return tuple(round(v * KEY_SCALE) for v in r), round(c * KEY_SCALE)


def preference_of_key(key: CanonicalKey) -> Preference:
    """The canonical preference of ``key``, used as-is (not normalized again), so that
    ``canonical_key(preference_of_key(k)) == k``: a fixed point, hence no drift through ids."""
    r, c = key
    return Preference(r=tuple(v / KEY_SCALE for v in r), c=c / KEY_SCALE)


def canonicalize(r: Any, c: Any, tasks: Sequence[str]) -> tuple[Preference, CanonicalKey]:
    """Validate ``(r, c)`` (:func:`normalize_preference`) and round it to the canonical
    preference: preferences with one key are one preference, with one tree, BN deltas and
    outputs, wherever they were parsed (the server, an id, a router that has no weights)."""
    key = canonical_key(normalize_preference(r, c, tasks))
    return preference_of_key(key), key


def simplex_grid_size(n_tasks: int, resolution: int) -> int:
    """Number of points of :func:`simplex_grid`: C(resolution + N - 1, N - 1)."""
    return math.comb(resolution + n_tasks - 1, n_tasks - 1)


def simplex_grid(n_tasks: int, resolution: int) -> list[tuple[float, ...]]:
    """The regular grid on the N-simplex: every ``r = k / resolution`` with non-negative integer
    ``k`` summing to ``resolution`` (the points over which the paper's Figure 5 maps the cost).

    Ordered lexicographically by ``k`` descending (the first point is ``(1, 0, ..., 0)``).
    """
    if n_tasks < 1 or resolution < 1:
        raise PreferenceError(
            f"a simplex grid needs n_tasks >= 1 and resolution >= 1, got {n_tasks}, {resolution}"
        )

    def compositions(total: int, parts: int) -> Iterable[tuple[int, ...]]:
        if parts == 1:
            yield (total,)
            return
        for first in range(total, -1, -1):
            for rest in compositions(total - first, parts - 1):
                yield (first, *rest)

    return [tuple(k / resolution for k in ks) for ks in compositions(resolution, n_tasks)]


def resolve_tasks(tasks: Iterable[str] | str | None, model_tasks: Sequence[str]) -> tuple[int, ...]:
    """Stream indices (ascending) of a requested task subset; ``None`` means every task."""
    if tasks is None:
        return tuple(range(len(model_tasks)))
    if isinstance(tasks, str):
        tasks = [tasks]
    names = list(tasks)
    if not names:
        raise TaskError("the task subset is empty; name at least one task or pass None for all")
    check_task_names(names, model_tasks)
    if len(set(names)) != len(names):
        raise TaskError(f"duplicate task(s) in {names}")
    return tuple(sorted(model_tasks.index(t) for t in names))


# -- sampling -------------------------------------------------------------------------------------
def standard_gamma(
    concentration: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gamma(concentration, 1) draws, from ``generator`` (a CPU generator) when given.

    torch's public Gamma sampler (:class:`torch.distributions.Gamma`) takes no generator: it
    draws from the global one. So the draw is made there, from a copy of ``generator``'s state,
    and the advanced state is handed back: the numbers are exactly those ``generator`` itself
    would give, and the global generator is left as it was (:func:`torch.random.fork_rng`).
    Not for concurrent use with other users of the global CPU generator in other threads.
    """
    rate = torch.ones((), dtype=concentration.dtype)
    if generator is None:
        return torch.distributions.Gamma(concentration, rate).sample()
    if generator.device.type != "cpu":
        raise ValueError(f"standard_gamma needs a CPU generator, got one on {generator.device}")
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator.get_state())
        draw = torch.distributions.Gamma(concentration, rate).sample()
        generator.set_state(torch.get_rng_state())
    return draw


def sample_simplex(
    n_tasks: int,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    count: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """r ~ Dir(eta * 1_N): shape (N,), or (count, N) for ``count`` independent draws.

    Normalized Gamma(eta, 1) draws. eta = 1 is uniform on the simplex (evaluation, the static
    baselines); eta = :data:`TRAINING_ETA` is the training distribution (paper App. G).
    """
    shape = (n_tasks,) if count is None else (count, n_tasks)
    gamma = standard_gamma(torch.full(shape, float(eta), dtype=dtype), generator)
    total = gamma.sum(-1, keepdim=True)
    # Every draw is at least the smallest normal float, so the sum is positive; the guard keeps
    # a degenerate row on the simplex all the same.
    return torch.where(total > 0, gamma / total, torch.full_like(gamma, 1.0 / n_tasks))


def sample_preference(
    n_tasks: int, eta: float = TRAINING_ETA, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training preference: r ~ Dir(eta * 1_N), then c ~ U(0, 1) (paper §3.3, App. G).

    r and c are drawn from ``generator`` in that order, so a step seeded alike draws alike.
    """
    r = sample_simplex(n_tasks, eta, generator)
    return r, torch.rand((), generator=generator)


def sample_preferences(
    n_tasks: int, count: int, seed: int, *, eta: float = 1.0, c: float | None = None
) -> list[tuple[list[float], float]]:
    """``count`` preferences from ``seed``: r ~ Dir(eta) (uniform on the simplex by default),
    c ~ U(0, 1), or ``c`` for every one of them when given."""
    g = torch.Generator().manual_seed(seed)
    r = sample_simplex(n_tasks, eta, g, count=count)
    cs = torch.rand(count, generator=g) if c is None else torch.full((count,), float(c))
    return [(row.tolist(), float(ci)) for row, ci in zip(r, cs, strict=True)]
