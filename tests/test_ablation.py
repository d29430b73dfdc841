"""Post-hoc edits as mixer wrappers: gates, pattern and output patches, recording, vmapping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ablate.ablation import Edit, EditedMixer, edited, recorded
from ablate.model import ModelConfig, Transformer, visibility

B, L, D, H, V, N = 2, 8, 16, 4, 11, 2
K = D // H


def config(attention="learned", **kwargs) -> ModelConfig:
    return ModelConfig(
        vocab_size=V, seq_len=L, d_model=D, n_heads=H, n_layers=N, attention=attention, **kwargs
    )


def net(attention="learned", **kwargs) -> Transformer:
    return Transformer(config(attention, **kwargs), rngs=nnx.Rngs(0))


def tokens(seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, L), 0, V)


def gated(model: Transformer, gate_NH) -> Transformer:
    """`model` with its heads gated only (by default: changes nothing)."""
    gate_NH = jnp.asarray(gate_NH, jnp.float32)
    zeros_NH = jnp.zeros((N, H))
    patterns, outputs = jnp.zeros((N, 1, H, L, L)), jnp.zeros((N, 1, L, H, K))
    return edited(model, gate_NH, zeros_NH, patterns, zeros_NH, outputs)


def with_w_o_zeroed(model: Transformer, heads_by_layer: dict[int, list[int]]) -> Transformer:
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    for layer, heads in heads_by_layer.items():
        w_o = copy.blocks[layer].attention.w_o
        w_o[...] = w_o[...].at[jnp.asarray(heads)].set(0.0)
    return copy


def test_zero_gates_equal_a_model_without_attention_output():
    model = net()
    silenced = gated(model, np.zeros((N, H)))(tokens()).logits
    silent = with_w_o_zeroed(model, {0: list(range(H)), 1: list(range(H))})
    np.testing.assert_allclose(silenced, silent(tokens()).logits, atol=1e-5)
    assert np.abs(silenced - model(tokens()).logits).max() > 1e-2

    # One head of one layer.
    gate_NH = np.ones((N, H))
    gate_NH[0, 1] = 0
    one_off = gated(model, gate_NH)(tokens()).logits
    np.testing.assert_allclose(
        one_off, with_w_o_zeroed(model, {0: [1]})(tokens()).logits, atol=1e-5
    )
    assert np.abs(one_off - silenced).max() > 1e-2


def test_neutral_edit_reproduces_the_unedited_logits_and_leaves_the_model_plain():
    plain = net(fused_attention=False)
    neutral = gated(plain, np.ones((N, H)))
    np.testing.assert_array_equal(neutral(tokens()).logits, plain(tokens()).logits)
    fused = net()
    np.testing.assert_allclose(
        gated(fused, np.ones((N, H)))(tokens()).logits, fused(tokens()).logits, atol=1e-5
    )
    # The copy is wrapped, the model is not; the edit arrays are Edit state, not parameters.
    assert all(type(m) is EditedMixer for b in neutral.blocks for m in b.attention.mixers)
    assert not any(type(m) is EditedMixer for b in plain.blocks for m in b.attention.mixers)
    assert len(jax.tree.leaves(nnx.state(neutral, Edit))) == 5 * N
    assert nnx.state(neutral, nnx.Param).keys() == nnx.state(plain, nnx.Param).keys()


def test_pattern_and_output_patching():
    model = net()
    attention = model.blocks[0].attention
    x_BLD = jax.random.normal(jax.random.key(1), (B, L, D))
    visible_BLS = visibility(L, True, None, B)
    v_BLHK = np.einsum("BLD,DHK->BLHK", x_BLD, attention.w_v[...])
    _, probs_BHLS, heads_BLHK = attention(x_BLD, visible_BLS, return_pattern=True)
    ones_NH, zeros_NH = jnp.ones((N, H)), jnp.zeros((N, H))

    # Pattern patched to the identity on head 0 of layer 0 only: it outputs its own values.
    mix_NH = zeros_NH.at[0, 0].set(1.0)
    eye_NBHLS = jnp.broadcast_to(jnp.eye(L), (N, B, H, L, L))
    patch = edited(model, ones_NH, mix_NH, eye_NBHLS, zeros_NH, jnp.zeros((N, B, L, H, K)))
    _, patched_BHLS, patched_BLHK = patch.blocks[0].attention(
        x_BLD, visible_BLS, return_pattern=True
    )
    np.testing.assert_allclose(patched_BHLS[:, 0], eye_NBHLS[0, :, 0], atol=1e-6)
    np.testing.assert_allclose(patched_BHLS[:, 1:], probs_BHLS[:, 1:], atol=1e-6)
    np.testing.assert_allclose(patched_BLHK[:, :, 0], v_BLHK[:, :, 0], atol=1e-5)
    np.testing.assert_allclose(patched_BLHK[:, :, 1:], heads_BLHK[:, :, 1:], atol=1e-5)
    assert np.abs(heads_BLHK[:, :, 0] - v_BLHK[:, :, 0]).max() > 1e-2

    # Output half-patched with a fill, then gated by 2: gate * (own + fill) / 2.
    fill_NBLHK = jax.random.normal(jax.random.key(2), (N, B, L, H, K))
    patch = edited(model, 2 * ones_NH, zeros_NH, eye_NBHLS, zeros_NH + 0.5, fill_NBLHK)
    y_BLD, _, mixed_BLHK = patch.blocks[0].attention(x_BLD, visible_BLS)
    np.testing.assert_allclose(mixed_BLHK, heads_BLHK + fill_NBLHK[0], atol=1e-5)
    np.testing.assert_allclose(
        y_BLD, np.einsum("BLHK,HKD->BLD", mixed_BLHK, attention.w_o[...]), atol=1e-5
    )


def test_recorded_head_outputs_are_the_attention_layers_own():
    model = net([["learned", "learned", "uniform", "frozen"], "gaussian"])
    out, heads = recorded(model, tokens(), return_patterns=True)
    np.testing.assert_array_equal(out.logits, model(tokens()).logits)
    assert [h.shape for h in heads] == [(B, L, H, K)] * N
    x_BLD = model.token_embed(tokens()) + model.pos_embed[...][None, :L]
    block = model.blocks[0]
    visible_BLS = visibility(L, True, None, B)
    y_BLD, _, heads_BLHK = block.attention(block.norm_attn(x_BLD), visible_BLS)
    np.testing.assert_allclose(heads[0], heads_BLHK, atol=1e-6)
    summed_BLD = np.einsum("BLHK,HKD->BLD", heads[0], block.attention.w_o[...])
    np.testing.assert_allclose(summed_BLD, y_BLD, atol=1e-5)
    assert np.abs(y_BLD).max() > 1e-2


def test_vmapped_edits_equal_edits_one_at_a_time():
    model = net(["learned", "random_fixed"])
    graphdef, state = nnx.split(model)
    gates_ANH = np.ones((3, N, H), np.float32)
    gates_ANH[1, 0, 2] = 0
    gates_ANH[2, 1] = 0.5

    @jax.jit
    def logits(state, gate_NH):
        return gated(nnx.merge(graphdef, state), gate_NH)(tokens()).logits

    together = jax.jit(jax.vmap(logits, in_axes=(None, 0)))(state, gates_ANH)
    for a in range(3):
        np.testing.assert_allclose(together[a], logits(state, gates_ANH[a]), atol=1e-5)
    assert np.abs(together[1] - together[0]).max() > 1e-3
    assert np.abs(together[2] - together[0]).max() > 1e-3
