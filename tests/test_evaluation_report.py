"""`dymu evaluate` end to end on a tiny randomly initialised model saved through dymu.store: every
file and JSON field it promises, numbers that agree with each other, --data, and clear errors."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from PIL import Image

import dymu
from dymu.cli import main
from training.config import load_config
from training.data import dataset_tasks
from training.evaluation.figures import FIGURES
from training.evaluation.metrics import hypervolume, reference_point, uniformity
from training.pipeline import build_model

# one torch thread: on a crowded machine the small convolutions run several times faster
ARGS = [
    "--preferences",
    "3",
    "--cost-preferences",
    "20",
    "--curve-points",
    "2",
    "--quiet",
    "--threads",
    "1",
]
MAIN_ROWS = ["single-task", "dymu-noadapt-c0", "dymu-noadapt-c1", "dymu-c0", "dymu-c1"]
POINT_KEYS = {"r", "c", "losses", "metrics", "flops", "params"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A random tiny scenes model (scenes-tiny shapes) with its training config recorded."""
    cfg = load_config("scenes-tiny")
    model = build_model(cfg, dataset_tasks("scenes"))
    training = {"config": cfg.model_dump(mode="json"), "wall_s": 12.5}
    return dymu.save(model, tmp_path_factory.mktemp("store") / "tiny", training=training)


@pytest.fixture(scope="module")
def report_dir(artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["evaluate", str(artifact), "--out", str(out), *ARGS]) == 0
    return out


def test_writes_every_promised_file(report_dir):
    for name in ["report.json", "report.md", *FIGURES]:
        assert (report_dir / name).stat().st_size > 0, name
    for name in FIGURES:
        with Image.open(report_dir / name) as img:
            assert img.format == "PNG" and min(img.size) > 100


