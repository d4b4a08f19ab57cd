"""`dymu train`: registered on the `dymu` command through the ``dymu.commands`` entry point."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .config import available_configs, load_config


def _train(args: argparse.Namespace) -> int:
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
    command = "dymu " + " ".join(shlex.quote(a) for a in sys.argv[1:])
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
    if vdir is None:
        print(f"stopped after --max-steps; continue with: {command} --resume")
    else:
        print(f"wrote {vdir}")
    return 0


def add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a controllable model (all stages) and write it to the store",
        description="Train the anchor streams, the RSA task affinity, the edge hypernet and the "
        "weight hypernet, then write the artifact through dymu's store. Configs: "
        + ", ".join(available_configs())
        + ", or a path to a TOML file.",
    )
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)
