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

Both reach a kind of attention by its `part`: "attention" (every block's own: a decoder-only
model's, an encoder-decoder's decoder self-attention), "cross_attention" (an encoder-decoder's
cross-attention) or "encoder" (its encoder's self-attention); several parts at once stack
their layers, in the order given, on the layer axis N of the edit arrays.

The model (model.py) stays a plain model: it knows nothing of either wrapper.

Axis letters: the table in `ablate.model`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ablate.attention import Mixer, apply_pattern
from ablate.model import Attention, Output, Transformer


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


#: One part's name, or several (their layers one after another on the layer axis).
PartNames = str | tuple[str, ...]


def attentions_of(model: nnx.Module, part: PartNames = "attention") -> list[Attention]:
    """The attention sublayers of one part (or of several, their layers one after another)."""
    if not isinstance(part, str):
        return [a for p in part for a in attentions_of(model, p)]
    if part == "encoder":
        return [block.attention for block in model.encoder]
    return [getattr(block, part) for block in model.blocks]


def edited(
    model: Transformer,
    gate_NH: jax.Array,
    pattern_mix_NH: jax.Array,
    pattern_NBHLS: jax.Array | Sequence[jax.Array],
    output_mix_NH: jax.Array,
    output_NBLHK: jax.Array | Sequence[jax.Array],
    *,
    part: PartNames = "attention",
) -> Transformer:
    """A copy of `model` with every head edited by its layer's and head's slice of the arrays.

    The fills broadcast over the batch (a leading B of 1 serves any batch). `part` names the
    attention to edit (the module docstring); where layers differ in L or S (several parts)
    the fills are sequences with one array per layer.
    """
    model = _copy(model)
    for n, attention in enumerate(attentions_of(model, part)):
        groups = [(s, c, m) for (s, c), m in zip(attention.head_groups, attention.mixers)]
        mixers = attention.mixers
        for i, (start, count, mixer) in enumerate(groups):
            heads = slice(start, start + count)
            mixers[i] = EditedMixer(
                mixer,
                gate_NH[n, heads],
                pattern_mix_NH[n, heads],
                pattern_NBHLS[n][:, heads],
                output_mix_NH[n, heads],
                output_NBLHK[n][:, :, heads],
            )
    return model


def recorded(
    model: Transformer, *inputs: jax.Array, part: PartNames = "attention", **kwargs: Any
) -> tuple[Output, tuple]:
    """(model(*inputs, **kwargs), per layer of `part` the heads' outputs `heads_BLHK`)."""
    model = _copy(model)
    attentions = attentions_of(model, part)
    for attention in attentions:
        mixers = attention.mixers
        for i in range(len(mixers)):
            mixers[i] = RecordedMixer(mixers[i])
    out = model(*inputs, **kwargs)
    heads = []
    for attention in attentions:
        seen = [m.heads_BLHK[...] for m in attention.mixers]
        heads.append(jnp.concatenate(seen, axis=2))
    return out, tuple(heads)
