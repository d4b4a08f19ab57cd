"""multidigits: MultiMNIST-style pairs of scikit-learn's bundled digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from training.data import DatasetError, build_dataset, dataset_tasks
from training.data.multidigits import (
    CANVAS,
    N_TRAIN_SOURCES,
    make_pairs,
    source_digits,
    warp_digits,
)


def test_shapes_tasks_and_determinism():
    ds = build_dataset("multidigits", "train", n=12, seed=3)
    assert len(ds) == 12
    assert [(t.name, t.kind, t.classes, t.loss_scale) for t in ds.tasks] == [
        ("left", "classification", 10, 1.0),
        ("right", "classification", 10, 1.0),
    ]
    assert ds.tasks == dataset_tasks("multidigits")
    s = ds[5]
    assert s["image"].shape == (3, CANVAS, CANVAS) and s["image"].dtype == torch.float32
    assert torch.equal(s["image"][0], s["image"][1]) and torch.equal(s["image"][0], s["image"][2])
    assert s["left"].dtype == torch.int64 and s["left"].ndim == 0 and 0 <= int(s["left"]) <= 9
    again = build_dataset("multidigits", "train", n=12, seed=3)
    for i in range(12):
        assert torch.equal(ds[i]["image"], again[i]["image"])
        assert int(ds[i]["right"]) == int(again[i]["right"])
    other = build_dataset("multidigits", "train", n=12, seed=4)
    assert not torch.equal(ds[0]["image"], other[0]["image"])
    big = build_dataset("multidigits", "train", n=400, seed=0)
    pix = torch.stack([big[i]["image"] for i in range(len(big))])
    assert abs(float(pix.mean())) < 0.2 and 0.8 < float(pix.std()) < 1.2  # normalized


def test_labels_are_the_source_digits_and_the_canvas_is_their_overlay():
    digits = load_digits()
    up, labels = source_digits()
    p = make_pairs(50, seed=1, split="train")
    np.testing.assert_array_equal(p["left"], digits.target[p["left_index"]])
    np.testing.assert_array_equal(p["right"], digits.target[p["right_index"]])
    np.testing.assert_array_equal(labels, digits.target)
    assert np.all(p["left_index"] != p["right_index"])
    s = up.shape[1]
    for k in range(50):
        r0, c0, r1, c1 = p["offsets"][k]
        canvas = np.zeros((CANVAS, CANVAS), np.float32)
        canvas[r0 : r0 + s, c0 : c0 + s] = up[p["left_index"][k]]
        canvas[r1 : r1 + s, c1 : c1 + s] = np.maximum(
            canvas[r1 : r1 + s, c1 : c1 + s], up[p["right_index"][k]]
        )
        np.testing.assert_array_equal(p["image"][k], canvas)
        assert r0 < r1 < r0 + s and c0 < c1 < c0 + s  # upper-left / lower-right, overlapping
    # the upsampled digit keeps the source's shape
    small = up[7][:: s // 8, :: s // 8]
    assert np.corrcoef(small.ravel(), digits.images[7].ravel())[0, 1] > 0.8


def test_train_and_test_use_disjoint_source_images():
    train = make_pairs(500, seed=0, split="train")
    test = make_pairs(300, seed=0, split="test")
    tr = set(train["left_index"]) | set(train["right_index"])
    te = set(test["left_index"]) | set(test["right_index"])
    assert max(tr) < N_TRAIN_SOURCES <= min(te)
    assert not tr & te
    val = build_dataset("multidigits", "val", n=5)  # val is an alias of test
    np.testing.assert_allclose(
        val.denormalize(val[0]["image"])[0].numpy(),
        make_pairs(5, 0, "test")["image"][0],
        atol=1e-6,
    )


def test_sources_keep_a_slice_of_the_pool_and_the_default_is_unchanged():
    fit = make_pairs(3000, seed=1, split="train", sources=[0, 1200])
    cal = make_pairs(2000, seed=3, split="train", sources=[1200, 1400])
    used_fit = set(fit["left_index"]) | set(fit["right_index"])
    used_cal = set(cal["left_index"]) | set(cal["right_index"])
    assert max(used_fit) < 1200 <= min(used_cal) and max(used_cal) < N_TRAIN_SOURCES
    assert len(used_cal) > 190  # the slice is drawn from, not one digit of it
    assert (cal["left_index"] != cal["right_index"]).all()
    whole = make_pairs(50, seed=1, split="train")
    same = make_pairs(50, seed=1, split="train", sources=None)
    for key in whole:  # shipped models were trained on the default: it must not move
        np.testing.assert_array_equal(whole[key], same[key])
    ds = build_dataset("multidigits", "train", n=4, sources=[1200, 1400])
    assert len(ds) == 4


@pytest.mark.parametrize(
    "sources", [[5], [3, 3], [0, 1401], [-1, 10], [10, 11], [0.0, 5], [True, 5]]
)
def test_bad_sources_are_refused_with_the_reason(sources):
    with pytest.raises(DatasetError, match="sources"):
        make_pairs(10, split="train", sources=sources)


def test_warp_renders_each_digit_through_its_own_affine_map():
    plain = make_pairs(400, seed=2, split="train")
    warped = make_pairs(400, seed=2, split="train", warp=True)
    for key in ("left", "right", "left_index", "right_index", "offsets"):  # the same pairs
        np.testing.assert_array_equal(plain[key], warped[key])
    assert warped["image"].dtype == np.float32
    assert warped["image"].min() >= 0.0 and warped["image"].max() <= 1.0
    changed = np.abs(warped["image"] - plain["image"]).reshape(400, -1).max(axis=1)
    assert (changed > 0.1).mean() > 0.95  # nearly every pair is redrawn
    # a map about the centre keeps the ink near where it was and in about the same amount
    ink_plain, ink_warped = plain["image"].sum(axis=(1, 2)), warped["image"].sum(axis=(1, 2))
    assert np.median(ink_warped / ink_plain) == pytest.approx(1.0, abs=0.15)
    # the same source digit twice looks different: each rendering gets its own map
    digit = source_digits()[0][:1]
    twice = warp_digits(np.repeat(digit, 2, axis=0), np.random.default_rng(0))
    assert np.abs(twice[0] - twice[1]).max() > 0.1
    # with every bound at zero the map is the identity
    np.testing.assert_allclose(
        warp_digits(digit, np.random.default_rng(0), bounds=(0.0, 0.0, 0.0)), digit, atol=1e-5
    )
    again = make_pairs(400, seed=2, split="train", warp=True)
    np.testing.assert_array_equal(warped["image"], again["image"])
    with pytest.raises(DatasetError, match="warp"):
        build_dataset("multidigits", "train", n=4, warp="yes")
