"""``pascal-context``: PASCAL-Context with the multi-task labels of the MTI-Net / ATRC family.

The layout is that of ``PASCAL_MT`` as read by Vandenhende et al.'s Multi-Task-Learning-PyTorch
(``data/pascal_context.py``, from Maninis et al.'s ASTMT) and MTI-Net::

    <root>/JPEGImages/<id>.jpg                 the image
    <root>/ImageSets/Context/{train,val}.txt   one <id> per line (4,998 / 5,105 images)
    <root>/semseg/VOC12/<id>.png               semseg, 21 classes (0 = background, 255 = ignore),
    <root>/semseg/pascal-context/<id>.png        the VOC12 file wins when both exist (as there)
    <root>/human_parts/<id>.png | <id>.mat     human parts, see below
    <root>/sal_distill/<id>.png                saliency (distilled), grey, > 0.5 = salient
    <root>/normals_distill/<id>.png            normals (distilled), RGB, n = 2 * v / 255 - 1
    <root>/pascal-context/trainval/<id>.mat    'LabelMap' (459 Context classes): edges and the
                                                 normals' validity mask

Targets, as those loaders build them:

- ``semseg``: the PNG's indices; anything above 20 other than 255 becomes 255 (ignore).
- ``human_parts`` (7 classes: background + 6 parts): if ``human_parts/<id>.png`` exists it is
  read as a ready label map (indices 0..6, 255 = ignore; a *preprocessed alternative* that some
  pipelines write once from the .mat files). Otherwise ``human_parts/<id>.mat`` (the
  Pascal-Part annotation ``anno``: objects with ``class_ind`` and part masks) is parsed with
  :func:`scipy.io.loadmat`: the parts of every person (class 15) are painted with the 6-part
  grouping of MTI-Net (head, torso, upper arms, lower arms + hands, upper legs, lower legs +
  feet). Images without annotated people are all background, as there.
- ``sal``: binary, ``PNG / 255 > 0.5``.
- ``normals``: from the distilled PNG, kept only on pixels whose Context class is one of the
  classes shared with NYU (:data:`NORMALS_VALID_CLASSES`, the rule of those loaders), zero
  (invalid) elsewhere; renormalized to unit length.
- ``edge``: binary, pixels where the discrete Laplacian of ``LabelMap`` is non-zero (a label
  boundary), as there, but *without* the final morphological thinning of scikit-image (not a
  dependency here), so boundaries are 2 pixels wide instead of ~1.

All samples are resized to ``size`` (default 512x512, the paper's input size, aspect ratio not
kept, like MTI-Net's fixed resize): the image bilinearly, every target by nearest neighbour
(thin edges may break up when shrinking a lot). ``size=None`` keeps each image's own size.
Images are normalized with ImageNet statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dymu.config import TaskSpec

from .base import IMAGENET_MEAN, IMAGENET_STD, DatasetError, MultiTaskDataset, RawSample, Sample

SPLITS: dict[str, str] = {"train": "train", "val": "val", "test": "val"}
DEFAULT_SIZE: tuple[int, int] = (512, 512)
PERSON = 15  # the Pascal-Part class index of 'person'
LAYOUT = (
    "<root>/JPEGImages/<id>.jpg, <root>/ImageSets/Context/{train,val}.txt, "
    "<root>/semseg/pascal-context/<id>.png, <root>/human_parts/<id>.mat (or .png), "
    "<root>/sal_distill/<id>.png, and for 5 tasks <root>/normals_distill/<id>.png and "
    "<root>/pascal-context/trainval/<id>.mat (the PASCAL_MT layout of MTI-Net / ATRC)"
)

#: Pascal-Part part names of a person -> one of 6 parts (0 is background).
HUMAN_PARTS_6: dict[str, int] = {
    "hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "mouth": 1, "nose": 1,
    "rear": 1, "rebrow": 1, "reye": 1, "neck": 2, "torso": 2, "luarm": 3, "ruarm": 3,
    "lhand": 4, "llarm": 4, "rhand": 4, "rlarm": 4, "luleg": 5, "ruleg": 5,
    "lfoot": 6, "llleg": 6, "rfoot": 6, "rlleg": 6,
}  # fmt: skip

#: PASCAL-Context (459-class) indices of the classes that NYU-v2 also labels (its class list
#: minus 'unknown'), plus 'tvmonitor': where the distilled normals count as ground truth.
NORMALS_VALID_CLASSES: frozenset[int] = frozenset(
    (
        3,
        4,
        6,
        9,
        10,
        11,
        13,
        15,
        17,
        18,
        22,
        23,
        29,
        30,
        33,
        34,
        36,
        37,
        38,
        39,
        41,
        43,
        46,
        49,
        50,
        51,
        53,
        55,
        56,
        59,
        61,
        62,
        65,
        66,
        68,
        69,
        72,
        73,
        78,
        83,
        84,
        85,
        87,
        88,
        95,
        96,
        101,
        104,
        105,
        107,
        111,
        113,
        115,
        122,
        124,
        135,
        141,
        142,
        143,
        146,
        150,
        154,
        157,
        158,
        159,
        165,
        172,
        174,
        181,
        183,
        184,
        191,
        193,
        195,
        197,
        199,
        202,
        213,
        215,
        216,
        219,
        220,
        223,
        225,
        228,
        230,
        232,
        233,
        238,
        239,
        242,
        243,
        246,
        250,
        251,
        252,
        255,
        260,
        261,
        263,
        269,
        272,
        273,
        275,
        281,
        283,
        284,
        285,
        286,
        287,
        288,
        290,
        291,
        292,
        293,
        295,
        304,
        307,
        309,
        310,
        314,
        315,
        319,
        323,
        329,
        330,
        331,
        336,
        342,
        345,
        349,
        350,
        351,
        352,
        355,
        357,
        368,
        370,
        371,
        374,
        379,
        380,
        383,
        384,
        397,
        401,
        403,
        405,
        407,
        408,
        411,
        412,
        413,
        414,
        417,
        419,
        421,
        423,
        427,
        429,
        430,
        432,
        440,
        441,
        442,
        443,
        444,
        446,
        454,
        457,
    )
)


def pascal_tasks(tasks: int = 5) -> tuple[TaskSpec, ...]:
    """3 tasks (semseg 21 classes, human parts 7, saliency) or 5 (+ normals, edges), with the
    paper's loss scales (App. G): 1, 2, 5, 10, 50."""
    if tasks not in (3, 5):
        raise DatasetError(f"pascal-context: tasks must be 3 or 5, got {tasks!r}")
    three = (
        TaskSpec(name="semseg", kind="segmentation", classes=21, loss_scale=1.0),
        TaskSpec(name="human_parts", kind="segmentation", classes=7, loss_scale=2.0),
        TaskSpec(name="sal", kind="binary", loss_scale=5.0),
    )
    if tasks == 3:
        return three
    return (
        *three,
        TaskSpec(name="normals", kind="normals", loss_scale=10.0),
        TaskSpec(name="edge", kind="binary", loss_scale=50.0),
    )


