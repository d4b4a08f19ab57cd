"""Small datasets written in the real on-disk layouts (random values), for the loaders' tests
and for the sweep over every registered dataset (tests/test_sweeps.py)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat


def write_nyuv2(root: Path, split: str = "train", n: int = 3, hw=(16, 16), seed: int = 0) -> list:
    """``root/split/{image,label,depth,normal}/<i>.npy``, as MTAN stores NYU-v2; the arrays."""
    rng = np.random.default_rng(seed)
    h, w = hw
    d = root / split
    for f in ("image", "label", "depth", "normal"):
        (d / f).mkdir(parents=True)
    truth = []
    for i in range(n):
        image = rng.random((h, w, 3))  # float64 in [0, 1], as MTAN stores it
        label = rng.integers(-1, 13, size=(h, w)).astype(np.float64)
        depth = rng.uniform(0.5, 9.0, size=(h, w, 1)).astype(np.float32)
        depth[0, :3] = 0.0
        depth[1, 0] = np.nan
        normal = rng.normal(size=(h, w, 3)).astype(np.float32) * 2.0  # not unit on disk
        normal[2, :4] = 0.0
        np.save(d / "image" / f"{i}.npy", image)
        np.save(d / "label" / f"{i}.npy", label)
        np.save(d / "depth" / f"{i}.npy", depth)
        np.save(d / "normal" / f"{i}.npy", normal)
        truth.append((image, label, depth, normal))
    return truth


PASCAL_HW = H, W = 20, 24
PASCAL_IDS = IDS = ("2008_000002", "2008_000003")


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


def write_pascal(parent: Path) -> Path:
    """A PASCAL_MT root under ``parent``: two images with every task's labels (both forms of
    human parts: Pascal-Part .mat for the first, the preprocessed PNG for the second)."""
    root = parent / "PASCAL_MT"
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


COARSE_NAMES = [f"super_{k}" for k in range(19)] + ["vehicles 2"]


def _coarse_of_fine() -> np.ndarray:
    """A grouping of the 100 fine classes into 20 coarse ones (not simply fine // 5)."""
    perm = np.random.default_rng(1).permutation(100)
    coarse = np.empty(100, np.int64)
    coarse[perm] = np.arange(100) // 5
    return coarse


def _write(path, fine, coarse_of, rng):
    data = rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8)
    d = {
        b"filenames": [f"img{i}.png".encode() for i in range(len(fine))],
        b"batch_label": b"fixture",
        b"fine_labels": [int(f) for f in fine],
        b"coarse_labels": [int(coarse_of[f]) for f in fine],
        b"data": data,
    }
    with open(path, "wb") as f:
        pickle.dump(d, f)
    return data


def write_cifar(parent: Path) -> tuple:
    """``parent/cifar-100-python/{train,test,meta}`` in the CIFAR-100 python format; returns
    (parent, coarse_of, train_fine, test_fine, train pixels)."""
    folder = parent / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    coarse_of = _coarse_of_fine()
    train_fine = np.concatenate([np.arange(100), rng.integers(0, 100, 20)])
    test_fine = rng.integers(0, 100, 12)
    train = _write(folder / "train", train_fine, coarse_of, rng)
    _write(folder / "test", test_fine, coarse_of, rng)
    with open(folder / "meta", "wb") as f:
        pickle.dump(
            {
                b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
                b"coarse_label_names": [n.encode() for n in COARSE_NAMES],
            },
            f,
        )
    return parent, coarse_of, train_fine, test_fine, train
