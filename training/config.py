"""Training configuration: TOML files under training/configs/, validated with pydantic.

Every value has a default from the paper (App. G) or docs/design.md §4; a config file names what
differs. Schedules given in the paper in steps of its 30k-step budget (learning-rate decay every
14k, temperature decay every 300) scale with a stage's step budget unless set explicitly.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dymu.config import BackboneConfig, HypernetConfig
from dymu.errors import ConfigError, validation_message

CONFIG_DIR = Path(__file__).parent / "configs"
PAPER_STEPS = 30_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Which dataset, where it lives (None = generated / bundled), and its options."""

    name: str = "scenes"
    root: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="training split options")
    val_options: dict[str, Any] = Field(default_factory=dict, description="held-out split options")
    calibration_options: dict[str, Any] | None = Field(
        default=None,
        description="options of a calibration split of the training source that no stage trains "
        "on (a generated benchmark: another seed); the edge stage's path table reads it when set",
    )
    workers: int = Field(default=0, ge=0, description="DataLoader workers (used on GPU)")


class AnchorStage(_Strict):
    """Stage 0: the N single-task streams, each trained alone on its task."""

    steps: int = Field(default=2000, ge=0)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    pretrained: str | None = Field(default=None, description="artifact to take the streams from")
    select_every: int | None = Field(
        default=None,
        ge=1,
        description="every this many steps, each stream's loss on the calibration split; each "
        "stream ends at its lowest (needs [data] calibration_options; docs/training.md, "
        "'Stream selection'). None: the streams end where the steps end, as in the paper",
    )
    select_images: int = Field(default=512, ge=2, description="calibration images it measures")
    mixing: float = Field(
        default=0.0,
        ge=0,
        description="weight of a second loss per step: every task read through one random tree "
        "of the streams (each node's parent stream drawn at random), so that a node serves the "
        "other tasks' upper layers too and shared trees cost less; 0: the paper's independent "
        "streams (docs/training.md, 'Path mixing')",
    )


class TrunkStage(_Strict):
    """Before stage 0: one trunk shared by every task, copied into every stream (0 steps: off).

    The fully shared tree (stream 0's layers below the top, every task's own top node and head)
    trains on sum_i w_i L_i; its layers are then copied into every stream, and stage 0 trains
    each stream on its own task from there. The paper's streams all start from one
    ImageNet-pretrained encoder, which keeps their low-level features interchangeable so that
    a shared node serves every task; streams trained apart from random weights do not have that
    (docs/training.md, "The common trunk").
    """

    steps: int = Field(default=0, ge=0)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)


class AffinityStage(_Strict):
    """Stage 0b: RSA task affinity from K training images (App. D)."""

    images: int = Field(default=100, ge=2)
    score: Literal["row-minmax", "rdm-spearman"] = Field(
        default="row-minmax",
        description="row-minmax: App. D (degenerate for 2 tasks: A = 0 unless the streams are "
        "equal); rdm-spearman: Spearman correlation of the similarity matrices (RSA's score)",
    )


