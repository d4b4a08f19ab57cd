"""CIFAR-100 as 20 five-way tasks, on a tiny fixture in the python distribution's format."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from training.data import DatasetError, build_dataset, dataset_tasks
from training.data.cifar import CIFAR100_MEAN, CIFAR100_STD

from .data_fixtures import COARSE_NAMES, write_cifar


@pytest.fixture
def cifar_root(tmp_path):
    return write_cifar(tmp_path)


def test_twenty_five_way_tasks(cifar_root):
    root, coarse_of, train_fine, test_fine, train_data = cifar_root
    ds = build_dataset("cifar100-20", "train", root=root)
    assert len(ds) == len(train_fine)
    assert len(ds.tasks) == 20
    assert [t.name for t in ds.tasks] == [*COARSE_NAMES[:19], "vehicles_2"]
    assert all(t.kind == "classification" and t.classes == 5 for t in ds.tasks)
    assert all(t.loss_scale == 1.0 and t.ignore_index == 255 for t in ds.tasks)
    assert ds.tasks == dataset_tasks("cifar100-20", root=root)
    for i in (0, 37, 105, 119):
        s = ds[i]
        assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
        labels = np.array([int(s[t.name]) for t in ds.tasks])
        assert all(s[t.name].dtype == torch.int64 and s[t.name].ndim == 0 for t in ds.tasks)
        f = train_fine[i]
        k = coarse_of[f]
        assert np.all(np.delete(labels, k) == 255)
        members = np.flatnonzero(coarse_of == k)  # the 5 fine classes of coarse class k
        assert labels[k] == list(members).index(f)
        assert 0 <= labels[k] <= 4
    # channel-first rows of 1024 values each, as the distribution stores them
    img = ds.denormalize(ds[3]["image"]).numpy()
    expect = train_data[3].reshape(3, 32, 32) / 255.0
    np.testing.assert_allclose(img, expect, atol=1e-5)
    raw = (ds[3]["image"] * torch.tensor(CIFAR100_STD).view(3, 1, 1)) + torch.tensor(
        CIFAR100_MEAN
    ).view(3, 1, 1)
    np.testing.assert_allclose(raw.numpy(), expect, atol=1e-5)

    test = build_dataset("cifar100-20", "test", root=root)
    assert len(test) == len(test_fine) and len(build_dataset("cifar100", "val", root=root)) == 12
    for i in range(len(test)):
        labels = [int(test[i][t.name]) for t in test.tasks]
        assert sum(v != 255 for v in labels) == 1 and all(v in range(5) or v == 255 for v in labels)


def test_without_meta_and_given_the_folder_itself(cifar_root):
    root = cifar_root[0]
    (root / "cifar-100-python" / "meta").unlink()
    ds = build_dataset("cifar100-20", "train", root=root / "cifar-100-python")
    assert [t.name for t in ds.tasks] == [f"coarse{k:02d}" for k in range(20)]


def test_missing_or_broken_cifar(tmp_path, cifar_root):
    with pytest.raises(DatasetError, match="cifar-100-python"):
        build_dataset("cifar100-20", "train", root=tmp_path / "nothing")
    with pytest.raises(DatasetError, match="cifar-100-python"):
        build_dataset("cifar100-20", "train")
    root = cifar_root[0]
    with open(root / "cifar-100-python" / "train", "wb") as f:  # a class grouping that is off
        pickle.dump(
            {
                b"data": np.zeros((2, 3072), np.uint8),
                b"fine_labels": [0, 1],
                b"coarse_labels": [0, 0],
            },
            f,
        )
    with pytest.raises(DatasetError, match="fine classes"):
        build_dataset("cifar100-20", "train", root=root)
