"""PASCAL-Context on a tiny fixture in the PASCAL_MT layout (JPEG, PNG and .mat files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from training.data import DatasetError, build_dataset, dataset_tasks
from training.data.pascal import label_edges

H, W = 20, 24
IDS = ("2008_000002", "2008_000003")


def _parts_mat(path, objects):
    """A Pascal-Part annotation: anno.imname, anno.objects(class, class_ind, mask, parts)."""
    obj_dt = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    part_dt = [("part_name", "O"), ("mask", "O")]
    objs = np.zeros((1, len(objects)), dtype=obj_dt)
    for k, (cls, ind, mask, parts) in enumerate(objects):
        p = np.zeros((1, len(parts)), dtype=part_dt) if parts else np.zeros((0, 0))
        for j, (name, pmask) in enumerate(parts):
            p[0, j]["part_name"] = name
            p[0, j]["mask"] = pmask.astype(np.uint8)
        objs[0, k]["class"] = cls
        objs[0, k]["class_ind"] = np.array([[ind]], dtype=np.uint8)
        objs[0, k]["mask"] = mask.astype(np.uint8)
        objs[0, k]["parts"] = p
    savemat(path, {"anno": {"imname": path.stem, "objects": objs}})


@pytest.fixture
def pascal_root(tmp_path):
    root = tmp_path / "PASCAL_MT"
    for d in (
        "JPEGImages",
        "ImageSets/Context",
        "semseg/pascal-context",
        "human_parts",
        "sal_distill",
        "normals_distill",
        "pascal-context/trainval",
    ):
        (root / d).mkdir(parents=True)
    (root / "ImageSets/Context/train.txt").write_text("\n".join(IDS) + "\n")
    (root / "ImageSets/Context/val.txt").write_text(IDS[1] + "\n")
    rng = np.random.default_rng(0)
    for k, i in enumerate(IDS):
        img = (rng.random((H, W, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
        sem = np.zeros((H, W), np.uint8)
        sem[5:15, 4:12] = 15  # person
        sem[0, :] = 255
        sem[1, 0] = 40  # out of range -> ignore
        Image.fromarray(sem).save(root / "semseg/pascal-context" / f"{i}.png")
        sal = np.zeros((H, W), np.uint8)
        sal[5:15, 4:12] = 230
        sal[5, 4] = 100  # below 0.5 -> 0
        Image.fromarray(sal).save(root / "sal_distill" / f"{i}.png")
        nrm = np.full((H, W, 3), 128, np.uint8)
        nrm[..., 2] = 255
        Image.fromarray(nrm).save(root / "normals_distill" / f"{i}.png")
        lab = np.full((H, W), 1, np.uint16)  # 'accordion': not an NYU class -> normals invalid
        lab[:, W // 2 :] = 440  # 'wall': an NYU class -> normals valid
        savemat(root / "pascal-context/trainval" / f"{i}.mat", {"LabelMap": lab})
        if k == 0:
            person = np.zeros((H, W), bool)
            person[5:15, 4:12] = True
            head = np.zeros((H, W), bool)
            head[5:8, 6:10] = True
            torso = np.zeros((H, W), bool)
            torso[8:12, 5:11] = True
            lfoot = np.zeros((H, W), bool)
            lfoot[14, 5] = True
            car = np.zeros((H, W), bool)
            car[16:19, 14:20] = True
            _parts_mat(
                root / "human_parts" / f"{i}.mat",
                [
                    ("person", 15, person, [("head", head), ("torso", torso), ("lfoot", lfoot)]),
                    ("car", 7, car, []),
                ],
            )
        else:  # the preprocessed PNG alternative
            parts = np.zeros((H, W), np.uint8)
            parts[6:9, 5:9] = 3
            parts[19, 23] = 255
            Image.fromarray(parts).save(root / "human_parts" / f"{i}.png")
    return root


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
