"""``multidigits``: MultiMNIST-style pairs of real handwritten digits (Sener & Koltun, 2018).

The source digits are scikit-learn's bundled ``load_digits`` (1,797 images of 8x8 at 17 grey
levels; nothing is downloaded). Each digit is upsampled bilinearly to ``digit_size`` (default
24x24) and two are overlaid (pixel-wise maximum) on a 36x36 canvas: the *left* digit at the
upper-left corner and the *right* digit at the lower-right corner, each shifted inwards by a
random 0..3 pixels, so they overlap by 12 to 18 pixels along each axis, as in MultiMNIST where
two 28x28 digits share a 36x36 canvas. Tasks ``left`` and ``right``: 10-way classification,
loss scale 1. The grey image is replicated to 3 channels so the same backbones apply.

Fixed source split: the first 1,400 source images feed ``train``, the remaining 397 ``test``,
so test pairs are made of digit images never seen in training. ``sources=(start, stop)`` keeps
a slice of the split's pool: ``sources=(0, 1200)`` for the stages and ``(1200, 1400)`` for the
calibration split give a path table on other writers' digits than those the streams fit
(docs/training.md, "The calibration split"). Pairs are drawn from
``np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))`` with stream 0 for
train and 1 for test; the same ``(n, seed, split)`` always gives the same pairs.

``warp=True`` renders each pair's two digits through their own random affine map (rotation
within +-``WARP_DEGREES``, scale within 1 +- ``WARP_SCALE``, shear within +-``WARP_SHEAR``, about
the digit's centre; bilinear), so the same source digit looks different in every pair: the
classic augmentation of handwritten digits, made into the split itself (docs/training.md,
"Warped digits"). Its draws come after the pairs' own, so a warped split has the same digits,
labels and offsets as the plain one of the same ``(n, seed, split, sources)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

from dymu.config import TaskSpec
from dymu.normalization import DATASET_NORMALIZATION

from .base import ArrayDataset, DatasetError, Sample

CANVAS = 36
N_TRAIN_SOURCES = 1400
JITTER = 3
WARP_DEGREES = 15.0
WARP_SCALE = 0.15
WARP_SHEAR = 0.2
SPLITS: dict[str, str] = {"train": "train", "test": "test", "val": "test"}
STREAMS: dict[str, int] = {"train": 0, "test": 1}
DEFAULT_N: dict[str, int] = {"train": 10000, "test": 2000}
#: Canvas statistics (measured on 10,000 train pairs of seed 0), for zero-mean unit-variance.
DIGITS_MEAN, DIGITS_STD = DATASET_NORMALIZATION["multidigits"]


def multidigits_tasks() -> tuple[TaskSpec, ...]:
    """``left`` and ``right`` digit: 10-way classification each, loss scale 1."""
    return (
        TaskSpec(name="left", kind="classification", classes=10, loss_scale=1.0),
        TaskSpec(name="right", kind="classification", classes=10, loss_scale=1.0),
    )


@lru_cache(maxsize=4)
def source_digits(digit_size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 bundled digits upsampled to ``digit_size`` (float32 in [0, 1]) and their
    labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.stack(
        [
            np.asarray(
                Image.fromarray((im / 16.0).astype(np.float32)).resize(
                    (digit_size, digit_size), Image.Resampling.BILINEAR
                )
            )
            for im in d.images
        ]
    )
    return np.clip(imgs, 0.0, 1.0).astype(np.float32), d.target.astype(np.int64)


def source_indices(split: str) -> np.ndarray:
    """Indices into ``load_digits`` that feed ``split`` (train: the first 1,400)."""
    n_all = len(source_digits()[1])
    if SPLITS[split] == "train":
        return np.arange(N_TRAIN_SOURCES)
    return np.arange(N_TRAIN_SOURCES, n_all)


def source_pool(split: str, sources: Sequence[int] | None = None) -> np.ndarray:
    """The source digits ``split`` draws from: its whole pool, or the slice ``sources`` =
    ``(start, stop)`` of it (at least 2 digits: a pair needs two different images)."""
    pool = source_indices(split)
    if sources is None:
        return pool
    if len(sources) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in sources):
        raise DatasetError(f"multidigits: sources must be [start, stop] integers, got {sources!r}")
    start, stop = sources
    if not 0 <= start < stop <= len(pool) or stop - start < 2:
        raise DatasetError(
            f"multidigits: sources [{start}, {stop}] must satisfy 0 <= start, start + 2 <= stop "
            f"<= {len(pool)} (the {SPLITS[split]} pool)"
        )
    return pool[start:stop]


def make_pairs(
    n: int,
    seed: int = 0,
    split: str = "train",
    digit_size: int = 24,
    sources: Sequence[int] | None = None,
    warp: bool = False,
) -> dict[str, np.ndarray]:
    """``n`` overlaid pairs: ``image`` (n, 36, 36) float32 in [0, 1]; ``left``/``right`` (n,)
    labels; ``left_index``/``right_index`` (n,) indices into ``load_digits``; ``offsets`` (n, 4)
    the (row, col) of the left digit's and the right digit's top-left corners. ``sources``:
    ``(start, stop)``, the slice of the split's pool of source digits to draw from; ``warp``: a
    random affine map per rendered digit (:func:`warp_digits`)."""
    if split not in SPLITS:
        raise DatasetError(f"multidigits has splits train and test (val = test), not {split!r}")
    if not 8 <= digit_size <= CANVAS - JITTER:
        raise DatasetError(f"multidigits: digit_size must be in 8..{CANVAS - JITTER}")
    split = SPLITS[split]
    digits, labels = source_digits(digit_size)
    pool = source_pool(split, sources)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(STREAMS[split],)))
    li = pool[rng.integers(len(pool), size=n)]
    # a different source image on the right: shift by 1..len-1 within the pool
    ri = pool[(np.searchsorted(pool, li) + rng.integers(1, len(pool), size=n)) % len(pool)]
    jit = rng.integers(0, JITTER + 1, size=(n, 4))
    far = CANVAS - digit_size
    offsets = np.stack([jit[:, 0], jit[:, 1], far - jit[:, 2], far - jit[:, 3]], axis=1)
    left, right = digits[li], digits[ri]
    if warp:
        left, right = warp_digits(left, rng), warp_digits(right, rng)
    images = np.zeros((n, CANVAS, CANVAS), np.float32)
    s = digit_size
    for k in range(n):
        r0, c0, r1, c1 = offsets[k]
        images[k, r0 : r0 + s, c0 : c0 + s] = left[k]
        np.maximum(
            images[k, r1 : r1 + s, c1 : c1 + s], right[k], out=images[k, r1 : r1 + s, c1 : c1 + s]
        )
    return {
        "image": images,
        "left": labels[li],
        "right": labels[ri],
        "left_index": li,
        "right_index": ri,
        "offsets": offsets,
    }


def warp_digits(
    digits: np.ndarray,
    rng: np.random.Generator,
    bounds: tuple[float, float, float] = (WARP_DEGREES, WARP_SCALE, WARP_SHEAR),
) -> np.ndarray:
    """Each (S, S) digit of ``digits`` (n, S, S) through its own random affine map about its
    centre: rotation (degrees), isotropic scale change and horizontal shear, each drawn
    uniformly within +-``bounds``; bilinear, zero outside, clipped to [0, 1]."""
    from scipy.ndimage import affine_transform

    degrees, scale_change, shear_bound = bounds
    n, size = len(digits), digits.shape[-1]
    angle = np.deg2rad(rng.uniform(-degrees, degrees, n))
    scale = rng.uniform(1.0 - scale_change, 1.0 + scale_change, n)
    shear = rng.uniform(-shear_bound, shear_bound, n)
    centre = np.full(2, (size - 1) / 2.0)
    out = np.empty_like(digits)
    for k in range(n):
        cos, sin = np.cos(angle[k]), np.sin(angle[k])
        rotation = np.array([[cos, -sin], [sin, cos]])
        forward = scale[k] * rotation @ np.array([[1.0, 0.0], [shear[k], 1.0]])
        inverse = np.linalg.inv(forward)  # affine_transform maps output coordinates to input
        offset = centre - inverse @ centre
        affine_transform(digits[k], inverse, offset, output=out[k], order=1, cval=0.0)
    return np.clip(out, 0.0, 1.0, out=out)


def build_multidigits(
    split: str,
    root: None = None,
    *,
    n: int | None = None,
    seed: int = 0,
    digit_size: int = 24,
    sources: Sequence[int] | None = None,
    warp: bool = False,
    transform: Callable[[Sample], Sample] | None = None,
) -> ArrayDataset:
    """The ``multidigits`` split: ``n`` pairs (default 10,000 train, 2,000 test) of ``seed``,
    drawn from the slice ``sources`` of the split's source digits (default: all of them),
    each digit warped at random when ``warp`` is set."""
    if root is not None:
        raise DatasetError("multidigits is generated from scikit-learn's digits; it takes no root")
    if split not in SPLITS:
        raise DatasetError(f"multidigits has splits train and test (val = test), not {split!r}")
    n = DEFAULT_N[SPLITS[split]] if n is None else int(n)
    if n < 1:
        raise DatasetError(f"multidigits: n must be >= 1, got {n}")
    if not isinstance(warp, bool):
        raise DatasetError(f"multidigits: warp must be true or false, got {warp!r}")
    pairs = make_pairs(n, seed, split, digit_size, sources, warp)
    return ArrayDataset(
        multidigits_tasks(),
        pairs["image"],
        {"left": pairs["left"], "right": pairs["right"]},
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        transform=transform,
    )
