"""ablate's modules inside a user's own NNX model, trained by a plain optax loop.

The first model is the README's "Use the modules in your own JAX code" snippet, kept in sync by
hand: a previous-token task that attention solves in a hundred steps.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from ablate.attention import Frozen, MixerSettings
from ablate.model import Attention, Block, ModelConfig, visibility

VOCAB, LENGTH, BATCH, STEPS = 8, 8, 32, 100


class PreviousTokenModel(nnx.Module):
    """Your own model: your embeddings and readout around one ablate Block."""

    def __init__(self, attention: str, vocab: int, length: int, rngs: nnx.Rngs):
        cfg = ModelConfig(vocab_size=vocab, seq_len=length, d_model=16, n_heads=4, n_layers=1)
        self.embed = nnx.Embed(vocab, cfg.d_model, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (length, cfg.d_model)))
        self.block = Block((attention,) * cfg.n_heads, cfg, rngs)  # one variant per head
        self.readout = nnx.Linear(cfg.d_model, vocab, rngs=rngs)

    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        B, L = tokens_BL.shape
        x_BLD = self.embed(tokens_BL) + self.pos[...][None, :L]
        x_BLD, _, _ = self.block(x_BLD, visibility(L, causal=True, valid_BL=None, batch_size=B))
        return self.readout(x_BLD)


def previous_token_loss(model: nnx.Module, tokens_BL: jax.Array) -> jax.Array:
    logits_BLV = model(tokens_BL)[:, 1:]
    return optax.softmax_cross_entropy_with_integer_labels(logits_BLV, tokens_BL[:, :-1]).mean()


def train(model: nnx.Module, steps: int = STEPS) -> list[float]:
    """The README's loop: nnx.Optimizer over nnx.Param, nnx.value_and_grad, nnx.jit."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, tokens_BL):
        loss, grads = nnx.value_and_grad(previous_token_loss)(model, tokens_BL)
        optimizer.update(model, grads)
        return loss

    losses = []
    for step in range(steps):
        tokens_BL = jax.random.randint(jax.random.key(step), (BATCH, LENGTH), 0, VOCAB)
        losses.append(train_step(model, optimizer, tokens_BL))
    return [float(loss) for loss in losses]


def test_block_inside_a_user_model_learns_the_previous_token():
    model = PreviousTokenModel("learned", VOCAB, LENGTH, nnx.Rngs(0))
    losses = train(model)
    chance = math.log(VOCAB)
    assert losses[0] > 0.8 * chance
    assert np.mean(losses[-10:]) < 0.25 * chance


class AttentionOnly(nnx.Module):
    """A user's own single attention layer whose heads come from ablate's registry."""

    def __init__(self, variant: str, vocab: int, length: int, rngs: nnx.Rngs):
        d_model, n_heads = 16, 4
        settings = MixerSettings(
            d_model=d_model, head_dim=d_model // n_heads, max_len=length, causal=True
        )
        self.embed = nnx.Embed(vocab, d_model, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (length, d_model)))
        self.attention = Attention((variant,) * n_heads, settings, rngs)
        self.readout = nnx.Linear(d_model, vocab, rngs=rngs)

    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        B, L = tokens_BL.shape
        x_BLD = self.embed(tokens_BL) + self.pos[...][None, :L]
        y_BLD, _, _ = self.attention(x_BLD, visibility(L, True, None, B))
        return self.readout(y_BLD)


@pytest.mark.parametrize("variant", ["frozen", "none"])
def test_attention_layer_from_the_registry_in_a_user_model(variant):
    model = AttentionOnly(variant, VOCAB, LENGTH, nnx.Rngs(1))
    frozen_before = [np.array(x) for x in jax.tree.leaves(nnx.state(model, Frozen))]
    losses = train(model)
    chance = math.log(VOCAB)
    if variant == "none":
        # Each token sees only itself: the previous token cannot be predicted.
        assert np.mean(losses[-10:]) > 0.9 * chance
        assert frozen_before == []
    else:
        # Frozen random W_q, W_k still route by position once the embeddings adapt.
        assert np.mean(losses[-10:]) < 0.5 * chance
        frozen_after = jax.tree.leaves(nnx.state(model, Frozen))
        assert len(frozen_after) == 2
        for before, after in zip(frozen_before, frozen_after, strict=True):
            np.testing.assert_array_equal(after, before)
