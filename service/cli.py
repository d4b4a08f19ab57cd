"""``dymu serve``: the subcommand this package contributes to the ``dymu`` CLI.

Registered through the ``dymu.commands`` entry-point group (pyproject.toml). Importing this
module is cheap (no FastAPI, no torch), so ``dymu --help`` stays fast; the server's modules are
imported when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dymu.cli import at_least
from dymu.errors import DymuError, validation_message


def _serve(args: argparse.Namespace) -> int:
    try:
        from pydantic import ValidationError

        from .server import serve
        from .settings import Settings
    except ImportError as exc:
        raise DymuError(
            f"`dymu serve` needs the serving extra (pip install 'dymu[serving]'): {exc}"
        ) from exc
    overrides = {
        k: v
        for k, v in {
            "model_dir": args.model_dir,
            "host": args.host,
            "port": args.port,
            "device": args.device,
            "backend": args.backend,
            "log_level": args.log_level,
            "exit_on_load_error": False if args.stay_up_on_load_error else None,
        }.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise DymuError(f"bad setting {validation_message(exc.errors())}") from exc
    # Fail fast on a missing artifact (the full checksum verification runs at start-up).
    from dymu.store import resolve

    resolve(settings.model_dir)
    if settings.backend == "onnx":
        from .backends import onnx_available

        if not onnx_available():
            raise DymuError("--backend onnx needs onnxruntime: pip install 'dymu[onnx]'")
    if args.replicas is not None and args.engine != "ray":
        raise DymuError("--replicas needs --engine ray (uvicorn serves one process)")
    url = f"http://{'127.0.0.1' if settings.host == '0.0.0.0' else settings.host}:{settings.port}"
    if args.engine == "ray":
        try:
            from .ray_app import run
        except ImportError as exc:
            raise DymuError(
                f"--engine ray needs Ray Serve (pip install 'dymu[ray]'): {exc}"
            ) from exc
        replicas = args.replicas or 1
        print(f"dymu serve: {settings.model_dir} on {url}, Ray Serve, {replicas} replica(s)")
        run(settings, replicas, address=args.ray_address)
        return 0
    print(f"dymu serve: {settings.model_dir} on {url}  (OpenAPI docs: {url}/docs)", flush=True)
    serve(settings)
    return 0


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP (preference API, predictions, metrics)",
        description="Serve a model store over HTTP: POST /preference, POST /predict, "
        "GET /v1/model, /healthz, /readyz, /metrics; OpenAPI docs at /docs. Every option "
        "is also an environment variable DYMU_<OPTION> (see docs/service.md); flags win.",
    )
    p.add_argument(
        "model_dir",
        nargs="?",
        type=Path,
        default=None,
        help="model_store/<name> (newest version) or a version directory "
        "(default: $DYMU_MODEL_DIR or model_store/scenes-small)",
    )
    p.add_argument("--host", default=None, help="interface (default 127.0.0.1; $DYMU_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000; $DYMU_PORT)")
    p.add_argument(
        "--device",
        default=None,
        help="auto (CUDA when available), cpu, cuda or cuda:<i> (default auto; $DYMU_DEVICE)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "torch-cl", "onnx"),
        default=None,
        help="auto = the fastest of torch, torch-cl (channels-last) and onnx, measured at "
        "warm-up on the default tree ($DYMU_BACKEND)",
    )
    p.add_argument("--log-level", default=None, help="uvicorn log level (default info)")
    p.add_argument(
        "--stay-up-on-load-error",
        action="store_true",
        help="when the artifact fails to load or verify at start, stay up (live, not ready) "
        "instead of exiting non-zero ($DYMU_EXIT_ON_LOAD_ERROR=false)",
    )
    p.add_argument(
        "--engine",
        choices=("uvicorn", "ray"),
        default="uvicorn",
        help="uvicorn: one process (default); ray: Ray Serve replicas of the same app behind "
        "one endpoint, sub-networks routed by preference (pip install 'dymu[ray]'; "
        "docs/scale.md)",
    )
    p.add_argument(
        "--replicas",
        type=at_least(1),
        default=None,
        help="--engine ray: model replicas (default 1), each with its own preference cache",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="--engine ray: a running Ray cluster to join (default: $RAY_ADDRESS, else a "
        "local Ray started here)",
    )
    p.set_defaults(func=_serve)
