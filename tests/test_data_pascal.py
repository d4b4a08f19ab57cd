"""PASCAL-Context on a tiny fixture in the PASCAL_MT layout (JPEG, PNG and .mat files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import DatasetError, build_dataset, dataset_tasks
from training.data.pascal import label_edges

from .data_fixtures import PASCAL_HW, PASCAL_IDS, write_pascal

H, W = PASCAL_HW
IDS = PASCAL_IDS


@pytest.fixture
def pascal_root(tmp_path):
    return write_pascal(tmp_path)


def test_three_tasks_shapes_kinds_and_values(pascal_root):
    ds = build_dataset("pascal-context", "train", root=pascal_root, tasks=3, size=None)
    assert len(ds) == 2
    assert [(t.name, t.kind, t.classes, t.loss_scale) for t in ds.tasks] == [
        ("semseg", "segmentation", 21, 1.0),
        ("human_parts", "segmentation", 7, 2.0),
        ("sal", "binary", None, 5.0),
    ]
    assert ds.tasks == dataset_tasks("pascal-context", tasks=3)
    s = ds[0]
    assert set(s) == {"image", "semseg", "human_parts", "sal"}
    assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.float32
    sem = s["semseg"].numpy()
    assert s["semseg"].dtype == torch.int64 and sem.shape == (H, W)
    assert sem[0, 0] == 255 and sem[1, 0] == 255 and sem[6, 6] == 15 and sem[18, 20] == 0
    parts = s["human_parts"].numpy()
    assert parts[6, 7] == 1 and parts[9, 6] == 2 and parts[14, 5] == 6  # head, torso, lower leg
    assert parts[17, 15] == 0 and parts[0, 0] == 0  # the car's pixels are background
    assert set(np.unique(parts)) == {0, 1, 2, 6}
    sal = s["sal"]
    assert sal.shape == (1, H, W) and sal.dtype == torch.float32
    assert set(np.unique(sal.numpy())) == {0.0, 1.0} and sal[0, 5, 4] == 0 and sal[0, 6, 6] == 1
    png_parts = ds[1]["human_parts"].numpy()  # read from the PNG alternative
    assert png_parts[7, 6] == 3 and png_parts[19, 23] == 255 and png_parts[0, 0] == 0
    assert len(build_dataset("pascal-context", "val", root=pascal_root, tasks=3, size=None)) == 1


def test_five_tasks_and_resize(pascal_root):
    ds = build_dataset("pascal-context", "train", root=pascal_root, size=None)
    assert [t.name for t in ds.tasks] == ["semseg", "human_parts", "sal", "normals", "edge"]
    assert [t.kind for t in ds.tasks][3:] == ["normals", "binary"]
    s = ds[0]
    n = s["normals"]
    assert n.shape == (3, H, W) and n.dtype == torch.float32
    assert torch.all(n[:, :, : W // 2] == 0)  # invalid class
    np.testing.assert_allclose(torch.linalg.vector_norm(n[:, :, W // 2 :], dim=0), 1.0, atol=1e-6)
    assert n[2, 0, -1] > 0.99
    edge = s["edge"][0].numpy()
    assert s["edge"].shape == (1, H, W) and set(np.unique(edge)) == {0.0, 1.0}
    assert edge[:, W // 2 - 1 : W // 2 + 1].all() and not edge[:, : W // 2 - 1].any()
    assert not label_edges(np.full((4, 5), 7)).any()
    step = np.zeros((3, 6))
    step[:, 3:] = 2
    np.testing.assert_array_equal(label_edges(step), np.tile([0, 0, 1, 1, 0, 0], (3, 1)))

    small = build_dataset("pascal-context", "train", root=pascal_root, tasks=5, size=(16, 16))
    r = small[1]
    shapes = {k: tuple(v.shape) for k, v in r.items()}
    assert shapes == {
        "image": (3, 16, 16),
        "semseg": (16, 16),
        "human_parts": (16, 16),
        "sal": (1, 16, 16),
        "normals": (3, 16, 16),
        "edge": (1, 16, 16),
    }
    assert set(np.unique(r["sal"].numpy())) <= {0.0, 1.0}
    default = build_dataset("pascal-context", "train", root=pascal_root, tasks=3)
    assert default[0]["image"].shape == (3, 512, 512)


def test_missing_pascal_names_the_layout(tmp_path, pascal_root):
    with pytest.raises(DatasetError, match="JPEGImages"):
        build_dataset("pascal-context", "train", root=tmp_path / "none")
    with pytest.raises(DatasetError, match="ImageSets/Context"):
        build_dataset("pascal-context", "train", root=tmp_path)
    with pytest.raises(DatasetError, match="3 or 5"):
        build_dataset("pascal-context", "train", root=pascal_root, tasks=4)
    (pascal_root / "sal_distill" / f"{IDS[1]}.png").unlink()
    with pytest.raises(DatasetError, match="sal_distill"):
        build_dataset("pascal-context", "train", root=pascal_root, tasks=3)
