"""Alignment, entropy, distance and context dependence against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablate.metrics import (
    attention_metrics,
    context_dependence,
    mean_interval,
    paired_dependence,
    uniform_alignment,
    uniform_entropy,
)
from ablate.model import visibility


def test_alignment_counts_context_positions_only():
    # One sequence of length 3, one scored row (i = 2) depending on j = 0 and on itself.
    deps = jnp.zeros((1, 3, 3), bool).at[0, 2, 0].set(True).at[0, 2, 2].set(True)
    weights = jnp.zeros((1, 3)).at[0, 2].set(1.0)
    probs = jnp.stack(
        [
            jnp.eye(3),  # head 0: only itself
            jnp.array([[1, 0, 0], [1, 0, 0], [0.7, 0.1, 0.2]]),  # head 1: 0.7 on j = 0
        ]
    )[None]
    out = attention_metrics(probs, deps, weights)
    np.testing.assert_allclose(out["alignment"], [0.0, 0.7], atol=1e-6)
    # Entropy of head 1 averaged over the 3 rows: rows 0 and 1 are one-hot.
    h = -(0.7 * np.log(0.7) + 0.1 * np.log(0.1) + 0.2 * np.log(0.2)) / 3
    np.testing.assert_allclose(out["entropy"], [0.0, h], rtol=1e-5)
    # Distance of head 1: row 1 looks 1 back, row 2 looks 0.7 * 2 + 0.1 * 1 back.
    np.testing.assert_allclose(out["distance"], [0.0, (1 + 1.5) / 3], rtol=1e-5)


def test_uniform_alignment_matches_uniform_pattern():
    L = 5
    deps = jnp.zeros((2, L, L), bool).at[:, 4, 1].set(True).at[:, 3, 0].set(True)
    weights = jnp.zeros((2, L)).at[:, 3:].set(1.0)
    visible = visibility(L, True, None, 2)
    probs = (visible / visible.sum(-1, keepdims=True))[:, None]
    from_pattern = attention_metrics(probs, deps, weights)["alignment"][0]
    expected = (1 / 4 + 1 / 5) / 2
    np.testing.assert_allclose(uniform_alignment(deps, visible, weights), expected, rtol=1e-6)
    np.testing.assert_allclose(from_pattern, expected, rtol=1e-6)


def test_uniform_entropy_is_the_entropy_of_a_uniform_pattern_averaged_as_entropy_is():
    # Causal, length 4; the second sequence is padded after 2 tokens (its padded queries see
    # nothing and do not count, as in attention_metrics).
    valid = jnp.array([[True] * 4, [True, True, False, False]])
    visible = visibility(4, True, valid, 2)
    probs = visible / jnp.maximum(visible.sum(-1, keepdims=True), 1)
    from_pattern = attention_metrics(probs[:, None], jnp.eye(4, dtype=bool)[None], valid, valid)
    # Real queries see 1, 2, 3, 4 positions and 1, 2: mean log of those over 6 queries.
    expected = (2 * np.log(1) + 2 * np.log(2) + np.log(3) + np.log(4)) / 6
    np.testing.assert_allclose(uniform_entropy(visible, valid), expected, rtol=1e-6)
    np.testing.assert_allclose(from_pattern["entropy"], [expected], rtol=1e-6)
    # Without padding every query is real: causal (1..4 visible) differs from bidirectional.
    causal = uniform_entropy(visibility(4, True, None, 1))
    np.testing.assert_allclose(causal, np.log([1, 2, 3, 4]).mean(), rtol=1e-6)
    np.testing.assert_allclose(uniform_entropy(visibility(4, False, None, 1)), np.log(4))


def test_alignment_is_nan_without_context_dependencies():
    deps = jnp.eye(4, dtype=bool)[None]  # memorize: each target depends on itself only
    weights = jnp.ones((1, 4))
    out = attention_metrics(jnp.eye(4)[None, None], deps, weights)
    assert np.isnan(out["alignment"]).all()
    assert np.isnan(uniform_alignment(deps, visibility(4, True, None, 1), weights))


def test_context_dependence_formula():
    assert context_dependence(1.0, 0.25, 0.25) == 1.0
    assert context_dependence(0.9, 0.9, 0.1) == 0.0
    assert context_dependence(0.95, 0.55, 0.1) == pytest.approx(0.4 / 0.85)
    assert np.isnan(context_dependence(0.1, 0.1, 0.1))


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = [
        (i.low <= 0.3 <= i.high)
        for i in (mean_interval(rng.normal(0.3, 0.05, 5)) for _ in range(2000))
    ]
    assert 0.93 <= np.mean(hits) <= 0.97
    # The hand-written percentile bootstrap this replaced covered ~0.75 with 3 seeds: the
    # t-interval with 3 seeds is wider than the seeds' range.
    x = rng.normal(0.3, 0.05, 3)
    i = mean_interval(x)
    assert i.low < x.min() and i.high > x.max() and i.method == "t"


def test_no_interval_from_one_or_two_seeds_and_bca_only_from_eight():
    for x in ([0.5], [0.5, 0.7]):
        i = mean_interval(x)
        assert not i.has_interval and i.mean == pytest.approx(np.mean(x))
        assert "no interval" in i.describe()
    assert mean_interval([0.1, 0.2, 0.4]).describe() == "95% Student-t interval over 3 seeds"
    with pytest.raises(ValueError, match="needs >= 8"):
        mean_interval([0.1, 0.2, 0.3, 0.4], method="bca")
    x = np.random.default_rng(1).normal(0, 1, 12)
    bca = mean_interval(x, method="bca")
    assert bca.low < x.mean() < bca.high and "BCa" in bca.describe()
    assert mean_interval([0.2, None, float("nan"), 0.4, 0.3]).n == 3


def test_paired_dependence_uses_per_seed_differences():
    """Seed-to-seed spread shared by both variants cancels in the paired difference."""
    learned = {0: 0.9, 1: 0.6, 2: 0.75, 3: 0.8}
    variant = {s: a - 0.1 for s, a in learned.items()} | {9: 0.2}  # seed 9 has no partner
    out = paired_dependence(learned, variant, chance=0.1)
    assert out["seeds"] == [0, 1, 2, 3]
    assert out["difference"].low == pytest.approx(0.1) == out["difference"].high
    unpaired = mean_interval(list(learned.values()))
    assert unpaired.high - unpaired.low > 0.2  # what an unpaired comparison would carry
    assert out["dependence_per_seed"][1] == pytest.approx(0.1 / 0.5)
    assert np.isnan(paired_dependence({0: 0.1}, {0: 0.1}, 0.1)["dependence_per_seed"][0])


def test_an_interval_is_cut_to_the_range_of_the_quantity():
    x = [0.97, 1.0, 1.0, 0.99]
    free, cut = mean_interval(x), mean_interval(x, bounds=(0.0, 1.0))
    assert free.high > 1.0 and cut.high == 1.0 and cut.low == free.low


def test_descent_direction_on_scores_is_minus_the_softmax_chain_rule():
    """For a qk head, the direction is -dL/ds for p = softmax(s + mask); for any other head
    it is -dL/dp centred over the visible positions (a row-constant push does nothing)."""
    from ablate.attention import masked_softmax
    from ablate.metrics import descent_direction

    rng = np.random.default_rng(0)
    B, H, L = 2, 2, 5
    visible = visibility(L, True, None, B)
    scores = jnp.asarray(rng.normal(size=(B, H, L, L)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(B, H, L, L)), jnp.float32)  # dL/dp of L = sum(p * g)
    p = masked_softmax(scores, visible)
    expected = -jax.grad(lambda s: (masked_softmax(s, visible) * g).sum())(scores)
    got = descent_direction(g, p, visible, [True, True])
    np.testing.assert_allclose(got, expected * visible[:, None], atol=1e-6)
    centred = descent_direction(g, p, visible, [False, False])
    np.testing.assert_allclose((centred * visible[:, None]).sum(-1), 0.0, atol=1e-5)
    np.testing.assert_array_equal(centred * ~visible[:, None], 0.0)
    shifted = descent_direction(g + 3.0, p, visible, [False, False])  # a constant per row
    np.testing.assert_allclose(shifted, centred, atol=1e-5)


def test_gradient_alignment_is_the_share_of_the_positive_push_on_the_dependencies():
    deps = jnp.zeros((1, 3, 3), bool).at[0, 2, 0].set(True).at[0, 2, 2].set(True)
    weights = jnp.zeros((1, 3)).at[0, 2].set(1.0)
    direction = jnp.zeros((1, 2, 3, 3))
    direction = direction.at[0, 0, 2].set(jnp.array([0.3, 0.1, -0.4]))  # 0.3 of 0.4 on j = 0
    direction = direction.at[0, 1, 2].set(jnp.array([-0.2, 0.5, 0.9]))  # none on j = 0
    from ablate.metrics import gradient_alignment

    np.testing.assert_allclose(gradient_alignment(direction, deps, weights), [0.75, 0.0], atol=1e-6)
    # A head with no push anywhere has no share to report.
    assert np.isnan(gradient_alignment(jnp.zeros((1, 1, 3, 3)), deps, weights)).all()
