"""Stage 2 with several preferences per step (``[weight] preferences``, ``dense_fraction``)."""

import pytest
import torch

from dymu.errors import ConfigError
from training.config import CONFIG_DIR, load_config
from training.data import build_dataset, collate
from training.run import step_generator
from training.stages import batch_groups, step_preferences, weight_loss
from training.tasks import weighted_task_loss

from .conftest import prepared_run


def _weight_run(tmp_path, **weight):
    base = load_config("scenes-tiny")
    config = base.model_copy(
        update={"check_preferences": 0, "weight": base.weight.model_copy(update=weight)}
    )
    return prepared_run(tmp_path, config, ("weight",))


def test_each_group_is_scored_by_the_model_served_for_its_own_preference(tmp_path):
    run = _weight_run(tmp_path, preferences=3, dense_fraction=0.5, batch_size=5)
    model = run.model.eval()
    with torch.no_grad():  # deltas away from zero, so a group read with the wrong r shows
        for p in model.weight_hypernet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = build_dataset("scenes", "train", n=5, seed=11, size=tuple(run.config.input_size))
    batch = collate([data[i] for i in range(5)])
    with torch.no_grad():
        total, _ = weight_loss(run, model.weight_hypernet, 7, batch)
    gen = step_generator(run.config.seed, "weight-pref", 7)
    prefs = step_preferences(model.n_tasks, 3, 0.5, run.config.weight.eta, gen)
    groups = batch_groups(batch, 3)
    assert [len(g["image"]) for g in groups] == [2, 1, 2]
    expected = []
    for (r, c), group in zip(prefs, groups, strict=True):
        served = model.materialize(r.tolist(), float(c))  # BN folded: the path inference takes
        with torch.no_grad():
            expected.append(weighted_task_loss(run.tasks, served(group["image"]), group, r)[0])
    torch.testing.assert_close(total, torch.stack(expected).mean(), rtol=1e-4, atol=1e-5)
    assert len({tuple(r.tolist()) for r, _ in prefs}) == 3


def test_step_preferences_draw_the_dense_share_from_dir_1_first():
    def draws(count, dense):
        return step_preferences(3, count, dense, 0.2, torch.Generator().manual_seed(5))

    one = draws(1, 0.0)
    plain = torch.Generator().manual_seed(5)
    from dymu.preference import sample_preference

    r, c = sample_preference(3, 0.2, plain)  # one preference, no dense share: the old step
    assert torch.equal(one[0][0], r) and torch.equal(one[0][1], c)
    many = draws(4000, 0.5)
    dense = torch.stack([r for r, _ in many[:2000]])
    sparse = torch.stack([r for r, _ in many[2000:]])
    # Dir(1) rarely puts 95 % on one task (about 0.8 % of draws); Dir(0.2) often does
    assert (dense.max(1).values > 0.95).float().mean() < 0.03
    assert (sparse.max(1).values > 0.95).float().mean() > 0.3


def test_batch_groups_split_tensors_and_share_the_rest():
    batch = {"image": torch.arange(7).float(), "seg": torch.arange(7) * 2, "meta": "x"}
    groups = batch_groups(batch, 3)
    assert torch.equal(torch.cat([g["image"] for g in groups]), batch["image"])
    assert torch.equal(torch.cat([g["seg"] for g in groups]), batch["seg"])
    assert all(g["meta"] == "x" for g in groups)
    assert all(len(g["image"]) >= 2 for g in groups)


def test_more_preferences_than_images_is_a_config_error(tmp_path):
    text = (CONFIG_DIR / "scenes-tiny.toml").read_text()
    path = tmp_path / "many.toml"
    path.write_text(text.replace("[weight]\n", "[weight]\npreferences = 5\n"))
    with pytest.raises(ConfigError, match=r"preferences \(5\) exceeds batch_size \(4\)"):
        load_config(path)


def _calibrated(tmp_path, images, calibration={"n": 6, "seed": 7}):  # noqa: B006
    base = load_config("scenes-tiny")
    config = base.model_copy(
        update={
            "check_preferences": 0,
            "data": base.data.model_copy(update={"calibration_options": calibration}),
            "weight": base.weight.model_copy(update={"images": images, "steps": 2}),
        }
    )
    return prepared_run(tmp_path, config, ("weight",))


def _trained_weights(run) -> list[torch.Tensor]:
    from training.stages import stage_weight

    stage_weight(run, 0)
    return [p.detach().clone() for p in run.model.weight_hypernet.parameters()]


def test_the_weight_stage_trains_on_the_calibration_split_when_asked(tmp_path):
    on_cal = _calibrated(tmp_path / "a", "calibration")
    assert len(on_cal.calibration_set) == 6
    batch = next(on_cal.batches("weight", 0, 1, 6, calibration=True))
    cal = torch.stack([on_cal.calibration_set[i]["image"] for i in range(6)])
    train = torch.stack([on_cal.train_set[i]["image"] for i in range(len(on_cal.train_set))])
    # batches draw with replacement: every image is one of the calibration split's
    assert all((cal == image).flatten(1).all(1).any() for image in batch["image"])
    assert not any((train == image).flatten(1).all(1).any() for image in batch["image"])
    on_train = _calibrated(tmp_path / "b", "training")
    on_train.model.load_state_dict(on_cal.model.state_dict())
    # the same run whose calibration split holds the training images trains like "training"
    swapped = _calibrated(tmp_path / "c", "calibration")
    swapped.model.load_state_dict(on_cal.model.state_dict())
    swapped.calibration_set = swapped.train_set
    a, b, c = (_trained_weights(r) for r in (on_cal, on_train, swapped))
    assert all(torch.equal(x, y) for x, y in zip(b, c, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_weight_stage_on_a_calibration_split_the_config_lacks_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="calibration_options"):
        _calibrated(tmp_path, "calibration", calibration=None)


def test_a_process_batch_smaller_than_the_preferences_is_a_config_error(tmp_path):
    run = _weight_run(tmp_path, preferences=4, batch_size=4)
    data = build_dataset("scenes", "train", n=2, seed=11, size=tuple(run.config.input_size))
    with pytest.raises(ConfigError, match=r"preferences \(4\) exceeds the 2 images"):
        weight_loss(run, run.model.weight_hypernet, 0, collate([data[0], data[1]]))
