"""Which preference a request runs: by id, inline ``(r, c)``, the default, chosen by a budget,
or degraded under load (docs/service.md, "Budgets" and "Degrade under load").

A budget (``{"max_gflops": x}`` or ``{"max_fraction": f}``, with ``r``, never with ``c`` or an
id) is resolved by the core (``ControllableModel.within_budget``, on a control thread): the
request then runs the chosen canonical ``(r, c)``, whose id reproduces the tree on any replica.

Degrading is opt-in twice: the server's ``DYMU_OVERLOAD=degrade`` and the request's
``allow_degrade`` field or ``X-Dymu-Allow-Degrade: 1`` header. Such a request is degraded when
more than the threshold of images wait for a batch (reason ``queue``), or when the gate
admitted it past the server's limit instead of refusing it (reason ``full``). It then runs its
own ``r`` at ``DYMU_DEGRADE_C`` (or under ``DYMU_DEGRADE_BUDGET``); a request that already asks
for that preference is not counted as degraded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dymu.budget import check_exclusive
from dymu.preference import CanonicalKey, Preference, canonical_key

from .errors import BadRequestError
from .runtime import LoadedModel, TaskSubset
from .schemas import BudgetOut
from .state import Service


@dataclass(frozen=True)
class Selected:
    """The preference a request runs, and how it came to be that one."""

    preference: Preference
    key: CanonicalKey
    requested: Preference  # what the request asked for (or its budget chose)
    degraded: str | None  # None, or the reason: "queue" / "full"
    budget: BudgetOut | None

    headroom: bool = False  # allows degrading on a degrading server: may queue past max_queue

    def queue_limit(self, max_queue: int) -> int | None:
        """The batcher's bound for this request's images: a request that allows degrading on a
        degrading server may use the headroom the gate gives it (twice ``max_queue``), others
        the usual bound."""
        return 2 * max_queue if self.headroom else None


async def requested(
    svc: Service,
    lm: LoadedModel,
    preference_id: str | None,
    r: Any,
    c: Any,
    budget: Any,
    subset: TaskSubset,
) -> tuple[Preference, CanonicalKey, BudgetOut | None]:
    """The canonical preference a request asks for; a budget is resolved here (422s: a budget
    with c, with an id or without r; a malformed budget; one no tree of r fits)."""
    check_exclusive(c, budget)
    if budget is None:
        pref, key = lm.ids.select(preference_id, r, c)
        return pref, key, None
    if preference_id is not None:
        raise BadRequestError("give either preference_id or an inline r with a budget, not both")
    if r is None:
        raise BadRequestError("a budget was given without r: give r with it")
    base, _ = lm.parse(r, None)
    t0 = time.perf_counter()
    choice = await svc.control(lm.within_budget, base, budget, subset)
    out = lm.budget_out(choice, subset, time.perf_counter() - t0)
    return choice.preference, canonical_key(choice.preference), out


def degrade_reason(svc: Service, state: dict[str, Any]) -> str | None:
    """Why a request that allows it is degraded now (None: it is not)."""
    if not svc.degrading:
        return None
    if state.get("over_admitted"):
        return "full"
    batcher = svc.batcher
    if batcher is not None and batcher.depth > svc.settings.degrade_threshold:
        return "queue"
    return None


async def select(
    svc: Service,
    lm: LoadedModel,
    fields: Any,
    subset: TaskSubset,
    state: dict[str, Any],
) -> Selected:
    """The preference a /predict request (``fields``: its parsed body) runs."""
    pref, key, budget = await requested(
        svc, lm, fields.preference_id, fields.r, fields.c, fields.budget, subset
    )
    allowed = bool(fields.allow_degrade or state.get("allow_degrade"))
    # An allowing request on a degrading server is not refused by the batcher's bound either.
    headroom = bool(state.get("over_admitted")) or (allowed and svc.degrading)
    reason = degrade_reason(svc, state) if allowed else None
    if reason is None:
        return Selected(pref, key, pref, None, budget, headroom)
    cheaper = await svc.control(lm.degraded, pref, subset)
    cheaper_key = canonical_key(cheaper)
    if cheaper_key == key:
        return Selected(pref, key, pref, None, budget, headroom)
    svc.metrics.degraded.labels(reason).inc()
    return Selected(cheaper, cheaper_key, pref, reason, budget, headroom)