def _png(path: Path, mode: str | None = None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert(mode) if mode else im)


def _loadmat(path: Path) -> dict:
    from scipy.io import loadmat

    return loadmat(str(path))


def label_edges(label_map: np.ndarray) -> np.ndarray:
    """Binary edges where the 4-neighbour Laplacian of a label map is non-zero (borders
    reflected without repeating the edge pixel, like OpenCV's default)."""
    x = np.asarray(label_map, dtype=np.float64)
    p = np.pad(x, 1, mode="reflect") if min(x.shape) > 1 else np.pad(x, 1, mode="edge")
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4.0 * x
    return (lap != 0).astype(np.float32)


def human_parts_from_mat(mat: dict, shape: tuple[int, int]) -> np.ndarray:
    """The 7-class part map of a Pascal-Part annotation (``loadmat`` output), 0 = background."""
    target = np.zeros(shape, np.int64)
    objects = mat["anno"][0][0][1][0]
    for obj in objects:
        if int(np.asarray(obj[1]).ravel()[0]) != PERSON or np.asarray(obj[3]).size == 0:
            continue
        for part in obj[3][0]:
            name = str(np.asarray(part[0]).ravel()[0])
            if name in HUMAN_PARTS_6:
                target[np.asarray(part[1]).astype(bool)] = HUMAN_PARTS_6[name]
    return target


