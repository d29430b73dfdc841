"""Post-hoc edits of a built model's heads, as wrappers around its mixers.

As in penzai, an ablation swaps one sublayer: `edited` returns a copy of a model in which
every mixer is wrapped in `EditedMixer`, whose edit arrays are `Edit` state (not
`nnx.Param`, so never trained). Per head h of the wrapped group, the pattern becomes
(1 - pattern_mix[h]) * own + pattern_mix[h] * pattern, then the head output becomes
gate[h] * ((1 - output_mix[h]) * own + output_mix[h] * output), all before the output
projection, where heads are still separate. With gate 1 and both mixes 0 an edit changes no
bit. The arrays may be tracers: `jax.vmap` over them evaluates many edits in one program.

`recorded` is the other wrapper: it returns each layer's per-head outputs (the mean-output
ablation needs them), leaving the computation as it is.

The model (model.py) stays a plain model: it knows nothing of either wrapper.

Axis letters: the table in `ablate.model`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ablate.attention import Mixer, apply_pattern
from ablate.model import Output, Transformer, mixers_of


class Edit(nnx.Variable):
    """An edit array of one wrapped mixer: state that vmaps, never trained."""


class EditedMixer(nnx.Module):
    """A trained mixer with its heads' patterns and outputs edited (arrays over its heads)."""

    def __init__(
        self,
        inner: Mixer,
        gate_H: jax.Array,
        pattern_mix_H: jax.Array,
        pattern_BHLS: jax.Array,
        output_mix_H: jax.Array,
        output_BLHK: jax.Array,
    ):
        self.inner = inner
        self.gate = Edit(gate_H)
        self.pattern_mix = Edit(pattern_mix_H)
        self.pattern = Edit(pattern_BHLS)
        self.output_mix = Edit(output_mix_H)
        self.output = Edit(output_BLHK)

    def __call__(
        self,
        x_BLD: jax.Array,
        v_BLHK: jax.Array,
        visible_BLS: jax.Array,
        *,
        want_pattern: bool,
        **source: jax.Array,
    ) -> tuple[jax.Array, jax.Array | None]:
        """As `Mixer.__call__` (`source`: its `source_BSD` in cross-attention); a mixer with a
        pattern always mixes by its (edited) pattern."""
        inner = self.inner
        if inner.has_pattern:
            probs_BHLS = inner.pattern(x_BLD, visible_BLS, **source)
            mix_1H11 = self.pattern_mix[...][None, :, None, None]
            other_BHLS = self.pattern[...].astype(probs_BHLS.dtype)
            probs_BHLS = (1 - mix_1H11) * probs_BHLS + mix_1H11 * other_BHLS
            out_BLHK = apply_pattern(probs_BHLS, v_BLHK)
        else:
            out_BLHK, probs_BHLS = inner(
                x_BLD, v_BLHK, visible_BLS, want_pattern=want_pattern, **source
            )
        out_BLHK = out_BLHK.astype(x_BLD.dtype)
        mix_11H1 = self.output_mix[...][None, None, :, None].astype(out_BLHK.dtype)
        out_BLHK = (1 - mix_11H1) * out_BLHK + mix_11H1 * self.output[...].astype(out_BLHK.dtype)
        out_BLHK = out_BLHK * self.gate[...][None, None, :, None].astype(out_BLHK.dtype)
        return out_BLHK, probs_BHLS if want_pattern else None


class Recorded(nnx.Variable):
    """What a `RecordedMixer` saw last: state, never trained."""


class RecordedMixer(nnx.Module):
    """A mixer that keeps its heads' outputs of the last call."""

    def __init__(self, inner: Mixer):
        self.inner = inner
        self.heads_BLHK = Recorded(jnp.zeros(()))

    def __call__(
        self,
        x_BLD: jax.Array,
        v_BLHK: jax.Array,
        visible_BLS: jax.Array,
        *,
        want_pattern: bool,
        **source: jax.Array,
    ) -> tuple[jax.Array, jax.Array | None]:
        out_BLHK, probs_BHLS = self.inner(
            x_BLD, v_BLHK, visible_BLS, want_pattern=want_pattern, **source
        )
        self.heads_BLHK.set_value(out_BLHK.astype(x_BLD.dtype))
        return out_BLHK, probs_BHLS


def _copy(model: Transformer) -> Transformer:
    """A new module tree over the same arrays, so that wrapping leaves `model` as it was."""
    return nnx.merge(*nnx.split(model))


def edited(
    model: Transformer,
    gate_NH: jax.Array,
    pattern_mix_NH: jax.Array,
    pattern_NBHLS: jax.Array,
    output_mix_NH: jax.Array,
    output_NBLHK: jax.Array,
    *,
    part: str = "attention",
) -> Transformer:
    """A copy of `model` with every head edited by its layer's and head's slice of the arrays.

    The fills broadcast over the batch (a leading B of 1 serves any batch). `part` names the
    blocks' attention to edit ("cross_attention": an encoder-decoder's cross-attention).
    """
    model = _copy(model)
    for n, block in enumerate(model.blocks):
        attention = getattr(block, part)
        groups = [(s, c, m) for (s, c), m in zip(attention.head_groups, attention.mixers)]
        mixers = attention.mixers
        for i, (start, count, mixer) in enumerate(groups):
            heads = slice(start, start + count)
            mixers[i] = EditedMixer(
                mixer,
                gate_NH[n, heads],
                pattern_mix_NH[n, heads],
                pattern_NBHLS[n, :, heads],
                output_mix_NH[n, heads],
                output_NBLHK[n, :, :, heads],
            )
    return model


def recorded(model: Transformer, tokens_BL: jax.Array, **kwargs: Any) -> tuple[Output, tuple]:
    """(model(tokens_BL, **kwargs), per layer the heads' outputs `heads_BLHK`)."""
    model = _copy(model)
    for n, groups in enumerate(mixers_of(model)):
        mixers = model.blocks[n].attention.mixers
        for i, (_, _, mixer) in enumerate(groups):
            mixers[i] = RecordedMixer(mixer)
    out = model(tokens_BL, **kwargs)
    heads = []
    for block in model.blocks:
        seen = [m.heads_BLHK[...] for m in block.attention.mixers]
        heads.append(jnp.concatenate(seen, axis=2))
    return out, tuple(heads)
