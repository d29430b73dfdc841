"""The attention mixers on their own and inside the `Attention` layer, checked against numpy.

Everything here runs under the strict rank-promotion setting of conftest.py and never builds
a whole Transformer (tests/test_model.py does that).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ablate import attention
from ablate.attention import (
    MIXERS,
    Fixed,
    Frozen,
    GaussianConfig,
    MixerSettings,
    RandomTableConfig,
    default_gaussian_offsets,
    make_mixer,
    masked_softmax,
    variant_names,
    variant_problem,
)
from ablate.config import ConfigError
from ablate.model import Attention, visibility

B, L, D, H = 2, 8, 16, 4
K = D // H
N_VALID = 5  # the second sequence of the batch is padded after this many tokens
PATTERN_VARIANTS = [name for name, cls in MIXERS.items() if cls.has_pattern]
MASKS = ("causal", "causal_padded", "bidirectional_padded")


def settings(causal: bool = True, **kwargs) -> MixerSettings:
    return MixerSettings(d_model=D, head_dim=K, max_len=L, causal=causal, **kwargs)


def valid_BL() -> jax.Array:
    return jnp.asarray([[True] * L, [True] * N_VALID + [False] * (L - N_VALID)])


def mask(kind: str) -> jax.Array:
    """visible_BLS for a mask kind of MASKS."""
    if kind == "causal":
        return visibility(L, True, None, B)
    return visibility(L, kind == "causal_padded", valid_BL(), B)


def inputs(seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, L, D))


def reference_softmax(scores_BHLS: np.ndarray, visible_BLS: np.ndarray) -> np.ndarray:
    """Softmax over visible positions in float64, zero elsewhere (and in rows seeing nothing)."""
    visible_B1LS = visible_BLS[:, None]
    scores_BHLS = np.where(visible_B1LS, scores_BHLS, -np.inf)
    top_BHL1 = np.where(visible_B1LS.any(-1, keepdims=True), scores_BHLS.max(-1, keepdims=True), 0)
    weights_BHLS = np.exp(scores_BHLS - top_BHL1)
    return weights_BHLS / np.maximum(weights_BHLS.sum(-1, keepdims=True), 1e-300)


def scored(visible_BLS) -> np.ndarray:
    """(B, L): query rows that see at least one position (padded queries may see none)."""
    return np.asarray(visible_BLS).any(-1)


def test_registry_names_and_flags():
    assert variant_names() == list(MIXERS)
    assert set(MIXERS) == {
        "learned",
        "uniform",
        "random_fixed",
        "frozen",
        "synthesizer",
        "gaussian",
        "none",
        "fourier",
    }
    assert [n for n, m in MIXERS.items() if not m.has_pattern] == ["fourier"]
    assert [n for n, m in MIXERS.items() if not m.supports_causal] == ["fourier"]


def test_visibility_masks():
    causal = np.asarray(mask("causal"))
    np.testing.assert_array_equal(causal[1], np.tril(np.ones((L, L), bool)))
    for kind, allowed_LS in (("causal_padded", causal[0]), ("bidirectional_padded", True)):
        visible = np.asarray(mask(kind))
        np.testing.assert_array_equal(visible[0], np.ones((L, L), bool) & allowed_LS)
        # Valid queries see exactly the valid keys they are allowed to.
        expected = (np.ones((L, L), bool) & allowed_LS)[:N_VALID, :N_VALID]
        np.testing.assert_array_equal(visible[1, :N_VALID, :N_VALID], expected)
        # No query sees a padded key (a padded query may see itself).
        seen_padding = visible[1, :, N_VALID:] & ~np.eye(L, dtype=bool)[:, N_VALID:]
        assert not seen_padding.any()


def assert_rows_are_distributions(probs_BHLS: np.ndarray, visible_BLS: np.ndarray) -> None:
    """Rows sum to one over visible positions (rows that see nothing are all zero)."""
    assert np.isfinite(probs_BHLS).all()
    assert (probs_BHLS >= 0).all()
    assert scored(visible_BLS)[:, :N_VALID].all()
    row_sums_BHL = np.broadcast_to(scored(visible_BLS)[:, None], probs_BHLS.shape[:3])
    np.testing.assert_allclose(probs_BHLS.sum(-1), row_sums_BHL, atol=1e-5)
    hidden_BHLS = np.broadcast_to(~visible_BLS[:, None], probs_BHLS.shape)
    assert hidden_BHLS.any()
    assert (probs_BHLS[hidden_BHLS] == 0).all()


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("name", PATTERN_VARIANTS)
def test_pattern_rows_are_distributions_over_visible_positions(name, kind):
    visible_BLS = mask(kind)
    mixer = make_mixer(name, H, settings(causal=kind != "bidirectional_padded"), nnx.Rngs(0))
    probs_BHLS = np.asarray(mixer.pattern(inputs(), visible_BLS))
    assert probs_BHLS.shape == (B, H, L, L)
    assert probs_BHLS.dtype == np.float32
    assert_rows_are_distributions(probs_BHLS, np.asarray(visible_BLS))


@pytest.mark.parametrize("name", PATTERN_VARIANTS)
def test_mix_agrees_with_pattern_applied_to_values(name):
    visible_BLS = mask("causal_padded")
    mixer = make_mixer(name, H, settings(), nnx.Rngs(1))
    x_BLD = inputs()
    v_BLHK = jax.random.normal(jax.random.key(2), (B, L, H, K))
    probs = np.asarray(mixer.pattern(x_BLD, visible_BLS), np.float64)
    expected_BLHK = np.einsum("BHLS,BSHK->BLHK", probs, np.asarray(v_BLHK, np.float64))
    out_BLHK = np.asarray(mixer.mix(x_BLD, v_BLHK, visible_BLS))
    assert out_BLHK.shape == (B, L, H, K)
    rows = scored(visible_BLS)  # rows that see nothing: test_learned_mix_of_a_row_seeing_nothing
    np.testing.assert_allclose(out_BLHK[rows], expected_BLHK[rows], atol=1e-5)


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("name", ["learned", "frozen"])
def test_learned_matches_reference_and_dot_product_attention(name, kind):
    visible_BLS = mask(kind)
    mixer = make_mixer(name, H, settings(causal=kind != "bidirectional_padded"), nnx.Rngs(3))
    x_BLD = inputs(4)
    v_BLHK = jax.random.normal(jax.random.key(5), (B, L, H, K))

    x, v = np.asarray(x_BLD, np.float64), np.asarray(v_BLHK, np.float64)
    q_BLHK = np.einsum("BLD,DHK->BLHK", x, np.asarray(mixer.w_q[...], np.float64))
    k_BSHK = np.einsum("BSD,DHK->BSHK", x, np.asarray(mixer.w_k[...], np.float64))
    scores_BHLS = np.einsum("BLHK,BSHK->BHLS", q_BLHK, k_BSHK) / np.sqrt(K)
    probs_BHLS = reference_softmax(scores_BHLS, np.asarray(visible_BLS))
    expected_BLHK = np.einsum("BHLS,BSHK->BLHK", probs_BHLS, v)

    # The patterns must be far from uniform, or this test could not tell the variants apart.
    uniform_BHLS = reference_softmax(np.zeros_like(scores_BHLS), np.asarray(visible_BLS))
    assert np.abs(probs_BHLS - uniform_BHLS).max() > 0.1

    np.testing.assert_allclose(mixer.pattern(x_BLD, visible_BLS), probs_BHLS, atol=1e-5)
    out_BLHK = np.asarray(mixer.mix(x_BLD, v_BLHK, visible_BLS))
    rows = scored(visible_BLS)
    np.testing.assert_allclose(out_BLHK[rows], expected_BLHK[rows], atol=1e-5)
    by_jax_BLHK = jax.nn.dot_product_attention(
        jnp.asarray(q_BLHK, jnp.float32),
        jnp.asarray(k_BSHK, jnp.float32),
        v_BLHK,
        mask=visible_BLS[:, None],
    )
    np.testing.assert_allclose(out_BLHK[rows], np.asarray(by_jax_BLHK)[rows], atol=1e-5)
    assert (out_BLHK[~rows] == 0).all()  # rows that see nothing are zero, as their pattern


def plain_masked_softmax(scores_BHLS, visible_BLS):
    """masked_softmax without its written-out derivative: JAX differentiates the ops."""
    visible_B1LS = visible_BLS[:, None]
    return jax.nn.softmax(jnp.where(visible_B1LS, scores_BHLS, -1e30), axis=-1) * visible_B1LS


@pytest.mark.parametrize("kind", MASKS)
def test_masked_softmax_derivatives_equal_those_of_the_plain_ops(kind):
    # A row that sees nothing too: its pattern is zero, and so must be its derivatives.
    visible_BLS = jnp.asarray(np.asarray(mask(kind)).copy()).at[1, 0].set(False)
    scores_BHLS = 3 * jax.random.normal(jax.random.key(0), (B, H, L, L))
    tangent_BHLS, cotangent_BHLS = jax.random.normal(jax.random.key(1), (2, B, H, L, L))
    for fn in (masked_softmax, plain_masked_softmax):
        assert not np.isnan(np.asarray(fn(scores_BHLS, visible_BLS))).any()

    def derivatives(fn):
        probs, jvp = jax.jvp(lambda s: fn(s, visible_BLS), (scores_BHLS,), (tangent_BHLS,))
        vjp = jax.vjp(lambda s: fn(s, visible_BLS), scores_BHLS)[1](cotangent_BHLS)[0]
        # Second order (a Hessian-vector product) goes through the written-out rule too.
        hvp = jax.jvp(
            jax.grad(lambda s: (fn(s, visible_BLS) * cotangent_BHLS).sum()),
            (scores_BHLS,),
            (tangent_BHLS,),
        )[1]
        return probs, jvp, vjp, hvp

    ours, plain = derivatives(masked_softmax), derivatives(plain_masked_softmax)
    assert np.abs(np.asarray(plain[2])).max() > 0.1  # the check could fail
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(ours[2][1, :, 0], 0)


def test_learned_mix_of_a_row_seeing_nothing_is_zero_like_its_pattern():
    visible_BLS = jnp.asarray(np.asarray(mask("causal")).copy()).at[1, L - 1].set(False)
    mixer = make_mixer("learned", H, settings(), nnx.Rngs(0))
    v_BLHK = jax.random.normal(jax.random.key(5), (B, L, H, K))
    np.testing.assert_array_equal(mixer.pattern(inputs(), visible_BLS)[1, :, L - 1], 0)
    np.testing.assert_allclose(mixer.mix(inputs(), v_BLHK, visible_BLS)[1, L - 1], 0, atol=1e-6)


def test_learned_pattern_depends_on_content_but_fixed_ones_do_not():
    visible_BLS = mask("causal")
    x1_BLD, x2_BLD = inputs(6), inputs(7)
    for name in PATTERN_VARIANTS:
        mixer = make_mixer(name, H, settings(), nnx.Rngs(0))
        change = np.abs(mixer.pattern(x1_BLD, visible_BLS) - mixer.pattern(x2_BLD, visible_BLS))
        if name in ("learned", "frozen"):
            assert change.max() > 1e-2, name
        else:
            assert change.max() == 0, name


@pytest.mark.parametrize("kind", MASKS)
def test_uniform_output_is_masked_mean_of_values(kind):
    visible_BLS = mask(kind)
    layer = Attention(("uniform",) * H, settings(kind != "bidirectional_padded"), nnx.Rngs(0))
    x_BLD = inputs()
    y_BLD, probs_BHLS, heads_BLHK = layer(x_BLD, visible_BLS, return_pattern=True)

    v_BLHK = np.einsum("BLD,DHK->BLHK", np.asarray(x_BLD), np.asarray(layer.w_v[...]))
    visible = np.asarray(visible_BLS)
    expected_BLHK = np.zeros_like(v_BLHK)
    for b in range(B):
        for i in range(L):
            if visible[b, i].any():
                expected_BLHK[b, i] = v_BLHK[b, visible[b, i]].mean(axis=0)
    np.testing.assert_allclose(heads_BLHK, expected_BLHK, atol=1e-5)
    weights_BLS = visible / np.maximum(visible.sum(-1, keepdims=True), 1)
    np.testing.assert_allclose(
        probs_BHLS, np.broadcast_to(weights_BLS[:, None], (B, H, L, L)), atol=1e-7
    )
    expected_BLD = np.einsum("BLHK,HKD->BLD", expected_BLHK, np.asarray(layer.w_o[...]))
    np.testing.assert_allclose(y_BLD, expected_BLD, atol=1e-5)


@pytest.mark.parametrize("kind", MASKS)
def test_none_output_is_the_tokens_own_value(kind):
    layer = Attention(("none",) * H, settings(kind != "bidirectional_padded"), nnx.Rngs(0))
    x_BLD = inputs()
    _, probs_BHLS, heads_BLHK = layer(x_BLD, mask(kind), return_pattern=True)
    v_BLHK = np.einsum("BLD,DHK->BLHK", np.asarray(x_BLD), np.asarray(layer.w_v[...]))
    rows = scored(mask(kind))
    np.testing.assert_allclose(heads_BLHK, v_BLHK * rows[:, :, None, None], atol=1e-5)
    eye_BLS = np.eye(L) * rows[:, :, None]
    np.testing.assert_array_equal(probs_BHLS, np.broadcast_to(eye_BLS[:, None], (B, H, L, L)))


@pytest.mark.parametrize("name", ["random_fixed", "synthesizer"])
def test_random_table_pattern_is_softmax_of_its_table(name):
    config = MIXERS[name].Config(scale=2.0)
    mixer = make_mixer(name, H, settings(), nnx.Rngs(0), config)
    table_HLS = np.asarray(mixer.logits[...], np.float64)
    assert table_HLS.shape == (H, L, L)
    assert 1.5 < table_HLS.std() < 2.5  # drawn with scale = 2
    visible_BLS = mask("causal_padded")
    expected_BHLS = reference_softmax(
        np.broadcast_to(table_HLS[None], (B, H, L, L)), np.asarray(visible_BLS)
    )
    np.testing.assert_allclose(mixer.pattern(inputs(), visible_BLS), expected_BHLS, atol=1e-5)
    # A shorter sequence uses the top-left corner of the table.
    short_visible_BLS = visibility(5, True, None, B)
    short_BHLS = mixer.pattern(inputs()[:, :5], short_visible_BLS)
    expected_short_BHLS = reference_softmax(
        np.broadcast_to(table_HLS[None, :, :5, :5], (B, H, 5, 5)), np.asarray(short_visible_BLS)
    )
    np.testing.assert_allclose(short_BHLS, expected_short_BHLS, atol=1e-5)


def test_default_gaussian_offsets():
    assert default_gaussian_offsets(4, causal=True) == (0, -1, -2, -3)
    assert default_gaussian_offsets(5, causal=False) == (0, -1, 1, -2, 2)
    assert default_gaussian_offsets(1, causal=False) == (0,)


@pytest.mark.parametrize(
    "causal, offsets, expected",
    [
        (True, (), (0, -1, -2, -3)),
        (False, (), (0, -1, 1, -2)),
        (False, (2, -3), (2, -3, 2, -3)),
        (False, (1, 0, -1, 3, 5), (1, 0, -1, 3)),
    ],
)
def test_gaussian_pattern_peaks_at_i_plus_offset(causal, offsets, expected):
    sigma = 1.5
    config = GaussianConfig(sigma=sigma, offsets=offsets)
    mixer = make_mixer("gaussian", H, settings(causal), nnx.Rngs(0), config)
    assert mixer.offsets == expected
    visible_BLS = visibility(L, causal, None, B)
    probs_BHLS = np.asarray(mixer.pattern(inputs(), visible_BLS))
    checked = 0
    for h, offset in enumerate(expected):
        for i in range(L):
            if 0 <= i + offset < L and (not causal or offset <= 0):
                assert probs_BHLS[0, h, i].argmax() == i + offset
                checked += 1
    assert checked >= 2 * L
    pos = np.arange(L)
    dist_HLS = pos[None, None, :] - (pos[None, :, None] + np.asarray(expected)[:, None, None])
    expected_BHLS = reference_softmax(
        np.broadcast_to(-0.5 * (dist_HLS / sigma) ** 2, (B, H, L, L)), np.asarray(visible_BLS)
    )
    np.testing.assert_allclose(probs_BHLS, expected_BHLS, atol=1e-6)


def test_fourier_is_refused_for_causal_models():
    assert variant_problem("fourier", causal=False) is None
    problem = variant_problem("fourier", causal=True)
    assert "fourier" in problem and "causal" in problem
    with pytest.raises(ConfigError) as info:
        make_mixer("fourier", H, settings(causal=True), nnx.Rngs(0))
    assert info.value.problems == [("attention", problem)]


def test_unknown_variant_is_refused_with_the_valid_names():
    problem = variant_problem("lerned", causal=True)
    assert "'lerned'" in problem
    assert all(name in problem for name in MIXERS)
    with pytest.raises(ConfigError, match="lerned"):
        make_mixer("lerned", H, settings(), nnx.Rngs(0))


def test_fourier_mixes_positions_and_features():
    mixer = make_mixer("fourier", H, settings(causal=False), nnx.Rngs(0))
    visible_BLS = visibility(L, False, None, B)
    with pytest.raises(TypeError, match="has_pattern"):
        mixer.pattern(inputs(), visible_BLS)

    # A constant signal over positions and features goes to frequency (0, 0) only.
    v_BLHK = jnp.full((B, L, H, K), 3.0)
    out = np.array(mixer.mix(inputs(), v_BLHK, visible_BLS))
    assert out.shape == (B, L, H, K)
    np.testing.assert_allclose(out[:, 0, :, 0], 3.0 * np.sqrt(L * K), rtol=1e-5)
    out[:, 0, :, 0] = 0
    np.testing.assert_allclose(out, 0, atol=1e-5)

    # Re(F_L v F_K) written out with cos/sin matrices, independently of jnp.fft.
    def dft_parts(n):
        angle = 2 * np.pi * np.outer(np.arange(n), np.arange(n)) / n
        return np.cos(angle) / np.sqrt(n), np.sin(angle) / np.sqrt(n)

    (cos_L, sin_L), (cos_K, sin_K) = dft_parts(L), dft_parts(K)
    noise_BLHK = jax.random.normal(jax.random.key(0), (B, L, H, K))
    v = np.asarray(noise_BLHK, np.float64)
    expected_BLHK = np.einsum("ML,BLHK,KN->BMHN", cos_L, v, cos_K) - np.einsum(
        "ML,BLHK,KN->BMHN", sin_L, v, sin_K
    )
    base_BLHK = mixer.mix(inputs(), noise_BLHK, visible_BLS)
    np.testing.assert_allclose(base_BLHK, expected_BLHK, atol=1e-5)
    # The first token reaches every position.
    moved_BLHK = mixer.mix(inputs(), noise_BLHK.at[:, 0].add(1.0), visible_BLS)
    assert (np.abs(moved_BLHK - base_BLHK).max(axis=(2, 3)) > 1e-3).all()


def test_fourier_ignores_padded_positions():
    mixer = make_mixer("fourier", H, settings(causal=False), nnx.Rngs(0))
    visible_BLS = mask("bidirectional_padded")
    # A constant over the N_VALID real positions: frequency (0, 0) gets sum / sqrt(L K).
    v_BLHK = jnp.full((B, L, H, K), 3.0)
    out = np.asarray(mixer.mix(inputs(), v_BLHK, visible_BLS))
    np.testing.assert_allclose(out[1, 0, :, 0], 3.0 * N_VALID * np.sqrt(K / L), rtol=1e-5)

    noise_BLHK = jax.random.normal(jax.random.key(0), (B, L, H, K))
    pad_BL11 = (~valid_BL())[:, :, None, None]
    changed_BLHK = jnp.where(pad_BL11, 100.0 * noise_BLHK, noise_BLHK)
    np.testing.assert_allclose(
        mixer.mix(inputs(), changed_BLHK, visible_BLS)[:, :N_VALID],
        mixer.mix(inputs(), noise_BLHK, visible_BLS)[:, :N_VALID],
        atol=1e-5,
    )


def test_freezing_is_by_variable_type():
    assert not issubclass(Fixed, nnx.Param) and not issubclass(Frozen, nnx.Param)
    learned = make_mixer("learned", H, settings(), nnx.Rngs(0))
    frozen = make_mixer("frozen", H, settings(), nnx.Rngs(0))
    fixed = make_mixer("random_fixed", H, settings(), nnx.Rngs(0))
    synth = make_mixer("synthesizer", H, settings(), nnx.Rngs(0))
    assert type(learned.w_q) is nnx.Param and type(learned.w_k) is nnx.Param
    assert type(frozen.w_q) is Frozen and type(frozen.w_k) is Frozen
    assert type(fixed.logits) is Fixed
    assert type(synth.logits) is nnx.Param
    assert len(jax.tree.leaves(nnx.state(frozen, nnx.Param))) == 0
    assert len(jax.tree.leaves(nnx.state(fixed, nnx.Param))) == 0
    assert len(jax.tree.leaves(nnx.state(frozen, Frozen))) == 2
    assert len(jax.tree.leaves(nnx.state(synth, nnx.Param))) == 1
    # Same seed, same draws: only the variable type differs.
    np.testing.assert_array_equal(learned.w_q[...], frozen.w_q[...])
    np.testing.assert_array_equal(fixed.logits[...], synth.logits[...])


@pytest.mark.parametrize("fused", [True, False])
def test_head_outputs_projected_and_summed_give_the_layer_output(fused):
    layer = Attention(("learned", "learned", "uniform", "gaussian"), settings(), nnx.Rngs(0))
    x_BLD = inputs()
    y_BLD, probs, heads_BLHK = layer(x_BLD, mask("causal_padded"), fused=fused)
    assert probs is None
    per_head_HBLD = [
        np.asarray(heads_BLHK[:, :, h]) @ np.asarray(layer.w_o[...][h]) for h in range(H)
    ]
    np.testing.assert_allclose(y_BLD, sum(per_head_HBLD), atol=1e-5)
    assert min(np.abs(p).max() for p in per_head_HBLD) > 1e-2


@pytest.mark.parametrize("kernel", [True, False], ids=["dot_product_attention", "pattern_path"])
def test_fused_and_pattern_paths_of_a_layer_agree(kernel, monkeypatch):
    # The fused path is jax.nn.dot_product_attention on accelerators and the pattern path
    # on a CPU: both are checked here, on the CPU, against patterns asked for explicitly.
    monkeypatch.setattr(attention, "uses_attention_kernel", lambda: kernel)
    layer = Attention(("learned", "learned", "frozen", "none"), settings(), nnx.Rngs(0))
    x_BLD, visible_BLS = inputs(), mask("causal_padded")
    y_fused, _, heads_fused = layer(x_BLD, visible_BLS, fused=True)
    y_plain, probs_BHLS, heads_plain = layer(x_BLD, visible_BLS, fused=False, return_pattern=True)
    assert probs_BHLS.shape == (B, H, L, L)
    rows = scored(visible_BLS)
    np.testing.assert_allclose(np.asarray(y_fused)[rows], np.asarray(y_plain)[rows], atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(heads_fused)[rows], np.asarray(heads_plain)[rows], atol=1e-5
    )


def test_mixed_heads_match_single_variant_heads():
    variants = ("gaussian", "gaussian", "uniform", "none")
    layer = Attention(variants, settings(), nnx.Rngs(0))
    assert layer.head_groups == ((0, 2), (2, 1), (3, 1))
    assert [type(m) for m in layer.mixers] == [
        MIXERS["gaussian"],
        MIXERS["uniform"],
        MIXERS["none"],
    ]
    assert layer.has_pattern_H == (True,) * H
    x_BLD, visible_BLS = inputs(), mask("causal_padded")
    _, probs_BHLS, _ = layer(x_BLD, visible_BLS, return_pattern=True)
    for h, name in enumerate(variants):
        single = make_mixer(name, H, settings(), nnx.Rngs(1))
        np.testing.assert_allclose(
            probs_BHLS[:, h], single.pattern(x_BLD, visible_BLS)[:, h], atol=1e-6, err_msg=name
        )
    # The heads really differ, so the comparison above can fail.
    assert np.abs(probs_BHLS[:, 1] - probs_BHLS[:, 2]).max() > 0.1
    assert np.abs(probs_BHLS[:, 2] - probs_BHLS[:, 3]).max() > 0.1


def test_mixed_layer_with_fourier_heads_reports_zero_patterns():
    variants = ("fourier", "fourier", "learned", "learned")
    layer = Attention(variants, settings(causal=False), nnx.Rngs(0))
    assert layer.has_pattern_H == (False, False, True, True)
    visible_BLS = mask("bidirectional_padded")
    y_BLD, probs_BHLS, heads_BLHK = layer(inputs(), visible_BLS, return_pattern=True)
    np.testing.assert_array_equal(probs_BHLS[:, :2], 0)
    assert_rows_are_distributions(np.asarray(probs_BHLS[:, 2:]), np.asarray(visible_BLS))
    assert np.isfinite(np.asarray(y_BLD)).all()
    expected = layer.mixers[1].pattern(inputs(), visible_BLS)
    np.testing.assert_allclose(probs_BHLS[:, 2:], expected, atol=1e-6)


def test_attention_layer_jit_equals_eager():
    layer = Attention(
        ("learned", "synthesizer", "random_fixed", "gaussian"), settings(), nnx.Rngs(0)
    )
    x_BLD, visible_BLS = inputs(), mask("causal_padded")
    graphdef, state = nnx.split(layer)

    @jax.jit
    def forward(state, x_BLD, visible_BLS):
        return nnx.merge(graphdef, state)(x_BLD, visible_BLS, return_pattern=True)[:2]

    y_jit, probs_jit = forward(state, x_BLD, visible_BLS)
    y_eager, probs_eager, _ = layer(x_BLD, visible_BLS, return_pattern=True)
    np.testing.assert_allclose(y_jit, y_eager, atol=1e-5)
    np.testing.assert_allclose(probs_jit, probs_eager, atol=1e-6)


def test_what_a_mixer_keeps_at_init_and_its_flops_follow_its_variable_types():
    made = {name: make_mixer(name, H, settings(causal=False), nnx.Rngs(0)) for name in MIXERS}
    kept = {name: m.kept_at_init() for name, m in made.items()}
    assert kept == {name: () for name in MIXERS} | {
        "frozen": ("W_q", "W_k"),
        "random_fixed": ("random pattern",),
    }
    qk = 2 * D * H * K  # W_q and W_k
    per_mix = H * L * K
    flops = {name: m.flops_per_token(L) for name, m in made.items()}
    assert flops["learned"] == 6 * qk + 12 * per_mix
    assert flops["frozen"] == 4 * qk + 12 * per_mix  # frozen weights get no gradient
    assert flops["synthesizer"] == 6 * per_mix and flops["random_fixed"] == 4 * per_mix
    assert flops["fourier"] == 0
    # The same class with its table turned Frozen (as in a frozen layer) counts one less term.
    synth = made["synthesizer"]
    synth.logits = Frozen(synth.logits[...])
    assert synth.flops_per_token(L) == 4 * per_mix
    assert synth.kept_at_init() == ("random pattern",)


def test_variant_settings_are_validated_and_typed():
    with pytest.raises(ConfigError) as info:
        GaussianConfig(sigma=0.0)
    assert info.value.problems[0][0] == "sigma"
    with pytest.raises(ConfigError):
        RandomTableConfig(scale=-1.0)
    with pytest.raises(TypeError, match="GaussianConfig"):
        make_mixer("gaussian", H, settings(), nnx.Rngs(0), RandomTableConfig())
