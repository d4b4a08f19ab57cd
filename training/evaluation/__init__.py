"""Evaluation of controllable multi-task models against the paper's baselines (paper §4).

``metrics`` (hypervolume, uniformity, reference points), ``methods`` (the table's rows, loaded
from an artifact or a ``dymu baselines`` run directory), ``loop`` (the evaluation loop),
``report`` (JSON, markdown, the claims check), ``figures`` (PNGs), ``cli`` (``dymu evaluate``).
See docs/evaluation.md.
"""

from .metrics import REFERENCE_POINTS, Hypervolume, hypervolume, reference_point, uniformity

__all__ = ["REFERENCE_POINTS", "Hypervolume", "hypervolume", "reference_point", "uniformity"]
