"""The encoder-decoder: shapes, decoder causality, cross-attention's view of the source,
source padding for every variant that serves cross-attention, and refused configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ablate.attention import MIXERS
from ablate.config import ConfigError, from_dict
from ablate.seq2seq import EncoderDecoder, Seq2SeqConfig, mixers_of

B, S, L, D, H = 2, 6, 5, 16, 4
V_SRC, V_TGT = 9, 7
N_VALID = 4  # real source positions; the rest is padding
CROSS_VARIANTS = [n for n, cls in MIXERS.items() if cls.supports_cross]


def config(**kwargs) -> Seq2SeqConfig:
    base = dict(
        vocab_size=V_TGT,
        seq_len=L,
        source_vocab_size=V_SRC,
        source_len=S,
        d_model=D,
        n_heads=H,
        n_layers=1,
        n_decoder_layers=2,
    )
    return Seq2SeqConfig(**(base | kwargs))


def build(cfg: Seq2SeqConfig, seed: int = 0):
    model = EncoderDecoder(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, source, tokens, source_valid):
        out = nnx.merge(graphdef, state)(
            source, tokens, source_valid_BS=source_valid, return_patterns=True
        )
        return out

    return model, lambda *a: run(state, *a)


def inputs(seed: int = 0):
    ks, kt = jax.random.split(jax.random.key(seed))
    source = jax.random.randint(ks, (B, S), 1, V_SRC)
    tokens = jax.random.randint(kt, (B, L), 1, V_TGT)
    valid = jnp.broadcast_to(jnp.arange(S) < N_VALID, (B, S))
    return source.at[:, N_VALID:].set(0), tokens, valid


def test_shapes_patterns_and_rows():
    cfg = config(
        attention=(("learned", "fourier", "uniform", "none"),),
        decoder_attention=("random_fixed", ("learned", "gaussian", "none", "synthesizer")),
        cross_attention=(("learned", "frozen", "uniform", "synthesizer"), "random_fixed"),
    )
    model, run = build(cfg)
    source, tokens, valid = inputs()
    out = run(source, tokens, valid)
    assert out.logits.shape == (B, L, V_TGT) and out.logits.dtype == jnp.float32
    assert np.isfinite(out.logits).all()
    assert [p.shape for p in out.encoder_patterns] == [(B, H, S, S)]
    assert [p.shape for p in out.patterns] == [(B, H, L, L)] * 2
    assert [p.shape for p in out.cross_patterns] == [(B, H, L, S)] * 2
    for cross in out.cross_patterns:
        # Rows are distributions over the real source positions, each of which they see.
        np.testing.assert_allclose(cross.sum(-1), 1.0, atol=1e-5)
        assert (cross[..., N_VALID:] == 0).all() and (cross[..., :N_VALID] > 0).all()
    for own in out.patterns:
        assert not np.triu(np.asarray(own), k=1).any()  # causal
    # Eager and jit agree; without patterns the logits are the same.
    eager = model(source, tokens, source_valid_BS=valid)
    assert eager.patterns is None and eager.cross_patterns is None
    np.testing.assert_allclose(eager.logits, out.logits, atol=1e-5)
    assert [len(g) for g in mixers_of(model, "cross")] == [4, 1]


def test_decoder_is_causal_and_sees_every_real_source_position():
    _, run = build(config())
    source, tokens, valid = inputs(1)
    base = np.asarray(run(source, tokens, valid).logits)
    for j in range(L):
        changed = tokens.at[:, j].set((tokens[:, j] % (V_TGT - 1)) + 1)
        logits = np.asarray(run(source, changed, valid).logits)
        np.testing.assert_array_equal(logits[:, :j], base[:, :j])
        assert np.abs(logits[:, j:] - base[:, j:]).max(axis=-1).min() > 1e-6
    for j in range(N_VALID):  # every real source token reaches every target position
        changed = source.at[:, j].set((source[:, j] % (V_SRC - 1)) + 1)
        logits = np.asarray(run(changed, tokens, valid).logits)
        assert np.abs(logits - base).max(axis=-1).min() > 1e-6


@pytest.mark.parametrize("variant", CROSS_VARIANTS)
def test_padded_source_tokens_change_nothing(variant):
    # The encoder mixes with fourier and learned heads, so padding must be hidden there too.
    cfg = config(
        attention=(("learned", "fourier", "uniform", "random_fixed"),),
        decoder_attention="learned",
        cross_attention=variant,
    )
    _, run = build(cfg)
    source, tokens, valid = inputs(2)
    base = run(source, tokens, valid)
    edited = source.at[:, N_VALID:].set(jnp.array([3, 5])[None, : S - N_VALID])
    out = run(edited, tokens, valid)
    np.testing.assert_array_equal(out.logits, base.logits)
    for a, b in zip(out.cross_patterns, base.cross_patterns):
        np.testing.assert_array_equal(a, b)
        assert (a[..., N_VALID:] == 0).all()
    # ... while a real source token does move the output (the source is seen at all).
    moved = run(source.at[:, 0].set(source[:, 0] % (V_SRC - 1) + 1), tokens, valid)
    assert np.abs(np.asarray(moved.logits) - np.asarray(base.logits)).max() > 1e-6


def test_refused_configs_name_their_fields():
    with pytest.raises(ConfigError) as e:
        config(
            attention="none",
            decoder_attention=("fourier", "learned"),
            cross_attention=("none", ("learned", "none", "fourier", "uniform")),
        )
    problems = dict(e.value.problems)
    assert set(problems) == {
        "decoder_attention[0]",
        "cross_attention[0]",
        "cross_attention[1][1]",
        "cross_attention[1][2]",
    }
    assert "never see the source" in problems["cross_attention[0]"]
    assert "never see the source" in problems["cross_attention[1][1]"]
    assert "only the encoder" in problems["cross_attention[1][2]"]
    assert "causal" in problems["decoder_attention[0]"]
    with pytest.raises(ConfigError) as e:
        from_dict(
            Seq2SeqConfig,
            {
                "vocab_size": 5,
                "seq_len": 4,
                "source_vocab_size": 5,
                "source_len": 4,
                "n_decoder_layers": 3,
                "cross_attention": ["learned", "uniform"],
                "freeze": ["layer.0"],
                "attention_settings": {"gaussian": {"sigma": -1.0}},
            },
            "model",
        )
    problems = dict(e.value.problems)
    assert "n_decoder_layers = 3" in problems["model.cross_attention"]
    assert "model.freeze[0]" in problems
    assert "model.attention_settings.gaussian.sigma" in problems


def test_cross_random_table_is_target_by_source():
    cfg = config(cross_attention="random_fixed", decoder_attention="random_fixed")
    model = EncoderDecoder(cfg, rngs=nnx.Rngs(0))
    assert model.blocks[0].cross_attention.mixers[0].logits.shape == (H, L, S)
    assert model.blocks[0].attention.mixers[0].logits.shape == (H, L, L)


def test_gaussian_cross_attention_follows_the_monotonic_alignment():
    """Target i centres on source position i + offset, clipped to the row's real source."""
    from ablate.attention import Gaussian, MixerSettings
    from ablate.seq2seq import cross_visibility

    B, L, S, n_real = 2, 6, 5, jnp.array([5, 3])
    settings = MixerSettings(d_model=8, head_dim=4, max_len=L, causal=False, max_source_len=S)
    mixer = Gaussian(2, settings, nnx.Rngs(0), Gaussian.Config(sigma=0.3, offsets=(0, 1)))
    source_valid_BS = jnp.arange(S)[None] < n_real[:, None]
    visible_BLS = cross_visibility(source_valid_BS, jnp.ones((B, L), bool), L, S, B)
    probs = mixer.pattern(jnp.zeros((B, L, 8)), visible_BLS, source_BSD=jnp.zeros((B, S, 8)))
    peak = np.asarray(probs.argmax(-1))  # (B, H, L)
    for b, n in enumerate([5, 3]):
        for h, offset in enumerate((0, 1)):
            expected = np.clip(np.arange(L) + offset, 0, n - 1)
            np.testing.assert_array_equal(peak[b, h], expected)
    assert float(probs[1, :, :, 3:].max()) == 0.0  # padded source positions get no mass
    # The clip moves the centre itself (not only the peak): with sigma 1 a target past the
    # source's end has the row of a centre on the last real position.
    wide = Gaussian(1, settings, nnx.Rngs(0), Gaussian.Config(sigma=1.0, offsets=(0,)))
    probs = wide.pattern(jnp.zeros((B, L, 8)), visible_BLS, source_BSD=jnp.zeros((B, S, 8)))
    expected = jax.nn.softmax(-0.5 * (jnp.arange(3.0) - 2.0) ** 2)
    np.testing.assert_allclose(probs[1, 0, 5, :3], expected, rtol=1e-6)
