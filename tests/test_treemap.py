"""`dymu tree-map` (training/treemap.py): the edge objective's best tree per preference, read
off a path table, with the dichotomy's step at tau (docs/training.md, "The tree map")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dymu
import training
from dymu.cli import main
from training.branching import RegularizerSwitches
from training.config import load_config
from training.data import split_dataset
from training.pipeline import build_model, take_streams
from training.treemap import MapOptions, map_trees, with_edge
from training.trees import TreeTable

from .conftest import prepared_run


def _two_task_table(tau: float) -> TreeTable:
    """N = 2, L = 3: each task's own path (j, j) costs 1; any other path costs task 0 3.0 and
    task 1 2.0 (columns: path (a_0, a_1) at a_0 * 2 + a_1)."""
    table = torch.tensor([[1.0, 3.0, 3.0, 3.0], [2.0, 2.0, 2.0, 1.0]])
    return TreeTable.build(table, 3, torch.ones(2, 2), tau, RegularizerSwitches())


def _nodes_fraction(table: TreeTable):
    """A tree's cost as its share of the anchor's 6 nodes: distinct layer-0 parents, used
    layer-1 children and the 2 top nodes."""

    def fraction(k: int) -> float:
        parents, used = table.parents[k], table.used[k]
        layer0 = len(set(parents[0][used[0]].tolist()))
        return (layer0 + int(used.sum())) / 6

    return fraction


def _map(tau: float, lambdas: tuple[float, float]) -> dict:
    table = _two_task_table(tau)
    options = MapOptions(c_values=(0.0, 1.0), points=11, preferences=200)
    return map_trees(table, ["a", "b"], _nodes_fraction(table), lambdas, options)


def test_without_the_regularizer_every_preference_gets_the_anchor():
    result = _map(0.3, (0.0, 0.0))
    for by_c in result["by_c"].values():
        assert by_c["mean_fraction"] == pytest.approx(1.0)
        inner = [p for pts in by_c["lines"].values() for p in pts if 0 < p["r_i"] < 1]
        assert all(p["losses"] == {"a": 1.0, "b": 1.0} for p in inner)
    assert result["last_over_first"] == pytest.approx(1.0)


def test_the_dichotomy_step_at_tau_makes_a_task_lose_as_its_weight_rises():
    # tau = 0.3: below it task b is inactive, c cannot act and lambda_I is too weak to merge
    # it, so b keeps its own path (loss 1); at r_b = 0.3 c * lambda_A L_active switches on and
    # b is merged into a's path (loss 2): b's loss rises with its weight
    cliff = _map(0.3, (10.0, 0.01))
    line_b = [p["losses"]["b"] for p in cliff["by_c"]["1.0"]["lines"]["b"]]
    assert line_b[1:4] == [1.0, 1.0, 2.0]
    assert cliff["by_c"]["1.0"]["monotone"]["b"] is False
    assert cliff["by_c"]["0.0"]["monotone"] == {"a": True, "b": True}
    # a low tau moves the step to the corner: b is merged below some weight and keeps its own
    # path above it, so its loss only falls as r_b rises; c = 1 shares, c = 0 does not
    low = _map(0.05, (10.0, 0.01))
    assert low["by_c"]["1.0"]["monotone"] == {"a": True, "b": True}
    line_b = [p["losses"]["b"] for p in low["by_c"]["1.0"]["lines"]["b"]]
    assert line_b[1] == 2.0 and line_b[-1] == 1.0
    assert low["by_c"]["1.0"]["mean_fraction"] < low["by_c"]["0.0"]["mean_fraction"]
    assert low["last_over_first"] < 1.0


def test_a_judge_table_prices_the_same_trees_and_reads_claim_2_on_its_own_losses():
    table = _two_task_table(0.05)
    options = MapOptions(c_values=(0.0, 1.0), points=11, preferences=200)
    plain = map_trees(table, ["a", "b"], _nodes_fraction(table), (10.0, 0.01), options)
    # judged by the same table: the same trees, the same losses, the same rho
    same = map_trees(table, ["a", "b"], _nodes_fraction(table), (10.0, 0.01), options, table)
    assert same["control_rho"]["judged"] == same["control_rho"]["table"]
    assert same["control_rho"]["table"] == plain["control_rho"]["table"]
    assert plain["control_rho"]["table"]["b"] < 0  # b keeps its own path as r_b rises
    # a judge on whose images b's own path is the worst: the map picks the same trees, and
    # there b's loss rises with its weight
    flipped = TreeTable.build(
        torch.tensor([[1.0, 3.0, 3.0, 3.0], [1.0, 1.0, 1.0, 2.0]]), 3, torch.ones(2, 2), 0.05,
        RegularizerSwitches(),
    )  # fmt: skip
    judged = map_trees(table, ["a", "b"], _nodes_fraction(table), (10.0, 0.01), options, flipped)
    assert judged["control_rho"]["table"] == plain["control_rho"]["table"]
    assert judged["control_rho"]["judged"]["b"] > 0
    line = judged["by_c"]["1.0"]["lines"]["b"]
    assert [p["tree"] for p in line] == [p["tree"] for p in plain["by_c"]["1.0"]["lines"]["b"]]
    assert [p["judged"]["b"] for p in line] == [3.0 - p["losses"]["b"] for p in line]
    assert "judged" not in plain["by_c"]["1.0"]["lines"]["b"][0]


def test_with_edge_validates_the_overrides():
    config = load_config("scenes-tiny")
    assert with_edge(config, tau=0.1, lambda_active=None).edge.tau == 0.1
    assert with_edge(config, tau=0.1).edge.lambda_active == config.edge.lambda_active
    with pytest.raises(dymu.ConfigError, match="tau"):
        with_edge(config, tau=-1.0)


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    """A scenes-tiny model (untrained streams) in a store, and scenes-tiny's config with a path
    table of 4 images as a TOML file."""
    tmp = tmp_path_factory.mktemp("treemap")
    source = (Path(training.__file__).parent / "configs" / "scenes-tiny.toml").read_text()
    edge = '[edge]\nestimator = "trees"\npath_images = 4\n'
    path = tmp / "tiny.toml"
    path.write_text(source.replace("[edge]\n", edge))
    run = prepared_run(tmp, load_config(path), ("edge",))
    return dymu.save(run.model, tmp / "store"), path


@pytest.mark.slow  # a whole CLI run (~25-30 s): make test-slow
def test_the_cli_prints_the_map_and_writes_it_as_json(tiny_artifact, tmp_path, capsys):
    vdir, config = tiny_artifact
    out = tmp_path / "map.json"
    args = ["tree-map", str(config), str(vdir), "--points", "5", "--preferences", "50"]
    # no regularizer: c changes nothing
    assert main([*args, "--lambda-active", "0", "--lambda-inactive", "0", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 0.0 |" in text and "| 1.0 |" in text and f"wrote {out}" in text
    flat = json.loads(out.read_text())
    assert flat["lambda_active"] == 0.0 and flat["tau"] == pytest.approx(0.2)
    assert set(flat["by_c"]) == {"0.0", "0.5", "1.0"}
    assert all(len(pts) == 5 for pts in flat["by_c"]["0.0"]["lines"].values())
    assert flat["by_c"]["0.0"] == flat["by_c"]["1.0"]
    # a strong lambda_A shares more at c = 1 than at c = 0
    strong_args = ["--lambda-active", "1e6", "--lambda-inactive", "0", "--json", str(out)]
    assert main([*args, *strong_args]) == 0
    strong = json.loads(out.read_text())["by_c"]
    assert strong["1.0"]["mean_fraction"] < strong["0.0"]["mean_fraction"]
    assert 0 < strong["1.0"]["mean_fraction"] < 1
    # lambda_A in the table's units: 1 is the full-sharing pull, and c = 1 shares most
    table_args = ["--pull-scale", "table", "--lambda-active", "1", "--json", str(out)]
    assert main([*args, *table_args]) == 0
    assert "pull_scale table: 1 x the full-sharing pull" in capsys.readouterr().out
    scaled = json.loads(out.read_text())
    assert scaled["pull_scale"] == "table" and scaled["sharing_pull"] > 0
    assert scaled["lambda_active"] == pytest.approx(scaled["sharing_pull"])
    fractions = [v["mean_fraction"] for v in scaled["by_c"].values()]
    assert fractions[2] < fractions[0] and fractions == sorted(fractions, reverse=True)


def test_the_cli_rejects_bad_input_with_one_line(tiny_artifact, tmp_path, capsys):
    vdir, config = tiny_artifact
    assert main(["tree-map", str(config), str(vdir), "--tau", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dymu: error: [edge]:") and "tau" in err and "\n" not in err
    assert main(["tree-map", str(config), str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dymu: error:") and "\n" not in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a table")
    assert main(["tree-map", str(config), str(vdir), "--table", str(junk)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dymu: error: {junk} is not a path-table file") and "\n" not in err
    nowhere = tmp_path / "no" / "m.json"
    assert main(["tree-map", str(config), str(vdir), "--json", str(nowhere)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["tree-map", str(config), str(vdir), "--c", "2"])
    assert exc.value.code == 2
    assert "every c must be in [0, 1]" in capsys.readouterr().err
    for bad in ("[1, 2]", "{seed: 4}"):
        with pytest.raises(SystemExit) as exc:
            main(["tree-map", str(config), str(vdir), "--judge", bad])
        assert exc.value.code == 2
        assert "expected a JSON object of dataset options" in capsys.readouterr().err
    assert main(["tree-map", str(config), str(vdir), "--judge", '{"writers": 3}']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dymu: error: scenes takes no option writers") and "\n" not in err


@pytest.mark.slow  # two CLI runs (~30 s): make test-slow
def test_judged_on_the_table_s_own_images_the_trees_cost_what_the_table_says(
    tiny_artifact, tmp_path
):
    vdir, config = tiny_artifact
    # the table read off 4 calibration images (path_scale loss-scale: w_j T), judged on the
    # same 4 images: every judged loss is the table's; on 6 other images they differ
    calibrated = tmp_path / "cal.toml"
    text = config.read_text().replace(
        "[data]\n", "[data]\ncalibration_options = { n = 4, seed = 5 }\n"
    )
    calibrated.write_text(text)
    out = tmp_path / "map.json"
    args = ["tree-map", str(calibrated), str(vdir), "--points", "3", "--preferences", "30"]
    same = [*args, "--judge", '{"n": 4, "seed": 5}', "--judge-images", "4", "--json", str(out)]
    assert main(same) == 0
    flat = json.loads(out.read_text())
    assert flat["table_split"] == "calibration"
    assert flat["judge"] == {"options": {"n": 4, "seed": 5}, "images": 4}
    points = [p for v in flat["by_c"].values() for pts in v["lines"].values() for p in pts]
    for p in points:
        assert p["judged"] == pytest.approx(p["losses"], rel=1e-5)
    assert flat["control_rho"]["judged"] == pytest.approx(flat["control_rho"]["table"])
    other = [*args, "--judge", '{"n": 6, "seed": 6}', "--json", str(out)]
    assert main(other) == 0
    flat = json.loads(out.read_text())
    assert flat["judge"]["images"] == 6  # at most the split's images
    points = [p for v in flat["by_c"].values() for pts in v["lines"].values() for p in pts]
    assert any(p["judged"] != pytest.approx(p["losses"], rel=1e-3) for p in points)


def test_the_path_table_is_cached_for_the_same_streams_and_images_only(
    tiny_artifact, tmp_path, capsys
):
    vdir, config = tiny_artifact
    table, first, second = tmp_path / "table.safetensors", tmp_path / "a.json", tmp_path / "b.json"
    args = ["tree-map", str(config), str(vdir), "--points", "3", "--preferences", "20"]
    assert main([*args, "--json", str(first)]) == 0
    assert main([*args, "--table", str(table), "--json", str(second)]) == 0
    assert table.exists()
    assert json.loads(first.read_text()) == json.loads(second.read_text())
    # the cached table is read back: a changed file changes the map
    with safe_open(str(table), framework="pt") as f:
        meta = f.metadata()
    cached = load_file(str(table))["table"]
    flipped = cached.flip(-1).contiguous()
    save_file({"table": flipped}, str(table), metadata=meta)
    assert main([*args, "--table", str(table), "--json", str(second)]) == 0
    assert json.loads(first.read_text()) != json.loads(second.read_text())
    # other images (path_images) or other streams: refused, the file is kept
    other = tmp_path / "other.toml"
    other.write_text(config.read_text().replace("path_images = 4", "path_images = 3"))
    assert main(["tree-map", str(other), str(vdir), "--table", str(table)]) == 2
    assert "(path_images differ)" in capsys.readouterr().err
    store = vdir.parent
    again = dymu.save(dymu.load(vdir, device="cpu"), store, training={"command": "again"})
    assert main(["tree-map", str(config), str(again), "--table", str(table)]) == 2
    assert "(artifact differ)" in capsys.readouterr().err
    assert torch.equal(load_file(str(table))["table"], flipped)


def build_model_of(config):
    return build_model(config, tuple(split_dataset(config).tasks))


def test_streams_that_do_not_fit_the_config_are_one_line_before_any_copy(tiny_artifact, tmp_path):
    # the check behind `anchor.pretrained` (dymu train --anchor-from, dymu tree-map)
    vdir, config = tiny_artifact
    other_tasks = build_model_of(load_config("multidigits"))
    with pytest.raises(dymu.ConfigError, match=r"its tasks \['segmentation'"):
        take_streams(other_tasks, str(vdir), torch.device("cpu"))
    wider = tmp_path / "wider.toml"
    text = config.read_text()
    wider.write_text(text.replace("widths = [8, 8, 12, 12, 16]", "widths = [8, 8, 12, 12, 24]"))
    model = build_model_of(load_config(wider))
    before = {k: v.clone() for k, v in model.anchor.state_dict().items()}
    with pytest.raises(dymu.ConfigError, match="do not fit the config's backbone") as exc:
        take_streams(model, str(vdir), torch.device("cpu"))
    assert "\n" not in str(exc.value)
    assert all(torch.equal(v, model.anchor.state_dict()[k]) for k, v in before.items())
    # the same tasks and backbone: the streams are copied
    same = build_model_of(load_config(config))
    take_streams(same, str(vdir), torch.device("cpu"))
    source = dymu.load(vdir, device="cpu").anchor.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in same.anchor.state_dict().items())
