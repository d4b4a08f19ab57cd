"""``dymu data``: write the ``scenes`` benchmark to disk and describe dataset splits.

dymu data scenes --n 1000 --seed 0 --size 96x128 --out data/scenes [--split train]
dymu data info data/scenes
dymu data list
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np

from .base import DatasetError

_SIZE = re.compile(r"(\d+)[xX](\d+)")
MAX_SIDE = 8192
CHUNK = 256


def parse_size(text: str) -> tuple[int, int]:
    """``"HxW"`` -> ``(H, W)``, strictly (two positive integers up to 8192, nothing else)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise DatasetError(f"--size must look like HxW (e.g. 96x128), got {text!r}")
    h, w = int(m.group(1)), int(m.group(2))
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise DatasetError(f"--size sides must be in 1..{MAX_SIDE}, got {h}x{w}")
    return h, w


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, desc=desc, unit="img", leave=False)


def _scenes(args: argparse.Namespace) -> int:
    from .npy_split import prepare_split_dir, write_meta, write_samples
    from .scenes import SCENE_CLASSES, SPLIT_STREAMS, SPLITS, render_scenes

    size = parse_size(args.size)
    if args.n < 1:
        raise DatasetError(f"--n must be >= 1, got {args.n}")
    split = SPLITS[args.split]
    out = prepare_split_dir(Path(args.out) / split, overwrite=args.overwrite)
    bar = None if args.quiet else _progress(args.n, f"scenes {split}")
    t0 = time.perf_counter()
    t_render = 0.0
    for start in range(0, args.n, CHUNK):
        m = min(CHUNK, args.n - start)
        t1 = time.perf_counter()
        arrays = render_scenes(m, args.seed, size, stream=SPLIT_STREAMS[split], start=start)
        t_render += time.perf_counter() - t1
        write_samples(arrays, out, start)
        if bar is not None:
            bar.update(m)
    if bar is not None:
        bar.close()
    write_meta(
        out,
        {
            "generator": "scenes",
            "seed": args.seed,
            "split": split,
            "stream": SPLIT_STREAMS[split],
            "n": args.n,
            "size": list(size),
            "classes": list(SCENE_CLASSES),
            "depth": "z-depth along the optical axis, metres",
            "normals": "camera frame (x right, y down, z forward), unit, facing the camera",
        },
    )
    dt = time.perf_counter() - t0
    print(
        f"wrote {args.n} scenes ({split}, {size[0]}x{size[1]}, seed {args.seed}) to {out} in "
        f"{dt:.1f} s: {args.n / dt:.0f} images/s ({args.n / max(t_render, 1e-9):.0f} images/s "
        f"rendering alone)"
    )
    print(f"read it with build_dataset('scenes', {split!r}, root={str(Path(args.out))!r})")
    return 0


def _describe_split(d: Path) -> None:
    from .npy_split import KIND_FOLDERS, _indices, read_meta

    meta = read_meta(d)
    counts = {
        f: len(_indices(d / f)) for f in ("image", *KIND_FOLDERS.values()) if (d / f).is_dir()
    }
    print(f"{d}")
    print("  samples  " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    first = _indices(d / "image")[:1]
    if first:
        i = first[0]
        for f in counts:
            a = np.load(d / f / f"{i}.npy", mmap_mode="r")
            extra = ""
            if f == "label":
                vals = np.unique(np.asarray(a))
                extra = f", values {vals.min():g}..{vals.max():g}"
            elif f == "depth":
                extra = f", range {float(np.min(a)):.2f}..{float(np.max(a)):.2f}"
            print(f"  {f:<8} {i}.npy {tuple(a.shape)} {a.dtype}{extra}")
    for k, v in meta.items():
        print(f"  meta     {k}: {v}")


def _info(args: argparse.Namespace) -> int:
    d = Path(args.dir).expanduser()
    if (d / "image").is_dir():
        splits = [d]
    else:
        splits = [d / s for s in ("train", "val", "test") if (d / s / "image").is_dir()]
    if not splits:
        raise DatasetError(
            f"no split at {d}: expected <dir>/image/<i>.npy or <dir>/{{train,val}}/image/<i>.npy"
        )
    for s in splits:
        _describe_split(s)
    return 0


def _list(args: argparse.Namespace) -> int:
    from . import DATASETS

    for e in DATASETS.values():
        tasks = ", ".join(t.name for t in e.tasks())
        print(f"{e.name:<15} {e.description}")
        print(f"{'':<15} splits {'/'.join(e.splits)}; options {', '.join(e.options)}")
        print(f"{'':<15} tasks {tasks}")
        print(f"{'':<15} data {e.layout}")
    return 0


def add_data_command(sub: argparse._SubParsersAction) -> None:
    """Register ``dymu data`` (entry point ``dymu.commands: data``)."""
    p = sub.add_parser(
        "data",
        help="generate and inspect datasets",
        description="Write the scenes benchmark to disk, describe a split, list the benchmarks.",
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    s = dsub.add_parser(
        "scenes",
        help="render scenes and write them in the NYU-v2 (MTAN) .npy layout",
        description="Render procedural 3-D scenes (segmentation, depth, normals) and write "
        "OUT/SPLIT/{image,label,depth,normal}/<i>.npy and meta.json.",
    )
    s.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--size", default="96x128", help="HxW in pixels (default 96x128)")
    s.add_argument("--out", required=True, type=Path, help="dataset root; writes OUT/SPLIT")
    s.add_argument(
        "--split",
        default="train",
        choices=("train", "val", "test"),
        help="split to write (train and val use different random streams; test = val)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace an existing split")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_scenes)

    i = dsub.add_parser(
        "info", help="describe a split on disk", description="Describe a split in the .npy layout."
    )
    i.add_argument("dir", type=Path, help="a split folder, or a root holding train/ and val/")
    i.set_defaults(func=_info)

    lst = dsub.add_parser("list", help="list the registered benchmarks")
    lst.set_defaults(func=_list)
