"""Typed model configuration, with the paper's defaults (App. G).

A :class:`ModelConfig` fully determines the shapes of the anchor net and both hypernets, so it is
what the artifact's manifest stores and what :func:`dymu.create_model` builds from.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

#: segmentation: C-class logits per pixel; depth: 1 channel; normals: 3 channels, unit-normalized;
#: binary: 1 logit per pixel (saliency, edges); classification: K logits per image.
TaskKind = Literal["segmentation", "depth", "normals", "binary", "classification"]


class TaskSpec(BaseModel):
    """One task: its name, the kind of head it needs, and its loss scale ``w_i`` (App. G)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_\-]+$")
    kind: TaskKind
    classes: int | None = Field(
        default=None, ge=2, description="C for segmentation, K for classification"
    )
    loss_scale: float = Field(default=1.0, gt=0)
    ignore_index: int | None = Field(default=255, description="label of unlabeled pixels/samples")

    @model_validator(mode="after")
    def _classes_match_kind(self) -> TaskSpec:
        needs = self.kind in ("segmentation", "classification")
        if needs and self.classes is None:
            raise ValueError(f"task {self.name!r} of kind {self.kind} needs `classes`")
        if not needs and self.classes is not None:
            raise ValueError(f"task {self.name!r} of kind {self.kind} takes no `classes`")
        return self

    @property
    def out_channels(self) -> int:
        """Channels (dense) or logits (classification) the head produces."""
        return {"depth": 1, "normals": 3, "binary": 1}.get(self.kind, self.classes or 0)

    @property
    def dense(self) -> bool:
        return self.kind != "classification"


#: The only format of pretrained weights dymu reads (no pickle: loading one runs its code).
PRETRAINED_SUFFIX = ".safetensors"


class BackboneConfig(BaseModel):
    """A backbone chosen by name from :data:`dymu.backbones.BACKBONES`, with its options.

    ``init`` names a safetensors file of ImageNet-pretrained encoder weights in torchvision's or
    timm's key names, loaded into every stream's encoder before training (stage 0) by
    :func:`dymu.backbones.pretrained.load_encoder`; building a model never reads it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "small_resnet"
    options: dict[str, Any] = Field(default_factory=dict)
    init: str | None = Field(
        default=None, description="PATH.safetensors: pretrained encoder for every stream"
    )

    @field_validator("init")
    @classmethod
    def _safetensors_only(cls, v: str | None) -> str | None:
        if v is not None and not v.endswith(PRETRAINED_SUFFIX):
            raise ValueError(
                f"must name a {PRETRAINED_SUFFIX} file (pickle checkpoints are not read), got {v!r}"
            )
        return v

    @model_serializer(mode="wrap")
    def _without_unset_init(self, handler: Any) -> dict[str, Any]:
        # Configs without ``init`` dump exactly as before it existed: the manifests, checkpoints
        # and run records written earlier still compare equal.
        data = handler(self)
        if data.get("init") is None:
            data.pop("init", None)
        return data


#: What the weight hypernet feeds each node (HypernetConfig.weight_input).
WeightInput = Literal["preference", "readers"]


class HypernetConfig(BaseModel):
    """Sizes of both hypernets (App. G: embedding 32, edge MLP 2x100, weight MLP 3x100)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    embed_dim: int = Field(default=32, ge=1)
    edge_hidden: tuple[int, ...] = (100, 100)
    weight_hidden: tuple[int, ...] = (100, 100, 100)
    #: What each node's BN deltas are a function of: "preference", (r, c) as in §3.3.2; or
    #: "readers", c and r restricted to the tasks that read the node, renormalized (a departure:
    #: docs/training.md, "Deltas from the readers' preference")
    weight_input: WeightInput = "preference"


class ModelConfig(BaseModel):
    """Everything that fixes the shapes of a controllable model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: tuple[TaskSpec, ...] = Field(min_length=1)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    input_size: tuple[int, int] = Field(
        default=(96, 128), description="[H, W] the model is built for"
    )
    in_channels: int = Field(default=3, ge=1)
    hypernet: HypernetConfig = Field(default_factory=HypernetConfig)

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: tuple[TaskSpec, ...]) -> tuple[TaskSpec, ...]:
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return tasks

    @field_validator("input_size")
    @classmethod
    def _positive_size(cls, size: tuple[int, int]) -> tuple[int, int]:
        if min(size) < 1:
            raise ValueError(f"input_size must be positive, got {size}")
        return size

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)


class ConfigTasks:
    """``tasks``, ``n_tasks`` and ``input_size`` read from ``self.config`` (a
    :class:`ModelConfig`): what every controllable-like object (:class:`dymu.ControllableModel`,
    the baselines) tells about itself."""

    config: ModelConfig

    @property
    def tasks(self) -> tuple[str, ...]:
        """Task names, in stream order."""
        return self.config.task_names

    @property
    def n_tasks(self) -> int:
        return self.config.n_tasks

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.config.input_size)


def dense_tasks(classes: int = 6) -> tuple[TaskSpec, ...]:
    """The three dense tasks of the scenes / NYU-v2 setting, with NYU-v2's loss scales."""
    return (
        TaskSpec(name="segmentation", kind="segmentation", classes=classes, loss_scale=1.0),
        TaskSpec(name="depth", kind="depth", loss_scale=3.0),
        TaskSpec(name="normals", kind="normals", loss_scale=10.0),
    )
