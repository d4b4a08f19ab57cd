"""Task losses and metrics (training/tasks.py) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dymu.config import TaskSpec
from training.tasks import (
    EDGE_POS_WEIGHT,
    HIGHER_IS_BETTER,
    TaskMeter,
    delta_m,
    make_meters,
    task_loss,
    weighted_task_loss,
)

SEG = TaskSpec(name="seg", kind="segmentation", classes=3)
SEG4 = TaskSpec(name="seg4", kind="segmentation", classes=4)
DEPTH = TaskSpec(name="depth", kind="depth", loss_scale=3.0)
NORMALS = TaskSpec(name="normals", kind="normals", loss_scale=10.0)
SAL = TaskSpec(name="sal", kind="binary")
CLS = TaskSpec(name="cls", kind="classification", classes=4)
ALL = (SEG, DEPTH, NORMALS, SAL, CLS)


def one_hot_logits(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Logits whose arg-max is ``labels``; class dim second."""
    logits = F.one_hot(labels, classes).float() * 5.0
    return logits.movedim(-1, 1)


def rotated_normals(angles_deg: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, target) of shape (1, 3, 1, n): target +z, pred rotated about x by each angle."""
    a = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    target = torch.zeros(1, 3, 1, len(angles_deg))
    target[0, 2] = 1.0
    pred = torch.stack([torch.zeros_like(a), torch.sin(a), torch.cos(a)]).float()
    return pred.reshape(1, 3, 1, -1), target


def random_batch(task: TaskSpec, g: torch.Generator, b: int = 2, hw=(5, 6)):
    h, w = hw
    if task.kind == "segmentation":
        pred = torch.randn(b, task.classes, h, w, generator=g)
        target = torch.randint(0, task.classes, (b, h, w), generator=g)
        target[torch.rand(b, h, w, generator=g) < 0.2] = 255
    elif task.kind == "classification":
        pred = torch.randn(b, task.classes, generator=g)
        target = torch.randint(0, task.classes, (b,), generator=g)
        target[torch.rand(b, generator=g) < 0.3] = 255
    elif task.kind == "depth":
        pred = torch.rand(b, 1, h, w, generator=g) * 5
        target = torch.rand(b, 1, h, w, generator=g) * 5 + 0.1
        target[torch.rand(b, 1, h, w, generator=g) < 0.2] = 0
    elif task.kind == "normals":
        pred = F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
        target = F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
        target[:, :, torch.rand(h, w, generator=g) < 0.2] = 0
    else:
        pred = torch.randn(b, 1, h, w, generator=g) * 2
        target = (torch.rand(b, 1, h, w, generator=g) < 0.4).float()
        target[torch.rand(b, 1, h, w, generator=g) < 0.2] = 255
    return pred, target


# ------------------------------------------------------------------------------------ losses


def test_segmentation_ce_ignores_unlabeled_pixels():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 4, 5, generator=g)
    target = torch.randint(0, 3, (2, 4, 5), generator=g)
    target[0, :2] = 255
    target[1, 3, 1:] = 255
    valid = target != 255
    expected = F.cross_entropy(pred.movedim(1, -1)[valid], target[valid])
    assert torch.allclose(task_loss(SEG, pred, target), expected)
    # a (B, 1, H, W) target is accepted too
    assert torch.allclose(task_loss(SEG, pred, target[:, None]), expected)


def test_classification_ce_ignores_unlabeled_samples():
    pred = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 255, 3, 255, 1])
    keep = target != 255
    expected = F.cross_entropy(pred[keep], target[keep])
    assert torch.allclose(task_loss(CLS, pred, target), expected)


def test_depth_l1_ignores_zero_pixels():
    pred = torch.tensor([3.0, 3.0, 5.0, 1.0]).reshape(1, 1, 2, 2)
    target = torch.tensor([2.0, 4.0, 0.0, 1.0]).reshape(1, 1, 2, 2)
    assert task_loss(DEPTH, pred, target).item() == pytest.approx(2 / 3)
    # (B, H, W) target
    assert task_loss(DEPTH, pred, target[:, 0]).item() == pytest.approx(2 / 3)


def test_normals_loss_identical_zero_opposite_two_invalid_ignored():
    n = F.normalize(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2)), dim=1)
    assert task_loss(NORMALS, n, n).item() == pytest.approx(0.0, abs=1e-6)
    assert task_loss(NORMALS, -n, n).item() == pytest.approx(2.0, abs=1e-6)
    target = n.clone()
    target[:, :, :2] = 0  # invalid rows: prediction there is irrelevant
    pred = n.clone()
    pred[:, :, :2] = -n[:, :, :2]
    assert task_loss(NORMALS, pred, target).item() == pytest.approx(0.0, abs=1e-6)


def test_binary_bce_ignore_and_pos_weight():
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 1, 4, 4, generator=g)
    target = (torch.rand(2, 1, 4, 4, generator=g) < 0.3).float()
    target[0, 0, 0] = 255
    valid = target != 255
    expected = F.binary_cross_entropy_with_logits(pred[valid], target[valid])
    assert torch.allclose(task_loss(SAL, pred, target), expected)
    w = EDGE_POS_WEIGHT
    p, t = torch.sigmoid(pred[valid]), target[valid]
    manual = -(w * t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    assert torch.allclose(task_loss(SAL, pred, target, pos_weight=w), manual, atol=1e-5)


@pytest.mark.parametrize("task", ALL, ids=lambda t: t.kind)
def test_all_ignored_batch_gives_zero_with_gradient(task):
    g = torch.Generator().manual_seed(4)
    pred, target = random_batch(task, g)
    if task.kind in ("depth", "normals"):
        target.zero_()
    else:
        target.fill_(255)
    pred = pred.clone().requires_grad_(True)
    loss = task_loss(task, pred, target)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert pred.grad.abs().sum().item() == 0.0


def test_spatial_mismatch_raises_clear_error():
    with pytest.raises(ValueError, match="resize the prediction"):
        task_loss(DEPTH, torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="resize the prediction"):
        TaskMeter(SEG).update(torch.zeros(1, 3, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        task_loss(SEG, torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


def test_weighted_task_loss_sums_r_w_l():
    g = torch.Generator().manual_seed(5)
    tasks = (SEG, DEPTH, NORMALS)
    batches = {t.name: random_batch(t, g) for t in tasks}
    preds = {k: v[0] for k, v in batches.items()}
    targets = {k: v[1] for k, v in batches.items()}
    r = torch.tensor([0.5, 0.3, 0.2])
    total, per = weighted_task_loss(tasks, preds, targets, r)
    expected = sum(
        r[i] * t.loss_scale * task_loss(t, preds[t.name], targets[t.name])
        for i, t in enumerate(tasks)
    )
    assert torch.allclose(total, expected)
    assert set(per) == {"seg", "depth", "normals"}
    total1, _ = weighted_task_loss(tasks, preds, targets)
    assert torch.allclose(total1, sum(t.loss_scale * per[t.name] for t in tasks))
    with pytest.raises(ValueError, match="entries"):
        weighted_task_loss(tasks, preds, targets, torch.ones(2))
    with pytest.raises(KeyError, match="depth"):
        weighted_task_loss(tasks, {"seg": preds["seg"]}, targets)


# ----------------------------------------------------------------------------------- metrics


def test_segmentation_miou_and_pixel_accuracy_hand_example():
    # rows target, cols pred: IoU_0 = 1/3, IoU_1 = 2/3, IoU_2 = 1/2 -> mIoU = 1/2; acc = 4/6.
    # Class 3 of SEG4 appears nowhere, so it is left out of the mean.
    target = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
    pred_labels = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    for task in (SEG, SEG4):
        m = TaskMeter(task)
        m.update(one_hot_logits(pred_labels, task.classes), target)
        out = m.compute()
        assert out["miou"] == pytest.approx(50.0)
        assert out["pixel_acc"] == pytest.approx(400 / 6)
    # an ignored pixel (whatever is predicted there) changes nothing
    t2 = torch.cat([target, torch.tensor([[[255]], [[255]]]).reshape(1, 2, 1)], dim=2)
    p2 = torch.cat([pred_labels, torch.tensor([[[2], [2]]])], dim=2)
    m = TaskMeter(SEG)
    m.update(one_hot_logits(p2, 3), t2)
    assert m.compute()["miou"] == pytest.approx(50.0)
    assert m.compute()["pixel_acc"] == pytest.approx(400 / 6)


def test_segmentation_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="labels must lie"):
        TaskMeter(SEG).update(torch.zeros(1, 3, 1, 2), torch.tensor([[[0, 7]]]))


def test_depth_abs_and_rel_error_hand_values():
    pred = torch.tensor([3.0, 3.0, 5.0, 1.0]).reshape(1, 1, 2, 2)
    target = torch.tensor([2.0, 4.0, 0.0, 1.0]).reshape(1, 1, 2, 2)
    m = TaskMeter(DEPTH)
    m.update(pred, target)
    out = m.compute()
    assert out["abs_err"] == pytest.approx(2 / 3)
    assert out["rel_err"] == pytest.approx((1 / 2 + 1 / 4 + 0) / 3)
    assert out["loss"] == pytest.approx(2 / 3)


def test_normals_angle_metrics_on_known_angles():
    pred, target = rotated_normals([10, 40, 10, 40, 0])
    target[..., -1] = 0  # last pixel invalid
    m = TaskMeter(NORMALS)
    m.update(pred, target)
    out = m.compute()
    assert out["mean_angle"] == pytest.approx(25.0, abs=1e-4)
    assert out["median_angle"] == pytest.approx(25.0, abs=0.01)
    assert out["within_11.25"] == pytest.approx(50.0)
    assert out["within_22.5"] == pytest.approx(50.0)
    assert out["within_30"] == pytest.approx(50.0)
    cos = math.cos(math.radians(10)) + math.cos(math.radians(40))
    assert out["loss"] == pytest.approx(1 - cos / 2, abs=1e-6)

    pred, target = rotated_normals([10, 20, 40])
    m = TaskMeter(NORMALS)
    m.update(pred, target)
    out = m.compute()
    assert out["median_angle"] == pytest.approx(20.0, abs=0.01)
    assert out["within_22.5"] == pytest.approx(200 / 3)
    assert out["within_30"] == pytest.approx(200 / 3)


def test_normals_median_matches_numpy_on_random_angles():
    g = torch.Generator().manual_seed(6)
    angles = (torch.rand(1001, generator=g, dtype=torch.float64) * 120).tolist()
    for n in (1001, 1000):
        pred, target = rotated_normals(angles[:n])
        m = TaskMeter(NORMALS)
        m.update(pred, target)
        out = m.compute()
        assert out["median_angle"] == pytest.approx(float(np.median(angles[:n])), abs=0.01)
        assert out["mean_angle"] == pytest.approx(float(np.mean(angles[:n])), abs=1e-3)


def test_binary_miou_and_bce():
    # logits > 0 <=> prob > 0.5; pred = [1, 1, 0, 0], target = [1, 0, 0, ign] ->
    # class 1: TP 1, FP 1, FN 0 -> 1/2; class 0: TP 1, FP 0, FN 1 -> 1/2.
    pred = torch.tensor([2.0, 0.5, -1.0, 3.0]).reshape(1, 1, 1, 4)
    target = torch.tensor([1.0, 0.0, 0.0, 255.0]).reshape(1, 1, 1, 4)
    m = TaskMeter(SAL)
    m.update(pred, target)
    out = m.compute()
    assert out["miou"] == pytest.approx(50.0)
    expected = F.binary_cross_entropy_with_logits(pred[..., :3], target[..., :3]).item()
    assert out["bce"] == pytest.approx(expected, rel=1e-6)
    assert out["loss"] == pytest.approx(expected, rel=1e-6)
    m = TaskMeter(SAL, pos_weight=EDGE_POS_WEIGHT)
    m.update(pred, target)
    out = m.compute()
    assert out["bce"] == pytest.approx(expected, rel=1e-6) and out["loss"] > out["bce"]


def test_classification_accuracy_with_ignored_samples():
    target = torch.tensor([0, 255, 2, 1])
    pred = one_hot_logits(torch.tensor([0, 1, 1, 1]), 4)
    m = TaskMeter(CLS)
    m.update(pred, target)
    out = m.compute()
    assert out["accuracy"] == pytest.approx(200 / 3)
    keep = target != 255
    assert out["loss"] == pytest.approx(F.cross_entropy(pred[keep], target[keep]).item())
    # a batch without labels changes nothing; a split without any gives NaN
    m.update(pred[:1], torch.tensor([255]))
    assert m.compute()["accuracy"] == pytest.approx(200 / 3)
    empty = TaskMeter(CLS)
    empty.update(pred[:1], torch.tensor([255]))
    assert math.isnan(empty.compute()["accuracy"]) and math.isnan(empty.compute()["loss"])


def test_accumulating_two_batches_equals_one_concatenated_batch():
    g = torch.Generator().manual_seed(7)
    tasks = (SEG, DEPTH, NORMALS, SAL, CLS)
    split, joint = make_meters(tasks), make_meters(tasks)
    for task in tasks:
        p1, t1 = random_batch(task, g, b=2)
        p2, t2 = random_batch(task, g, b=3)
        split[task.name].update(p1, t1)
        split[task.name].update(p2, t2)
        joint[task.name].update(torch.cat([p1, p2]), torch.cat([t1, t2]))
        a, b = split[task.name].compute(), joint[task.name].compute()
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-9), (task.name, key)
            assert key in HIGHER_IS_BETTER
        # the pooled loss is the concatenated batch's loss, not a mean of batch means
        whole = task_loss(task, torch.cat([p1, p2]), torch.cat([t1, t2])).item()
        assert a["loss"] == pytest.approx(whole, rel=1e-5)
    split["seg"].reset()
    assert math.isnan(split["seg"].compute()["miou"])


# ------------------------------------------------------------------------------------- delta_m


def test_delta_m():
    st = {"seg": {"miou": 50.0, "pixel_acc": 80.0, "loss": 1.0}, "depth": {"abs_err": 0.5}}
    assert delta_m(st, st) == pytest.approx(0.0)
    # 10 % lower error (lower is better) -> +10
    assert delta_m({"depth": {"abs_err": 0.45}}, st) == pytest.approx(10.0)
    # 10 % higher mIoU, same accuracy -> +5 for seg; the (excluded) loss does not count
    mt = {"seg": {"miou": 55.0, "pixel_acc": 80.0, "loss": 9.0}, "depth": {"abs_err": 0.55}}
    assert delta_m(mt, st) == pytest.approx((5.0 - 10.0) / 2)
    # overriding a direction flips its sign
    assert delta_m({"depth": {"abs_err": 0.45}}, st, {"abs_err": True}) == pytest.approx(-10.0)
    with pytest.raises(ValueError, match="unknown"):
        delta_m({"seg": {"odsF": 1.0}}, {"seg": {"odsF": 2.0}})
    with pytest.raises(ValueError, match="single-task"):
        delta_m({"other": {"miou": 1.0}}, st)
