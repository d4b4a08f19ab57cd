"""`dymu baselines`: registered on the `dymu` command through the ``dymu.commands`` entry point."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..config import available_configs, load_config


def _baselines(args: argparse.Namespace) -> int:
    from .run import run_baselines

    config = load_config(args.config)
    if args.steps_scale != 1.0:
        config = config.scaled(args.steps_scale)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    path = run_baselines(
        config,
        args.out,
        methods=methods,
        dymu_model=args.dymu,
        ablations=args.ablations,
        device=args.device,
        progress=not args.quiet,
        command="dymu " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    print(f"wrote {path}")
    return 0


def add_baselines_command(sub: argparse._SubParsersAction) -> None:
    from .methods import BASELINES

    p = sub.add_parser(
        "baselines",
        help="train dymu, the baselines and the ablation into one run directory",
        description="Train PHN, PHN-BN, Controllable Pareto MTL and K static multi-task networks "
        "(and dymu itself unless --dymu names a trained model) on a config's data, with the "
        "same loop, losses and backbone; --ablations adds the Table-6 ablation. Writes "
        "RUN_DIR/run.json for `dymu evaluate`. An interrupted run continues where it stopped. "
        "Configs: " + ", ".join(available_configs()) + ", or a path to a TOML file.",
    )
    p.add_argument("config", help="config name (training/configs/NAME.toml) or path")
    p.add_argument("--out", type=Path, required=True, help="the run directory")
    p.add_argument(
        "--methods",
        default=",".join(BASELINES),
        help=f"comma-separated subset of {','.join(BASELINES)} (default: all)",
    )
    p.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="multiply every step budget (dymu's stages and the baselines')",
    )
    p.add_argument(
        "--dymu",
        type=Path,
        default=None,
        metavar="MODEL_DIR",
        help="an existing dymu artifact to use (default: train one into RUN_DIR/dymu)",
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also train the four edge/weight hypernet ablations (anchor from the dymu model)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_baselines)
