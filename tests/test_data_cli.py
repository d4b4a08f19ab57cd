"""``dymu data`` through the installed console script and in-process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dymu.cli import main
from training.data import build_dataset, render_scenes
from training.data.base import DatasetError
from training.data.cli import parse_size


def _dymu() -> str:
    exe = Path(sys.executable).parent / "dymu"
    found = str(exe) if exe.is_file() else shutil.which("dymu")
    if not found:
        pytest.skip("the dymu console script is not installed")
    return found


def test_console_script_writes_a_split_the_loader_reads(tmp_path):
    out = tmp_path / "scenes"
    r = subprocess.run(
        [
            _dymu(),
            "data",
            "scenes",
            "--n",
            "3",
            "--seed",
            "2",
            "--size",
            "24x32",
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert str(out / "train") in r.stdout and "images/s" in r.stdout
    ds = build_dataset("scenes", "train", root=out)
    assert len(ds) == 3
    ref = render_scenes(3, 2, (24, 32))
    np.testing.assert_allclose(
        ds.denormalize(ds[2]["image"]).permute(1, 2, 0).numpy(), ref["image"][2], atol=1e-6
    )
    np.testing.assert_array_equal(ds[2]["segmentation"].numpy(), ref["label"][2])

    bad = subprocess.run(
        [_dymu(), "data", "scenes", "--n", "3", "--size", "24by32", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dymu: error:") and "HxW" in lines[0]


def test_in_process_val_split_info_and_errors(tmp_path, capsys):
    out = tmp_path / "s"
    assert (
        main(
            [
                "data",
                "scenes",
                "--n",
                "2",
                "--size",
                "8x10",
                "--split",
                "val",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    ds = build_dataset("scenes", "val", root=out)
    mem = build_dataset("scenes", "val", n=2, size=(8, 10))
    np.testing.assert_allclose(ds[1]["image"].numpy(), mem[1]["image"].numpy(), atol=1e-5)
    # refusing to overwrite, then overwriting
    assert (
        main(
            [
                "data",
                "scenes",
                "--n",
                "1",
                "--size",
                "8x10",
                "--split",
                "val",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 2
    )
    assert "overwrite" in capsys.readouterr().err
    assert (
        main(
            [
                "data",
                "scenes",
                "--n",
                "1",
                "--size",
                "8x10",
                "--split",
                "val",
                "--out",
                str(out),
                "--quiet",
                "--overwrite",
            ]
        )
        == 0
    )
    assert len(build_dataset("scenes", "val", root=out)) == 1
    capsys.readouterr()
    assert main(["data", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "image 1" in text and "generator: scenes" in text
    assert main(["data", "info", str(tmp_path / "none")]) == 2
    assert main(["data", "list"]) == 0
    assert "pascal-context" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["96x", "x128", "0x5", "96*128", "96x128x3", "-1x4", "", "axb"])
def test_parse_size_is_strict(text):
    with pytest.raises(DatasetError):
        parse_size(text)


def test_parse_size_accepts_hxw():
    assert parse_size("96x128") == (96, 128) and parse_size(" 37X53 ") == (37, 53)
