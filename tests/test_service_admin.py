"""Settings, the admin surface (off without a token), reloads, and `dymu serve` as a process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dymu
from service.client import DymuAPIError, DymuClient
from service.settings import Settings

from .conftest import randomize_, tiny_config
from .test_service import HW, metric_samples, random_image, running, save_tiny

TOKEN = "s3cret-token"


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("DYMU_MODEL_DIR", "/models/x")
    monkeypatch.setenv("DYMU_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("DYMU_DEFAULT_R", '{"depth": 1}')
    monkeypatch.setenv("DYMU_DEFAULT_C", "0.5")
    monkeypatch.setenv("DYMU_BACKEND", "onnx")
    monkeypatch.setenv("DYMU_ADMIN_TOKEN", "")
    s = Settings()
    assert str(s.model_dir) == "/models/x" and s.max_batch_size == 3
    assert s.default_r == {"depth": 1.0} and s.default_c == 0.5 and s.backend == "onnx"
    assert s.admin_token is None  # empty token: admin stays off
    monkeypatch.setenv("DYMU_DEVICE", "tpu")
    with pytest.raises(ValueError, match="device"):
        Settings()
    assert Settings(device="CUDA:1").device == "cuda:1"
    with pytest.raises(ValueError, match="default_c"):
        Settings(device="cpu", default_c=2)


def test_admin_surface_is_off_without_a_token(tmp_path):
    with running(save_tiny(tmp_path)) as srv, DymuClient(srv.url) as client:
        for path in ("/admin/reload", "/admin/cache/clear"):
            res = client.http.post(path, headers={"Authorization": f"Bearer {TOKEN}"})
            assert res.status_code == 404 and "DYMU_ADMIN_TOKEN" in res.json()["detail"]
        assert "/admin/reload" not in client.http.get("/openapi.json").json()["paths"]


def test_admin_needs_the_token_clears_and_reloads(tmp_path):
    store = save_tiny(tmp_path, "m")
    settings = {"admin_token": TOKEN, "default_r": [1, 0, 0], "default_c": 0.5}
    with running(store, **settings) as srv, DymuClient(srv.url) as client:
        http = client.http
        assert "/admin/reload" in http.get("/openapi.json").json()["paths"]
        res = http.post("/admin/cache/clear")
        assert res.status_code == 401 and res.headers["www-authenticate"] == "Bearer"
        res = http.post("/admin/cache/clear", headers={"Authorization": "Bearer nope"})
        assert res.status_code == 403
        with pytest.raises(DymuAPIError) as err:
            client.reload("wrong")
        assert err.value.status == 403

        info = client.model()
        assert info.default_preference_id.startswith("v1_1000000-0-0_500000_")
        old = client.create_preference([1, 2, 3], 0.1)
        client.create_preference([3, 2, 1], 0.1)
        cleared = client.clear_cache(TOKEN)
        assert cleared.action == "clear_cache" and cleared.cleared == 2
        assert client.get_preference(old.preference_id).cached is False  # id still valid
        assert client.get_preference(info.default_preference_id).cached is True  # pinned

        # a new version in the store; reload switches to it
        torch.manual_seed(1)
        dymu.save(randomize_(dymu.create_model(tiny_config(input_size=HW)), seed=1), store)
        result = client.reload(TOKEN)
        assert (result.previous_version, result.model_version) == ("v1", "v2")
        assert client.model().version == "v2"
        res = http.get(f"/preference/{old.preference_id}")
        assert res.status_code == 404 and "v1" in res.json()["detail"]
        new = client.create_preference([1, 2, 3], 0.1)
        assert new.preference_id.startswith("v2_") and new.cached is False
        assert client.predict(random_image(0)).metrics.preference_id.startswith("v2_")
        [(labels, _)] = metric_samples(client.metrics())["dymu_model_info"]
        assert labels["version"] == "v2"

        # a broken newest version: 409 with the reason, and v2 keeps serving
        bad = store / "v3"
        bad.mkdir()
        (bad / "manifest.json").write_text("{}")
        res = http.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert res.status_code == 409 and "v3" in res.json()["detail"]
        assert client.ready().ready and client.model().version == "v2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dymu_serve_arguments(tmp_path: Path, capsys):
    from dymu.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--device", "--backend", "model_dir"):
        assert flag in out
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("dymu: error: no model at")
    assert main(["serve", str(tmp_path), "--device", "tpu"]) == 2
    assert "device" in capsys.readouterr().err


def test_dymu_serve_runs_a_server_process(tmp_path: Path):
    store = save_tiny(tmp_path, "cli")
    port = _free_port()
    env = {**os.environ, "DYMU_MAX_BATCH_SIZE": "2", "DYMU_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dymu.cli", "serve", str(store), "--port", str(port),
         "--backend", "torch", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        with DymuClient(f"http://127.0.0.1:{port}") as client:
            client.wait_ready(timeout=90)
            info = client.model()
            assert info.name == "cli" and info.backend == "torch" and info.device == "cpu"
            assert info.batching["max_batch_size"] == 2  # from the environment
            assert client.predict(random_image(3)).metrics.tasks == list(info_tasks(info))
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully, then `dymu` says 130
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode in (0, 130), out
    assert f"http://127.0.0.1:{port}/docs" in out


def info_tasks(info) -> list[str]:
    return [t.name for t in info.tasks]