class PascalContext(MultiTaskDataset):
    """One split of PASCAL-Context in the PASCAL_MT layout (see the module docstring)."""

    def __init__(self, root: str | Path, split: str, n_tasks: int = 5, **kwargs: object) -> None:
        super().__init__(pascal_tasks(n_tasks), **kwargs)  # type: ignore[arg-type]
        if split not in SPLITS:
            raise DatasetError(f"pascal-context has splits train and val, not {split!r}")
        self.root = Path(root).expanduser()
        lst = self.root / "ImageSets" / "Context" / f"{SPLITS[split]}.txt"
        if not lst.is_file():
            raise DatasetError(
                f"no PASCAL-Context at {self.root} (missing {lst}); expected layout: {LAYOUT}"
            )
        self.ids = [s.strip() for s in lst.read_text().splitlines() if s.strip()]
        if not self.ids:
            raise DatasetError(f"{lst} lists no images")
        for i in self.ids:  # fail early, naming the first missing file
            for f in self._required(i):
                if not f.is_file():
                    raise DatasetError(
                        f"PASCAL-Context file missing: {f}; expected layout: {LAYOUT}"
                    )

    def _semseg_path(self, i: str) -> Path:
        voc = self.root / "semseg" / "VOC12" / f"{i}.png"
        return voc if voc.is_file() else self.root / "semseg" / "pascal-context" / f"{i}.png"

    def _parts_path(self, i: str) -> Path:
        png = self.root / "human_parts" / f"{i}.png"
        return png if png.is_file() else self.root / "human_parts" / f"{i}.mat"

    def _context_path(self, i: str) -> Path:
        return self.root / "pascal-context" / "trainval" / f"{i}.mat"

    def _required(self, i: str) -> list[Path]:
        files = [
            self.root / "JPEGImages" / f"{i}.jpg",
            self._semseg_path(i),
            self._parts_path(i),
            self.root / "sal_distill" / f"{i}.png",
        ]
        if len(self.tasks) == 5:
            files += [self.root / "normals_distill" / f"{i}.png", self._context_path(i)]
        return files

    def __len__(self) -> int:
        return len(self.ids)

    def raw(self, k: int) -> RawSample:
        i = self.ids[k]
        image = _png(self.root / "JPEGImages" / f"{i}.jpg", "RGB").astype(np.float32) / 255.0
        hw = image.shape[:2]
        out: RawSample = {"image": image}

        sem = _png(self._semseg_path(i)).astype(np.int64)
        out["semseg"] = np.where((sem > 20) & (sem != 255), 255, sem)

        parts_file = self._parts_path(i)
        if parts_file.suffix == ".png":
            parts = _png(parts_file).astype(np.int64)
            parts = np.where((parts > 6) & (parts != 255), 255, parts)
        else:
            parts = human_parts_from_mat(_loadmat(parts_file), hw)
        out["human_parts"] = parts

        sal = _png(self.root / "sal_distill" / f"{i}.png", "L").astype(np.float32) / 255.0
        out["sal"] = (sal > 0.5).astype(np.float32)

        if len(self.tasks) == 5:
            label_map = _loadmat(self._context_path(i))["LabelMap"]
            rgb = _png(self.root / "normals_distill" / f"{i}.png", "RGB").astype(np.float32)
            normals = 2.0 * rgb / 255.0 - 1.0
            valid = np.isin(label_map, list(NORMALS_VALID_CLASSES))
            out["normals"] = np.where(valid[..., None], normals, 0.0).astype(np.float32)
            out["edge"] = label_edges(label_map)
        for name in ("semseg", "human_parts", "sal", "normals", "edge"):
            if name in out and out[name].shape[:2] != hw:
                raise DatasetError(
                    f"PASCAL-Context {name} of {i} is {out[name].shape[:2]}, the image {hw}"
                )
        return out


def build_pascal(
    split: str,
    root: str | Path | None = None,
    *,
    tasks: int = 5,
    size: Sequence[int] | None = DEFAULT_SIZE,
    transform: Callable[[Sample], Sample] | None = None,
) -> PascalContext:
    """PASCAL-Context ``split`` under ``root`` with 3 or 5 ``tasks``, resized to ``size``."""
    if root is None:
        raise DatasetError(f"pascal-context needs root=<dir> holding {LAYOUT}")
    pascal_tasks(tasks)  # validates
    return PascalContext(
        root, split, tasks, mean=IMAGENET_MEAN, std=IMAGENET_STD, size=size, transform=transform
    )
