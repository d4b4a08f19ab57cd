"""Data-parallel training under ``torchrun``: process group, per-rank batch shards, DDP.

``torchrun --nproc-per-node P -m training CONFIG`` (or ``dymu train CONFIG --nproc P``) starts P
processes with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; :func:`from_env` joins them into one
process group (gloo on CPU, nccl on CUDA). Without those variables everything here is a no-op
and training runs in one process, as by default.

Seed semantics are kept: step ``s`` of a stage draws the *same* global batch indices as a
single-process run (``run.step_generator``); rank k takes the k-th contiguous shard of
them (:meth:`Distributed.shard`), so the config's ``batch_size`` is the global batch. The
preference and the Gumbel noise of a step come from the same per-step generator, so every rank
draws the same ones. DDP averages the gradients, which equals the single-process gradient of
the global batch whenever a stage's loss is a mean over the shard's samples with the same
number of valid targets per shard (true for ``scenes``) and no layer mixes samples in training.

The one layer that mixes samples is BatchNorm in train mode, used only by stage 0 (the anchor):
on CUDA it is converted to ``SyncBatchNorm`` (statistics over the global batch, so stage 0
matches a single-process run); PyTorch's SyncBatchNorm has no CPU kernel, so on CPU each rank
normalizes its own shard ("ghost batch norm", the usual DDP behaviour) and the running
statistics are rank 0's (DDP broadcasts buffers from rank 0 at every forward). Stages 1 and 2
keep BN in eval mode and match a single-process run on any device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dymu.errors import ConfigError


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: ``rank`` of ``world`` (1 = a single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, shows progress, writes checkpoints and the artifact."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process on CUDA (``cuda:LOCAL_RANK``); the CPU as given."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def check_batch(self, stage: str, batch_size: int) -> int:
        """The per-rank batch of a stage whose global batch is ``batch_size``."""
        if batch_size % self.world:
            raise ConfigError(
                f"[{stage}] batch_size = {batch_size} is the global batch and must be divisible "
                f"by the number of processes ({self.world})"
            )
        return batch_size // self.world

    def shard(self, indices: list[int]) -> list[int]:
        """Rank k's contiguous k-th share of one step's global batch indices."""
        if not self.enabled:
            return indices
        per = len(indices) // self.world
        return indices[self.rank * per : (self.rank + 1) * per]

    def wrap(self, module: nn.Module, find_unused: bool = False) -> nn.Module:
        """``module`` under DistributedDataParallel (itself when single-process)."""
        if not self.enabled:
            return module
        device = next(module.parameters()).device
        if device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            return DistributedDataParallel(
                module, device_ids=[device.index], find_unused_parameters=find_unused
            )
        return DistributedDataParallel(module, find_unused_parameters=find_unused)

    def unwrap(self, module: nn.Module) -> nn.Module:
        """The trained module back from :meth:`wrap`, with plain BatchNorm2d layers again
        (the rest of dymu, e.g. BN folding, expects them) and rank 0's buffers on every rank.

        DDP broadcasts rank 0's buffers at the start of each forward, so after the last step
        each rank holds the BN running statistics of its own last shard; later stages use the
        module frozen, and must all use the ones rank 0 writes to the artifact.
        """
        if isinstance(module, DistributedDataParallel):
            module = module.module
        _revert_sync_batchnorm(module)
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)
        return module

    def mean(self, stats: dict[str, float]) -> dict[str, float]:
        """Per-rank statistics of a step averaged over the ranks: the logged loss is the global
        batch's, and a non-finite loss stops every rank at the same step (none is left waiting
        in an all-reduce)."""
        if not self.enabled:
            return stats
        values = torch.tensor(list(stats.values()), dtype=torch.float64)
        if dist.get_backend() == "nccl":
            values = values.cuda()
        dist.all_reduce(values)
        return dict(zip(stats, (values / self.world).tolist()))

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. the artifact path)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _revert_sync_batchnorm(module: nn.Module) -> None:
    """Undo ``convert_sync_batchnorm`` in place (same parameters and buffers)."""
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )  # fmt: skip
            bn.weight, bn.bias = child.weight, child.bias
            bn.running_mean, bn.running_var = child.running_mean, child.running_var
            bn.num_batches_tracked = child.num_batches_tracked
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            _revert_sync_batchnorm(child)


def from_env(device: torch.device) -> Distributed:
    """Join the process group that torchrun describes in the environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return Distributed(rank=rank, world=world, local_rank=local)


def shutdown(completed: bool = True) -> None:
    """Leave the process group. After a completed run every rank first waits for the others:
    a gloo rank whose peers had already left aborted now and then on its way out ("terminate
    called without an active exception", once in four runs of `make test-scale` here). After
    a failure the group is left as it is: another rank may be inside a collective, where
    destroying the group can hang, and torchrun stops the other ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if completed:
        dist.barrier()
        dist.destroy_process_group()
