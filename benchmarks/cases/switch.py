"""Case 3: what a preference switch costs, part by part, against one predict call.

Parts (each round uses a new random preference, so nothing is cached by accident):

* ``hypernets``: ``model.controller``: edge hypernet -> arg-max tree and the weight hypernet's
  features, in one pass (the BN deltas themselves are one matmul inside the folding);
* ``materialize``: the whole switch in torch, ``model.materialize(r, c)`` = hypernets + the
  tree's skeleton (kept per tree) + BN deltas + folding of the adapted convs, on a frozen model
  (``model.freeze()``: the service's, whose weights never change);
* ``materialize, unfrozen``: the same on a model whose weights may still change (a script's
  or a trainer's): every switch also reads every anchor and head tensor's version counter;
* ``onnx weights``: feeding a preference's folded weights to its tree's existing ONNX session
  (``OnnxSession.weights``: what a switch adds when the tree was seen before);
* ``onnx export + session``: a tree seen for the first time (``export_onnx`` + ``OnnxSession``,
  the service's code; the service does it on a background thread and serves torch meanwhile);
* ``cache hit``: the service's canonical key of (r, c) + ``PreferenceCache.get``.

Predict = one image at batch 1 through the served tree, on torch and on ONNX Runtime.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from dymu.preference import sample_preferences

from ..config import size_label
from ..nets import hand_made_trees, materialize
from ..registry import Context, register_case
from ..report import fmt, table
from ..timing import interleave, paired_ratio, summarize

PARTS = ("hypernets", "materialize", "materialize, unfrozen", "onnx weights", "cache hit")
#: Issue 15, item 1: ``model.materialize`` for a new preference / one torch predict of its tree.
MATERIALIZE_GOALS = {"96x128": 0.25, "288x384": 0.1}


def served_preference(n: int) -> tuple[list[float], float]:
    """The preference the service benchmarks use: (0.6, 0.3, 0.1), c = 0.5 for N = 3."""
    if n == 3:
        return [0.6, 0.3, 0.1], 0.5
    w = np.arange(n, 0, -1, dtype=float)
    return list(w / w.sum()), 0.5


def random_preferences(n: int, count: int, seed: int) -> list[tuple[list[float], float]]:
    return sample_preferences(n, count, seed)


def onnx_ok() -> bool:
    from service.backends import onnx_available

    return onnx_available()


def _torch_variants(
    model: Any, net: Any, x: torch.Tensor, r: list[float], c: float, seed: int
) -> dict[str, Any]:
    """The parts timed in torch, each a call on a new random preference (but the cache hit)."""
    from dymu.preference import canonicalize
    from service.cache import PreferenceCache

    prefs = itertools.cycle(random_preferences(model.n_tasks, 64, seed))

    def hypernets() -> None:  # both hypernets, as materialize runs them (one pass)
        pr, pc = next(prefs)
        model.controller(model.preference(pr, pc))

    def switch() -> None:
        pr, pc = next(prefs)
        model.materialize(pr, pc)

    def switch_unfrozen() -> None:
        pr, pc = next(prefs)
        model.unfreeze()
        try:
            model.materialize(pr, pc)
        finally:
            model.freeze()

    cache: PreferenceCache = PreferenceCache(64, 2**30)
    _, key = canonicalize(r, c, model.tasks)
    cache.put(key, SimpleNamespace(nbytes=0))

    def cache_hit() -> None:
        _, k = canonicalize(r, c, model.tasks)
        assert cache.get(k) is not None

    return {
        "hypernets": hypernets,
        "materialize": switch,
        "materialize, unfrozen": switch_unfrozen,
        "cache hit": cache_hit,
        "predict torch": lambda: net(x),
    }


def _sample(ctx: Context, net: Any, x: torch.Tensor, hw: tuple[int, int], variants: dict) -> dict:
    """Every part's samples, in interleaved rounds; with ONNX Runtime, its predict and weights
    too, and a new tree's export + session against its predict in rounds of their own."""
    from service.backends import OnnxSession, export_onnx

    cfg, session = ctx.config, None
    if onnx_ok():
        session = OnnxSession(export_onnx(net, hw), ctx.device, cfg.threads)
        weights = session.weights(net)
        xn = x.cpu().numpy()
        variants["onnx weights"] = lambda: session.weights(net)
        variants["predict onnx"] = lambda: session.run(xn, weights)
    number = {"cache hit": 200}
    with torch.no_grad():
        samples = interleave(variants, cfg.switch_rounds, warmup=1, number=number, sync=ctx.sync)
        if session is None:
            return samples
        trees = itertools.cycle(hand_made_trees(ctx.model))  # first sight of a tree each round
        fresh = iter([materialize(ctx.model, next(trees)) for _ in range(cfg.export_rounds + 1)])
        export = {
            "onnx export + session": lambda: OnnxSession(
                export_onnx(next(fresh), hw), ctx.device, cfg.threads
            ),
            "predict onnx": variants["predict onnx"],
        }
        extra = interleave(export, cfg.export_rounds, warmup=1, sync=ctx.sync)
    samples["onnx export + session"] = extra["onnx export + session"]
    samples["predict onnx (export rounds)"] = extra["predict onnx"]
    return samples


