"""The MTAN .npy layout: the NYU-v2 loader on a fixture in the real layout, the writer's round
trip through both loaders, the registry and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dymu.errors import DymuError
from training.data import (
    DATASETS,
    DatasetError,
    build_dataset,
    dataset_tasks,
    render_scenes,
    write_split,
)
from training.data.scenes import SCENE_CLASSES

from .data_fixtures import write_nyuv2


def test_nyuv2_fixture_in_the_real_layout(tmp_path):
    truth = write_nyuv2(tmp_path, "train")
    write_nyuv2(tmp_path, "val", n=2, seed=1)
    ds = build_dataset("nyuv2", "train", root=tmp_path)
    assert len(ds) == 3
    assert [(t.name, t.kind, t.classes, t.loss_scale) for t in ds.tasks] == [
        ("segmentation", "segmentation", 13, 1.0),
        ("normals", "normals", None, 10.0),
        ("depth", "depth", None, 3.0),
    ]
    assert ds.tasks == dataset_tasks("nyuv2")
    image, label, depth, normal = truth[1]
    s = ds[1]
    assert s["image"].shape == (3, 16, 16) and s["image"].dtype == torch.float32
    np.testing.assert_allclose(
        ds.denormalize(s["image"]).permute(1, 2, 0).numpy(), image, atol=1e-5
    )
    seg = s["segmentation"]
    assert seg.dtype == torch.int64 and seg.shape == (16, 16)
    np.testing.assert_array_equal(seg.numpy(), np.where(label < 0, 255, label))
    assert s["depth"].shape == (1, 16, 16)
    d = s["depth"][0].numpy()
    assert d[0, 0] == 0 and d[1, 0] == 0  # invalid and NaN -> 0
    np.testing.assert_allclose(d[3:], depth[3:, :, 0])
    n = s["normals"].permute(1, 2, 0).numpy()
    norms = np.linalg.norm(n, axis=-1)
    np.testing.assert_allclose(norms[3:], 1.0, atol=1e-5)
    assert np.all(n[2, :4] == 0)
    np.testing.assert_allclose(
        n[5], normal[5] / np.linalg.norm(normal[5], axis=-1)[:, None], atol=1e-5
    )
    # "test" is an alias of "val"
    assert len(build_dataset("nyuv2", "test", root=tmp_path)) == 2
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["segmentation"].shape == (2, 16, 16)
    small = build_dataset("nyuv2", "train", root=tmp_path, size=(8, 12))
    r = small[0]
    assert r["image"].shape == (3, 8, 12) and r["segmentation"].shape == (8, 12)
    assert r["depth"].shape == (1, 8, 12) and r["normals"].shape == (3, 8, 12)
    assert set(np.unique(r["segmentation"].numpy())) <= set(range(13)) | {255}


def test_missing_nyuv2_names_the_expected_layout(tmp_path):
    for root in (None, tmp_path / "nowhere", tmp_path):
        with pytest.raises(DatasetError) as err:
            build_dataset("nyuv2", "train", root=root)
        msg = str(err.value)
        assert "image/<i>.npy" in msg and "label" in msg and "depth" in msg and "normal" in msg
        assert "\n" not in msg
        assert isinstance(err.value, DymuError) and isinstance(err.value, ValueError)
    write_nyuv2(tmp_path, "train")
    for f in (tmp_path / "train" / "normal").glob("*.npy"):
        f.unlink()
        break
    with pytest.raises(DatasetError, match="normal"):
        build_dataset("nyuv2", "train", root=tmp_path)
    with pytest.raises(DatasetError, match="splits"):
        build_dataset("nyuv2", "dev", root=tmp_path)


def test_write_split_round_trips_through_both_loaders(tmp_path):
    arrays = render_scenes(3, seed=4, size=(20, 28))
    arrays["label"][1, :2, :5] = 255  # unlabeled pixels
    out = write_split(
        arrays, tmp_path / "train", {"generator": "scenes", "seed": 4, "classes": SCENE_CLASSES}
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n"] == 3 and meta["size"] == [20, 28] and meta["seed"] == 4
    assert meta["classes"] == list(SCENE_CLASSES)
    raw_label = np.load(out / "label" / "1.npy")
    assert raw_label.shape == (20, 28) and raw_label[0, 0] == -1
    assert np.load(out / "depth" / "0.npy").shape == (20, 28, 1)
    assert np.load(out / "image" / "0.npy").dtype == np.float32

    nyu = build_dataset("nyuv2", "train", root=tmp_path)
    sc = build_dataset("scenes", "train", root=tmp_path)
    assert len(nyu) == len(sc) == 3
    assert dataset_tasks("scenes", root=tmp_path)[0].classes == len(SCENE_CLASSES)
    for ds in (nyu, sc):
        s = ds[1]
        np.testing.assert_allclose(
            ds.denormalize(s["image"]).permute(1, 2, 0).numpy(), arrays["image"][1], atol=1e-5
        )
        np.testing.assert_array_equal(s["segmentation"].numpy(), arrays["label"][1])
        assert s["segmentation"][0, 0] == 255
        np.testing.assert_array_equal(s["depth"][0].numpy(), arrays["depth"][1])
        np.testing.assert_allclose(
            s["normals"].permute(1, 2, 0).numpy(), arrays["normal"][1], atol=1e-6
        )
    with pytest.raises(DatasetError, match="overwrite"):
        write_split(arrays, tmp_path / "train")
    write_split({k: v[:2] for k, v in arrays.items()}, tmp_path / "train", overwrite=True)
    assert len(build_dataset("scenes", "train", root=tmp_path)) == 2


def test_registry_and_option_errors():
    assert set(DATASETS) == {"scenes", "multidigits", "nyuv2", "pascal-context", "cifar100-20"}
    with pytest.raises(DatasetError, match="unknown dataset"):
        build_dataset("imagenet", "train")
    with pytest.raises(DatasetError, match="no option"):
        build_dataset("scenes", "train", colour=True)
    with pytest.raises(DatasetError, match="no option"):
        dataset_tasks("nyuv2", n=3)
    assert len(dataset_tasks("cifar100-20")) == 20
    assert [t.loss_scale for t in dataset_tasks("pascal", tasks=5)] == [1, 2, 5, 10, 50]
    assert [t.kind for t in dataset_tasks("multidigits")] == ["classification"] * 2
