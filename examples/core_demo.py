"""End-to-end tour of dymu's core on a randomly initialized model (what `make demo` runs).

Builds the default scenes model (small_resnet, 3 dense tasks, 96x128), saves it through the
store, loads it back (every checksum verified), then for a few preferences (r, c) shows the tree
the edge hypernet picks, its analytic cost, and checks that the materialized tree computes what
the soft forward computes and what FlopCounterMode counts. Until a trained model ships, the
trees come from an untrained controller: the point is the machinery, not the choices.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import dymu
from dymu.config import ModelConfig, dense_tasks


def main() -> None:
    torch.manual_seed(0)
    model = dymu.create_model(ModelConfig(tasks=dense_tasks()))
    with tempfile.TemporaryDirectory() as tmp:
        vdir = dymu.save(model, Path(tmp) / "scenes-random", training={"command": "demo"})
        model = dymu.load(Path(tmp) / "scenes-random", device="auto")
        print(
            f"saved and verified {vdir.name}: tasks {model.tasks}, N={model.n_tasks}, "
            f"L={model.n_layers}, input {model.input_size}"
        )
    anchor = model.anchor_cost()
    print(
        f"full anchor: {anchor.gflops:.3f} GFLOPs/image (1 MAC = 2 FLOPs), "
        f"{anchor.params:,} params; controller {model.control_params:,} params\n"
    )
    x = torch.randn(1, 3, *model.input_size, device=model.device)
    print(
        f"{'r':<20} {'c':>4}  {'tree (parents/layer)':<22} {'GFLOPs':>7} {'of anchor':>9} "
        f"{'materialize':>11}  check"
    )
    for r, c in [([1, 1, 1], 0.0), ([1, 1, 1], 1.0), ([0.8, 0.1, 0.1], 0.5), ([0, 0, 1], 1.0)]:
        t0 = time.perf_counter()
        net = model.materialize(r, c)
        t_mat = time.perf_counter() - t0
        arch = net.architecture
        nu = arch.one_hot_nu(x.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = net(x)
        with torch.no_grad():
            ref = model(x, nu, model.bn_deltas(r, c))
        diff = max((out[k] - ref[k]).abs().max().item() for k in out)
        cost = net.cost()
        ok = diff < 1e-4 and counter.get_total_flops() == cost.flops
        tree = " ".join("".join(map(str, row)) for row in arch.parents)
        print(
            f"{r!s:<20} {c:>4}  {tree:<22} {cost.gflops:>7.3f} {cost.fraction_of(anchor):>9.0%} "
            f"{t_mat * 1e3:>9.1f}ms  {'ok' if ok else 'MISMATCH'} (max diff {diff:.1e})"
        )
        if not ok:
            raise SystemExit("materialized model disagrees with the soft forward or FLOP count")
    shared = model.cost(dymu.Architecture.fully_shared(model.n_tasks, model.n_layers))
    print(
        f"\nfully shared tree: {shared.gflops:.3f} GFLOPs ({shared.fraction_of(anchor):.0%} of "
        "the anchor) — the floor that sharing can reach."
    )


if __name__ == "__main__":
    main()