def measure_size(ctx: Context, size: str) -> dict[str, Any]:
    model, hw = ctx.model, ctx.hw(size)
    x = ctx.images(1, hw)
    r, c = served_preference(model.n_tasks)
    with torch.no_grad():
        net = model.materialize(r, c)
    samples = _sample(ctx, net, x, hw, _torch_variants(model, net, x, r, c, ctx.config.seed))
    served = "predict onnx" if "predict onnx" in samples else "predict torch"
    ratios: dict[str, float] = {}
    for part in (*PARTS, "onnx export + session"):
        if part not in samples:
            continue
        ref = "predict onnx (export rounds)" if part == "onnx export + session" else served
        ratios[part] = paired_ratio(samples[part], samples[ref])
    # materialize = hypernets + (tree + BN deltas + folding): the second part, per round
    tree_part = [m - h for m, h in zip(samples["materialize"], samples["hypernets"], strict=True)]
    derived = {"tree + BN deltas + folding (materialize - hypernets)": tree_part}
    for name, s in derived.items():
        ratios[name] = paired_ratio(s, samples[served])
    weights_s = samples.get("onnx weights", [0.0] * len(samples["materialize"]))
    switch_s = [m + w for m, w in zip(samples["materialize"], weights_s, strict=True)]
    torch_predict = samples["predict torch"]
    return {
        "size": size_label(hw),
        "served_backend": served.removeprefix("predict "),
        "preference": {"r": r, "c": c},
        "parts": {name: summarize(s) for name, s in {**samples, **derived}.items()},
        "over_predict": ratios,
        "switch_over_predict": paired_ratio(switch_s, samples[served]),
        "materialize_over_predict_torch": paired_ratio(samples["materialize"], torch_predict),
        "materialize_unfrozen_over_predict_torch": paired_ratio(
            samples["materialize, unfrozen"], torch_predict
        ),
        "materialize_goal": MATERIALIZE_GOALS.get(size_label(hw)),
        "switch_definition": "materialize (+ onnx weights when ONNX serves) / predict, per round",
        "samples_s": samples,
    }


def run(ctx: Context) -> dict[str, Any]:
    sizes = []
    was_frozen = ctx.model.frozen
    ctx.model.freeze()  # as the service serves it
    try:
        for size in ctx.config.switch_sizes:
            ctx.log(f"  switch at {size}")
            sizes.append(measure_size(ctx, size))
    finally:
        if not was_frozen:
            ctx.model.unfreeze()
    return {"sizes": sizes}


def markdown(result: dict[str, Any]) -> str:
    parts = []
    for s in result["sizes"]:
        goal = s.get("materialize_goal")
        parts.append(
            f"**predict at {s['size']}, batch 1** (served backend: {s['served_backend']}; "
            f"switch / predict = **{s['switch_over_predict']:.2f}**; `model.materialize` / "
            f"torch predict = **{s['materialize_over_predict_torch']:.3f}**"
            + (f", goal <= {goal:g}" if goal is not None else "")
            + f"; unfrozen {s['materialize_unfrozen_over_predict_torch']:.3f})\n"
        )
        rows = [
            [name, fmt(p["median_ms"], 3), fmt(s["over_predict"].get(name), 3)]
            for name, p in s["parts"].items()
        ]
        parts.append(table(["part", "median ms", f"/ predict {s['served_backend']}"], rows))
    return "\n".join(parts)


register_case("switch", 3, "Preference switch vs one predict", markdown)(run)
