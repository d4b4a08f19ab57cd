"""Baselines of the evaluation (paper §4.3; docs/design.md §5), trained by the project's own loop.

    from training.baselines import BASELINES, train_baseline, load_method, SingleTask

    path = train_baseline("phn", load_config("scenes-small"), Path("runs/scenes/phn"))
    phn = load_method(path)                      # controllable-like, like dymu.load's model
    net = phn.materialize([0.6, 0.3, 0.1])       # nn.Module; net(images) -> {task: tensor}
    net.cost()                                   # dymu.Cost, 1 multiply-add = 2 FLOPs

``dymu baselines CONFIG --out RUN_DIR`` trains dymu, all baselines and the Table-6 ablation into
one run directory (:mod:`.run`); docs/baselines.md describes the methods and their budgets.
"""

from dymu.shared import HardSharedNet, shared_cost

from .methods import (
    BASELINES,
    CPMTL,
    PHN,
    PHNBN,
    Baseline,
    GeneratorOptions,
    SingleTask,
    StaticMTL,
    StaticSet,
)
from .run import ABLATION_FLAGS, REFERENCE, ablation_config, load_run, read_run, run_baselines
from .store import load_method, save_baseline
from .train import static_preferences, train_baseline

__all__ = [
    "ABLATION_FLAGS",
    "BASELINES",
    "CPMTL",
    "PHN",
    "PHNBN",
    "REFERENCE",
    "Baseline",
    "GeneratorOptions",
    "HardSharedNet",
    "SingleTask",
    "StaticMTL",
    "StaticSet",
    "ablation_config",
    "load_method",
    "load_run",
    "read_run",
    "run_baselines",
    "save_baseline",
    "shared_cost",
    "static_preferences",
    "train_baseline",
]
