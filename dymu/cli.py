"""The ``dymu`` command. Subcommands register here; each has ``--help``.

Errors a user can cause print one line (``dymu: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import DymuError


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type for every command's counts: an integer of at least ``low``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in "invalid ... value"
    return parse


def _info(args: argparse.Namespace) -> int:
    from .model import ControllableModel
    from .store import list_versions, load, resolve

    vdir = resolve(args.model_dir)
    model: ControllableModel = load(vdir, device="cpu")
    m = model.manifest
    hw = tuple(args.size) if args.size else model.input_size
    anchor = model.anchor_cost(hw)
    info = {
        "path": str(vdir),
        "name": m.get("name"),
        "version": m.get("version"),
        "versions": list_versions(vdir.parent),
        "created_at": m.get("created_at"),
        "tasks": [t.model_dump(mode="json") for t in model.config.tasks],
        "n_tasks": model.n_tasks,
        "n_layers": model.n_layers,
        "input_size": list(model.input_size),
        "backbone": model.config.backbone.model_dump(mode="json"),
        "anchor_cost": {
            **anchor.to_dict(),
            "input_size": list(hw),
            "flop_convention": "1 multiply-add = 2 FLOPs",
        },
        "control_params": model.control_params,
        "task_affinity": m.get("task_affinity"),
        "training": m.get("training"),
        "metrics": m.get("metrics"),
        "files": m["files"],
        "verified": True,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['name']} {info['version']}  ({vdir})  verified: every sha256 matches")
    print(f"  backbone     {model.config.backbone.name} {model.config.backbone.options or ''}")
    print(
        f"  N x L        {model.n_tasks} tasks x {model.n_layers} layers, input "
        f"{model.config.in_channels}x{hw[0]}x{hw[1]}"
    )
    print("  tasks")
    for t in model.config.tasks:
        extra = f", {t.classes} classes" if t.classes else ""
        print(f"    {t.name:<16} {t.kind}{extra}, loss scale {t.loss_scale:g}")
    print(
        f"  anchor cost  {anchor.gflops:.3f} GFLOPs/image (1 MAC = 2 FLOPs), "
        f"{anchor.params:,} params"
    )
    print(f"  controller   {model.control_params:,} params (both hypernets)")
    if m.get("training"):
        print(f"  training     {json.dumps(m['training'])}")
    print("  files")
    for name, entry in sorted(m["files"].items()):
        print(f"    {name:<30} {entry['bytes']:>12,} B  sha256 {entry['sha256']}")
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="describe and verify a model artifact",
        description="Show tasks, N, L, input size, anchor cost, files and "
        "checksums of an artifact; every checksum is verified.",
    )
    p.add_argument(
        "model_dir",
        type=Path,
        help="model_store/<name> (newest version) or model_store/<name>/<version>",
    )
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="input size for the cost (default: the model's)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_info)


#: The core's own subcommands. Other packages (training, service, benchmarks) add theirs through
#: the ``dymu.commands`` entry-point group, so the core never imports them.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_info]
ENTRY_POINT_GROUP = "dymu.commands"


def _plugin_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    from importlib.metadata import entry_points

    adders = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            adders.append(ep.load())
        except ImportError as exc:  # an optional extra is not installed
            adders.append(_unavailable(ep.name, ep.value, exc))
    return adders


def _unavailable(
    name: str, target: str, exc: ImportError
) -> Callable[[argparse._SubParsersAction], None]:
    """A subcommand that explains why it cannot run instead of breaking the whole CLI."""
    extra = "training" if target.startswith("training") else "serving"

    def fail(args: argparse.Namespace) -> int:
        raise DymuError(
            f"`dymu {name}` needs the {extra} extra (pip install 'dymu[{extra}]'): {exc}"
        )

    def add(sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser(name, help=f"(unavailable: install dymu[{extra}])")
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(func=fail)

    return add


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dymu",
        description="Controllable dynamic multi-task networks: inspect, train, "
        "evaluate and serve models chosen by preference (r, c).",
    )
    parser.add_argument("--version", action="version", version=f"dymu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in [*SUBCOMMANDS, *_plugin_commands()]:
        add(sub)
    return parser


def run_command(args: argparse.Namespace, prog: str = "dymu") -> int:
    """Run a parsed subcommand: a :class:`DymuError` becomes one line on stderr and exit 2,
    Ctrl-C exit 130 (every front end of the commands goes through here)."""
    try:
        return args.func(args)
    except DymuError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
