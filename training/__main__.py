"""``python -m training CONFIG [options]``: ``dymu train`` without the ``dymu`` front end, so
that ``torchrun --nproc-per-node P -m training CONFIG`` runs every stage data-parallel."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from dymu.cli import run_command

from .cli import add_train_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a controllable model (the arguments of `dymu train`); run it with "
        "`torchrun --nproc-per-node P -m training CONFIG` for P data-parallel processes.",
    )
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    if args.record_command is None:
        procs = os.environ.get("LOCAL_WORLD_SIZE")
        launcher = f"torchrun --nproc-per-node {procs}" if procs else "python"
        args.record_command = f"{launcher} -m training " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
        )
    return run_command(args, "python -m training")


if __name__ == "__main__":
    raise SystemExit(main())
