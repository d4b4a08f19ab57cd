"""`dymu evaluate`: registered on the `dymu` command through the ``dymu.commands`` entry point."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dymu.errors import DymuError


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from dymu.device import resolve_device

    from .methods import held_out_split, load_source
    from .metrics import reference_point
    from .report import evaluate_source, write_report

    if args.preferences < 1:
        raise DymuError(f"--preferences must be >= 1, got {args.preferences}")
    if args.threads is not None and args.threads < 1:
        raise DymuError(f"--threads must be >= 1, got {args.threads}")
    if args.cost_preferences < 1 or args.curve_points < 2:
        raise DymuError("--cost-preferences must be >= 1 and --curve-points >= 2")
    device = resolve_device(args.device)
    source = load_source(args.model_or_run_dir, device=str(device), dymu_model=args.dymu)
    dataset, info = held_out_split(source, args.data, calibration=args.split == "calibration")
    names = list(source.dymu.tasks)
    if args.reference_point is not None:
        if len(args.reference_point) != len(names):
            raise DymuError(
                f"--reference-point needs {len(names)} values ({', '.join(names)}), "
                f"got {len(args.reference_point)}"
            )
        reference = list(args.reference_point)
    else:
        try:
            reference = reference_point(source.benchmark or info.get("name", ""), names)
        except ValueError as exc:
            raise DymuError(f"{exc} (--reference-point)") from exc
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        with torch.no_grad():
            report = evaluate_source(
                source,
                dataset,
                reference=reference,
                n_preferences=args.preferences,
                seed=args.seed,
                cost_preferences=args.cost_preferences,
                curve_points=args.curve_points,
                batch_size=args.batch_size,
                device=str(device),
                progress=not args.quiet,
                dataset_info=info,
            )
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their setting
    report["command"] = "dymu " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    files = write_report(report, args.out)
    print((args.out / "report.md").read_text().split("\n## Task metrics")[0])
    for claim in report["claims"]:
        verdict = {True: "holds", False: "does not hold", None: "not evaluated"}[claim["holds"]]
        print(f"claim: {claim['claim']}: {verdict} ({claim['text']})")
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    """Register ``dymu evaluate`` (entry point ``dymu.commands: evaluate``)."""
    p = sub.add_parser(
        "evaluate",
        help="hypervolume, uniformity, cost and claims of a model or a baselines run",
        description="Evaluate a dymu artifact or a run directory of `dymu baselines` on a "
        "held-out split: the paper's table (HV, uniformity, inference params, GFLOPs, control "
        "params), task metrics and Δ_m, Table 6 when the run has ablations, PNG figures, a JSON "
        "with every number, and the paper's five claims.",
    )
    p.add_argument("model_or_run_dir", type=Path, help="model_store/<name>[/vN] or a run dir")
    p.add_argument("--out", type=Path, required=True, help="folder for report.{md,json} + PNGs")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a split written by `dymu data` or a dataset root (default: the held-out split "
        "of the recorded training config)",
    )
    p.add_argument(
        "--split",
        choices=["held-out", "calibration"],
        default="held-out",
        help="which split of the recorded training config: held-out (default), or the "
        "calibration split, to make choices on without reading the held-out one",
    )
    p.add_argument(
        "--dymu",
        type=Path,
        default=None,
        metavar="MODEL_DIR",
        help="with a run dir: evaluate this dymu artifact instead of the one run.json names",
    )
    p.add_argument("--preferences", type=int, default=20, help="P, preferences per row (20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the preferences (0)")
    p.add_argument(
        "--cost-preferences", type=int, default=1000, help="preferences of the mean cost (1000)"
    )
    p.add_argument("--curve-points", type=int, default=5, help="points per trade-off curve (5)")
    p.add_argument(
        "--reference-point",
        type=float,
        nargs="+",
        default=None,
        help="override the benchmark's reference point (one value per task, w_i·L_i units)",
    )
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass (50)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is fastest on a crowded machine",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_evaluate)
