"""The training pipeline end to end on scenes-tiny: all stages, the artifact, resume, the CLI."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dymu
from dymu.errors import ConfigError
from training.config import available_configs, load_config
from training.pipeline import run_training


def weights(vdir: Path) -> dict[str, torch.Tensor]:
    model = dymu.load(vdir, device="cpu")
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("train")
    vdir = run_training(
        load_config("scenes-tiny"),
        root / "store" / "tiny",
        run_dir=root / "run",
        device="cpu",
        progress=False,
        command="pytest",
    )
    return vdir, root


def test_all_stages_write_a_loadable_artifact(tiny_run):
    vdir, _ = tiny_run
    model = dymu.load(vdir, device="cpu")
    m = model.manifest
    assert model.tasks == ("segmentation", "depth", "normals")
    assert m["input_size"] == [24, 32]
    assert m["training"]["command"] == "pytest" and m["training"]["seed"] == 0
    assert set(m["training"]["stages"]) == {"anchor", "affinity", "edge", "weight"}
    # what decides the bits of a CPU run besides config, seed and data
    assert m["training"]["torch"] == torch.__version__ and m["training"]["device"] == "cpu"
    assert m["training"]["torch_threads"] == torch.get_num_threads()
    affinity = torch.tensor(m["task_affinity"])
    assert affinity.shape == (3, 3) and torch.allclose(affinity.diagonal(), torch.ones(3))
    assert ((affinity >= 0) & (affinity <= 1)).all()
    checks = m["metrics"]["checks"]
    assert set(checks["flops_by_c"]) == {"0.0", "0.5", "1.0"}
    assert set(checks["one_hot_vs_single_task"]) == set(model.tasks)
    assert "train_log.csv" in m["files"]
    # the normalization the model was trained with travels with it (the service reads it)
    from service.imaging import normalization_for
    from training.data import build_dataset

    data = build_dataset("scenes", "train", n=1, size=(24, 32))
    assert m["input_normalization"] == {"mean": list(data.mean), "std": list(data.std)}
    assert normalization_for(m) == (tuple(data.mean), tuple(data.std), "manifest")
    with open(vdir / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["stage"] for r in rows} == {"anchor", "edge", "weight"}
    assert all(float(r["loss"]) == float(r["loss"]) for r in rows)  # no NaN
    # the weight hypernet trained: its deltas are no longer zero
    deltas = model.bn_deltas([0.2, 0.3, 0.5], 0.5)
    assert any(float(dg.abs().sum()) > 0 for node in deltas.values() for dg, _ in node.values())
    net = model.materialize([1, 1, 1], 0.5)
    with torch.no_grad():
        out = net(torch.randn(1, 3, 24, 32))
    assert out["segmentation"].shape == (1, 6, 24, 32)


def test_training_is_repeatable_and_resume_gives_the_same_weights(tiny_run, tmp_path):
    vdir, _ = tiny_run
    config = load_config("scenes-tiny").model_copy(update={"check_preferences": 0})
    # interrupted twice (inside the anchor stage and inside the edge stage), then resumed
    run_dir = tmp_path / "run"
    assert (
        run_training(
            config, tmp_path / "s" / "m", run_dir=run_dir, device="cpu", progress=False, max_steps=7
        )
        is None
    )
    assert (
        run_training(
            config,
            tmp_path / "s" / "m",
            run_dir=run_dir,
            device="cpu",
            progress=False,
            max_steps=10,
            resume=True,
        )
        is None
    )
    resumed = run_training(
        config, tmp_path / "s" / "m", run_dir=run_dir, device="cpu", progress=False, resume=True
    )
    straight = run_training(
        config, tmp_path / "s2" / "m", run_dir=tmp_path / "run2", device="cpu", progress=False
    )
    a, b, c = weights(resumed), weights(straight), weights(vdir)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], c[k]), k  # same as the first run: repeatable on the CPU


def test_a_run_dir_with_a_checkpoint_needs_resume(tmp_path):
    config = load_config("scenes-tiny").model_copy(update={"check_preferences": 0})
    run_training(
        config,
        tmp_path / "s" / "m",
        run_dir=tmp_path / "r",
        device="cpu",
        progress=False,
        max_steps=3,
    )
    with pytest.raises(ConfigError, match="--resume"):
        run_training(
            config, tmp_path / "s" / "m", run_dir=tmp_path / "r", device="cpu", progress=False
        )
    with pytest.raises(ConfigError, match="another config"):
        run_training(
            config.scaled(2.0),
            tmp_path / "s" / "m",
            run_dir=tmp_path / "r",
            device="cpu",
            progress=False,
            resume=True,
        )


def test_stage1_variants_train_and_matter(tmp_path):
    """The stream reading, `regularize_samples` and `logit_bound` each change the result."""
    base = load_config("scenes-tiny").model_copy(update={"check_preferences": 0})
    variants = {
        "plain": {},
        "samples": {"regularize_samples": True},
        "bound": {"logit_bound": 1.5},
        "stream": {"regularizer": "stream"},
    }
    states = {}
    for name, update in variants.items():
        edge = base.edge.model_copy(update={"lambda_active": 50.0, **update})
        config = base.model_copy(update={"edge": edge})
        vdir = run_training(
            config,
            tmp_path / name / "m",
            run_dir=tmp_path / f"run-{name}",
            device="cpu",
            progress=False,
            stages=("anchor", "affinity", "edge"),
        )
        states[name] = dymu.load(vdir, device="cpu").edge_hypernet.state_dict()
    for name in ("samples", "bound", "stream"):
        assert any(not torch.equal(states[name][k], states["plain"][k]) for k in states[name])


def test_affinity_score_is_the_configs(tmp_path):
    """`[affinity] score` reaches stage 0b: on the same anchor the two scores give different
    affinities, and the artifact records the one it was trained with."""
    base = load_config("scenes-tiny").model_copy(update={"check_preferences": 0})
    found = {}
    for score in ("row-minmax", "rdm-spearman"):
        config = base.model_copy(
            update={"affinity": base.affinity.model_copy(update={"score": score})}
        )
        vdir = run_training(
            config,
            tmp_path / score / "m",
            run_dir=tmp_path / f"run-{score}",
            device="cpu",
            progress=False,
            stages=("anchor", "affinity", "edge"),
        )
        m = dymu.load(vdir, device="cpu").manifest
        assert m["training"]["config"]["affinity"]["score"] == score
        found[score] = torch.tensor(m["task_affinity"])
        assert torch.allclose(found[score].diagonal(), torch.ones(3))
    assert not torch.allclose(found["row-minmax"], found["rdm-spearman"])


def test_every_config_validates():
    names = available_configs()
    assert {
        "scenes-small",
        "scenes-tiny",
        "multidigits",
        "nyuv2",
        "pascal3",
        "pascal5",
        "cifar100-20",
    } <= set(names)
    for name in names:
        config = load_config(name)
        assert config.scaled(0.5).anchor.steps <= config.anchor.steps
    with pytest.raises(ConfigError, match="no config"):
        load_config("imagenet")


def test_bad_config_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[edge]\nlambda_active = -1\n")
    with pytest.raises(ConfigError, match=r"edge\.lambda_active"):
        load_config(bad)
    bad.write_text("[edge\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


@pytest.mark.slow  # a whole CLI run (~25-30 s): make test-slow
def test_dymu_train_cli(tmp_path):
    exe = Path(sys.executable).parent / "dymu"
    proc = subprocess.run(
        [
            str(exe),
            "train",
            "scenes-tiny",
            "--out",
            str(tmp_path / "store" / "t"),
            "--run-dir",
            str(tmp_path / "run"),
            "--device",
            "cpu",
            "--steps-scale",
            "0.5",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    m = dymu.load(tmp_path / "store" / "t", device="cpu").manifest
    assert m["training"]["command"].startswith("dymu train scenes-tiny")
    assert m["training"]["config"]["anchor"]["steps"] == 6
    # --anchor-from: the controller is retrained on the streams of an existing artifact
    again = subprocess.run(
        [
            str(exe),
            "train",
            "scenes-tiny",
            "--out",
            str(tmp_path / "store" / "t"),
            "--run-dir",
            str(tmp_path / "run2"),
            "--device",
            "cpu",
            "--steps-scale",
            "0.5",
            "--quiet",
            "--anchor-from",
            str(tmp_path / "store" / "t" / "v1"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    first = dymu.load(tmp_path / "store" / "t" / "v1", device="cpu")
    second = dymu.load(tmp_path / "store" / "t" / "v2", device="cpu")
    assert "anchor" not in second.manifest["training"]["stages"]
    assert second.manifest["training"]["config"]["anchor"]["pretrained"].endswith("v1")
    for key, value in first.anchor.state_dict().items():
        assert torch.equal(value, second.anchor.state_dict()[key]), key
    # with a subset of the stages the streams are still the artifact's, not a fresh init
    subset = subprocess.run(
        [
            str(exe), "train", "scenes-tiny", "--out", str(tmp_path / "store" / "t"),
            "--run-dir", str(tmp_path / "run3"), "--device", "cpu", "--quiet",
            "--stages", "affinity,edge", "--anchor-from", str(tmp_path / "store" / "t" / "v1"),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert subset.returncode == 0, subset.stderr
    third = dymu.load(tmp_path / "store" / "t" / "v3", device="cpu")
    assert set(third.manifest["training"]["stages"]) == {"affinity", "edge"}
    for key, value in first.anchor.state_dict().items():
        assert torch.equal(value, third.anchor.state_dict()[key]), key
    bad = subprocess.run([str(exe), "train", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("dymu: error: no config")


def test_checks_record_the_resource_shape_and_the_shared_trees(tiny_run):
    from training.evaluation.checks import evaluate, uniform_and_one_hot

    vdir, _ = tiny_run
    model = dymu.load(vdir, device="cpu")
    checks = model.manifest["metrics"]["checks"]
    shape = checks["resource_shape"]
    anchor = model.anchor_cost().flops
    points = uniform_and_one_hot(3)
    for name, r in points.items():
        for c in (0.0, 0.5, 1.0):
            want = model.cost(model.architecture(r, c)).flops / anchor
            assert shape["fraction_of_anchor"][name][str(c)] == pytest.approx(want)
    corners = [shape["fraction_of_anchor"][f"one-hot {i}"]["0.0"] for i in range(3)]
    assert shape["max_one_hot_at_c0"] == pytest.approx(max(corners))
    centre = shape["fraction_of_anchor"]["uniform"]
    assert shape["uniform_c1_over_c0"] == pytest.approx(centre["1.0"] / centre["0.0"])
    trees = checks["shared_trees"]["trees"]
    assert set(trees) == {"uniform c=0.5", "uniform c=1.0"} | {
        f"one-hot {i} c=0.0" for i in range(3)
    }
    # one entry recomputed from scratch on the held-out split the checks used
    from training.data import split_dataset

    data = split_dataset(load_config("scenes-tiny"), held_out=True)
    tasks = model.config.tasks
    tree = evaluate(model.materialize(points["uniform"], 1.0), data, tasks, 50)
    stream = evaluate(lambda x: model.anchor(x, tasks=[1]), data, [tasks[1]], 50)
    assert trees["uniform c=1.0"]["depth"]["loss_ratio"] == pytest.approx(
        tree["depth"]["loss"] / stream["depth"]["loss"], rel=1e-5
    )


def test_a_process_group_is_left_only_after_a_completed_run(tmp_path):
    """training.distributed.shutdown: after a completed run the group is destroyed (after a
    barrier); after a failure it is left alone, since another rank may be in a collective."""
    import torch.distributed as dist

    from training.distributed import shutdown

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        shutdown(completed=False)
        assert dist.is_initialized()
        shutdown(completed=True)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
