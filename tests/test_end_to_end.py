"""The core's acceptance check: a random tiny model through the store, 100 preferences."""

import random

import torch
from torch.utils.flop_counter import FlopCounterMode

import dymu

from .conftest import randomize_, tiny_config


def test_store_load_and_100_random_preferences(tmp_path):
    torch.manual_seed(0)
    model = randomize_(dymu.create_model(tiny_config()), seed=11)
    dymu.save(model, tmp_path / "tiny")
    loaded = dymu.load(tmp_path / "tiny", device="cpu")
    rng = random.Random(0)
    x = torch.randn(1, 3, *loaded.input_size)
    trees = set()
    for _ in range(100):
        r = [rng.random() for _ in loaded.tasks]
        c = rng.random()
        net = loaded.materialize(r, c)
        trees.add(net.architecture.id)
        nu = net.architecture.one_hot_nu()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = net(x)
        with torch.no_grad():
            ref = loaded(x, nu, loaded.bn_deltas(r, c))
        assert max((out[k] - ref[k]).abs().max().item() for k in out) < 1e-4
        assert counter.get_total_flops() == net.cost().flops
        assert net.cost().params <= loaded.anchor_cost().params
    assert len(trees) > 1, "the randomized controller should pick several trees"
