"""Task losses and evaluation metrics (docs/design.md §4 loss, §5 metrics).

Targets, as the datasets produce them (batched):

============== =================== ===========================================================
kind           prediction          target
============== =================== ===========================================================
segmentation   (B, C, H, W) logits int64 (B, H, W); ``ignore_index`` (255) = unlabeled pixel
depth          (B, 1, H, W)        float (B, 1, H, W); 0 (or non-finite) = invalid pixel
normals        (B, 3, H, W) unit   float (B, 3, H, W) unit vectors; all-zero = invalid pixel
binary         (B, 1, H, W) logits float (B, 1, H, W) in {0, 1}; ``ignore_index`` = ignored
classification (B, K) logits       int64 (B,); ``ignore_index`` = sample without this label
============== =================== ===========================================================

(``ignore_index`` is ``task.ignore_index``; None means nothing is ignored.)

Single-channel dense targets may also come as (B, H, W) and segmentation targets as (B, 1, H, W).
Predictions must have the target's spatial size: nothing is resized here (a mismatch raises
:class:`ValueError`; interpolate the prediction first if that is what you want).

Losses (:func:`task_loss`) are *unscaled* means over the valid pixels/samples of the batch; a
batch with none gives an exact 0 that still has a gradient path (``sum / max(count, 1)``), never
NaN. :func:`weighted_task_loss` forms ``Σ_i r_i w_i L_i`` with ``w_i = task.loss_scale`` (App. G).

Metrics (:class:`TaskMeter`) accumulate sufficient statistics (sums, counts, confusion matrices,
an angle histogram) over batches, so a whole split is evaluated exactly rather than as a mean of
batch means. Rates (mIoU, accuracies, "within" fractions) are reported in **percent**. Every
meter also reports ``loss``: the task loss averaged over all valid pixels/samples of the split.
:func:`delta_m` is the multi-task performance Δ_m of Maninis et al. (CVPR 2019).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dymu.config import TaskSpec

__all__ = [
    "ANGLE_BIN_DEG",
    "ANGLE_THRESHOLDS",
    "EDGE_POS_WEIGHT",
    "HIGHER_IS_BETTER",
    "TaskMeter",
    "delta_m",
    "make_meters",
    "task_loss",
    "weighted_task_loss",
]

#: ASTMT / MTI-Net edge balance (positives 0.95, negatives 0.05) as torch's ``pos_weight``: the
#: same loss up to the constant factor 0.05.
EDGE_POS_WEIGHT = 0.95 / 0.05

#: Width of the normals meter's angle-histogram bins (degrees); the median is exact to half a bin.
ANGLE_BIN_DEG = 0.01
_ANGLE_BINS = round(180.0 / ANGLE_BIN_DEG)

#: Thresholds (degrees) of the normals "within" metrics: ``within_11.25`` etc.
ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)

#: Direction of every metric name the meters produce (True: higher is better).
HIGHER_IS_BETTER: dict[str, bool] = {
    "loss": False,
    # segmentation (and binary: miou)
    "miou": True,
    "pixel_acc": True,
    # depth
    "abs_err": False,
    "rel_err": False,
    # normals
    "mean_angle": False,
    "median_angle": False,
    **{f"within_{t:g}": True for t in ANGLE_THRESHOLDS},
    # binary
    "bce": False,
    # classification
    "accuracy": True,
}


# --------------------------------------------------------------------------------------------
# shapes


def _fmt(shape: torch.Size | tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _check(task: TaskSpec, pred: Tensor, target: Tensor) -> Tensor:
    """Validate ``pred``/``target`` shapes for ``task``; returns the target in canonical shape."""
    name, kind = task.name, task.kind
    if kind == "classification":
        if pred.dim() != 2 or pred.shape[1] != task.out_channels:
            raise ValueError(
                f"task {name!r} (classification, K={task.out_channels}) expects logits of shape "
                f"(B, {task.out_channels}), got {_fmt(pred.shape)}"
            )
        if target.dim() == 2 and target.shape[1] == 1:
            target = target[:, 0]
        if target.dim() != 1 or target.shape[0] != pred.shape[0]:
            raise ValueError(
                f"task {name!r}: labels of shape ({pred.shape[0]},) expected, got "
                f"{_fmt(target.shape)}"
            )
        return target
    ch = task.out_channels
    if pred.dim() != 4 or pred.shape[1] != ch:
        raise ValueError(
            f"task {name!r} ({kind}) expects a prediction of shape (B, {ch}, H, W), got "
            f"{_fmt(pred.shape)}"
        )
    if kind == "segmentation":
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        want = (pred.shape[0], *pred.shape[2:])
    else:
        if ch == 1 and target.dim() == 3:
            target = target.unsqueeze(1)
        want = tuple(pred.shape)
    if tuple(target.shape) != want:
        if target.dim() == len(want) and target.shape[0] == pred.shape[0]:
            raise ValueError(
                f"task {name!r}: prediction is {_fmt(pred.shape[-2:])} but target is "
                f"{_fmt(target.shape[-2:])} (H x W); resize the prediction to the target's size "
                "(e.g. F.interpolate) before computing the loss or metrics"
            )
        raise ValueError(
            f"task {name!r} ({kind}): target of shape {_fmt(want)} expected for a prediction of "
            f"shape {_fmt(pred.shape)}, got {_fmt(target.shape)}"
        )
    return target


def _labeled(task: TaskSpec, target: Tensor) -> Tensor:
    """Mask of labeled entries of an integer (segmentation/classification) target."""
    if task.ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool)
    return target != task.ignore_index


def _depth_valid(target: Tensor) -> Tensor:
    return (target != 0) & torch.isfinite(target)


def _normals_valid(target: Tensor) -> Tensor:
    """(B, H, W) mask: target vector not all-zero and finite."""
    return (target != 0).any(dim=1) & torch.isfinite(target).all(dim=1)


def _binary_valid(task: TaskSpec, target: Tensor) -> Tensor:
    valid = torch.isfinite(target)
    if task.ignore_index is not None:
        valid &= target != task.ignore_index
    return valid


# --------------------------------------------------------------------------------------------
# losses


def _loss_terms(
    task: TaskSpec, pred: Tensor, target: Tensor, pos_weight: float | Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(sum of per-element losses over valid elements, number of valid elements)."""
    kind = task.kind
    if kind in ("segmentation", "classification"):
        target = target.long()
        valid = _labeled(task, target)
        ignore = -100 if task.ignore_index is None else task.ignore_index
        total = F.cross_entropy(pred, target, ignore_index=ignore, reduction="sum")
        return total, valid.sum()
    if kind == "depth":
        valid = _depth_valid(target)
        err = torch.where(valid, (pred - torch.where(valid, target, 0)).abs(), 0)
        return err.sum(), valid.sum()
    if kind == "normals":
        valid = _normals_valid(target)
        clean = torch.where(valid.unsqueeze(1), target, 0)
        cos = F.cosine_similarity(pred, clean.to(pred.dtype), dim=1, eps=1e-8)
        return torch.where(valid, 1 - cos, 0).sum(), valid.sum()
    if kind == "binary":
        valid = _binary_valid(task, target)
        clean = torch.where(valid, target, 0).to(pred.dtype)
        pw = None
        if pos_weight is not None:
            pw = torch.as_tensor(pos_weight, dtype=pred.dtype, device=pred.device)
        bce = F.binary_cross_entropy_with_logits(pred, clean, reduction="none", pos_weight=pw)
        return torch.where(valid, bce, 0).sum(), valid.sum()
    raise ValueError(f"unknown task kind {kind!r}")  # pragma: no cover - TaskSpec validates


