import math

import pytest
import torch

from dymu.errors import PreferenceError, TaskError
from dymu.preference import normalize_preference, resolve_tasks

TASKS = ("segmentation", "depth", "normals")


def test_normalizes_onto_the_simplex():
    p = normalize_preference([2, 1, 1], 0.25, TASKS)
    assert p.r == (0.5, 0.25, 0.25)
    assert p.c == 0.25
    assert math.isclose(sum(p.r), 1.0)


def test_mapping_form_counts_missing_tasks_as_zero():
    p = normalize_preference({"depth": 3.0, "normals": 1.0}, 1, TASKS)
    assert p.r == (0.0, 0.75, 0.25)


def test_tensor_form():
    p = normalize_preference(torch.tensor([1.0, 1.0, 2.0]), torch.tensor(0.0), TASKS)
    assert p.r == (0.25, 0.25, 0.5)


@pytest.mark.parametrize(
    ("r", "c", "reason"),
    [
        ([1, 1], 0.5, "2 entries"),
        ([1, 1, 1, 1], 0.5, "4 entries"),
        ([1, -0.1, 1], 0.5, "non-negative"),
        ([1, float("nan"), 1], 0.5, "finite"),
        ([1, float("inf"), 1], 0.5, "finite"),
        ([0, 0, 0], 0.5, "positive sum"),
        ([1, 1, 1], 1.5, "c must be in"),
        ([1, 1, 1], -0.01, "c must be in"),
        ([1, 1, 1], float("nan"), "finite"),
        ([1, 1, 1], "high", "number"),
        (["a", 1, 1], 0.5, "number"),
        ([True, 1, 1], 0.5, "number"),
        ("abc", 0.5, "list"),
        (3.0, 0.5, "list"),
        ({"segmentation": 1, "colour": 2}, 0.5, "unknown task"),
        (torch.ones(2, 3), 0.5, "vector"),
    ],
)
def test_bad_preferences_raise_with_the_reason(r, c, reason):
    with pytest.raises(PreferenceError, match=reason):
        normalize_preference(r, c, TASKS)


def test_resolve_tasks():
    assert resolve_tasks(None, TASKS) == (0, 1, 2)
    assert resolve_tasks(["normals", "segmentation"], TASKS) == (0, 2)
    assert resolve_tasks("depth", TASKS) == (1,)
    with pytest.raises(TaskError, match="unknown task"):
        resolve_tasks(["depth", "edges"], TASKS)
    with pytest.raises(TaskError, match="empty"):
        resolve_tasks([], TASKS)
    with pytest.raises(TaskError, match="duplicate"):
        resolve_tasks(["depth", "depth"], TASKS)


def test_key_rounds_nearby_preferences_together():
    a = normalize_preference([1, 1, 1], 0.3, TASKS)
    b = normalize_preference([1, 1, 1 + 1e-9], 0.3 + 1e-9, TASKS)
    assert a.key() == b.key()
    assert a.key() != normalize_preference([1, 1, 1.1], 0.3, TASKS).key()
