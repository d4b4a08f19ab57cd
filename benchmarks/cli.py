"""``dymu bench``: the subcommand this package contributes to the ``dymu`` CLI.

Registered through the ``dymu.commands`` entry-point group (pyproject.toml); importing this
module is cheap, the harness is imported when the command runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dymu.errors import DymuError, validation_message


def _bench(args: argparse.Namespace) -> int:
    try:
        from pydantic import ValidationError

        from .config import preset
        from .harness import run_bench
    except ImportError as exc:
        raise DymuError(
            f"`dymu bench` needs the serving and onnx extras (pip install 'dymu[serving,onnx]'): "
            f"{exc}"
        ) from exc
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    try:
        config = preset(
            mode,
            model=args.model,
            device=args.device,
            cases=tuple(args.cases or ()),
            seed=args.seed,
            threads=args.threads,
        )
    except ValidationError as exc:
        raise DymuError(f"bad option {validation_message(exc.errors())}") from exc
    command = command_line(args, mode)
    report = run_bench(config, args.out, command=command)
    failed = [n for n, rec in report["cases"].items() if rec["status"] != "ok"]
    if failed:
        print(
            f"dymu bench: case(s) failed: {', '.join(failed)} (see results.json)", file=sys.stderr
        )
        return 1
    return 0


def command_line(args: argparse.Namespace, mode: str) -> str:
    """The command as a user would type it (recorded in the results)."""
    argv = ["dymu", "bench"] + ([f"--{mode}"] if mode != "full" else []) + ["--out", str(args.out)]
    if args.cases:
        argv += ["--cases", *args.cases]
    for flag in ("model", "device", "seed", "threads"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    return shlex.join(argv)


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark: time vs FLOPs, peers, switch, backends, server, scaling, paper scale",
        description="Run the benchmark cases and write results.json (every raw sample, the "
        "machine, versions, device, load) and summary.md under --out. Without a mode flag it "
        "runs the full suite (long); --quick finishes in about 2 minutes on 2 CPU cores.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer sizes and rounds (< 2 min)")
    mode.add_argument(
        "--tiny",
        action="store_true",
        help="smallest settings: every code path once (tests, with a tiny --model)",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, summary.md")
    p.add_argument(
        "--cases",
        nargs="+",
        metavar="CASE",
        help="run only these: proportionality peers switch backends server overload "
        "request_path scaling paper_scale profile (default: all)",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model_store/<name> (newest version) or a version directory "
        "(default model_store/scenes-small)",
    )
    p.add_argument("--device", default=None, help="auto (CUDA when available), cpu, cuda[:i]")
    p.add_argument("--seed", type=int, default=None, help="seed of inputs and preferences")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads of torch, ONNX Runtime and the servers (default: theirs)",
    )
    p.set_defaults(func=_bench)
