"""The baselines (training/baselines): training a few steps on scenes-tiny, materialize ->
forward -> cost (== FlopCounterMode) -> save -> load_method -> same outputs, the hypernets'
dependence on r, and `dymu baselines` writing the promised run layout."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dymu
from dymu.errors import ArtifactError, PreferenceError, TaskError
from dymu.shared import shared_cost
from training.baselines import (
    ABLATION_FLAGS,
    BASELINES,
    REFERENCE,
    SingleTask,
    StaticSet,
    load_method,
    load_run,
    train_baseline,
)
from training.config import load_config
from training.data import split_dataset

R = [0.2, 0.5, 0.3]


@pytest.fixture(scope="module")
def tiny():
    config = load_config("scenes-tiny")
    config = config.model_copy(
        update={"baselines": config.baselines.model_copy(update={"static_count": 2})}
    )
    return config, split_dataset(config)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    config, data = tiny
    root = tmp_path_factory.mktemp("baselines")
    return {
        name: train_baseline(
            name, config, root / name, steps=3, device="cpu", progress=False, dataset=data
        )
        for name in BASELINES
    }


def flop_counter_flops(net: torch.nn.Module, hw: tuple[int, int]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 3, *hw))
    return counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_trains_materializes_costs_saves_and_loads(name, trained, tiny):
    _, data = tiny
    path = trained[name]
    method = load_method(path, device="cpu")
    assert method.tasks == ("segmentation", "depth", "normals") and method.n_tasks == 3
    assert method.config.input_size == (24, 32)
    images = torch.stack([data[i]["image"] for i in range(2)])
    net = method.materialize(R, 0.7)
    assert not net.training
    with torch.no_grad():
        out = net(images)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "segmentation": (2, 6, 24, 32),
        "depth": (2, 1, 24, 32),
        "normals": (2, 3, 24, 32),
    }
    # the analytic cost is the FlopCounterMode count, at the model size and another size
    for hw in [(24, 32), (40, 48)]:
        assert net.cost(hw).flops == flop_counter_flops(net, hw) > 0
    assert net.cost().params == shared_cost(method.config).params
    # a task subset runs only its head and costs less
    depth = method.materialize(R, tasks=["depth"])
    with torch.no_grad():
        assert set(depth(images)) == {"depth"}
    assert depth.cost().flops == flop_counter_flops(depth, (24, 32)) < net.cost().flops
    # loading again gives the same outputs (the weights round-trip through safetensors)
    again = load_method(path, device="cpu").materialize(R, 0.7)
    with torch.no_grad():
        out2 = again(images)
    for task in out:
        torch.testing.assert_close(out2[task], out[task], rtol=0, atol=0)
    # materialize (BN folded) computes what training computed (eval mode)
    if name != "static":
        with torch.no_grad():
            soft = method(images, torch.tensor(R))
        for task in out:
            torch.testing.assert_close(out[task], soft[task], rtol=1e-4, atol=1e-5)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["train_seconds"] > 0 and manifest["steps"] == 3 * (2 if name == "static" else 1)
    assert manifest["control_params"] == method.control_params
    if name != "static":  # a run repeats bit for bit only with the same torch and CPU threads
        record = manifest["training"]
        assert record["torch_threads"] == torch.get_num_threads() and record["device"] == "cpu"


def test_control_params_are_the_hypernetworks(trained):
    phn, phn_bn, cpmtl = (load_method(trained[k], device="cpu") for k in ("phn", "phn-bn", "cpmtl"))
    assert phn.control_params == sum(p.numel() for p in phn.generator.parameters())
    # PHN generates every parameter: none of the network's own remain
    assert sum(p.numel() for p in phn.net.parameters()) == 0
    # CPMTL keeps its encoder and generates only the heads
    assert all(not n.startswith("heads.") for n, _ in cpmtl.net.named_parameters())
    assert phn_bn.control_params > 0
    assert load_method(trained["static"], device="cpu").control_params == 0


@pytest.mark.parametrize("name", ["phn", "phn-bn", "cpmtl"])
def test_hypernet_weights_depend_on_r(name, trained):
    method = load_method(trained[name], device="cpu")
    a = method.materialize([0.8, 0.1, 0.1]).state_dict()
    b = method.materialize([0.1, 0.1, 0.8]).state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed
    if name == "cpmtl":  # the shared encoder is the same for every r
        assert all(k.startswith("heads.") for k in changed)
    if name == "phn":  # every layer is generated
        assert any(k.startswith("blocks.0.") for k in changed)
    # c is validated, then ignored (one architecture)
    c0 = method.materialize(R, 0.0).state_dict()
    c1 = method.materialize(R, 1.0).state_dict()
    assert all(torch.equal(c0[k], c1[k]) for k in c0)


def test_bad_preferences_and_tasks_are_clear_errors(trained):
    method = load_method(trained["phn"], device="cpu")
    with pytest.raises(PreferenceError, match="c must be in"):
        method.materialize(R, 2.0)
    with pytest.raises(PreferenceError, match="3 tasks"):
        method.materialize([1.0, 0.0])
    with pytest.raises(TaskError, match="unknown task"):
        method.materialize(R, tasks=["edges"])


def test_static_set_serves_the_nearest_preference(trained):
    static = load_method(trained["static"], device="cpu")
    assert isinstance(static, StaticSet) and len(static.members) == 2
    for member in static.members:
        assert static.nearest(member.r) is member
        assert member.train_seconds > 0
    one = load_method(Path(trained["static"]) / "k1", device="cpu")
    assert one.r == static.members[1].r
    assert static.train_seconds == pytest.approx(sum(m.train_seconds for m in static.members))


def test_single_task_is_the_anchor_without_adaptation(tiny_model):
    single = SingleTask(tiny_model)
    net = single.materialize(R, 1.0)
    assert net.cost() == tiny_model.anchor_cost() and single.control_params == 0
    x = torch.randn(2, 3, 24, 32)
    with torch.no_grad():
        out, ref = net(x), tiny_model.anchor(x)
    for task in ref:
        torch.testing.assert_close(out[task], ref[task], rtol=1e-4, atol=1e-5)


def test_tampered_or_foreign_directories_are_refused(trained, tmp_path):
    import shutil

    copy = tmp_path / "phn"
    shutil.copytree(trained["phn"], copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="sha256"):
        load_method(copy)
    with pytest.raises(ArtifactError, match="no model"):
        load_method(tmp_path / "nothing")


def test_dymu_baselines_writes_the_run_layout(tmp_path, capsys):
    from dymu.cli import main
    from training.config import CONFIG_DIR

    # scenes-tiny with one or two steps per stage, two static nets and no held-out checks
    config = tmp_path / "tiny.toml"
    tiny = (CONFIG_DIR / "scenes-tiny.toml").read_text()
    tiny = tiny.replace("check_preferences = 6", "check_preferences = 0")
    config.write_text(f"{tiny}\n[baselines]\nstatic_count = 2\n")
    out = tmp_path / "run"
    argv = ["baselines", str(config), "--out", str(out), "--steps-scale", "0.1", "--quiet"]
    assert main([*argv, "--methods", "phn-bn,static", "--ablations"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["name"] == "tiny"
    assert set(run["methods"]) == {"dymu", "phn-bn", "static"}
    for name, entry in run["methods"].items():
        assert entry["kind"] == name and entry["train_seconds"] > 0 and entry["steps"] > 0
    assert run["methods"]["dymu"]["path"] == "dymu/v1"
    assert sorted(p.name for p in (out / "static").iterdir() if p.is_dir()) == [
        "k0",
        "k1",
    ]
    for flag in (*ABLATION_FLAGS, REFERENCE):
        model = dymu.load(out / "ablations" / flag, device="cpu")
        edge = model.manifest["training"]["config"]["edge"]
        assert edge.get(flag, True) is (flag == REFERENCE)
        assert set(model.manifest["training"]["stages"]) == {"affinity", "edge", "weight"}
        torch.testing.assert_close(
            model.anchor.state_dict(), dymu.load(out / "dymu", device="cpu").anchor.state_dict()
        )
    assert set(run["ablations"]) == {*ABLATION_FLAGS, REFERENCE}
    methods = load_run(out, device="cpu")
    assert isinstance(methods["dymu"], dymu.ControllableModel)
    # a second call continues the same run and trains nothing twice
    before = (out / "static" / "manifest.json").read_text()
    assert main([*argv, "--methods", "static", "--dymu", str(out / "dymu")]) == 0
    assert json.loads((out / "run.json").read_text()) == run
    assert (out / "static" / "manifest.json").read_text() == before
    # a bad method or another config is one clear line
    capsys.readouterr()
    assert main([*argv, "--methods", "phm"]) == 2
    assert "unknown method(s) ['phm']" in capsys.readouterr().err
    assert main(["baselines", str(config), "--out", str(out), "--quiet"]) == 2
    assert "another config" in capsys.readouterr().err