class HypernetStage(_Strict):
    """Shared schedule of both hypernet stages (App. G)."""

    steps: int = Field(default=PAPER_STEPS, ge=0)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    lr_decay: float = Field(default=0.3, gt=0, le=1)
    lr_decay_every: int | None = Field(default=None, ge=1, description="default: 14k/30k of steps")
    eta: float = Field(default=0.2, gt=0, description="Dirichlet concentration of r")
    dense_fraction: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of each step's preferences drawn with r ~ Dir(1) (the dense centre "
        "of the simplex, where c acts and evaluation draws) instead of Dir(eta); the edge stage "
        "uses it with the paths and trees estimators",
    )

    def decay_every(self) -> int:
        return self.lr_decay_every or max(1, round(self.steps * 14_000 / PAPER_STEPS))

    def lr_at(self, step: int) -> float:
        """Step decay: lr x lr_decay every ``decay_every()`` steps (App. G)."""
        return self.lr * self.lr_decay ** (step // self.decay_every())


class EdgeStage(HypernetStage):
    """Stage 1: the edge hypernet with the branching regularizer."""

    temperature_start: float = Field(default=5.0, gt=0)
    temperature_decay: float = Field(default=0.97, gt=0, le=1)
    temperature_every: int | None = Field(default=None, ge=1, description="default: 1% of steps")
    lambda_active: float = Field(default=1.0, ge=0)
    lambda_inactive: float = Field(default=0.1, ge=0)
    pull_scale: Literal["absolute", "table"] = Field(
        default="absolute",
        description="absolute: lambda_A as written (the paper); table: lambda_A in units of the "
        "pull c lambda_A from which the path table's most shared trees are best at every dense "
        "preference, so c = 1 with lambda_A = 1 buys all the sharing there is to buy whatever "
        "sharing costs these streams (trees estimator; docs/training.md, 'A pull in the "
        "table's units')",
    )
    tau: float | None = Field(default=None, gt=0, description="default 0.6 / N")
    regularize_samples: bool = Field(
        default=False,
        description="compute the branching regularizer and P_use on the Gumbel-softmax samples "
        "nu instead of softmax(logits) (the shipped scenes-small used softmax(logits))",
    )
    logit_bound: float | None = Field(
        default=None,
        gt=0,
        description="train on b*tanh(logits/b): keeps the parent distributions off saturation so "
        "the regularizer's gradient does not vanish; arg-max (inference) is unchanged",
    )
    regularizer: Literal["path", "stream"] = Field(
        default="path",
        description="read L_active / L_inactive along each task's path (default) or by stream "
        "index as the paper's Eq. 3 and 5 write it (docs/design.md §7)",
    )
    estimator: Literal["gumbel", "paths", "trees"] = Field(
        default="gumbel",
        description="gumbel: the paper's soft forward on Gumbel-softmax samples; paths: the exact "
        "expected loss of hard trees from a table of every path's loss (small N and L; "
        "docs/training.md, 'The path-table estimator'); trees: each sampled preference's best "
        "hard tree under the same objective, from the same table, fitted by cross-entropy "
        "(docs/training.md, 'The tree-table estimator')",
    )
    path_images: int = Field(
        default=256,
        ge=1,
        description="paths and trees estimators: training images of the path-loss table",
    )
    preferences: int = Field(
        default=32, ge=1, description="paths and trees estimators: preferences per optimizer step"
    )
    branched_init: float = Field(
        default=0.0,
        ge=0,
        description="initial logit bias of each node's own-stream parent: > 0 starts the "
        "controller at the anchor (the fully branched tree) instead of a uniform choice",
    )
    path_split: Literal["calibration", "training"] = Field(
        default="calibration",
        description="paths and trees estimators: read the path table on the calibration split "
        "where the config has one (else the training split), or on the training split always "
        "(more writers than a calibration slice, but images the streams fitted; docs/training.md, "
        "'The table's split')",
    )
    path_scale: Literal["loss-scale", "single-task"] = Field(
        default="loss-scale",
        description="paths and trees estimators: weigh task j's path losses by its loss scale w_j "
        "(App. G), or divide them by its own stream's loss (units of the single-task loss)",
    )
    # Ablation switches (Table 6).
    inactive_loss: bool = True
    layer_weighting: bool = True
    affinity: bool = True
    dichotomy: bool = True

    def temperature_period(self) -> int:
        return self.temperature_every or max(1, round(self.steps * 300 / PAPER_STEPS))

    @model_validator(mode="after")
    def _table_pull_needs_the_table(self) -> EdgeStage:
        if self.pull_scale == "table" and self.estimator != "trees":
            raise ValueError(
                f'[edge] pull_scale = "table" needs estimator = "trees" (got "{self.estimator}")'
            )
        return self


class WeightStage(HypernetStage):
    """Stage 2: the weight hypernet (BN deltas); anchor and edge hypernet frozen."""

    preferences: int = Field(
        default=1,
        ge=1,
        description="preferences per optimizer step: the batch splits into this many groups, "
        "each with its own (r, c), arg-max tree and BN deltas, so the hypernet sees more "
        "preferences for the same images (docs/training.md, 'The weight stage's images and "
        "preferences')",
    )
    delta_penalty: float = Field(
        default=0.0,
        ge=0,
        description="beta of a penalty beta x sum(dgamma^2 + dbeta^2) over the used nodes' BN "
        "deltas / (2 x the layout's channels), added to each preference's loss (every channel "
        "priced alike, whatever tree reads it): a task's adaptation then grows with its "
        "weight r_i, so its loss falls as r_i rises (0: the paper; docs/training.md, 'Deltas "
        "that follow r')",
    )
    images: Literal["training", "calibration"] = Field(
        default="training",
        description="the split stage 2 trains on: the training split (the paper), or the "
        "calibration split, images the streams never trained on (needs [data] "
        "calibration_options; docs/training.md, 'The weight stage's images and preferences')",
    )

    @model_validator(mode="after")
    def _groups_have_images(self) -> WeightStage:
        if self.preferences > self.batch_size:
            raise ValueError(
                f"[weight] preferences ({self.preferences}) exceeds batch_size "
                f"({self.batch_size}): every preference needs at least one image"
            )
        return self


class BaselinesConfig(_Strict):
    """Budgets and sizes of the baselines (training/baselines, docs/baselines.md).

    Unset budgets follow the dymu stages, so that the comparison is fair: a dynamic baseline
    (PHN, PHN-BN, CPMTL) sees as many training images as the whole dymu pipeline (anchor + edge
    + weight stages), in batches of the anchor's size; each static network is trained like one
    anchor stream (``anchor.steps`` batches of ``anchor.batch_size``).
    """

    steps: int | None = Field(
        default=None, ge=1, description="per dynamic baseline; default: dymu's images / batch"
    )
    batch_size: int | None = Field(default=None, ge=1, description="default: anchor.batch_size")
    lr: float | None = Field(default=None, gt=0, description="Adam; default: anchor.lr")
    lr_decay: float = Field(default=0.3, gt=0, le=1)
    lr_decay_every: int | None = Field(default=None, ge=1, description="default: 14k/30k of steps")
    weight_decay: float | None = Field(default=None, ge=0, description="default: anchor's")
    eta: float = Field(default=0.2, gt=0, description="Dirichlet concentration of r (as dymu)")
    static_count: int = Field(default=5, ge=1, description="K static networks (paper Fig. 6)")
    static_steps: int | None = Field(default=None, ge=1, description="default: anchor.steps")
    chunk_size: int = Field(default=1024, ge=1, description="PHN/CPMTL: outputs per chunk")
    chunk_embed_dim: int = Field(default=32, ge=1, description="PHN/CPMTL: chunk embedding size")


class TrainConfig(_Strict):
    """A whole training run: model shape, data, and the four stages."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
    seed: int = 0
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    input_size: tuple[int, int] = (96, 128)
    hypernet: HypernetConfig = Field(default_factory=HypernetConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    trunk: TrunkStage = Field(default_factory=TrunkStage)
    anchor: AnchorStage = Field(default_factory=AnchorStage)
    affinity: AffinityStage = Field(default_factory=AffinityStage)
    edge: EdgeStage = Field(default_factory=EdgeStage)
    weight: WeightStage = Field(default_factory=WeightStage)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    checkpoint_every: int = Field(default=250, ge=1)
    log_every: int = Field(default=10, ge=1)
    amp: bool = Field(default=True, description="bfloat16 autocast on CUDA (ignored on CPU)")
    check_preferences: int = Field(
        default=200, ge=0, description="random preferences of the held-out checks (0: skip)"
    )

    def scaled(self, factor: float) -> TrainConfig:
        """The same run with every stage's step budget multiplied by ``factor``."""
        if factor <= 0:
            raise ConfigError(f"--steps-scale must be positive, got {factor}")

        def scale(stage: BaseModel) -> BaseModel:
            steps = stage.steps  # type: ignore[attr-defined]
            return stage.model_copy(update={"steps": max(1, round(steps * factor)) if steps else 0})

        # Unset baseline budgets follow the scaled stages by themselves.
        base = self.baselines
        baselines = base.model_copy(
            update={
                k: max(1, round(getattr(base, k) * factor))
                for k in ("steps", "static_steps")
                if getattr(base, k) is not None
            }
        )
        return self.model_copy(
            update={
                "trunk": scale(self.trunk),
                "anchor": scale(self.anchor),
                "edge": scale(self.edge),
                "weight": scale(self.weight),
                "baselines": baselines,
            }
        )

    def baseline_budget(self, static: bool = False) -> HypernetStage:
        """Steps, batch size and learning-rate schedule of one baseline (see BaselinesConfig)."""
        b = self.baselines
        batch = b.batch_size or self.anchor.batch_size
        if static:
            steps = b.static_steps or self.anchor.steps
        else:
            images = sum(
                s.steps * s.batch_size for s in (self.trunk, self.anchor, self.edge, self.weight)
            )
            steps = b.steps or max(1, round(images / batch))
        return HypernetStage(
            steps=steps,
            batch_size=batch,
            lr=b.lr or self.anchor.lr,
            lr_decay=b.lr_decay,
            lr_decay_every=b.lr_decay_every,
            eta=b.eta,
        )


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_config(name_or_path: str | Path) -> TrainConfig:
    """A config by name (``scenes-small``) or by path to a TOML file."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(
            f"no config {name_or_path!r}: not a file, and not one of {available_configs()}"
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    data.setdefault("name", path.stem)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {validation_message(exc.errors())}") from exc
