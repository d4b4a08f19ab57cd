"""``python -m benchmarks [options]`` = ``dymu bench [options]``, from a plain checkout.

``dymu bench`` is found through the installed package's entry points; this runs the same
subcommand with nothing installed but the dependencies (``PYTHONPATH=.``), as
``benchmarks/gpu.sh`` does on a machine where the repository is only copied.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dymu.cli import run_command

from .cli import add_bench_command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    add_bench_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
