"""The state of one training run: its random streams, its batches, its device and its log.

Determinism: every random draw of step ``s`` of stage ``k`` (batch indices, preference, Gumbel
noise) comes from a generator seeded with ``(seed, k, s)`` (:func:`step_generator`). A run is
therefore repeatable on the CPU, and resuming from a checkpoint needs only the weights, the
optimizer state and the step — no RNG state — to give the same final weights as an
uninterrupted run.

Data parallelism: under ``torchrun`` every rank draws the same global batch indices of step
``s`` and trains on its shard of them (:class:`StepBatches`); rank 0 alone logs.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import dymu
from dymu.config import TaskSpec
from dymu.errors import ConfigError

from .config import TrainConfig
from .data import collate
from .distributed import Distributed

STAGES = ("trunk", "anchor", "affinity", "edge", "weight")
# Independent random streams: batch indices per stage, and preferences + Gumbel noise. New
# streams come last so that the ids of the others (and so every earlier run) never change.
_STREAM_ID = {
    name: i
    for i, name in enumerate(
        (
            "anchor", "affinity", "edge", "weight", "edge-pref", "weight-pref",
            "baseline", "baseline-pref", "trunk", "edge-paths", "stream-selection",
            "anchor-mixing",
        )
    )
}  # fmt: skip
# The seed of step s of stream k is seed * SEED_STRIDE + k * STREAM_STRIDE + s: two primes, so
# that (seed, stream, step) triples of realistic size never share a generator seed.
SEED_STRIDE = 1_000_003
STREAM_STRIDE = 7_919
LOG = "train_log.csv"


def step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator of every random draw of one step (see the module docstring)."""
    return torch.Generator().manual_seed(
        (seed * SEED_STRIDE + _STREAM_ID[stage] * STREAM_STRIDE + step) % (2**63 - 1)
    )


class StepBatches:
    """Batch-index lists for steps ``start..steps-1`` of a stage (a DataLoader batch_sampler).

    ``batch`` is the global batch; ``dist`` picks this rank's shard of it (all of it when
    single-process), so the indices of a step do not depend on the number of processes.
    """

    def __init__(
        self,
        seed: int,
        stage: str,
        start: int,
        steps: int,
        n: int,
        batch: int,
        dist: Distributed | None = None,
    ) -> None:
        self.seed, self.stage, self.start, self.steps, self.n, self.batch = (
            seed,
            stage,
            start,
            steps,
            n,
            batch,
        )
        self.dist = dist or Distributed()

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            gen = step_generator(self.seed, self.stage, step)
            indices = torch.randint(self.n, (self.batch,), generator=gen).tolist()
            yield self.dist.shard(indices)


@dataclass
class Run:
    """State shared by the stages of one training run."""

    config: TrainConfig
    model: dymu.ControllableModel
    train_set: torch.utils.data.Dataset
    device: torch.device
    run_dir: Path
    progress: bool = True
    affinity: torch.Tensor | None = None
    completed: dict[str, dict[str, Any]] = field(default_factory=dict)
    budget: int | None = None  # optimizer steps left in this invocation (None = no limit)
    dist: Distributed = field(default_factory=Distributed)
    # images of the training source that no stage trains on: the edge stage's path table
    calibration_set: torch.utils.data.Dataset | None = None
    # what a stage chose, for its entry in ``completed`` (the stream selection's steps)
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def tasks(self) -> tuple[TaskSpec, ...]:
        return self.model.config.tasks

    def sample_batches(
        self, stream: str, count: int, chunk: int, calibration: bool = False
    ) -> Iterator[dict]:
        """``count`` training images (at most the split) drawn without replacement from the
        random stream ``stream`` of the run's seed, collated ``chunk`` at a time on the device:
        the fixed image sets of stage 0b and of the edge stage's path table. ``calibration``:
        from the calibration split instead, where the config has one."""
        data = self.train_set
        if calibration and self.calibration_set is not None:
            data = self.calibration_set
        k = min(count, len(data))
        gen = step_generator(self.config.seed, stream, 0)
        idx = torch.randperm(len(data), generator=gen)[:k].tolist()
        for start in range(0, k, chunk):
            batch_ = collate([data[i] for i in idx[start : start + chunk]])
            yield {key: v.to(self.device) for key, v in batch_.items()}

    def batches(
        self, stage: str, start: int, steps: int, batch: int, calibration: bool = False
    ) -> Iterator[dict]:
        """The batches of steps ``start`` .. ``steps - 1`` of ``stage``, from the training split
        or (``calibration``) the calibration split."""
        data = self.train_set
        if calibration:
            if self.calibration_set is None:
                raise ConfigError(f"stage {stage} asks for the calibration split: there is none")
            data = self.calibration_set
        self.dist.check_batch(stage, batch)
        sampler = StepBatches(self.config.seed, stage, start, steps, len(data), batch, self.dist)
        cuda = self.device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            data,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.config.data.workers if cuda else 0,
            pin_memory=cuda,
        )
        for batch_ in loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch_.items()}

    def autocast(self) -> Any:
        return torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.config.amp
        )

    def log(self, row: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        path = self.run_dir / LOG
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
