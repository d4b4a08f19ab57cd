"""Data-parallel training under torchrun (2 CPU processes, gloo) on scenes-tiny (marked scale).

What must hold (training/distributed.py): the artifact of a 2-process run loads; stages 1 and 2
(BN in eval mode) match a single-process run of the same global batches from the same anchor;
stage 0 cannot match a single-process run on CPU (PyTorch's SyncBatchNorm has no CPU kernel, so
each rank normalizes its own half-batch), and it matches, within float tolerance, the
single-process computation with exactly those semantics: per-half BatchNorm statistics, the
mean of the halves' losses, rank 0's running statistics.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dymu
from dymu.errors import ConfigError
from training.config import load_config
from training.data import collate, split_dataset
from training.distributed import Distributed
from training.pipeline import build_model, run_training
from training.run import StepBatches
from training.tasks import weighted_task_loss

pytestmark = pytest.mark.scale

WORLD = 2
TOL = {"rtol": 1e-4, "atol": 2e-5}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, Path]:
    """``dymu train scenes-tiny --nproc 2`` (torchrun, gloo): the artifact and its run dir."""
    root = tmp_path_factory.mktemp("ddp")
    exe = Path(sys.executable).parent / "dymu"
    cmd = [str(exe), "train", "scenes-tiny", "--nproc", str(WORLD), "--device", "cpu"]
    cmd += ["--out", str(root / "store"), "--run-dir", str(root / "run"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1, proc.stdout  # rank 0 alone speaks
    return Path(proc.stdout.split("wrote ")[1].strip()), root


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m, k=k: f"{what} {k}: {m}")


def test_the_artifact_loads_and_rank_0_alone_logged(ddp_run):
    vdir, root = ddp_run
    model = dymu.load(vdir, device="cpu")
    training = model.manifest["training"]
    assert training["processes"] == WORLD
    assert training["command"].startswith("dymu train scenes-tiny --nproc 2")
    net = model.materialize([0.5, 0.3, 0.2], 0.5)
    out = net(torch.rand(1, 3, 24, 32))
    assert set(out) == set(model.tasks)
    config = load_config("scenes-tiny")
    with open(root / "run" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    per_stage = {s: sum(r["stage"] == s for r in rows) for s in ("anchor", "edge", "weight")}
    # log_every = 1: one row per step, written once (not once per rank).
    assert per_stage == {"anchor": 12, "edge": 12, "weight": 8}
    assert config.anchor.steps == 12


def ghost_batch_anchor(config) -> dict[str, torch.Tensor]:
    """Stage 0 as 2 DDP ranks compute it, in one process: each half of a step's global batch
    is normalized by its own BN statistics, the gradient is that of the halves' mean loss, and
    the running statistics follow rank 0's half only (DDP broadcasts rank 0's buffers)."""
    dataset = split_dataset(config)
    model = build_model(config, tuple(dataset.tasks))
    anchor, cfg = model.anchor.train(), config.anchor
    opt = torch.optim.Adam(anchor.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = StepBatches(config.seed, "anchor", 0, cfg.steps, len(dataset), cfg.batch_size)
    for indices in sampler:
        losses, rank0_buffers = [], []
        for rank in range(WORLD):
            shard = Distributed(rank=rank, world=WORLD).shard(indices)
            batch = collate([dataset[i] for i in shard])
            loss, _ = weighted_task_loss(model.config.tasks, anchor(batch["image"]), batch)
            losses.append(loss)
            if rank == 0:
                rank0_buffers = [b.clone() for b in anchor.buffers()]
        opt.zero_grad(set_to_none=True)
        (sum(losses) / WORLD).backward()
        opt.step()
        with torch.no_grad():  # only rank 0's statistics survive DDP's buffer broadcast
            for buf, kept in zip(anchor.buffers(), rank0_buffers, strict=True):
                buf.copy_(kept)
    return _state(anchor)


def test_stage_0_matches_the_single_process_ghost_batch_computation(ddp_run):
    vdir, _ = ddp_run
    got = _state(dymu.load(vdir, device="cpu").anchor)
    _assert_close(got, ghost_batch_anchor(load_config("scenes-tiny")), "anchor")


def test_stages_1_and_2_match_a_single_process_run_of_the_same_global_batch(ddp_run, tmp_path):
    vdir, _ = ddp_run
    config = load_config("scenes-tiny")
    config = config.model_copy(
        update={"anchor": config.anchor.model_copy(update={"pretrained": str(vdir)})}
    )
    single = run_training(
        config, tmp_path / "store", run_dir=tmp_path / "run", device="cpu", progress=False
    )
    ddp, one = dymu.load(vdir, device="cpu"), dymu.load(single, device="cpu")
    assert one.manifest["training"]["processes"] == 1
    torch.testing.assert_close(
        torch.tensor(ddp.manifest["task_affinity"]), torch.tensor(one.manifest["task_affinity"])
    )
    _assert_close(_state(ddp.edge_hypernet), _state(one.edge_hypernet), "edge hypernet")
    _assert_close(_state(ddp.weight_hypernet), _state(one.weight_hypernet), "weight hypernet")


def test_a_global_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        Distributed(rank=0, world=3).check_batch("anchor", 4)
    assert Distributed(rank=1, world=2).shard([5, 6, 7, 8]) == [7, 8]
