"""The one sampler of preferences (dymu.preference): seeded, exact, and the draws training
has always made (so the same seed still gives the same run)."""

from __future__ import annotations

import pytest
import torch

from dymu.preference import (
    sample_preference,
    sample_preferences,
    sample_simplex,
    standard_gamma,
)


def _reference_gamma(concentration: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # torch's own seeded sampler (private): here only, as the record of the draws runs made.
    return torch._standard_gamma(concentration, generator=g)


@pytest.mark.parametrize("eta", [0.05, 0.2, 1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standard_gamma_draws_what_the_generator_itself_draws(
    eta: float, dtype: torch.dtype
) -> None:
    conc = torch.full((50, 4), eta, dtype=dtype)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert torch.equal(standard_gamma(conc, g1), _reference_gamma(conc, g2))
    # ... and leaves the generator where its own draw would: the next numbers agree too.
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))


def test_standard_gamma_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(3)
    before = torch.get_rng_state()
    standard_gamma(torch.ones(10), torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)


def test_sample_preference_is_the_training_draw_of_every_seed() -> None:
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        r, c = sample_preference(3, 0.2, g)
        ref = torch.Generator().manual_seed(seed)
        gamma = _reference_gamma(torch.full((3,), 0.2), ref)
        assert torch.equal(r, gamma / gamma.sum())
        assert torch.equal(c, torch.rand((), generator=ref))


def test_sample_preferences_rows_are_on_the_simplex_and_repeatable() -> None:
    a = sample_preferences(4, 300, seed=5)
    assert a == sample_preferences(4, 300, seed=5)
    assert a != sample_preferences(4, 300, seed=6)
    for r, c in a:
        assert abs(sum(r) - 1) < 1e-5 and min(r) >= 0 and 0 <= c < 1
    fixed = sample_preferences(4, 10, seed=5, c=0.5)
    assert {c for _, c in fixed} == {0.5}
    assert [r for r, _ in fixed] == [r for r, _ in a[:10]]


def test_eta_sets_the_concentration() -> None:
    """Dir(eta): E[r_i] = 1/N; Var r_i = (N-1) / (N^2 (N eta + 1)) falls as eta grows."""
    g = torch.Generator().manual_seed(0)
    for eta in (0.2, 5.0):
        r = sample_simplex(3, eta, g, count=20_000)
        assert torch.allclose(r.mean(0), torch.full((3,), 1 / 3), atol=0.01)
        expected = 2 / (9 * (3 * eta + 1))
        assert r.var(0).mean().item() == pytest.approx(expected, rel=0.05)