def task_loss(
    task: TaskSpec, pred: Tensor, target: Tensor, pos_weight: float | Tensor | None = None
) -> Tensor:
    """Unscaled scalar loss of one task: a mean over the valid pixels/samples of the batch.

    * segmentation / classification: cross-entropy, ``task.ignore_index`` ignored.
    * depth: L1 ``mean |p - t|`` over pixels with ``t != 0`` (MTAN / NYU-v2 convention).
    * normals: ``mean (1 - cos(p, t))`` over pixels whose target is not all-zero (the common MTL
      convention, e.g. MTAN's ``1 - <p, t>`` with unit vectors; ``cos`` normalizes both, so
      identical normals give 0 and opposite ones 2).
    * binary: BCE with logits over pixels whose target is not ``task.ignore_index``;
      ``pos_weight`` multiplies the positive term as in
      :func:`torch.nn.functional.binary_cross_entropy_with_logits` (edges, ASTMT/MTI-Net:
      :data:`EDGE_POS_WEIGHT`).

    A batch without valid elements gives 0 with a gradient path (never NaN). The caller applies
    ``task.loss_scale``.
    """
    target = _check(task, pred, target)
    total, count = _loss_terms(task, pred, target, pos_weight)
    return total / count.clamp_min(1).to(total.dtype)


