"""`dymu bench`: the harness in its tiny mode writes every promised file and field.

The tests on the tiny run are marked ``slow``: the run starts a dozen ``dymu serve`` processes
(about two minutes on 2 cores), so they run in ``make test-slow``, which ``.ci/run`` calls after
``make test``; the harness's own pieces (interleaving, peaks, the lean client) stay in
``make test``.

No timing is asserted (speed is measured by the benchmark, never in tests): the checks are on
the structure of the results, on the numbers that do not depend on timing (FLOP ratios, costs,
versions, the store's newest version) and on the interleaving itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dymu
from benchmarks.__main__ import main as bench_main
from benchmarks.machine import fma_fractions, fp32_flops_per_cycle
from benchmarks.timing import interleave, paired_ratio
from dymu.architecture import Architecture

from .conftest import randomize_, tiny_config

CASES = (
    "proportionality",
    "peers",
    "switch",
    "backends",
    "server",
    "overload",
    "request_path",
    "scaling",
    "paper_scale",
    "profile",
)
HEADLINE = (
    "proportionality",
    "switch_over_predict",
    "server_overhead",
    "onnx_over_torch",
    "fma_fraction",
    "request_overhead",
    "request_overhead_json",
    "request_overhead_small",
    "clients_over_model",
)


def dymu_exe() -> str:
    return shutil.which("dymu") or str(Path(sys.executable).parent / "dymu")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run over a store with two versions (the harness must take the newest)."""
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    dymu.save(randomize_(dymu.create_model(tiny_config()), seed=1), root / "store")
    model = randomize_(dymu.create_model(tiny_config()), seed=2)
    dymu.save(model, root / "store")  # v2
    out = root / "out"
    proc = subprocess.run(
        [dymu_exe(), "bench", "--tiny", "--model", str(root / "store"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    return report, out, dymu.load(root / "store", device="cpu")


@pytest.mark.slow
def test_every_file_and_top_level_field(tiny_run):
    report, out, _ = tiny_run
    for name in ("results.json", "summary.md", "profile_tree.txt", "profile_anchor.txt"):
        assert (out / name).stat().st_size > 0, name
    assert report["schema"] == "dymu-bench/1" and report["mode"] == "tiny"
    assert report["command"].startswith("dymu bench --tiny --out ")
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["onnxruntime"]["version"]
    assert report["device"]["device"] == "cpu" and report["device"]["torch_threads"] >= 1
    assert len(report["machine"]["loadavg"]) == 3 and report["machine"]["cores_available"] >= 1
    assert report["model"]["version"] == "v2"  # the newest version, not v1
    assert report["peak"]["fma"]["flops_per_cycle_per_core"] >= 8
    assert report["peak"]["matmul"]["samples_s"]
    assert set(report["cases"]) == set(CASES)
    for name, rec in report["cases"].items():
        assert rec["status"] == "ok", (name, rec.get("traceback"))
        assert rec["wall_s"] >= 0 and len(rec["loadavg_start"]) == 3
    for name in HEADLINE:
        goal = report["headline"][name]
        assert {"value", "goal", "met", "where"} <= set(goal), name
        assert goal["value"] > 0 and isinstance(goal["met"], bool)
    assert set(report["headline"]["proportionality"]["by_c"]) == {"0", "0.5", "1"}


@pytest.mark.slow
def test_summary_has_every_case_and_the_headline(tiny_run):
    report, out, _ = tiny_run
    text = (out / "summary.md").read_text()
    assert report["command"] in text and "## Headline" in text
    for rec in report["cases"].values():
        assert f"## {rec['number']}. {rec['title']}" in text
    for name in HEADLINE:
        assert f"| {name} |" in text


@pytest.mark.slow
def test_proportionality_rows_and_flop_ratios(tiny_run):
    report, _, model = tiny_run
    result = report["cases"]["proportionality"]["result"]
    point = result["points"][0]
    rows = {r["tree"]: r for r in point["rows"]}
    for r in ("uniform r", "skewed r"):
        for c in ("0", "0.5", "1"):
            assert f"{r}, c={c}" in rows
    assert rows["fully branched"]["flop_ratio"] == 1.0
    hw = tuple(int(v) for v in point["size"].split("x"))
    shared = Architecture.fully_shared(model.n_tasks, model.n_layers)
    want = model.cost(shared, hw).flops / model.anchor_cost(hw).flops
    assert rows["fully shared"]["flop_ratio"] == pytest.approx(want)
    for row in point["rows"]:
        assert row["proportionality"] == pytest.approx(row["time_ratio"] / row["flop_ratio"])
        assert row["cpu_proportionality"] == pytest.approx(
            row["cpu_time_ratio"] / row["flop_ratio"]
        )
        assert len(point["samples_s"][row["architecture_id"]]) == point["rounds"]
    assert result["worst"]["proportionality"] == max(
        r["proportionality"] for r in point["rows"] if r["flop_ratio"] < 1
    )


@pytest.mark.slow
def test_peers_switch_backends_fields(tiny_run):
    report, _, model = tiny_run
    cases = {k: v["result"] for k, v in report["cases"].items()}
    peers = {r["network"]: r for r in cases["peers"]["points"][0]["rows"]}
    single = peers["N single-task networks, one after another"]
    hard = peers["hard-shared network (PHN / PHN-BN)"]
    hw = model.input_size
    assert single["gflops_per_image"] == pytest.approx(model.anchor_cost(hw).gflops)
    assert hard["params"] == model.cost_model.hard_shared_cost(hw).params < single["params"]
    assert all(r["images_per_s"] > 0 for r in peers.values())

    switch = cases["switch"]["sizes"][0]
    assert {
        "hypernets",
        "materialize",
        "materialize, unfrozen",
        "onnx weights",
        "cache hit",
        "onnx export + session",
    } <= set(switch["over_predict"])
    assert switch["materialize_unfrozen_over_predict_torch"] > 0
    assert switch["served_backend"] == "onnx" and switch["switch_over_predict"] > 0

    point = cases["backends"]["points"][0]
    names = {r["backend"] for r in point["rows"]}
    assert {
        "torch eager, folded",
        "torch eager, unfolded",
        "torch channels-last, folded",
        "onnx, folded",
        "onnx, unfolded",  # exported with its BatchNormalization nodes
    } <= names
    assert not point["skipped"] and point["fold_speedup_onnx"] > 0
    assert all(r["gflop_per_cpu_s"] > 0 for r in point["rows"])
    assert len(point["cpu_samples_s"]["onnx, folded"]) == point["rounds"]
    assert point["onnx_over_torch"] > 0 and point["onnx_providers"]["folded"].startswith("CPU")


@pytest.mark.slow
def test_server_scaling_paper_profile_fields(tiny_run):
    report, _, _ = tiny_run
    cases = {k: v["result"] for k, v in report["cases"].items()}
    run = cases["server"]["runs"][0]
    assert run["backend"] == "onnx"
    rows = {r["variant"]: r for r in run["sizes"][0]["rows"]}
    assert set(rows) == {"direct"} | {
        f"http {f}, batching {m}" for f in ("JSON-PNG", "npz", "OIP binary") for m in ("on", "off")
    }
    assert rows["http OIP binary, batching on"]["server_model_ms"] > 0
    assert rows["http JSON-PNG, batching off"]["backends"] == ["onnx"]
    assert rows["http npz, batching on"]["server_model_ms"] > 0
    loads = run["throughput"]
    assert {(t["clients"], t["batching"]) for t in loads} == {
        (c, m) for c in report["config"]["server_clients"] for m in ("on", "off")
    }
    assert all(t["images"] == len(t["latencies_s"]) > 0 for t in loads)
    assert run["preference"]["samples_s"]["new"]

    scaling = cases["scaling"]["rows"]
    assert [r["n_tasks"] for r in scaling] == [2, 3]
    assert scaling[1]["control_params"] > scaling[0]["control_params"]
    assert scaling[1]["anchor_mib"] > scaling[0]["anchor_mib"]
    assert all(r["soft_over_one_stream"] > 0 for r in scaling)

    paper = cases["paper_scale"]
    default = next(iter(paper["counts"].values()))
    # ResNet-34 encoder = 21,284,672 params per stream (torchvision, without fc)
    assert default["params_encoder_nodes"] == 3 * 21_284_672
    assert set(default["within_5pct"]) == set(default["relative_to_paper"])
    assert "multiply-adds" in paper["implied_convention"]

    prof = cases["profile"]
    assert prof["tree"]["top_ops"] and 0 < prof["tree"]["conv_share"] <= 1


@pytest.mark.slow
def test_request_path_fields(tiny_run):
    """Case 5c: overhead over the server's model time per format, and clients vs the model."""
    report, _, _ = tiny_run
    res = report["cases"]["request_path"]["result"]
    rows = {r["variant"]: r for r in res["overhead"][0]["rows"]}
    formats = ("npz", "npz, NPY in", "JSON-PNG", "OIP binary")
    assert set(rows) == {f"{f}, this tree" for f in formats} | {
        "npz via httpx (service.client), this tree"
    }
    assert all(r["server_model_ms"] > 0 and r["overhead"] > -1 for r in rows.values())
    headline = report["headline"]["request_overhead"]
    assert headline["npz_npy_in"] == rows["npz, NPY in, this tree"]["overhead"]
    load = res["load"][0]
    assert load["clients"] == report["config"]["request_clients"]
    rd = load["rounds"][0]
    assert rd["images"] > 0 and 1 <= rd["batch"] <= 8 and rd["model_images_per_s"] > 0
    assert load["ratio"] == rd["ratio"] > 0
    # the server's model time over the window (its /metrics), one inference thread: (0, 1]
    assert 0 < rd["model_busy"] <= 1.1
    if (report["config"]["threads"] or len(os.sched_getaffinity(0))) > 1:  # a worker per core
        assert load["workers"] == str(report["config"]["threads"] or len(os.sched_getaffinity(0)))
        assert 1 <= rd["workers_batch"] <= 8 and load["workers_ratio"] == rd["workers_ratio"] > 0


def test_interleave_alternates_variants_in_rotating_order():
    calls: list[str] = []
    variants = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    samples = interleave(variants, rounds=3, warmup=0)
    assert calls == list("abcbcacab")
    assert all(len(s) == 3 for s in samples.values())
    assert paired_ratio([2.0, 4.0, 100.0], [1.0, 2.0, 1.0]) == 2.0


def test_fma_fractions_compare_cpu_time_with_one_core():
    peak = {"gflops": 160.0, "cores": 2}
    # 80 GFLOP in 1 s of wall on both cores busy (2 CPU-seconds): half the 2-core peak either way
    assert fma_fractions(80.0, 1.0, 2.0, peak) == (0.5, 0.5)
    # one thread: 80 GFLOP in 1 CPU-second is all of one core's 80 GFLOP/s
    assert fma_fractions(80.0, 1.0, 1.0, peak) == (0.5, 1.0)
    assert fma_fractions(80.0, 1.0, None, peak) == (0.5, None)
    assert fma_fractions(80.0, 1.0, 1.0, {"gflops": None}) == (None, None)


def test_fma_peak_from_flags():
    assert fp32_flops_per_cycle({"avx512f", "avx2", "fma"}, "GenuineIntel", 6)[0] == 64
    assert fp32_flops_per_cycle({"avx512f", "avx2", "fma"}, "AuthenticAMD", 25)[0] == 32
    assert fp32_flops_per_cycle({"avx2", "fma"}, "AuthenticAMD", 23)[0] == 32
    assert fp32_flops_per_cycle(set(), "", None)[0] == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cases", "nope"], "unknown case(s) nope"),
        (["--model", "/nonexistent/store"], "no model at /nonexistent/store"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, args, message):
    assert bench_main(["--tiny", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dymu: error: ") and err.count("\n") == 1 and message in err


def _registered_cases() -> list[str]:
    import benchmarks.cases  # noqa: F401  (registers the built-in cases)
    from benchmarks.registry import CASES as REGISTERED

    return sorted(REGISTERED)


@pytest.mark.parametrize("name", _registered_cases())
@pytest.mark.slow
def test_every_registered_case_runs_and_renders(tiny_run, name):
    """The sweep over the case registry: a new case is run by the tiny bench the day it is
    registered, and must succeed, give a JSON result and render its summary section."""
    from benchmarks.registry import CASES as REGISTERED

    report, _, _ = tiny_run
    record = report["cases"][name]
    assert record["status"] == "ok", record.get("traceback")
    result = record["result"]
    assert isinstance(result, dict) and result
    text = REGISTERED[name].markdown(result)
    assert isinstance(text, str) and text.strip()
    assert set(_registered_cases()) == set(CASES), "add the new case to CASES"


def test_the_lean_sync_client_reads_keep_alive_replies_by_their_length():
    """``benchmarks.lean_http.Sync`` against a real HTTP/1.1 server (stdlib): the bodies come
    back whole (one larger than a socket read), in order, on one connection; a non-200 raises."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from typing import ClassVar

    from benchmarks.lean_http import Call, Sync

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        connections: ClassVar[set] = set()

        def do_POST(self) -> None:
            Echo.connections.add(self.client_address)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            reply = body * int(self.headers.get("X-Times", "1"))
            self.send_response(200 if self.path == "/ok" else 422)
            self.send_header("Content-Length", str(len(reply)))
            self.send_header("X-Len", str(len(body)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = Sync("127.0.0.1", server.server_address[1])
    try:
        big = bytes(range(256)) * 1000
        headers, body = conn.send(Call("/ok", big, {"X-Times": "3"}))
        assert headers["x-len"] == str(len(big)) and bytes(body) == big * 3
        headers, body = conn.send(Call("/ok", b"second"))
        assert bytes(body) == b"second"
        with pytest.raises(RuntimeError, match="422"):
            conn.send(Call("/bad", b"x"))
        assert len(Echo.connections) == 1  # one keep-alive connection
    finally:
        conn.close()
        server.shutdown()


@pytest.mark.slow
def test_overload_reports_how_fast_a_full_server_refuses(tiny_run):
    report, out, _ = tiny_run
    runs = report["cases"]["overload"]["result"]["runs"]
    assert runs
    for r in runs:
        if r["http_503"] == 0:
            assert r["p50_503_ms"] is None and r["p95_503_ms"] is None
        else:
            assert 0 < r["p50_503_ms"] <= r["p95_503_ms"] < 1e3 * 30
        assert r["probe_requests"] >= 1 and 0 <= r["probe_503"] <= r["probe_requests"]
        assert (r["probe_p50_503_ms"] is None) == (r["probe_503"] == 0)
    assert "503 p50 ms, lean probe" in (out / "summary.md").read_text()


def test_the_refusal_probe_times_each_request_on_a_new_connection():
    """``benchmarks.lean_http.probe_statuses`` against a real server that refuses and closes."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from benchmarks.lean_http import Call, probe_statuses

    ports: list[int] = []

    class Refuse(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            ports.append(self.client_address[1])
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        seen = probe_statuses("127.0.0.1", port, Call("/p", b"x" * 10), 0.3, 0.05)
    finally:
        server.shutdown()
    assert 2 <= len(seen) <= 7  # one request per 50 ms for 0.3 s
    assert all(status == 503 and 0 < dt < 1.0 for status, dt in seen)
    assert len(set(ports)) == len(seen)  # a new connection each time
