"""Prometheus for real, without Docker: Debian's `prometheus` scrapes a `dymu serve` on loopback.

The scrape job is docker/prometheus.yml's (only the target, the intervals and the rules path
are changed for the test) and the rules are docker/prometheus-rules.yml, so what runs here is
what `docker compose up` runs. PromQL over Prometheus' HTTP API then gives the request rate and
the p95 of the request latency, checked against what the client sent and against the
histogram the server exposes. The rules are also checked and unit-tested with `promtool`.

`make test` installs Debian's prometheus when it is missing (`make prometheus`); without it
these tests fail and say why.
"""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
RULES = DOCKER / "prometheus-rules.yml"
RULE_TESTS = DOCKER / "prometheus-rules.test.yml"
MODEL = ROOT / "model_store" / "scenes-small"
IMAGE = ROOT / "service" / "example.png"
PREDICTS = 16  # /predict requests sent, one every PACE_S seconds
PACE_S = 0.25
BUCKETS = 'dymu_http_request_duration_seconds_bucket{job="dymu",endpoint="/predict"}'
PREFERENCES = [([0.6, 0.3, 0.1], 0.5), ([1, 1, 1], 0.0), ([0, 1, 0], 0.2), ([1, 0, 1], 0.8)]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"Debian's {name} is not installed: run `make prometheus` (apt-get install "
            "prometheus) or `make test`, which installs it"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{what} did not answer 200 on {url} within {timeout:g} s")


@contextmanager
def process(cmd: list[str], ready_url: str, what: str, timeout: float) -> Iterator[None]:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    try:
        wait_for(ready_url, proc, timeout, what)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scrape_config(target: str) -> dict[str, Any]:
    """docker/prometheus.yml with the test's target, 1 s intervals and the rules' real path."""
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    assert config["rule_files"] == [RULES.name]
    config["rule_files"] = [str(RULES)]
    [job] = config["scrape_configs"]
    job["scrape_interval"] = "1s"
    job["static_configs"][0]["targets"] = [target]
    return config


