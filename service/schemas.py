"""Request and response bodies of the service (shared by the server and the client)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

#: Response headers of the service are X-Dymu-<Name>.
HEADER_PREFIX = "X-Dymu-"
#: "hit" when the request's sub-network came from this process's preference cache, else "miss".
CACHE_HEADER = HEADER_PREFIX + "Cache"
NPZ_MEDIA_TYPE = "application/x-npz"
#: A request header: "1" lets the server degrade this prediction under load.
ALLOW_DEGRADE_HEADER = HEADER_PREFIX + "Allow-Degrade"
#: A response header: "1" when the prediction ran degraded, else "0".
DEGRADED_HEADER = HEADER_PREFIX + "Degraded"

# r and c are validated by the core (dymu.preference.canonicalize), not by pydantic, so that
# the HTTP layer accepts exactly what dymu.Preference accepts (pydantic's lax mode would turn
# true or "1" into 1.0); the annotation still documents the type in the OpenAPI schema.
Weights = list[float] | dict[str, float]
RawWeights = SkipValidation[Weights]
RawNumber = SkipValidation[float]

OutputFormat = Literal["json", "npz"]

R_DESCRIPTION = (
    "Task importance: a list with one non-negative weight per task (in the model's task order) "
    "or a {task: weight} map where missing tasks count 0; normalized to sum to 1."
)
C_DESCRIPTION = "Frugality c in [0, 1]: 0 spends what helps the tasks, 1 shares as much as it can."
BUDGET_DESCRIPTION = (
    "Instead of c: the most accurate tree of r that fits a compute budget, per image at the "
    "model's input size for the task subset; the server picks the lowest c whose tree fits "
    "(docs/service.md, Budgets)."
)
ALLOW_DEGRADE_DESCRIPTION = (
    "Under load (DYMU_OVERLOAD=degrade, queue over the threshold) this request may run its r at "
    "the server's degrade c or budget instead of waiting or being refused (docs/service.md)."
)


class BudgetIn(BaseModel):
    """A compute budget: exactly one of ``max_gflops`` and ``max_fraction``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"max_gflops": 0.25}, {"max_fraction": 0.6}]},
    )

    max_gflops: RawNumber | None = Field(None, description="GFLOPs per image (> 0)")
    max_fraction: RawNumber | None = Field(
        None, description="share of the full anchor's FLOPs (> 0; 1 = the anchor)"
    )


# Validated by the core (dymu.budget.parse_budget), like r and c; the schema documents it.
RawBudget = SkipValidation[BudgetIn]


class PreferenceIn(BaseModel):
    """A preference (r, c)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"r": [0.6, 0.3, 0.1], "c": 0.3},
                {"r": {"depth": 2, "normals": 1}, "c": 0.0},
                {"r": [0.6, 0.3, 0.1], "budget": {"max_gflops": 0.25}},
                {"r": [1, 1, 1], "budget": {"max_fraction": 0.5}, "tasks": ["depth"]},
            ]
        },
    )

    r: RawWeights = Field(description=R_DESCRIPTION)
    c: RawNumber | None = Field(None, description=C_DESCRIPTION + " Default 0.")
    budget: RawBudget | None = Field(None, description=BUDGET_DESCRIPTION + " Not with c.")
    tasks: list[str] | None = Field(
        None, description="with a budget: the task subset it is for (default: all)"
    )


class ArchitectureOut(BaseModel):
    id: str = Field(description="stable 12-hex id of the tree")
    n_tasks: int
    n_layers: int
    parents: list[list[int]] = Field(
        description="parents[b][j]: the stream whose layer-b node feeds node (b+1, j)"
    )
    used_nodes: list[list[int]] = Field(description="streams that run, per layer (layer 0 first)")
    n_used_nodes: int
    n_nodes: int = Field(description="N x L: the nodes of the full anchor net")


class CostOut(BaseModel):
    input_size: list[int] = Field(description="[H, W] the cost is given for")
    flops: int = Field(description="FLOPs per image (1 multiply-add = 2 FLOPs)")
    gflops: float
    params: int = Field(description="active anchor parameters of the used nodes and heads")
    anchor_flops: int
    anchor_params: int
    fraction_of_anchor_flops: float
    fraction_of_anchor_params: float


class CostMapPoint(BaseModel):
    r: list[float] = Field(description="the grid point: the canonical r, in task order")
    flops: int = Field(description="FLOPs per image of its tree for the subset (1 MAC = 2 FLOPs)")
    gflops: float
    params: int = Field(description="active anchor parameters of the subset's used nodes and heads")
    fraction_of_anchor_flops: float = Field(description="flops / the full anchor's (all tasks)")
    architecture_id: str = Field(description="the tree's 12-hex id (equal ids: the same tree)")
    n_used_nodes: int


class CostMap(BaseModel):
    """The cost of the arg-max tree at every point of a grid on the simplex, for one c."""

    model: str | None
    model_version: str | None
    c: float
    resolution: int = Field(description="r takes the values k / resolution")
    tasks: list[str] = Field(description="the simplex's axes: every task, in the order of r")
    subset: list[str] = Field(description="the tasks whose paths are counted")
    input_size: list[int] = Field(description="[H, W] the cost is given for")
    anchor_flops: int
    anchor_params: int
    n_points: int
    n_architectures: int = Field(description="distinct trees over the grid")
    min_gflops: float
    max_gflops: float
    compute_ms: float
    points: list[CostMapPoint]


class BudgetOut(BaseModel):
    """What a budget chose: the lowest c whose tree fits, and that tree's cost."""

    max_gflops: float | None = None
    max_fraction: float | None = None
    limit_flops: float = Field(description="the budget in FLOPs per image")
    c: float = Field(description="the c chosen: the lowest in [0, 1] whose tree fits")
    tasks: list[str] = Field(description="the task subset the cost is for")
    cost: CostOut = Field(description="the chosen tree's cost for that subset")
    n_trees: int = Field(description="distinct trees of this r over c in [0, 1]")
    search_ms: float = Field(description="time to find the trees' c segments and choose")


