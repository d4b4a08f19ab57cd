"""Sweeps over the registries, so that a new entry is tested the day it is added: every
registered dataset (a fixture split in its real layout -> batches -> one training step of every
stage -> a loadable artifact). The sweep over every benchmark case is in tests/test_bench.py
(one tiny run of the harness, checked case by case from the registry)."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import dymu
from dymu.normalization import DATASET_NORMALIZATION
from training.config import TrainConfig, load_config
from training.data import DATASETS, collate, dataset_tasks, split_dataset
from training.pipeline import run_training

from .data_fixtures import write_cifar, write_nyuv2, write_pascal


def _nyuv2(tmp: Path) -> Path:
    write_nyuv2(tmp, "train", n=3)
    write_nyuv2(tmp, "val", n=2, seed=1)
    return tmp


@dataclass(frozen=True)
class Sweep:
    """How to get a small split of one registered dataset, and the model's input size for it."""

    input_size: tuple[int, int]
    write: Callable[[Path], Path] | None = None  # None: generated, no files
    options: dict[str, Any] = field(default_factory=dict)
    val_options: dict[str, Any] = field(default_factory=dict)


SWEEPS: dict[str, Sweep] = {
    "scenes": Sweep((24, 32), options={"n": 4, "seed": 1}, val_options={"n": 2, "seed": 2}),
    "multidigits": Sweep((36, 36), options={"n": 4, "seed": 1}, val_options={"n": 2, "seed": 2}),
    "nyuv2": Sweep((16, 16), _nyuv2),
    "pascal-context": Sweep(
        (20, 24),
        write_pascal,
        options={"tasks": 5, "size": None},
        val_options={"tasks": 5, "size": None},
    ),
    "cifar100-20": Sweep((32, 32), lambda tmp: write_cifar(tmp)[0]),
}


def test_every_registered_dataset_has_a_sweep() -> None:
    assert set(SWEEPS) == set(DATASETS), "add the new dataset to SWEEPS (and its fixture)"


def _one_step_config(name: str, sweep: Sweep, root: Path | None) -> TrainConfig:
    """scenes-tiny's model and hypernets on ``name``: one step of batch 2 per stage."""
    data = load_config("scenes-tiny").model_dump(mode="json")
    one_step = {"steps": 1, "batch_size": 2}
    data.update(
        name=f"sweep-{name}",
        input_size=list(sweep.input_size),
        check_preferences=0,
        data={
            "name": name,
            "root": None if root is None else str(root),
            "options": sweep.options,
            "val_options": sweep.val_options,
        },
        anchor={**data["anchor"], **one_step},
        affinity={**data["affinity"], "images": 2},
        edge={**data["edge"], **one_step},
        weight={**data["weight"], **one_step},
    )
    return TrainConfig.model_validate(data)


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_one_step_of_every_stage_on_every_dataset(name: str, tmp_path: Path) -> None:
    sweep = SWEEPS[name]
    (tmp_path / "data").mkdir()
    root = None if sweep.write is None else sweep.write(tmp_path / "data")
    config = _one_step_config(name, sweep, root)
    train = split_dataset(config)
    tasks = dataset_tasks(name, root, **sweep.options)
    assert tuple(train.tasks) == tasks
    # the statistics the images are normalized with are the one table's (the service reads it)
    assert (tuple(train.mean), tuple(train.std)) == DATASET_NORMALIZATION[name]
    batch = collate([train[0], train[1]])
    assert batch["image"].shape == (2, 3, *sweep.input_size)
    assert set(batch) == {"image", *(t.name for t in tasks)}

    vdir = run_training(
        config, tmp_path / "store", run_dir=tmp_path / "run", device="cpu", progress=False
    )
    model = dymu.load(vdir, device="cpu")
    assert model.tasks == tuple(t.name for t in tasks)
    assert set(model.manifest["training"]["stages"]) == {"anchor", "affinity", "edge", "weight"}
    assert model.manifest["input_normalization"] == {
        "mean": list(train.mean),
        "std": list(train.std),
    }
    with open(vdir / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["anchor", "edge", "weight"]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