def weighted_task_loss(
    tasks: Sequence[TaskSpec],
    preds: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    r: Tensor | None = None,
    *,
    pos_weight: Mapping[str, float | Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(Σ_i r_i w_i L_i, {task name: L_i})`` with ``w_i = task.loss_scale`` (App. G).

    ``r`` has one entry per task in the order of ``tasks`` (ones when None). The per-task losses
    are unscaled and keep their graphs. ``pos_weight`` maps binary task names to their BCE
    positive weight.
    """
    if not tasks:
        raise ValueError("weighted_task_loss needs at least one task")
    if r is not None:
        r = torch.as_tensor(r).reshape(-1)
        if r.numel() != len(tasks):
            raise ValueError(f"r has {r.numel()} entries for {len(tasks)} tasks")
    pos_weight = pos_weight or {}
    per_task: dict[str, Tensor] = {}
    total: Tensor | None = None
    for i, task in enumerate(tasks):
        for what, store in (("prediction", preds), ("target", targets)):
            if task.name not in store:
                raise KeyError(f"no {what} for task {task.name!r} (have {sorted(store)})")
        loss = task_loss(task, preds[task.name], targets[task.name], pos_weight.get(task.name))
        per_task[task.name] = loss
        term = loss * task.loss_scale
        if r is not None:
            term = term * r[i].to(device=loss.device, dtype=loss.dtype)
        total = term if total is None else total + term
    assert total is not None
    return total, per_task


# --------------------------------------------------------------------------------------------
# metrics


def _miou(conf: Tensor) -> float:
    """Mean IoU (percent) over the classes present in target or prediction of ``conf``."""
    tp = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - tp
    present = union > 0
    if not bool(present.any()):
        return math.nan
    return float((tp[present] / union[present]).mean()) * 100


def _nan_div(num: float, den: float, scale: float = 1.0) -> float:
    return num / den * scale if den > 0 else math.nan


class TaskMeter:
    """Accumulates one task's metrics over batches; :meth:`compute` gives split-level values.

    Metric names (rates in percent; every kind also reports ``loss``, the task loss averaged
    over all valid pixels/samples of the split):

    * segmentation: ``miou`` = mean over classes c present in target or prediction of
      ``TP_c / (TP_c + FP_c + FN_c)`` from the split's confusion matrix (ignored pixels
      excluded); ``pixel_acc`` = correct / labeled pixels.
    * depth: ``abs_err`` = Σ|p - t| / n, ``rel_err`` = Σ(|p - t| / |t|) / n over the n pixels
      with ``t != 0`` (MTAN's formulas, pooled over the split instead of averaged per batch).
    * normals: per-pixel angle ``θ = 2·atan2(|p̂ - t̂|, |p̂ + t̂|)`` in degrees (= arccos of the
      cosine, numerically stable; a zero prediction counts as 90°); ``mean_angle`` (exact),
      ``median_angle`` (from a histogram of :data:`ANGLE_BIN_DEG`-wide bins, bin centers, the
      mean of the two middle values for an even count: within half a bin of the exact median),
      ``within_11.25`` / ``within_22.5`` / ``within_30`` = % of valid pixels with θ < threshold.
    * binary: ``miou`` over the two classes (prediction positive iff sigmoid(logit) > 0.5, target
      positive iff ≥ 0.5; same present-class rule), ``bce`` = mean unweighted BCE; ``loss`` uses
      ``pos_weight`` when given.
    * classification: ``accuracy`` = correct / labeled samples.

    A split without any valid element gives NaN for its metrics.
    """

    def __init__(self, task: TaskSpec, pos_weight: float | Tensor | None = None) -> None:
        self.task = task
        self.pos_weight = pos_weight
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._state: dict[str, Tensor] = {}

    def _add(self, key: str, value: Tensor) -> None:
        value = value.detach()
        value = value.double() if value.is_floating_point() else value.long()
        if key in self._state:
            self._state[key] += value.to(self._state[key].device)
        else:
            self._state[key] = value.clone()

    def _get(self, key: str) -> Tensor | float:
        return self._state[key].cpu() if key in self._state else 0.0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch (prediction as the model outputs it, target as the dataset gives it)."""
        task = self.task
        pred = pred.detach()
        target = _check(task, pred, target)
        getattr(self, f"_update_{task.kind}")(pred, target)  # validates labels first
        # float64 so that the pooled loss does not depend on how the split is batched
        total, count = _loss_terms(task, pred.double(), target, self.pos_weight)
        self._add("loss_sum", total)
        self._add("loss_n", count)

    def _update_segmentation(self, pred: Tensor, target: Tensor) -> None:
        c = self.task.out_channels
        target = target.long()
        valid = _labeled(self.task, target)
        t = target[valid]
        if t.numel() and bool(((t < 0) | (t >= c)).any()):
            raise ValueError(
                f"task {self.task.name!r}: labels must lie in [0, {c}) or equal ignore_index="
                f"{self.task.ignore_index}, got values {sorted(set(t.unique().tolist()))}"
            )
        p = pred.argmax(dim=1)[valid]
        self._add("conf", torch.bincount(t * c + p, minlength=c * c).reshape(c, c))

    def _update_classification(self, pred: Tensor, target: Tensor) -> None:
        target = target.long()
        valid = _labeled(self.task, target)
        self._add("correct", (pred.argmax(dim=1)[valid] == target[valid]).sum())
        self._add("n", valid.sum())

    def _update_depth(self, pred: Tensor, target: Tensor) -> None:
        valid = _depth_valid(target)
        p, t = pred[valid].double(), target[valid].double()
        err = (p - t).abs()
        self._add("abs_sum", err.sum())
        self._add("rel_sum", (err / t.abs()).sum())
        self._add("n", valid.sum())

    def _update_normals(self, pred: Tensor, target: Tensor) -> None:
        valid = _normals_valid(target)
        p = pred.double().permute(0, 2, 3, 1)[valid]
        t = target.double().permute(0, 2, 3, 1)[valid]
        p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
        t = t / t.norm(dim=1, keepdim=True)
        angle = torch.rad2deg(2 * torch.atan2((p - t).norm(dim=1), (p + t).norm(dim=1)))
        bins = (angle / ANGLE_BIN_DEG).floor().long().clamp_(0, _ANGLE_BINS - 1)
        self._add("hist", torch.bincount(bins, minlength=_ANGLE_BINS))
        self._add("angle_sum", angle.sum())
        self._add("n", valid.sum())
        for thr in ANGLE_THRESHOLDS:
            self._add(f"within_{thr:g}", (angle < thr).sum())

    def _update_binary(self, pred: Tensor, target: Tensor) -> None:
        valid = _binary_valid(self.task, target)
        t = (target[valid] >= 0.5).long()
        p = (pred[valid] > 0).long()
        self._add("conf", torch.bincount(t * 2 + p, minlength=4).reshape(2, 2))
        clean = torch.where(valid, target, 0).to(pred.dtype)
        bce = F.binary_cross_entropy_with_logits(pred, clean, reduction="none")
        self._add("bce_sum", torch.where(valid, bce, 0).sum())

    def compute(self) -> dict[str, float]:
        """Split-level metrics of everything added since construction or :meth:`reset`."""
        out = {"loss": _nan_div(float(self._get("loss_sum")), float(self._get("loss_n")))}
        kind = self.task.kind
        if kind == "segmentation":
            c = self.task.out_channels
            conf = self._state.get("conf", torch.zeros(c, c, dtype=torch.long)).cpu()
            out["miou"] = _miou(conf)
            out["pixel_acc"] = _nan_div(float(conf.trace()), float(conf.sum()), 100)
        elif kind == "classification":
            out["accuracy"] = _nan_div(float(self._get("correct")), float(self._get("n")), 100)
        elif kind == "depth":
            n = float(self._get("n"))
            out["abs_err"] = _nan_div(float(self._get("abs_sum")), n)
            out["rel_err"] = _nan_div(float(self._get("rel_sum")), n)
        elif kind == "normals":
            n = float(self._get("n"))
            out["mean_angle"] = _nan_div(float(self._get("angle_sum")), n)
            out["median_angle"] = self._median_angle()
            for thr in ANGLE_THRESHOLDS:
                key = f"within_{thr:g}"
                out[key] = _nan_div(float(self._get(key)), n, 100)
        elif kind == "binary":
            conf = self._state.get("conf", torch.zeros(2, 2, dtype=torch.long)).cpu()
            out["miou"] = _miou(conf)
            out["bce"] = _nan_div(float(self._get("bce_sum")), float(conf.sum()))
        return out

    def _median_angle(self) -> float:
        if "hist" not in self._state:
            return math.nan
        cum = self._state["hist"].cpu().cumsum(0)
        n = int(cum[-1])
        if n == 0:
            return math.nan

        def order_stat(k: int) -> float:  # k-th smallest (0-based), as its bin's center
            b = int(torch.searchsorted(cum, torch.tensor(k), right=True))
            return (b + 0.5) * ANGLE_BIN_DEG

        if n % 2:
            return order_stat(n // 2)
        return (order_stat(n // 2 - 1) + order_stat(n // 2)) / 2


def make_meters(
    tasks: Sequence[TaskSpec], pos_weight: Mapping[str, float | Tensor] | None = None
) -> dict[str, TaskMeter]:
    """One :class:`TaskMeter` per task, keyed by task name."""
    pos_weight = pos_weight or {}
    return {t.name: TaskMeter(t, pos_weight.get(t.name)) for t in tasks}


# --------------------------------------------------------------------------------------------
# Δ_m


def delta_m(
    metrics: Mapping[str, Mapping[str, float]],
    single_task: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, bool] | None = None,
    *,
    exclude: Collection[str] = ("loss",),
) -> float:
    """Multi-task performance Δ_m in percent (Maninis et al., CVPR 2019; Vandenhende et al.).

    ``Δ_m = (1/T) Σ_t (1/|M_t|) Σ_j (-1)^{l_j} (M_{t,j} - M_{ST,t,j}) / M_{ST,t,j} × 100`` with
    ``l_j = 1`` when *lower* is better for metric j (Maninis' definition), so Δ_m > 0 means
    better than single-task: a 10 % lower error gives +10, a 10 % higher mIoU also +10.

    T = the tasks of ``metrics`` (each must be in ``single_task``); M_t = the metric names present
    in both dicts for task t, less ``exclude`` (``loss`` by default: an objective, not a reported
    metric). Filter the dicts to choose other metrics. Directions come from
    :data:`HIGHER_IS_BETTER`, updated by ``higher_is_better``.
    """
    directions = {**HIGHER_IS_BETTER, **(higher_is_better or {})}
    if not metrics:
        raise ValueError("delta_m needs the metrics of at least one task")
    per_task = []
    for task, values in metrics.items():
        if task not in single_task:
            raise ValueError(f"no single-task metrics for task {task!r}")
        base = single_task[task]
        names = [m for m in values if m in base and m not in exclude]
        if not names:
            raise ValueError(f"task {task!r} has no metric shared with its single-task baseline")
        terms = []
        for m in names:
            if m not in directions:
                raise ValueError(
                    f"direction of metric {m!r} unknown; pass higher_is_better={{{m!r}: ...}}"
                )
            ref = float(base[m])
            if ref == 0 or not math.isfinite(ref):
                raise ValueError(
                    f"single-task {task!r}/{m!r} is {ref}: Δ_m needs a finite, non-zero value"
                )
            sign = 1.0 if directions[m] else -1.0
            terms.append(sign * (float(values[m]) - ref) / ref)
        per_task.append(sum(terms) / len(terms))
    return sum(per_task) / len(per_task) * 100
