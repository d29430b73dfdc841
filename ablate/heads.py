"""Which heads the probe addresses: a model's kinds of attention (`Part`), and head names.

A decoder-only model has one part (its blocks' attention), whose heads are LAYER:HEAD. An
encoder-decoder has three: encoder self-attention, decoder self-attention and
cross-attention, whose heads are PART:LAYER:HEAD ("encoder:0:1", "cross:1:0"). The probe's
per-head arrays (N, H) stack the parts' layers on one layer axis N, part after part;
`Part.layers` says where each sits, `parse_heads` turns names into (row, head) pairs and
`group_name` turns them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from ablate.attention import MixerSettings
from ablate.config import ConfigError
from ablate.experiment import Experiment
from ablate.model import visibility
from ablate.seq2seq import Seq2SeqConfig, cross_visibility

#: The parts of an encoder-decoder, as heads are named, and in words (for plots).
PART_TITLES = {
    "encoder": "encoder self-attention",
    "decoder": "decoder self-attention",
    "cross": "cross-attention",
}

Group = tuple[tuple[int, int], ...]


class Part(NamedTuple):
    """One kind of attention the probe edits: rows `layers` of every (N, H) array.

    `name` is what its heads are called by ("" in a decoder-only model), `attention` the
    part as `ablate.ablation` names it, `patterns` the model output's field holding its
    patterns (`queries` x `keys`), `on_source` whether both sides read the source (the
    encoder); `settings` builds the registry's replacement mixers for it.
    """

    name: str
    attention: str
    patterns: str
    first: int
    n_layers: int
    queries: int
    keys: int
    settings: MixerSettings
    on_source: bool = False

    @property
    def layers(self) -> slice:
        return slice(self.first, self.first + self.n_layers)

    def visible(self, valid_BL, source_valid_BS, batch_size: int) -> jax.Array:
        """visible_BLS: the positions this part's heads may see in a batch (padding masked)."""
        if self.settings.cross:
            return cross_visibility(source_valid_BS, valid_BL, self.queries, self.keys, batch_size)
        valid = source_valid_BS if self.on_source else valid_BL
        return visibility(self.queries, self.settings.causal, valid, batch_size)


def parts_of(exp: Experiment) -> tuple[Part, ...]:
    """The kinds of attention of an experiment's model, in the order of the layer axis."""
    cfg, L = exp.model, exp.task.seq_len
    if not isinstance(cfg, Seq2SeqConfig):
        settings = MixerSettings(cfg.d_model, cfg.head_dim, cfg.seq_len, cfg.causal)
        return (Part("", "attention", "patterns", 0, cfg.n_layers, L, L, settings),)
    S, n_enc, n_dec = exp.task.source_len, cfg.n_layers, cfg.n_decoder_layers
    own = MixerSettings(cfg.d_model, cfg.head_dim, cfg.seq_len, causal=True)
    encoder = MixerSettings(cfg.d_model, cfg.head_dim, cfg.source_len, causal=False)
    cross = MixerSettings(
        cfg.d_model, cfg.head_dim, cfg.seq_len, False, max_source_len=cfg.source_len, cross=True
    )
    return (
        Part("encoder", "encoder", "encoder_patterns", 0, n_enc, S, S, encoder, on_source=True),
        Part("decoder", "attention", "patterns", n_enc, n_dec, L, L, own),
        Part("cross", "cross_attention", "cross_patterns", n_enc + n_dec, n_dec, L, S, cross),
    )


def part_at(parts: Sequence[Part], n: int) -> Part:
    """The part whose layers hold row n of the layer axis."""
    return next(p for p in parts if p.first <= n < p.first + p.n_layers)


def parse_heads(heads: str | Sequence, parts: Sequence[Part], n_heads: int) -> list[Group]:
    """Ablations from "0:1,1:*,0:0+1:1" (comma: separate ablations, +: one set, *: all heads).

    In an encoder-decoder (named `parts`) a head is PART:LAYER:HEAD ("cross:0:1,encoder:1:*").
    A sequence works too: each item a (layer, head) pair, or (part, layer, head), or a
    sequence of those (one set). The groups hold (row of the layer axis, head) pairs.
    """
    named = {p.name: p for p in parts if p.name}
    form = _head_form(named)
    if isinstance(heads, str):
        items: list = [g.split("+") for g in heads.split(",") if g.strip()]
    else:
        items = [[g] if isinstance(g[0], int | np.integer | str) else list(g) for g in heads]
    groups = []
    for item in items:
        group = []
        for spec in item:
            fields = spec.strip().split(":") if isinstance(spec, str) else list(spec)
            if len(fields) != 2 + bool(named):
                raise ConfigError([("heads", f"{spec!r} is not {form}")])
            *name, layer, head = fields
            if name and name[0] not in named:
                raise ConfigError([("heads", f"part {name[0]!r} does not exist; {form}")])
            part = named[name[0]] if name else parts[0]
            try:
                layer, chosen = int(layer), range(n_heads) if head == "*" else [int(head)]
            except ValueError:
                raise ConfigError([("heads", f"{spec!r} is not {form}")]) from None
            where = f"{part.name} layer {layer}" if part.name else f"layer {layer}"
            if not 0 <= layer < part.n_layers:
                has = f"{part.name} has" if part.name else "the model has"
                msg = f"{where} does not exist; {has} layers 0..{part.n_layers - 1}"
                raise ConfigError([("heads", msg)])
            for h in chosen:
                if not 0 <= h < n_heads:
                    msg = f"head {h} of {where} does not exist; layers have heads 0.."
                    raise ConfigError([("heads", f"{msg}{n_heads - 1}")])
                group.append((part.first + layer, h))
        groups.append(tuple(dict.fromkeys(group)))
    if not groups:
        raise ConfigError([("heads", "names no head")])
    return groups


def _head_form(named: dict[str, Part]) -> str:
    """How a head is written, in the words of an error message."""
    if not named:
        return "LAYER:HEAD (e.g. 0:1, 1:* or 0:0+1:1)"
    return (
        f"PART:LAYER:HEAD with PART one of {', '.join(named)} "
        "(e.g. cross:0:1, encoder:1:* or decoder:0:0+cross:0:1)"
    )


def head_name(parts: Sequence[Part], n: int, h: int) -> str:
    """The name of head h of row n of the layer axis, e.g. "0:1" or "cross:0:1"."""
    part = part_at(parts, n)
    return f"{part.name}:{n - part.first}:{h}" if part.name else f"{n}:{h}"


def group_name(group: Group, parts: Sequence[Part]) -> str:
    """The name of a set of heads, e.g. "0:1+1:0" (as `parse_heads` reads it back)."""
    return "+".join(head_name(parts, n, h) for n, h in group)