class Prom:
    """Prometheus' HTTP API (instant queries)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        reply = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10).json()
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def value(self, expr: str, at: float | None = None) -> float:
        result = self.query(expr, at)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def until(self, expr: str, expected: float, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        got: Any = None
        while time.monotonic() < deadline:
            result = self.query(expr)
            got = [float(r["value"][1]) for r in result]
            if got == [expected]:
                return
            time.sleep(0.3)
        pytest.fail(f"{expr} = {got} after {timeout:g} s, expected {expected}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[str, Prom]]:
    """A `dymu serve` and a Prometheus scraping it, both on loopback."""
    prometheus = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    api_port, prom_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    dymu = str(Path(sys.executable).with_name("dymu"))
    serve = [dymu, "serve", str(MODEL), "--host", "127.0.0.1", "--port", str(api_port),
             "--backend", "torch", "--device", "cpu", "--log-level", "warning"]  # fmt: skip
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(f"127.0.0.1:{api_port}")))
    prom = [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"]  # fmt: skip
    prom_url = f"http://127.0.0.1:{prom_port}"
    with (
        process(serve, f"{api}/readyz", "dymu serve", 180),
        process(prom, f"{prom_url}/-/ready", "prometheus", 60),
    ):
        yield api, Prom(prom_url)


def send_traffic(api: str) -> tuple[list[float], list[float]]:
    """PREDICTS predictions paced PACE_S apart (and one preference each); their start times
    and client-side latencies."""
    starts, latencies = [], []
    image = IMAGE.read_bytes()
    with httpx.Client(base_url=api, timeout=30) as client:
        for i in range(PREDICTS):
            r, c = PREFERENCES[i % len(PREFERENCES)]
            t0 = time.time()
            assert client.post("/preference", json={"r": r, "c": c}).status_code == 200
            reply = client.post(
                "/predict",
                files={"image": ("example.png", image, "image/png")},
                data={"r": ",".join(map(str, r)), "c": str(c)},
            )
            assert reply.status_code == 200, reply.text
            starts.append(t0)
            latencies.append(time.time() - t0)
            time.sleep(max(0.0, t0 + PACE_S - time.time()))
    return starts, latencies


def histogram_p95(api: str, endpoint: str) -> tuple[float, list[tuple[float, float]]]:
    """The p95 the way PromQL's histogram_quantile computes it, from the server's own
    cumulative buckets (summed over status and method), and those buckets."""
    text = httpx.get(f"{api}/metrics").text
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_bucket") and s.labels.get("endpoint") == endpoint:
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    cumulative = sorted(buckets.items())
    rank = 0.95 * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in cumulative:
        if count >= rank:
            return lower + (upper - lower) * (rank - below) / (count - below), cumulative
        lower, below = upper, count
    raise AssertionError("no bucket reaches the rank")


def bucket_bounds(value: float, cumulative: list[tuple[float, float]]) -> tuple[float, float]:
    lower = 0.0
    for upper, _ in cumulative:
        if value <= upper:
            return lower, upper
        lower = upper
    return lower, math.inf


def test_prometheus_scrapes_dymu_serve_and_promql_gives_rate_and_p95(stack):
    api, prom = stack
    prom.until('up{job="dymu"}', 1.0)
    starts, latencies = send_traffic(api)
    # the scraped counter counts every request sent
    predict = 'dymu_http_requests_total{job="dymu",endpoint="/predict",method="POST",status="200"}'
    prom.until(f"sum({predict})", PREDICTS)
    prom.until('sum(dymu_http_requests_total{job="dymu",endpoint="/preference"})', PREDICTS)
    count = 'dymu_http_request_duration_seconds_count{job="dymu",endpoint="/predict"}'
    prom.until(f"sum({count})", PREDICTS)  # the histogram too (it is observed after the count)

    # request rate: over a window inside the traffic, what the client sent in it
    window = 3.0
    at = starts[-1]
    sent = sum(1 for t in starts if at - window < t <= at)
    rate = prom.value(f"sum(rate({predict}[{window:g}s]))", at)
    assert 0.4 * sent / window <= rate <= 1.6 * sent / window, (rate, sent / window)
    # the recording rule sees the same traffic (its evaluations may lag the scrapes under load)
    prom.until('count(dymu:http_requests:rate1m{endpoint="/predict",status="200"} > 0)', 1)

    # p95 latency: PromQL over the scraped buckets = the quantile of the server's histogram
    expected, cumulative = histogram_p95(api, "/predict")
    assert prom.value(f"histogram_quantile(0.95, sum by (le) ({BUCKETS}))") == pytest.approx(
        expected, rel=1e-9
    )
    # the rate-based p95 (as the recording rule computes it) lies in the same bucket, and the
    # server's latency never exceeds the client's
    lo, hi = bucket_bounds(expected, cumulative)
    rate_p95 = prom.value(f"histogram_quantile(0.95, sum by (le) (rate({BUCKETS}[1m])))")
    assert lo <= rate_p95 <= hi, (rate_p95, lo, hi)
    client_p95 = sorted(latencies)[math.ceil(0.95 * len(latencies)) - 1]
    assert rate_p95 <= bucket_bounds(client_p95, cumulative)[1]
    prom.until('count(dymu:http_request_duration_seconds:p95_5m{endpoint="/predict"})', 1)


def test_the_rules_load_and_no_alert_fires_on_a_healthy_server(stack):
    _, prom = stack
    prom.until('dymu_ready{job="dymu"}', 1.0)
    rules = httpx.get(f"{prom.url}/api/v1/rules").json()["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    alerts = {"DymuPredictLatencyHigh", "DymuHigh503Rate", "DymuNotReady", "DymuDown"}
    assert alerts <= set(loaded)
    assert all(r["health"] == "ok" for r in loaded.values()), loaded
    assert all(r["state"] == "inactive" for r in loaded.values() if r["type"] == "alerting")
    assert prom.query("ALERTS") == []


def promtool(*args: str, cwd: Path = DOCKER) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_promtool_checks_the_config_and_the_rules():
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", RULES.name]):
        res = promtool(*args)
        assert res.returncode == 0, res.stdout + res.stderr
    res = promtool("test", "rules", RULE_TESTS.name)
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize(
    "change",
    [
        ("dymu:http_503:ratio_rate5m > 0.05", "dymu:http_503:ratio_rate5m > 0.5"),
        ("dymu_ready == 0", "dymu_ready == 1"),
        ("histogram_quantile(0.95,", "histogram_quantile(0.5,"),
    ],
)
def test_the_rule_tests_catch_a_wrong_rule(tmp_path, change):
    """The rules' unit tests fail when a threshold or the quantile is wrong."""
    old, new = change
    text = RULES.read_text()
    assert old in text
    (tmp_path / RULES.name).write_text(text.replace(old, new))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    res = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert res.returncode != 0 and "FAILED" in res.stdout + res.stderr
