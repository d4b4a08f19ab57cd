"""Path mixing in stage 0 (``[anchor] mixing``, training/stages.py; docs/training.md, "Path
mixing"): each step adds the loss of every task read through one random tree of the streams."""

from __future__ import annotations

import pytest
import torch

import dymu
from dymu.architecture import Architecture
from training.config import load_config
from training.pipeline import run_training
from training.stages import MixedPaths, all_tasks_loss, mixed_paths_loss, mixing_tree
from training.tasks import weighted_task_loss

from .conftest import prepared_run


def mixing_config(mixing: float, steps: int = 3):
    base = load_config("scenes-tiny")
    anchor = base.anchor.model_copy(update={"steps": steps, "batch_size": 4, "mixing": mixing})
    return base.model_copy(update={"check_preferences": 0, "anchor": anchor})


def test_each_step_has_its_own_seeded_random_tree(tmp_path):
    run = prepared_run(tmp_path, mixing_config(1.0), ("anchor",))
    trees = [mixing_tree(run, step) for step in range(20)]
    assert trees == [mixing_tree(run, step) for step in range(20)]  # a resumed run draws alike
    assert len({t.id for t in trees}) > 10
    branched = Architecture.fully_branched(run.model.anchor.n_tasks, run.model.anchor.num_layers)
    crossing = [t for t in trees if t != branched]
    # nodes read other streams' nodes: that is what the streams learn to serve
    assert all(any(p != j for row in t.parents for j, p in enumerate(row)) for t in crossing)
    assert len(crossing) == len(trees)


def test_the_loss_is_the_streams_plus_the_weight_times_the_random_tree(tmp_path):
    run = prepared_run(tmp_path, mixing_config(0.5), ("anchor",))
    anchor = run.model.anchor.eval()
    batch = next(run.batches("anchor", 0, 1, 4))
    with torch.no_grad():
        loss, stats = mixed_paths_loss(run, 0.5)(MixedPaths(anchor), 7, batch)
        own, _ = all_tasks_loss(run)(anchor, 7, batch)
        tree_out = anchor.forward_tree(batch["image"], mixing_tree(run, 7))
        tree_loss, _ = weighted_task_loss(run.tasks, tree_out, batch, None)
    torch.testing.assert_close(loss, own + 0.5 * tree_loss)
    assert stats["mixed"] == pytest.approx(float(tree_loss))
    assert not torch.isclose(tree_loss, own)  # a tree other than the streams themselves


def test_mixing_changes_what_stage_0_trains_and_zero_is_the_paper(tmp_path):
    def anchor_after(mixing: float, name: str) -> dict[str, torch.Tensor]:
        vdir = run_training(
            mixing_config(mixing), tmp_path / name / "m", run_dir=tmp_path / f"run-{name}",
            device="cpu", progress=False, stages=("anchor",),
        )  # fmt: skip
        return dymu.load(vdir, device="cpu").anchor.state_dict()

    plain, again, mixed = anchor_after(0.0, "a"), anchor_after(0.0, "b"), anchor_after(1.0, "c")
    assert all(torch.equal(plain[k], again[k]) for k in plain)
    assert any(not torch.equal(plain[k], mixed[k]) for k in plain)


def test_mixing_must_not_be_negative():
    from pydantic import ValidationError

    from training.config import AnchorStage

    assert AnchorStage().mixing == 0.0  # the paper's independent streams by default
    with pytest.raises(ValidationError, match="mixing"):
        AnchorStage(mixing=-0.1)
