"""What the server serves: the model's description and its cost map over the simplex."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from ..errors import ERROR_RESPONSES
from ..runtime import cost_out
from ..schemas import C_DESCRIPTION, CostMap, ModelInfo, TaskInfo
from ..state import Service, service_of

router = APIRouter(tags=["model"], responses=ERROR_RESPONSES)
Svc = Annotated[Service, Depends(service_of)]


@router.get("/v1/model", response_model=ModelInfo)
async def model_info(svc: Svc) -> ModelInfo:
    """Tasks, N, L, input size, version, artifact checksum and anchor cost."""
    lm, s = svc.require_ready(), svc.settings
    model = lm.model
    return ModelInfo(
        name=lm.name,
        version=lm.version,
        path=lm.manifest.get("path"),
        tasks=[TaskInfo(name=t.name, kind=t.kind, classes=t.classes) for t in model.config.tasks],
        n_tasks=model.n_tasks,
        n_layers=model.n_layers,
        input_size=list(lm.input_size),
        in_channels=model.config.in_channels,
        artifact_sha256=lm.checksum,
        files=lm.manifest.get("files", {}),
        anchor_cost=cost_out(lm.anchor_cost, lm.anchor_cost, lm.input_size),
        control_params=model.control_params,
        input_normalization={"mean": lm.mean, "std": lm.std, "source": lm.norm_source},
        device=str(lm.device),
        backend=lm.backend,
        backend_times_ms=None
        if lm.backend_times is None
        else {k: round(v * 1e3, 3) for k, v in lm.backend_times.items()},
        default_preference_id=lm.default_id,
        cache={
            "entries": len(lm.cache),
            "bytes": lm.cache.nbytes,
            "max_entries": lm.cache.max_entries,
            "max_bytes": lm.cache.max_bytes,
        },
        batching={
            "max_batch_size": s.max_batch_size,
            "max_wait_ms": s.max_wait_ms,
            "max_queue": s.max_queue,
            "request_timeout_s": s.request_timeout_s,
        },
    )


@router.get("/v1/cost-map", response_model=CostMap)
async def cost_map(
    svc: Svc,
    c: Annotated[float, Query(description=C_DESCRIPTION)] = 0.0,
    resolution: Annotated[
        int, Query(ge=1, le=100, description="grid step 1/resolution on each axis of r")
    ] = 20,
    tasks: Annotated[
        str | None,
        Query(
            description="comma-separated task subset whose paths are counted (default: all)",
            examples=["segmentation,depth"],
        ),
    ] = None,
) -> CostMap:
    """The cost over the simplex for one c (the paper's Figure 5), in one request.

    For every r on the grid {k / resolution} of the simplex: the edge hypernet's arg-max
    tree and its analytic FLOPs and params at the model's input size. No image, no BN
    deltas, nothing materialized or cached; at most 5,151 points.
    """
    lm = svc.require_ready()
    subset = [t.strip() for t in tasks.split(",")] if tasks else None
    return await svc.control(lm.cost_map, c, resolution, subset)
