"""Deployment files: docker-compose.yml (+ the GPU override), the Dockerfiles, prometheus.yml.

No Docker engine runs here. The compose files are validated against the Compose
specification's JSON schema (docker/compose-spec.json, the schema Debian's docker-compose
1.29 validates with) and, where that `docker-compose` is installed, by `docker-compose config`
itself; the rest is checked structurally.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker" / "compose.gpu.yml"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def merged() -> dict:
    """The GPU override applied on top of the base file (dicts merge, scalars replace)."""

    def merge(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: merge(a.get(k), b[k]) if k in a else b[k] for k in b} | {
                k: v for k, v in a.items() if k not in b
            }
        return b

    return merge(load(COMPOSE), load(GPU))


@pytest.mark.parametrize("name, config", [("cpu", load(COMPOSE)), ("gpu", merged())])
def test_compose_files_follow_the_compose_spec(name, config):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "docker" / "compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)  # its $schema URL is the 2019-09 draft
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    # the schema is strict enough to catch a typo
    broken = json.loads(json.dumps(config))
    broken["services"]["api"]["healthcheck"]["intervall"] = "10s"
    assert any(validator.iter_errors(broken))


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config_accepts_them():
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(GPU)]):
        res = subprocess.run(
            ["docker-compose", *files, "config", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr


def test_compose_api_service():
    api = load(COMPOSE)["services"]["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile"
    assert (ROOT / api["build"]["dockerfile"]).is_file()
    # healthcheck on /readyz
    assert any("/readyz" in part for part in api["healthcheck"]["test"])
    # the model store mounted read-only, and the served model inside it
    [mount] = [v for v in api["volumes"] if v["source"] == "./model_store"]
    assert mount["read_only"] is True and mount["type"] == "bind"
    env = api["environment"]
    assert env["DYMU_MODEL_DIR"].startswith(mount["target"] + "/")
    assert env["DYMU_HOST"] == "0.0.0.0"
    # every DYMU_ variable is a setting
    fields = {f"DYMU_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    port = int(env["DYMU_PORT"])
    # the host port is DYMU_API_PORT, the container's port by default
    assert f"${{DYMU_API_PORT:-{port}}}:{port}" in api["ports"]


def test_gpu_override_reserves_a_gpu():
    api = merged()["services"]["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    [device] = api["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert api["environment"]["DYMU_DEVICE"] == "cuda"
    assert api["volumes"] == load(COMPOSE)["services"]["api"]["volumes"]  # still read-only


def test_prometheus_scrapes_the_api():
    services = load(COMPOSE)["services"]
    prom = services["prometheus"]
    mounts = {v["source"]: v for v in prom["volumes"]}
    assert set(mounts) == {"./docker/prometheus.yml", "./docker/prometheus-rules.yml"}
    assert all(v["read_only"] is True for v in mounts.values())
    config_path = Path(mounts["./docker/prometheus.yml"]["target"])
    assert f"--config.file={config_path}" in prom["command"]
    # the rules lie next to the config, where its relative rule_files entry finds them
    rules = Path(mounts["./docker/prometheus-rules.yml"]["target"])
    assert load(ROOT / "docker" / "prometheus.yml")["rule_files"] == [rules.name]
    assert rules.parent == config_path.parent
    assert prom["depends_on"]["api"]["condition"] == "service_healthy"
    config = load(ROOT / "docker" / "prometheus.yml")
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    [target] = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "api" and port == services["api"]["environment"]["DYMU_PORT"]


def test_dockerfiles_install_like_the_readme():
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r'"torch==([0-9.]+)"', makefile).group(1)
    assert '-e ".[dev,training,serving,onnx]"' in makefile
    cpu = (ROOT / "docker" / "Dockerfile").read_text()
    gpu = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    # CPU torch first (same pin as `make setup`), then the package with the serving extras
    # torch from the public CPU index by default (TORCH_INDEX), or from the machine's own pip
    # configuration passed into the build (PIP_CONF: docker/pip/README.md); never a CUDA build
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in cpu
    assert f'pip install "torch=={torch_pin}" ${{TORCH_INDEX:+--index-url "$TORCH_INDEX"}}' in cpu
    assert 'PIP_CONFIG_FILE="/tmp/pip/$PIP_CONF"' in cpu and "torch.version.cuda is None" in cpu
    assert cpu.index("torch==") < cpu.index('pip install ".[serving,onnx]"')
    assert f'pip install "torch=={torch_pin}"' in gpu and "onnxruntime-gpu" in gpu
    assert '".[serving]"' in gpu and ".[serving,onnx]" not in gpu  # never two onnxruntimes
    for text in (cpu, gpu):
        assert "/readyz" in text and "HEALTHCHECK" in text and "EXPOSE 8000" in text
        assert 'CMD ["serve"]' in text and "USER dymu" in text
        for path in re.findall(r"^COPY (\S+) ", text, flags=re.M):
            assert (ROOT / path).exists(), path


def test_pyproject_declares_the_extras_and_the_command():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = {re.split(r"[<>=\[]", d)[0].lower() for d in extras["serving"]}
    assert {"fastapi", "uvicorn", "pydantic-settings", "prometheus-client", "httpx"} <= names
    assert {"python-multipart", "pillow"} <= names
    assert {"onnx", "onnxruntime"} <= {re.split(r"[<>=]", d)[0] for d in extras["onnx"]}
    assert project["entry-points"]["dymu.commands"]["serve"] == "service.cli:add_serve_command"


def test_ray_compose_file_and_kuberay_manifest():
    """docker-compose.ray.yml follows the Compose spec and runs `dymu serve --engine ray`; the
    KubeRay RayService deploys service.ray_app:app_builder with valid settings. Neither runs
    here (no Docker, no Kubernetes); Ray itself is tested in tests/test_service_ray.py."""
    import tomllib

    from dymu.cli import build_parser

    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "docker" / "compose-spec.json").read_text())
    config = load(ROOT / "docker-compose.ray.yml")
    errors = list(jsonschema.Draft201909Validator(schema).iter_errors(config))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    api = config["services"]["api"]
    assert (ROOT / api["build"]["dockerfile"]).is_file()
    args = build_parser().parse_args(api["command"])
    assert args.engine == "ray" and args.replicas == 2
    dockerfile = (ROOT / api["build"]["dockerfile"]).read_text()
    assert 'pip install ".[serving,onnx,ray]"' in dockerfile and "USER dymu" in dockerfile

    manifest = load(ROOT / "docker" / "kuberay-rayservice.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, builder = app["import_path"].split(":")
    assert f"def {builder}(args" in (ROOT / (module.replace(".", "/") + ".py")).read_text()
    settings = {k: v for k, v in app["args"].items() if k not in ("replicas", "replica_cpus")}
    assert Settings(**settings).cache_max_entries == 64
    # the cluster's Ray is the version range of the `ray` extra
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (ray_req,) = extras["optional-dependencies"]["ray"]
    low, high = re.search(r">=([0-9.]+),<([0-9]+)", ray_req).groups()
    version = tuple(int(v) for v in manifest["spec"]["rayClusterConfig"]["rayVersion"].split("."))
    assert tuple(int(v) for v in low.split(".")) <= version < (int(high),)
