"""The sample format every dymu dataset returns, and the array-backed implementation they share.

A sample is a ``dict[str, torch.Tensor]``:

- ``"image"``: float32 ``(3, H, W)``, normalized per channel as ``(rgb - mean) / std`` where
  ``rgb`` is in [0, 1] and ``mean``/``std`` are the dataset's :attr:`MultiTaskDataset.mean` and
  :attr:`MultiTaskDataset.std`: ImageNet statistics for the natural-image datasets (NYU-v2,
  PASCAL-Context), CIFAR-100's training statistics for CIFAR, and the measured statistics of
  the generated images for ``scenes`` and ``multidigits``; so the values are roughly zero-mean,
  unit-variance. :meth:`MultiTaskDataset.denormalize` inverts it.
- one key per task name, by the task's kind (:data:`dymu.config.TaskKind`):

  ============== ================================ =========================================
  kind           target                           unlabeled
  ============== ================================ =========================================
  segmentation   int64 ``(H, W)`` class indices   ``ignore_index`` (255)
  depth          float32 ``(1, H, W)`` metres     0
  normals        float32 ``(3, H, W)`` unit       all-zero vector
  binary         float32 ``(1, H, W)`` in {0, 1}  ``ignore_index`` (255)
  classification int64 scalar                     ``ignore_index`` (255)
  ============== ================================ =========================================

Raw samples (what :meth:`MultiTaskDataset.raw` returns) are numpy arrays in channels-last
layout: image ``(H, W, 3)`` float in [0, 1]; segmentation ``(H, W)`` int; depth ``(H, W)`` or
``(H, W, 1)``; normals ``(H, W, 3)``; binary ``(H, W)``; classification a 0-d int.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dymu.config import TaskSpec
from dymu.errors import DymuError
from dymu.normalization import IMAGENET

#: ImageNet channel statistics (the convention of the MTAN / MTI-Net pipelines and of
#: ImageNet-pretrained backbones), from the one table of :mod:`dymu.normalization`.
IMAGENET_MEAN, IMAGENET_STD = IMAGENET

Sample = dict[str, torch.Tensor]
RawSample = dict[str, np.ndarray]


class DatasetError(DymuError, ValueError):
    """A dataset that is missing, incomplete, unknown or asked for with bad options."""


def _as_size(size: Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise DatasetError(f"size must be positive (H, W), got {tuple(size)}")
    return h, w


def unit_normals(normal: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Normalize ``(..., 3)`` vectors to unit length; zero (or non-finite) vectors become 0."""
    n = np.nan_to_num(np.asarray(normal, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    valid = norm > eps
    return np.where(valid, n / np.where(valid, norm, 1.0), 0.0).astype(np.float32)


def to_sample(
    raw: Mapping[str, Any],
    tasks: Sequence[TaskSpec],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Sample:
    """Turn one raw, channels-last numpy sample into the tensor format of this module."""
    image = np.asarray(raw["image"], dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    out: Sample = {"image": ((img - m) / s).contiguous()}
    for t in tasks:
        y = np.asarray(raw[t.name])
        if t.kind == "segmentation":
            out[t.name] = torch.from_numpy(np.ascontiguousarray(y.astype(np.int64)))
        elif t.kind == "classification":
            out[t.name] = torch.tensor(int(y), dtype=torch.int64)
        elif t.kind == "normals":
            n = unit_normals(y.reshape(*y.shape[:2], 3))
            out[t.name] = torch.from_numpy(n).permute(2, 0, 1).contiguous()
        else:  # depth, binary: one channel
            d = y.astype(np.float32).reshape(y.shape[:2])
            if t.kind == "depth":
                d = np.where(np.isfinite(d) & (d > 0), d, 0.0).astype(np.float32)
            out[t.name] = torch.from_numpy(np.ascontiguousarray(d))[None]
    return out


def collate(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Samples stacked key by key into one batch (the DataLoader's ``collate_fn``)."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def resize_sample(sample: Sample, tasks: Sequence[TaskSpec], size: tuple[int, int]) -> Sample:
    """Resize a tensor sample to ``size`` = (H, W): the image bilinearly (antialiased when
    shrinking), every dense target by nearest neighbour so labels, ignore values and the
    zero "invalid" markers of depth and normals stay exact."""
    h, w = sample["image"].shape[-2:]
    if (h, w) == tuple(size):
        return sample
    out: Sample = {
        "image": F.interpolate(
            sample["image"][None],
            size=size,
            mode="bilinear",
            align_corners=False,
            antialias=size[0] < h or size[1] < w,
        )[0]
    }
    for t in tasks:
        y = sample[t.name]
        if not t.dense:
            out[t.name] = y
            continue
        y4 = y[None, None] if y.ndim == 2 else y[None]
        r = F.interpolate(y4.float(), size=size, mode="nearest-exact")[0]
        out[t.name] = r[0].to(y.dtype) if y.ndim == 2 else r.to(y.dtype)
    return out


class MultiTaskDataset(Dataset):
    """A map-style dataset of multi-task samples (see the module docstring for the format).

    Subclasses implement :meth:`__len__` and :meth:`raw`; this class turns raw samples into
    tensors, resizes them to :attr:`size` when one is set and applies ``transform`` last.
    """

    #: The tasks, in order, with the paper's loss scales.
    tasks: tuple[TaskSpec, ...]

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        size: Sequence[int] | None = None,
        transform: Callable[[Sample], Sample] | None = None,
    ) -> None:
        self.tasks = tuple(tasks)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.size = _as_size(size)
        self.transform = transform

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def raw(self, i: int) -> RawSample:
        """Sample ``i`` as channels-last numpy arrays (image in [0, 1], targets as stored)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _index(self, i: int) -> int:
        n = len(self)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        return j

    def __getitem__(self, i: int) -> Sample:
        sample = to_sample(self.raw(self._index(i)), self.tasks, self.mean, self.std)
        if self.size is not None:
            sample = resize_sample(sample, self.tasks, self.size)
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def denormalize(self, image: torch.Tensor) -> torch.Tensor:
        """Invert the image normalization: ``(3, H, W)`` or ``(B, 3, H, W)`` back to [0, 1]."""
        m = torch.tensor(self.mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        s = torch.tensor(self.std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        return image * s + m

    def __repr__(self) -> str:
        tasks = ", ".join(f"{t.name}:{t.kind}" for t in self.tasks)
        return f"{type(self).__name__}(n={len(self)}, tasks=[{tasks}])"


class ArrayDataset(MultiTaskDataset):
    """A :class:`MultiTaskDataset` over in-memory arrays with a leading sample axis.

    ``images`` is ``(n, H, W, 3)`` (or ``(n, H, W)``, replicated to 3 channels) with values in
    [0, 1]; ``targets[name]`` is ``(n, ...)`` in the raw layout of the task's kind.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        images: np.ndarray,
        targets: Mapping[str, np.ndarray],
        **kwargs: Any,
    ) -> None:
        super().__init__(tasks, **kwargs)
        self.images = np.asarray(images)
        self.targets = {t.name: np.asarray(targets[t.name]) for t in self.tasks}
        n = len(self.images)
        for name, arr in self.targets.items():
            if len(arr) != n:
                raise DatasetError(f"target {name!r} has {len(arr)} samples, images have {n}")

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, i: int) -> RawSample:
        out: RawSample = {"image": self.images[i]}
        for name, arr in self.targets.items():
            out[name] = arr[i]
        return out
