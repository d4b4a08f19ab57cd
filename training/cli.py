"""`dymu train`: registered on the `dymu` command through the ``dymu.commands`` entry point.

``dymu train CONFIG --nproc P`` starts the same command under ``torchrun`` (P data-parallel
processes, see :mod:`training.distributed`); ``torchrun --nproc-per-node P -m training CONFIG``
is the same thing spelled out (``training/__main__.py`` takes the arguments of ``dymu train``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from dymu.cli import at_least
from dymu.errors import ConfigError

from .config import available_configs, load_config


def _train(args: argparse.Namespace) -> int:
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args)
    from .pipeline import STAGES, run_training

    config = load_config(args.config)
    if args.steps_scale != 1.0:
        config = config.scaled(args.steps_scale)
    if args.anchor_from is not None:
        # retrain the controller on existing streams: stage 0 is skipped (`anchor.pretrained`)
        anchor = config.anchor.model_copy(update={"pretrained": str(args.anchor_from)})
        config = config.model_copy(update={"anchor": anchor})
    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    out = args.out or Path("model_store") / config.name
    command = args.record_command or "dymu " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    vdir = run_training(
        config,
        out,
        run_dir=args.run_dir,
        device=args.device,
        resume=args.resume,
        stages=stages,
        progress=not args.quiet,
        command=command,
        max_steps=args.max_steps,
    )
    if os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 speaks for the job
    if vdir is None:
        print(f"stopped after --max-steps; continue with: {command} --resume")
    else:
        print(f"wrote {vdir}")
    return 0


def torchrun_command(nproc: int, train_args: list[str]) -> list[str]:
    """``torchrun --standalone --nproc-per-node P -m training ARGS`` (as ``python -m``, so the
    torchrun of this interpreter's torch is the one that runs)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "training",
        *train_args,
    ]


def _launch(args: argparse.Namespace) -> int:
    """Run this ``dymu train`` under torchrun with ``--nproc`` processes; its exit status."""
    config = load_config(args.config)  # a bad config fails here, with one line, not P times
    if args.device not in ("auto", "cpu", "cuda"):
        raise ConfigError("--nproc > 1 takes --device auto, cpu or cuda (one GPU per process)")
    forwarded = [str(args.config)]
    for flag, value in (
        ("--out", args.out or Path("model_store") / config.name),
        ("--run-dir", args.run_dir),
        ("--steps-scale", args.steps_scale),
        ("--device", args.device),
        ("--stages", args.stages),
        ("--max-steps", args.max_steps),
        ("--anchor-from", args.anchor_from),
    ):
        if value is not None:
            forwarded += [flag, str(value)]
    forwarded += [f for f, on in (("--resume", args.resume), ("--quiet", args.quiet)) if on]
    command = "dymu " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    forwarded += ["--record-command", command]
    return subprocess.run(torchrun_command(args.nproc, forwarded), check=False).returncode


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``dymu train`` (also those of ``python -m training``)."""
    p.add_argument("config", help="config name (training/configs/NAME.toml) or path")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="artifact store directory (default model_store/<config name>)",
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="checkpoints and train_log.csv (default runs/<config name>)",
    )
    p.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="multiply every stage's step budget (schedules scale along)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue from the run-dir checkpoint")
    p.add_argument(
        "--stages",
        default=None,
        help="comma-separated subset of anchor,affinity,edge,weight (default: all)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop (with a checkpoint) after this many optimizer steps",
    )
    p.add_argument(
        "--anchor-from",
        type=Path,
        default=None,
        metavar="ARTIFACT",
        help="take the single-task streams from this artifact (skips stage 0; sets "
        "anchor.pretrained)",
    )
    p.add_argument(
        "--nproc",
        type=at_least(1),
        default=1,
        help="data-parallel processes (runs torchrun; gloo on CPU, one GPU each on CUDA); "
        "the config's batch_size is the global batch (default 1: a plain single process)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    # The command line recorded in the artifact when --nproc re-runs us under torchrun.
    p.add_argument("--record-command", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_train)


def add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a controllable model (all stages) and write it to the store",
        description="Train the anchor streams, the RSA task affinity, the edge hypernet and the "
        "weight hypernet, then write the artifact through dymu's store. Configs: "
        + ", ".join(available_configs())
        + ", or a path to a TOML file.",
    )
    add_train_arguments(p)


def _c_values(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        msg = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"every c must be in [0, 1], got {text!r}")
    return values


def _dataset_options(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        msg = f'expected a JSON object of dataset options, e.g. {{"seed": 4}}, got {text!r}'
        raise argparse.ArgumentTypeError(msg)
    return value


def _tree_map(args: argparse.Namespace) -> int:
    import json

    from dymu.device import resolve_device

    from .treemap import MapOptions, markdown, tree_map_of, with_edge

    for out in (args.json, args.table):
        if out is not None and not out.parent.is_dir():
            raise ConfigError(f"{out}: the folder {out.parent} does not exist")
    config = with_edge(
        load_config(args.config),
        tau=args.tau,
        lambda_active=args.lambda_active,
        lambda_inactive=args.lambda_inactive,
        pull_scale=args.pull_scale,
    )
    options = MapOptions(c_values=args.c, points=args.points, preferences=args.preferences)
    device = resolve_device(args.device)
    judge = None if args.judge is None else (args.judge, args.judge_images)
    result = tree_map_of(config, args.artifact, device, options, args.table, judge)
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def add_tree_map_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tree-map",
        help="the tree the edge stage aims for at each (r, c), from a model's streams",
        description="The edge objective's best hard tree for each preference (the map the "
        "tree-table estimator fits), computed on ARTIFACT's streams with CONFIG's path table "
        "and [edge] settings: the mean cost per c over Dir(1) preferences, each task's marginal "
        "line, and whether each task's loss falls as its preference rises. Seconds, where an "
        "edge stage takes minutes (docs/training.md, 'The tree map').",
    )
    p.add_argument("config", help="config name (training/configs/NAME.toml) or path")
    p.add_argument("artifact", type=Path, help="the model whose streams are mapped")
    for flag, what in (
        ("--tau", "the dichotomy's threshold (default: the config's, else 0.6 / N)"),
        ("--lambda-active", "lambda_A (default: the config's)"),
        ("--lambda-inactive", "lambda_I (default: the config's)"),
    ):
        p.add_argument(flag, type=float, default=None, help=what)
    p.add_argument(
        "--pull-scale",
        choices=("absolute", "table"),
        default=None,
        help="lambda_A as written, or in units of the table's full-sharing pull (default: the "
        "config's)",
    )
    p.add_argument("--c", type=_c_values, default=(0.0, 0.5, 1.0), help="default 0,0.5,1")
    p.add_argument("--points", type=at_least(2), default=11, help="points per marginal line")
    p.add_argument(
        "--preferences", type=at_least(1), default=300, help="Dir(1) preferences per mean cost"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the map as JSON")
    p.add_argument(
        "--table",
        type=Path,
        default=None,
        metavar="FILE",
        help="read the path table from FILE (safetensors) when it holds this artifact's and "
        "config's table, else compute it and write it there: the table is most of the time",
    )
    p.add_argument(
        "--judge",
        type=_dataset_options,
        default=None,
        metavar="OPTIONS",
        help="also price the map's trees on images of the training source under these dataset "
        "options (a JSON object, like calibration_options), e.g. other writers' digits: does "
        "claim 2 hold on images the table never saw?",
    )
    p.add_argument(
        "--judge-images", type=at_least(1), default=1000, help="images of the judge split"
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.set_defaults(func=_tree_map)
