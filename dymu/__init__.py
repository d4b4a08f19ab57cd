"""dymu: controllable dynamic multi-task networks (Raychaudhuri et al., CVPR 2022).

Entry points::

    model = dymu.load("model_store/scenes-small")       # newest version, verified
    tree = model.architecture(r=[0.6, 0.2, 0.2], c=0.5)  # arg-max parents per layer
    net = model.materialize([0.6, 0.2, 0.2], 0.5)        # nn.Module: only the used nodes run
    outputs = net(images)                                # {task: tensor}
    net.cost((96, 128))                                  # Cost(flops, params), 1 MAC = 2 FLOPs
    net = model.materialize([0.6, 0.2, 0.2], budget={"max_gflops": 0.25})  # lowest c that fits
"""

from . import backbones  # noqa: F401  (registers the built-in backbones)
from .architecture import Architecture
from .budget import Budget, BudgetChoice
from .config import BackboneConfig, HypernetConfig, ModelConfig, TaskSpec
from .cost import Cost, CostModel
from .errors import (
    ArchitectureError,
    ArtifactError,
    BudgetError,
    BudgetInfeasibleError,
    ConfigError,
    DymuError,
    InputError,
    PreferenceError,
    TaskError,
)
from .materialize import MaterializedModel
from .model import ControllableModel, create_model
from .preference import Preference, normalize_preference
from .store import load, save

__version__ = "0.1.0"

__all__ = [
    "Architecture",
    "ArchitectureError",
    "ArtifactError",
    "BackboneConfig",
    "Budget",
    "BudgetChoice",
    "BudgetError",
    "BudgetInfeasibleError",
    "ConfigError",
    "ControllableModel",
    "Cost",
    "CostModel",
    "DymuError",
    "HypernetConfig",
    "InputError",
    "MaterializedModel",
    "ModelConfig",
    "Preference",
    "PreferenceError",
    "TaskError",
    "TaskSpec",
    "__version__",
    "create_model",
    "load",
    "normalize_preference",
    "save",
]