class PreferenceRecord(BaseModel):
    """A preference as the server computed it."""

    preference_id: str = Field(description="derived from (r, c) and the model version")
    model: str
    model_version: str
    r: list[float] = Field(description="normalized r (6 decimals), in task order")
    r_by_task: dict[str, float]
    c: float
    architecture: ArchitectureOut
    cost: CostOut
    cached: bool = Field(description="false only for the request that computed it")
    compute_ms: float = Field(description="how long computing it took (when it was computed)")
    elapsed_ms: float = Field(description="this request's time in the server")
    backends: dict[str, str] = Field(
        description="state per backend for the full task set: ready, building, failed, disabled"
    )
    budget: BudgetOut | None = Field(None, description="set when a budget chose c")


class PredictJSON(BaseModel):
    """A prediction request as JSON: the image as base64 (plain or a data URL)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"image": "<base64 PNG or JPEG>", "preference_id": None, "format": "json"},
                {"image": "<base64 PNG>", "r": [1, 0, 0], "c": 0.5, "tasks": ["segmentation"]},
                {"image": "<base64 PNG>", "r": [1, 1, 1], "budget": {"max_gflops": 0.2}},
                {"image": "<base64 PNG>", "r": [1, 1, 1], "c": 0, "allow_degrade": True},
            ]
        },
    )

    image: str = Field(description="PNG, JPEG or NPY (raw uint8 pixels), base64")
    preference_id: str | None = Field(None, description="from POST /preference")
    r: RawWeights | None = Field(None, description=R_DESCRIPTION + " Inline, instead of an id.")
    c: RawNumber | None = Field(None, description=C_DESCRIPTION + " With r; default 0.")
    tasks: list[str] | None = Field(None, description="task subset (default: all)")
    format: OutputFormat = Field("json", description="json (PNG maps) or npz (float32 arrays)")
    budget: RawBudget | None = Field(None, description=BUDGET_DESCRIPTION + " With r, not c.")
    allow_degrade: bool = Field(False, description=ALLOW_DEGRADE_DESCRIPTION)


class RequestMetrics(BaseModel):
    """What one prediction cost; also sent as X-Dymu-* response headers."""

    flops: int = Field(description="FLOPs actually run for this image (1 MAC = 2 FLOPs)")
    gflops: float
    params: int = Field(description="parameters of the nodes and heads that ran")
    model_ms: float = Field(description="model time of the batch this image ran in")
    queue_ms: float = Field(description="time waiting for a batch")
    total_ms: float = Field(description="time in the server, decoding and encoding included")
    batch_size: int
    architecture_id: str
    preference_id: str
    tasks: list[str]
    input_size: list[int]
    device: str
    backend: str
    c: float = Field(description="the c actually served")
    requested_c: float = Field(description="the c asked for (or chosen by the budget)")
    degraded: bool = Field(
        False, description="served at the degrade c or budget because the server was loaded"
    )
    budget: BudgetOut | None = Field(None, description="set when a budget chose c")


class Prediction(BaseModel):
    """Outputs per task (PNG-encoded maps) and the request's metrics."""

    outputs: dict[str, dict[str, Any]]
    metrics: RequestMetrics


class TaskInfo(BaseModel):
    name: str
    kind: str
    classes: int | None = None


class ModelInfo(BaseModel):
    name: str | None
    version: str | None
    path: str | None
    tasks: list[TaskInfo]
    n_tasks: int
    n_layers: int
    input_size: list[int]
    in_channels: int
    artifact_sha256: str | None = Field(description="manifest_sha256 of the artifact")
    files: dict[str, Any]
    anchor_cost: CostOut
    control_params: int
    input_normalization: dict[str, Any]
    device: str
    backend: str
    backend_times_ms: dict[str, float] | None = Field(
        None,
        description="--backend auto: ms of one batch (max_batch_size, input size) per candidate "
        "backend, measured at warm-up; the fastest serves",
    )
    default_preference_id: str
    cache: dict[str, int]
    batching: dict[str, float]


class Health(BaseModel):
    status: str
    live: bool = True


class Readiness(BaseModel):
    ready: bool
    status: str
    model: str | None = None
    model_version: str | None = None
    detail: str | None = None


class ErrorBody(BaseModel):
    error: str = Field(description="error code, e.g. preference_error")
    detail: str = Field(description="the reason")
    status: int


class AdminResult(BaseModel):
    action: str
    model: str | None = None
    model_version: str | None = None
    previous_version: str | None = None
    cleared: int | None = None
    elapsed_ms: float
