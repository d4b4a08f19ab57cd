"""``cifar100-20``: CIFAR-100 as 20 five-way classification tasks (Rosenbaum et al. 2018; the
paper's CIFAR-100 setting, §4).

Read from the official *python* distribution on the user's disk (nothing is downloaded)::

    <root>/cifar-100-python/train   pickled dict: b'data' (N, 3072) uint8, b'fine_labels',
    <root>/cifar-100-python/test      b'coarse_labels'
    <root>/cifar-100-python/meta    b'fine_label_names', b'coarse_label_names' (optional)

(``root`` may also be the ``cifar-100-python`` folder itself.) These files are pickles, which
can run code when loaded: they are read with ``pickle.load(f, encoding="bytes")`` because that
is the only format the official distribution ships; only point ``root`` at a copy you trust.

Tasks: one per coarse class ``k`` (named after ``meta``'s coarse label, e.g.
``aquatic_mammals``, or ``coarse00`` .. ``coarse19`` without ``meta``), kind classification,
5 classes, loss scale 1 (all tasks weighted equally, App. G). Task ``k``'s label of an image is
the rank (0..4) of its fine class among the 5 fine classes of coarse class ``k`` (ordered by
fine label index); images of other coarse classes carry ``ignore_index`` (255) for task ``k``.
So every image is labelled for exactly one task and each task's loss and accuracy are computed
only on its own superclass's images — a 5-way problem per superclass, as the paper's split into
20 five-way tasks intends — while all tasks see every image as input. Images stay 32x32 and
are normalized with the CIFAR-100 training-set channel statistics.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dymu.config import TaskSpec
from dymu.normalization import DATASET_NORMALIZATION

from .base import ArrayDataset, DatasetError, Sample

CIFAR100_MEAN, CIFAR100_STD = DATASET_NORMALIZATION["cifar100-20"]
SPLITS: dict[str, str] = {"train": "train", "test": "test", "val": "test"}
N_COARSE, N_FINE_PER_COARSE = 20, 5
IGNORE = 255
LAYOUT = (
    "<root>/cifar-100-python/{train,test,meta} (the python version of CIFAR-100: pickled dicts "
    "with b'data', b'fine_labels', b'coarse_labels')"
)


def _folder(root: str | Path) -> Path:
    r = Path(root).expanduser()
    return (
        r
        if (r / "train").is_file() and not (r / "cifar-100-python").is_dir()
        else (r / "cifar-100-python")
    )


def _unpickle(path: Path) -> dict:
    """Load one file of the official distribution (see the module docstring on pickle)."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DatasetError(f"CIFAR-100 file missing: {path}; expected layout: {LAYOUT}") from None
    except Exception as exc:  # a truncated or foreign file
        raise DatasetError(f"cannot read {path} as CIFAR-100 ({exc}); expected {LAYOUT}") from exc


def _task_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "task"


def coarse_names(root: str | Path | None) -> list[str]:
    """Task names: the coarse label names from ``meta``, else ``coarse00`` .. ``coarse19``."""
    default = [f"coarse{k:02d}" for k in range(N_COARSE)]
    if root is None:
        return default
    meta_file = _folder(root) / "meta"
    if not meta_file.is_file():
        return default
    names = _unpickle(meta_file).get(b"coarse_label_names")
    if not names or len(names) != N_COARSE:
        return default
    out = [_task_name(n.decode() if isinstance(n, bytes) else str(n)) for n in names]
    return out if len(set(out)) == N_COARSE else default


def cifar_tasks(root: str | Path | None = None) -> tuple[TaskSpec, ...]:
    """20 five-way classification tasks, loss scale 1 each."""
    return tuple(
        TaskSpec(name=n, kind="classification", classes=N_FINE_PER_COARSE, loss_scale=1.0)
        for n in coarse_names(root)
    )


def fine_to_task(fine: np.ndarray, coarse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(coarse_of_fine, rank_of_fine)`` for the 100 fine classes, from labelled data: the
    coarse class of each fine class and its rank (0..4) within that coarse class."""
    coarse_of = np.full(100, -1, np.int64)
    for f, c in zip(fine.tolist(), coarse.tolist()):
        if coarse_of[f] not in (-1, c):
            raise DatasetError(f"fine class {f} appears under coarse classes {coarse_of[f]}, {c}")
        coarse_of[f] = c
    rank = np.full(100, -1, np.int64)
    for c in range(N_COARSE):
        members = np.flatnonzero(coarse_of == c)
        if len(members) != N_FINE_PER_COARSE:
            raise DatasetError(
                f"coarse class {c} has {len(members)} fine classes in the data, CIFAR-100 has 5"
            )
        rank[members] = np.arange(N_FINE_PER_COARSE)
    return coarse_of, rank


def load_cifar100(root: str | Path, split: str) -> dict[str, np.ndarray]:
    """``image`` (N, 32, 32, 3) uint8, ``fine`` and ``coarse`` (N,) int64 labels of ``split``."""
    d = _unpickle(_folder(root) / SPLITS[split])
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        fine = np.asarray(d[b"fine_labels"], dtype=np.int64)
        coarse = np.asarray(d[b"coarse_labels"], dtype=np.int64)
    except KeyError as exc:
        raise DatasetError(f"CIFAR-100 {split} file lacks {exc}; expected {LAYOUT}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or not len(data) == len(fine) == len(coarse):
        raise DatasetError(f"CIFAR-100 {split} data has shape {data.shape}; expected (N, 3072)")
    return {
        "image": data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
        "fine": fine,
        "coarse": coarse,
    }


class _Cifar20(ArrayDataset):
    """Keeps the uint8 images in memory and scales one sample at a time."""

    def raw(self, i: int) -> dict[str, np.ndarray]:
        out = super().raw(i)
        out["image"] = out["image"].astype(np.float32) / 255.0
        return out


def build_cifar(
    split: str,
    root: str | Path | None = None,
    *,
    transform: Callable[[Sample], Sample] | None = None,
) -> ArrayDataset:
    """CIFAR-100 ``split`` (train or test; val = test) as 20 five-way tasks."""
    if split not in SPLITS:
        raise DatasetError(f"cifar100-20 has splits train and test (val = test), not {split!r}")
    if root is None:
        raise DatasetError(f"cifar100-20 needs root=<dir> holding {LAYOUT}")
    if not _folder(root).is_dir():
        raise DatasetError(f"no CIFAR-100 at {Path(root)}; expected layout: {LAYOUT}")
    data = load_cifar100(root, split)
    # The fine -> coarse grouping comes from the training file (all 100 classes appear there).
    ref = data if SPLITS[split] == "train" else load_cifar100(root, "train")
    coarse_of, rank = fine_to_task(ref["fine"], ref["coarse"])
    if (coarse_of[data["fine"]] != data["coarse"]).any():
        raise DatasetError("CIFAR-100 test labels disagree with the train file's class grouping")
    tasks = cifar_tasks(root)
    labels = np.full((len(data["fine"]), N_COARSE), IGNORE, np.int64)
    labels[np.arange(len(labels)), data["coarse"]] = rank[data["fine"]]
    return _Cifar20(
        tasks,
        data["image"],
        {t.name: labels[:, k] for k, t in enumerate(tasks)},
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        transform=transform,
    )
