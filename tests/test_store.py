"""Artifacts: round trip, newest-version resolution, atomic writes, tamper detection."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dymu
from dymu import store
from dymu.errors import ArtifactError

from .conftest import randomize_, tiny_config


@pytest.fixture
def saved(tmp_path, tiny_model) -> Path:
    return dymu.save(
        tiny_model,
        tmp_path / "tiny",
        input_normalization={"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25]},
        task_affinity=torch.eye(3),
        training={"command": "pytest", "data_seed": 7},
        metrics={"hv": 1.5},
        extra_files={"train_log.csv": b"step,loss\n1,0.5\n"},
    )


def test_round_trip_gives_the_same_model(saved, tiny_model):
    loaded = dymu.load(saved.parent, device="cpu")
    x = torch.randn(2, 3, 24, 32)
    for r, c in [([1, 0, 0], 0.0), ([0.2, 0.5, 0.3], 0.7)]:
        a, b = tiny_model.materialize(r, c), loaded.materialize(r, c)
        assert a.architecture == b.architecture
        with torch.no_grad():
            oa, ob = a(x), b(x)
        assert all(torch.equal(oa[k], ob[k]) for k in oa)
    m = loaded.manifest
    assert m["version"] == "v1" and m["name"] == "tiny"
    assert m["input_size"] == [24, 32] and m["n_tasks"] == 3 and m["n_layers"] == 5
    assert [t["name"] for t in m["tasks"]] == ["segmentation", "depth", "normals"]
    assert m["tasks"][1]["loss_scale"] == 3.0
    assert m["task_affinity"] == torch.eye(3).tolist()
    assert m["training"] == {"command": "pytest", "data_seed": 7}
    assert m["metrics"] == {"hv": 1.5}
    assert m["input_normalization"] == {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25]}
    assert m["anchor_cost"]["flops"] == tiny_model.anchor_cost().flops
    assert set(m["files"]) == {*store.COMPONENTS.values(), "train_log.csv"}
    assert loaded.tasks == tiny_model.tasks
    assert not loaded.training


def test_weights_are_safetensors_only(saved):
    from safetensors import safe_open

    for fname in store.COMPONENTS.values():
        with safe_open(str(saved / fname), framework="pt") as f:
            assert f.metadata()["format"] == "dymu-artifact"
    assert not list(saved.glob("*.pt")) and not list(saved.glob("*.pkl"))


def test_artifact_files_get_the_usual_permissions(saved):
    """Every file is created like the manifest (mode 0o666 & ~umask), so a server running as
    another user (the non-root container mounting model_store) can read the weights."""
    modes = {p.name: p.stat().st_mode & 0o777 for p in saved.iterdir()}
    assert len(set(modes.values())) == 1, modes
    umask = int(Path("/proc/self/status").read_text().split("Umask:")[1].split()[0], 8)
    assert modes["anchor.safetensors"] == 0o666 & ~umask


def test_newest_version_is_loaded(tmp_path, tiny_model):
    root = tmp_path / "m"
    v1 = dymu.save(tiny_model, root)
    other = randomize_(dymu.create_model(tiny_config()), seed=99)
    v2 = dymu.save(other, root)
    assert (v1.name, v2.name) == ("v1", "v2")
    for _ in range(9):
        dymu.save(other, root)
    assert store.list_versions(root)[-1] == "v11"  # numeric, not lexical order
    assert store.resolve(root).name == "v11"
    loaded = dymu.load(root, device="cpu")
    w = next(iter(other.anchor.state_dict().values()))
    assert torch.equal(next(iter(loaded.anchor.state_dict().values())), w)
    assert dymu.load(v1, device="cpu").manifest["version"] == "v1"
    with pytest.raises(ArtifactError, match="v1"):
        dymu.save(tiny_model, root, version="v1")


def test_no_temporary_directories_are_left(tmp_path, tiny_model):
    root = tmp_path / "m"
    dymu.save(tiny_model, root)
    with pytest.raises(ArtifactError):
        dymu.save(tiny_model, root, extra_files={"../escape": b"x"})
    assert sorted(p.name for p in root.iterdir()) == ["v1"]
    assert not (tmp_path / "escape").exists()


def flip_byte(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fname", [*store.COMPONENTS.values(), "train_log.csv"])
def test_tampered_file_is_refused_by_name(saved, fname):
    flip_byte(saved / fname)
    with pytest.raises(ArtifactError, match=fname.replace(".", r"\.") + ".*sha256"):
        dymu.load(saved, device="cpu")


def test_missing_or_truncated_file_is_refused_by_name(saved):
    (saved / "edge_hypernet.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"edge_hypernet\.safetensors is missing"):
        dymu.load(saved, device="cpu")


def test_truncated_file(saved):
    p = saved / "anchor.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"anchor\.safetensors has 100 bytes"):
        dymu.load(saved, device="cpu")


def test_edited_manifest_is_refused(saved):
    mpath = saved / "manifest.json"
    m = json.loads(mpath.read_text())
    m["tasks"][0]["name"] = "sky"
    mpath.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"manifest\.json was modified"):
        dymu.load(saved, device="cpu")


def test_missing_manifest_and_missing_paths(tmp_path, saved):
    (saved / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"no version directories|manifest\.json is missing"):
        dymu.load(saved, device="cpu")
    with pytest.raises(ArtifactError, match="does not exist"):
        dymu.load(tmp_path / "nothing", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no version directories"):
        dymu.load(tmp_path / "empty", device="cpu")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, tiny_model, saved):
    """A consistent artifact (checksums recomputed) whose weights belong to another model."""
    other = dymu.create_model(tiny_config(n_tasks=2))
    other_dir = dymu.save(other, tmp_path / "two")
    (saved / "anchor.safetensors").write_bytes((other_dir / "anchor.safetensors").read_bytes())
    m = json.loads((saved / "manifest.json").read_text())
    m["files"]["anchor.safetensors"] = {
        "sha256": store.sha256_file(saved / "anchor.safetensors"),
        "bytes": (saved / "anchor.safetensors").stat().st_size,
    }
    m["manifest_sha256"] = store.manifest_digest(m)
    (saved / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"anchor\.safetensors does not fit"):
        dymu.load(saved, device="cpu")


def test_bad_device_and_names(tmp_path, tiny_model, saved):
    with pytest.raises(ArtifactError, match="bad device"):
        dymu.load(saved, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ArtifactError, match="no CUDA"):
            dymu.load(saved, device="cuda")
    with pytest.raises(ArtifactError, match="bad model name"):
        dymu.save(tiny_model, tmp_path / "bad name!")
    with pytest.raises(ArtifactError, match="bad version"):
        dymu.save(tiny_model, tmp_path / "ok", version="latest")
    with pytest.raises(ArtifactError, match="3 means and positive stds"):
        dymu.save(tiny_model, tmp_path / "ok", input_normalization={"mean": [0], "std": [1]})
    with pytest.raises(ArtifactError, match="3 x 3"):
        dymu.save(tiny_model, tmp_path / "ok", task_affinity=torch.eye(2))


def test_concurrent_writers_get_distinct_versions(tmp_path, tiny_model):
    """Two processes saving into one store at once both publish, as different versions."""
    root = tmp_path / "m"
    seed_dir = dymu.save(tiny_model, tmp_path / "src")
    code = (
        f"import dymu; m = dymu.load({str(seed_dir)!r}, device='cpu'); "
        f"[dymu.save(m, {str(root)!r}) for _ in range(3)]"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert store.list_versions(root) == [f"v{i}" for i in range(1, 7)]
    for v in store.list_versions(root):
        store.read_manifest(root / v, verify=True)
