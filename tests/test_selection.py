"""Stream selection (training/selection.py): each stream of stage 0 ends at its lowest loss on
the calibration split; a resumed run continues the selection (docs/training.md, "Stream
selection")."""

from __future__ import annotations

import json

import pytest
import torch

from dymu.errors import ConfigError
from training.config import load_config
from training.pipeline import run_training

from .conftest import prepared_run

CALIBRATION = {"n": 8, "seed": 7}


def selecting_config(every: int = 2, steps: int = 6, calibration: dict | None = CALIBRATION):
    base = load_config("scenes-tiny")
    return base.model_copy(
        update={
            "check_preferences": 0,
            "data": base.data.model_copy(update={"calibration_options": calibration}),
            "anchor": base.anchor.model_copy(
                update={"steps": steps, "select_every": every, "select_images": 8}
            ),
        }
    )


def prepared(tmp_path, config):
    return prepared_run(tmp_path, config, ("anchor",))


def states(run) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in s.state_dict().items()} for s in run.model.anchor.streams]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_stream_that_got_worse_ends_at_its_best_state_and_one_that_improved_is_kept(tmp_path):
    from training.selection import StreamSelector

    run = prepared(tmp_path, selecting_config())
    good = states(run)
    streams = run.model.anchor.streams
    with torch.no_grad():  # stream 1 starts spoiled, so the step-0 measure is its worst
        for p in streams[1].parameters():
            p.add_(torch.randn_like(p) * 3)
    sel = StreamSelector.begin(run, 0)  # measures at step 0
    spoiled_loss = sel.best_loss[1]
    with torch.no_grad():
        for p in streams[0].parameters():  # stream 0 gets worse after step 0
            p.add_(torch.randn_like(p) * 3)
        streams[1].load_state_dict(good[1])  # stream 1 gets better
    sel.observe(0)  # step 1: not a multiple of select_every = 2, nothing measured
    assert sel.best_step == [0, 0, 0]
    sel.observe(1)  # step 2: measured
    record = sel.finish()
    assert record["steps"] == {"segmentation": 0, "depth": 2, "normals": 0}
    assert record["calibration_loss"]["depth"] < spoiled_loss
    assert_same_state(states(run)[0], good[0])  # back to its best
    assert_same_state(states(run)[1], good[1])
    # the streams are left where the record says: measuring again gives the recorded losses
    again = StreamSelector.begin(run, 0)
    assert again.best_loss == pytest.approx(list(record["calibration_loss"].values()), rel=1e-6)


def test_a_resumed_run_makes_the_same_selection_as_an_uninterrupted_one(tmp_path):
    config = selecting_config(every=1, steps=6)
    whole = run_training(config, tmp_path / "a", run_dir=tmp_path / "ra", device="cpu",
                         stages=("anchor",), progress=False)  # fmt: skip
    stopped = run_training(config, tmp_path / "b", run_dir=tmp_path / "rb", device="cpu",
                           stages=("anchor",), progress=False, max_steps=3)  # fmt: skip
    assert stopped is None
    resumed = run_training(config, tmp_path / "b", run_dir=tmp_path / "rb", device="cpu",
                           stages=("anchor",), progress=False, resume=True)  # fmt: skip
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (whole, resumed))
    sa = a["training"]["stages"]["anchor"]["selection"]
    sb = b["training"]["stages"]["anchor"]["selection"]
    assert sa["steps"] == sb["steps"]
    assert sa["calibration_loss"] == pytest.approx(sb["calibration_loss"], rel=1e-5)
    assert sa["every"] == 1 and sa["images"] == 8


def test_selection_without_a_calibration_split_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="calibration_options"):
        prepared(tmp_path, selecting_config(calibration=None))
