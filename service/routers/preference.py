"""Preferences: compute (or find in the cache) the sub-network of (r, c) or of r under a budget
(service/selection.py), look one up by id."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from ..errors import ERROR_RESPONSES, BadRequestError
from ..parsing import loads, validated
from ..schemas import PreferenceIn, PreferenceRecord
from ..selection import requested
from ..state import Service, service_of

router = APIRouter(tags=["preference"], responses=ERROR_RESPONSES)
Svc = Annotated[Service, Depends(service_of)]
# The body is read by service/parsing.py (strict JSON: no duplicated or unknown fields), so
# OpenAPI is told its schema here rather than through a pydantic parameter.
BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PreferenceIn.model_json_schema()}},
    }
}


async def preference_in(request: Request) -> PreferenceIn:
    return validated(PreferenceIn, loads(await request.body()))


@router.post("/preference", response_model=PreferenceRecord, openapi_extra=BODY)
async def create_preference(
    svc: Svc, body: Annotated[PreferenceIn, Depends(preference_in)]
) -> PreferenceRecord:
    """Compute (or find in the cache) the sub-network of a preference (r, c), or of r under a
    compute budget (`budget` instead of `c`: the lowest c whose tree fits, for `tasks`).

    Returns its id, the normalized (r, c), the tree, its cost at the model's input size,
    whether it came from the cache and how long computing it took.
    """
    t0 = time.perf_counter()
    lm = svc.require_ready()
    if body.tasks is not None and body.budget is None:
        raise BadRequestError("tasks is the subset a budget is for: give it with a budget")
    subset = lm.subset(body.tasks)
    pref, key, budget = await requested(svc, lm, None, body.r, body.c, body.budget, subset)
    entry, computed = await svc.entry(lm, key, pref)
    record = svc.record(lm, entry, not computed, t0)
    record.budget = budget
    return record


@router.get("/preference/{preference_id}", response_model=PreferenceRecord)
async def get_preference(svc: Svc, preference_id: str) -> PreferenceRecord:
    """The record of a preference id; rebuilt on demand if it is not in the cache."""
    t0 = time.perf_counter()
    lm = svc.require_ready()
    pref, key = lm.decode_id(preference_id)
    entry, computed = await svc.entry(lm, key, pref)
    return svc.record(lm, entry, not computed, t0)