def test_json_fields_and_consistency(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    names = ["segmentation", "depth", "normals"]
    assert [t["name"] for t in report["tasks"]] == names
    assert report["reference_point"] == reference_point("scenes", names)
    assert report["hypervolume_exact"] is True
    assert list(report["methods"]) == MAIN_ROWS
    assert report["ablations"] == {}
    for key, entry in report["methods"].items():
        for field in (
            "hypervolume",
            "hypervolume_exact",
            "reference_point",
            "uniformity",
            "inference_params",
            "gflops",
            "control_params",
            "per_preference",
        ):
            assert field in entry, (key, field)
        pts = entry["per_preference"]
        assert len(pts) == 3
        for p in pts:
            assert set(p) >= POINT_KEYS
            assert len(p["r"]) == 3 and sum(p["r"]) == pytest.approx(1)
            assert list(p["losses"]) == names
            assert set(p["metrics"]) == set(names) and "miou" in p["metrics"]["segmentation"]
        # HV and uniformity are computed on exactly the loss vectors that per_preference reports
        vectors = [[p["losses"][t] for t in names] for p in pts]
        assert entry["hypervolume"] == hypervolume(vectors, report["reference_point"]).value
        assert entry["uniformity"] == pytest.approx(
            statistics.fmean(uniformity(p["r"], v) for p, v in zip(pts, vectors, strict=True))
        )
        # losses are w_i * L_i of the unscaled split-level loss
        scale = {t["name"]: t["loss_scale"] for t in report["tasks"]}
        for p in pts:
            for t in names:
                assert p["losses"][t] == pytest.approx(p["metrics"][t]["loss"] * scale[t])
    single, dymu_c0 = report["methods"]["single-task"], report["methods"]["dymu-c0"]
    assert single["gflops"] == pytest.approx(report["anchor_cost"]["gflops"])
    assert single["control_params"] == 0 and single["delta_m"] == 0
    assert dymu_c0["control_params"] > report["methods"]["dymu-noadapt-c0"]["control_params"] > 0
    assert all(p["c"] == 0.0 for p in dymu_c0["per_preference"])
    assert report["hypervolume"] == dymu_c0["hypervolume"]
    assert report["per_preference"] == dymu_c0["per_preference"]
    assert [c["claim"] for c in report["claims"]] == [
        "resource use falls with c",
        "task loss falls as its preference rises",
        "HV(dymu) > HV(PHN-BN) > HV(PHN)",
        "uniformity(dymu) > uniformity(PHN-BN)",
        "adaptation raises HV",
    ]
    assert report["claims"][2]["holds"] is None  # no PHN rows in a single artifact
    assert set(report["resource_usage"]) == {"0", "0.5", "1"}
    # the default split: the held-out options recorded in the artifact's training config
    assert report["dataset"] == {"name": "scenes", "root": None, "n": 16, "seed": 2}
    assert report["images"] == 16


def test_markdown_has_the_papers_table(report_dir):
    md = (report_dir / "report.md").read_text()
    assert "| Method | HV ↑" in md and "| Control Params |" in md
    for label in ("Single-Task", "dymu w/o adaptation, c=0.0", "dymu, c=1.0"):
        assert f"| {label} |" in md
    assert "## The paper's claims" in md and "not evaluated" in md


def test_data_dir_from_dymu_data(artifact, tmp_path, capsys):
    data = tmp_path / "data"
    assert (
        main(
            [
                "data",
                "scenes",
                "--n",
                "5",
                "--seed",
                "3",
                "--size",
                "24x32",
                "--out",
                str(data),
                "--split",
                "val",
                "--quiet",
            ]
        )
        == 0
    )
    out = tmp_path / "rep"
    args = ["--preferences", "2", "--cost-preferences", "5", "--curve-points", "2", "--quiet"]
    assert (
        main(
            [
                "evaluate",
                str(artifact),
                "--out",
                str(out),
                "--data",
                str(data / "val"),
                "--threads",
                "1",
                *args,
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 5 and report["dataset"]["split"] == "val"
    assert len(report["methods"]["dymu-c1"]["per_preference"]) == 2


def test_the_calibration_split_is_the_recorded_configs(tmp_path):
    cfg = load_config("scenes-tiny")
    cfg = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"calibration_options": {"n": 4, "seed": 9}})}
    )
    model = build_model(cfg, dataset_tasks("scenes"))
    training = {"config": cfg.model_dump(mode="json")}
    artifact = dymu.save(model, tmp_path / "store", training=training)
    reports = {}
    for split in ("calibration", "held-out"):
        out = tmp_path / split
        assert main(["evaluate", str(artifact), "--out", str(out), "--split", split, *ARGS]) == 0
        reports[split] = json.loads((out / "report.json").read_text())
    calibration = reports["calibration"]
    assert calibration["images"] == 4 and calibration["dataset"]["split"] == "calibration"
    assert calibration["dataset"]["seed"] == 9
    assert reports["held-out"]["images"] == cfg.data.val_options["n"]
    assert "calibration split:" in (tmp_path / "calibration" / "report.md").read_text()
    assert "held-out split:" in (tmp_path / "held-out" / "report.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reference-point", "1", "2"], "--reference-point needs 3 values"),
        (["--data", "/nonexistent/split"], "no such directory"),
        (["--preferences", "0"], "--preferences must be >= 1"),
        (["--split", "calibration"], "training config has no calibration split"),
        (["--split", "calibration", "--data", "/x"], "pass no --data"),
    ],
)
def test_bad_input_is_one_line_error(artifact, tmp_path, capsys, extra, message):
    assert main(["evaluate", str(artifact), "--out", str(tmp_path), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dymu: error:") and message in err and "\n" not in err


def test_missing_model_is_one_line_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_report(artifact, tmp_path_factory):
    """`dymu baselines` (every method, two static nets, the ablations; a step or two each) on
    scenes-tiny with the tiny artifact as dymu, then `dymu evaluate` on the run directory."""
    from training.config import CONFIG_DIR

    root = tmp_path_factory.mktemp("run")
    tiny = (CONFIG_DIR / "scenes-tiny.toml").read_text()
    config = root / "scenes-tiny.toml"
    config.write_text(
        tiny.replace("check_preferences = 6", "check_preferences = 0")
        + "\n[baselines]\nstatic_count = 2\n"
    )
    run = root / "run"
    argv = [
        "baselines",
        str(config),
        "--out",
        str(run),
        "--dymu",
        str(artifact),
        "--steps-scale",
        "0.1",
        "--ablations",
        "--device",
        "cpu",
        "--quiet",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is fastest on a crowded machine
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    out = root / "report"
    assert (
        main(
            [
                "evaluate",
                str(run),
                "--out",
                str(out),
                *ARGS[:2],
                "--cost-preferences",
                "5",
                *ARGS[4:],
            ]
        )
        == 0
    )
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_run_dir_has_a_row_for_every_method_and_the_ablation_table(run_report):
    report, md = run_report
    assert list(report["methods"]) == [
        "single-task",
        "phn",
        "phn-bn",
        "cpmtl",
        "static",
        *MAIN_ROWS[1:],
    ]
    for label in ("PHN", "PHN-BN", "Controllable Pareto MTL", "Static multi-task (2 nets)"):
        assert f"| {label} |" in md
    static = report["methods"]["static"]
    assert len(static["per_preference"]) == 2  # each static net once, at its own r_k
    assert [p["networks"] for p in static["hv_vs_train_time"]] == [1, 2]
    for key in ("phn", "phn-bn", "cpmtl"):
        assert report["methods"][key]["control_params"] > 0
        assert report["methods"][key]["train_seconds"] > 0
        assert len(report["tradeoff_curves"][key]) == 3 * 2  # 3 pairs x 2 points
    # Table 6: the control row and the four ablations, each at c = 0 and 1
    flags = ["reference", "inactive_loss", "layer_weighting", "affinity", "dichotomy"]
    assert list(report["ablations"]) == [f"ablation-{f}-c{c}" for f in flags for c in (0, 1)]
    assert "## Ablation (paper Table 6)" in md and "| no task dichotomy |" in md
    assert "## Training budgets (run.json)" in md
    assert report["training_budgets"]["phn"]["steps"] > 0
    claims = {c["claim"]: c for c in report["claims"]}
    for name in ("HV(dymu) > HV(PHN-BN) > HV(PHN)", "uniformity(dymu) > uniformity(PHN-BN)"):
        assert isinstance(claims[name]["holds"], bool), name
    # claims 2 and 4 carry their bootstrap intervals, around the numbers the rules compare
    unif = claims["uniformity(dymu) > uniformity(PHN-BN)"]["numbers"]
    for c in ("0", "1"):
        lo, hi = unif["margin_interval_95"][c]
        assert lo - 1e-9 <= unif[f"dymu_c{c}"] - unif["phn_bn"] <= hi + 1e-9
    rho = claims["task loss falls as its preference rises"]["numbers"]
    assert set(rho["interval_95"]) == set(rho["spearman_rho"])
    assert "95 % bootstrap intervals" in md


def test_dymu_override_needs_a_run_dir(artifact, tmp_path, capsys):
    assert main(["evaluate", str(artifact), "--out", str(tmp_path), "--dymu", str(artifact)]) == 2
    assert "applies to a run directory" in capsys.readouterr().err
