"""The `dymu` console command: --help everywhere, `info`, one-line errors."""

import json
import shutil
import subprocess
import sys

import pytest

import dymu
from dymu.cli import build_parser, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("dymu") or str(__import__("pathlib").Path(sys.executable).parent / "dymu")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def test_help_on_every_subcommand(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert "info" in commands
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: dymu " + name in capsys.readouterr().out


def test_info_prints_tasks_cost_and_checksums(tmp_path, tiny_model):
    vdir = dymu.save(tiny_model, tmp_path / "tiny", training={"command": "x", "data_seed": 1})
    proc = run_cli("info", str(tmp_path / "tiny"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tiny v1" in out and "3 tasks x 5 layers" in out and "3x24x32" in out
    for fname, entry in dymu.load(vdir, device="cpu").manifest["files"].items():
        assert fname in out and entry["sha256"] in out
    assert f"{tiny_model.anchor_cost().gflops:.3f} GFLOPs" in out


def test_info_json(tmp_path, tiny_model, capsys):
    dymu.save(tiny_model, tmp_path / "tiny")
    assert main(["info", str(tmp_path / "tiny"), "--json", "--size", "48", "64"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_tasks"] == 3 and info["n_layers"] == 5 and info["input_size"] == [24, 32]
    assert info["anchor_cost"]["input_size"] == [48, 64]
    assert info["anchor_cost"]["flops"] == tiny_model.anchor_cost((48, 64)).flops
    assert info["verified"] is True


def test_errors_are_one_line(tmp_path, tiny_model):
    proc = run_cli("info", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("dymu: error: no model at")
    vdir = dymu.save(tiny_model, tmp_path / "tiny")
    (vdir / "anchor.safetensors").write_bytes(b"garbage")
    proc = run_cli("info", str(vdir))
    assert proc.returncode == 2 and "anchor.safetensors" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
