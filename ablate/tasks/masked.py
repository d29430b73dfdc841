"""Masked language modelling (BERT): the masking scheme every MLM task shares, and the
synthetic MLM tasks `masked_copy` (positional) and `masked_recall` (by content).

The scheme (`MaskKnobs`, applied by `mask_tokens` on the device, inside the jitted sampler,
to a clean batch): each candidate position is selected for prediction with probability
`mask_rate`; a selected position's input becomes MASK with probability `mask_share`, a
random token of the target's alphabet with probability `random_share`, and stays the
original token otherwise (`keep_share`, BERT's 0.8 / 0.1 / 0.1). A selected position has
weight 1 and the original token as its target; every other position has weight 0 and
target 0, so it carries no loss. Candidates come in groups of which at most one member is
selected (a token and its twin, whose copy answers it: each member with probability
`mask_rate`, so a group of J members needs J * mask_rate <= 1); a sequence in which no group
was selected gets one member of one uniformly random group, so every sequence is scored
(the selection rate is then slightly above `mask_rate`: `expected_selected`).

An MLM target depends on positions on both sides (deps may have j > i), so these tasks are
`bidirectional`: only a bidirectional model (`model.causal = false`) may train on them, and
their reference levels and audit read every position. An instance is the pair (inputs,
selected): which positions were selected cannot be read from the inputs (a kept or randomly
replaced token looks like any other), so the host-side `reference` and `is_valid` of a
masked task take the selection too, and only whole sequences (a target depends on what
follows it, so a prefix is no instance).

Chance (`Task.chance`) is, as for every task, the best accuracy without any input token: for
uniform targets 1/(alphabet size). The own token at a selected position is an input, and it
gives something away: a kept token is the answer, and a random one is the answer with
probability 1/alphabet, so a reader of the own token alone reaches `own_token_level` =
chance + keep_share * (1 - chance) (the fixed-routing and bag readers of `ablate.reference`
see the own token, so their levels include this).

Axis letters: the table in `ablate.model` (P: candidate groups, J: a group's positions).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ablate.tasks.base import (
    MAX_SEQ_LEN,
    MAX_SYMBOLS,
    Batch,
    Knobs,
    Task,
    below,
    bounds,
    deps_from_sources,
    distinct,
    make_batch,
    outside,
    random_bits,
    register,
)

UNIT_BITS = 24  # a share's resolution: 24-bit uniforms (exact in float32)


@dataclasses.dataclass(frozen=True)
class MaskKnobs(Knobs):
    """The masking knobs every masked-LM task has (BERT's scheme; see the module docstring)."""

    mask_rate: float = 0.15
    mask_share: float = 0.8
    random_share: float = 0.1

    @property
    def keep_share(self) -> float:
        """The share of selected positions that keep their own token."""
        return max(0.0, 1.0 - self.mask_share - self.random_share)

    def problems(self) -> list[tuple[str, str]]:
        found = []
        for field in ("mask_rate", "mask_share", "random_share"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:  # also refuses NaN
                found.append((field, f"must be in [0, 1], got {value}"))
        total = self.mask_share + self.random_share
        if not found and total > 1.0 + 1e-9:
            found.append(
                (
                    "random_share",
                    f"mask_share + random_share must be <= 1 (the rest keeps the token), "
                    f"got {self.mask_share} + {self.random_share} = {total:g}",
                )
            )
        return found


def twin_problems(knobs: MaskKnobs) -> list[tuple[str, str]]:
    """[(mask_rate, why)] where a task's pairs of twins cannot be selected at mask_rate."""
    if knobs.mask_rate > 0.5:
        why = "a token and its twin are never both selected, so each is at most half the time"
        return [("mask_rate", f"must be <= 0.5 ({why}), got {knobs.mask_rate}")]
    return []


class Masked(NamedTuple):
    """A masked batch: corrupted inputs, targets and weights, and the selection [B, L]."""

    inputs: jax.Array
    targets: jax.Array
    weights: jax.Array
    selected: jax.Array


def _unit(bits: jax.Array) -> jax.Array:
    """Uniform float32 in [0, 1) from uint32 bits."""
    return (bits >> (32 - UNIT_BITS)).astype(jnp.float32) * (1.0 / 2**UNIT_BITS)


def mask_tokens(
    key: jax.Array,
    clean_BL: jax.Array,
    positions_BPJ: jax.Array,
    knobs: MaskKnobs,
    mask_id: int,
    fill: tuple[int, int],
) -> Masked:
    """Select and corrupt positions of a clean batch (pure; jit and vmap safe).

    positions_BPJ (or [1, P, J], broadcast) lists the candidate groups: at most one position
    of a group is selected, each with probability knobs.mask_rate (J * mask_rate <= 1). A row
    with no group selected gets one position of one uniformly random group. A random
    replacement is uniform over the ids [fill[0], fill[1]) (it may equal the original).
    """
    B, L = clean_BL.shape
    P, J = positions_BPJ.shape[1:]
    positions_BPJ = jnp.broadcast_to(positions_BPJ, (B, P, J)).astype(jnp.int32)
    group_bits, kind_bits, fill_bits, pick_bits = random_bits(key, B, P, L, L, 1)
    # A group is selected with probability J * rate; then member floor(u / rate), uniform.
    u_BP, rate = _unit(group_bits), knobs.mask_rate
    chosen_BP = u_BP < J * rate
    member_BP = jnp.minimum(jnp.floor(u_BP / max(rate, 1e-30)), J - 1).astype(jnp.int32)
    pick_B1 = below(pick_bits, P * J)
    forced_BP = ~chosen_BP.any(-1, keepdims=True) & (jnp.arange(P)[None, :] == pick_B1 // J)
    member_BP = jnp.where(forced_BP, pick_B1 % J, member_BP)
    chosen_BP = chosen_BP | forced_BP
    at_BP = jnp.take_along_axis(positions_BPJ, member_BP[..., None], -1)
    at_BP = jnp.where(chosen_BP, at_BP[..., 0], L)  # L: a spare column for the unchosen
    rows_B1 = jnp.arange(B)[:, None]
    selected_BL = jnp.zeros((B, L + 1), bool).at[rows_B1, at_BP].set(True)[:, :L]
    u_BL = _unit(kind_bits)
    to_mask_BL = selected_BL & (u_BL < knobs.mask_share)
    to_random_BL = selected_BL & ~to_mask_BL & (u_BL < knobs.mask_share + knobs.random_share)
    random_BL = fill[0] + below(fill_bits, fill[1] - fill[0])
    inputs_BL = jnp.where(to_mask_BL, mask_id, jnp.where(to_random_BL, random_BL, clean_BL))
    targets_BL = jnp.where(selected_BL, clean_BL, 0)
    return Masked(inputs_BL, targets_BL, selected_BL.astype(jnp.float32), selected_BL)


def expected_selected(n_groups: int, group_size: int, rate: float) -> float:
    """The expected number of selected positions per sequence (the forced one included)."""
    q = min(1.0, group_size * rate)
    return n_groups * q + (1.0 - q) ** n_groups


def ungrouped(seq_len: int) -> np.ndarray:
    """positions [1, L, 1]: every position a candidate of its own (text MLM)."""
    return np.arange(seq_len, dtype=np.int32)[None, :, None]


class MaskedTask(Task):
    """Base of the synthetic MLM tasks: a clean sequence, masked by `mask_tokens`.

    Subclasses define `_clean(key, B) -> (clean_BL, positions_BPJ, sources_BLJ)` (sources:
    the positions each position's token is determined by if it is selected; -1 none) and
    the host-side `_answer(x, selected, i)` and `_valid_masked(x, selected)`.
    """

    bidirectional: ClassVar[bool] = True
    MASK: ClassVar[int] = 0
    fill: tuple[int, int]  # the target alphabet, where random replacements come from

    @property
    def own_token_level(self) -> float:
        """The accuracy of a reader of the own token alone (uniform targets over `fill`)."""
        return self.chance + self.config.keep_share * (1.0 - self.chance)

    @abc.abstractmethod
    def _clean(self, key: jax.Array, batch_size: int):
        """(clean tokens [B, L], candidate groups [B, P, J], sources [B, L, J]) of a batch."""

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        clean_BL, positions_BPJ, sources_BLJ = self._clean(key, batch_size)
        m = mask_tokens(
            jax.random.fold_in(key, 1), clean_BL, positions_BPJ, self.config, self.MASK, self.fill
        )
        src_BLJ = jnp.where(m.selected[..., None], sources_BLJ, -1)
        deps_BLL = deps_from_sources(src_BLJ, self.seq_len)
        return make_batch(m.inputs, m.targets, m.weights, deps_BLL)

    def reference(self, inputs: np.ndarray, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(targets, weights) of one whole valid sequence and its selection."""
        x, chosen = self._host(inputs), np.asarray(selected, bool)
        if len(x) != self.seq_len or chosen.shape != x.shape:
            raise ValueError(
                f"{self.name}: a masked target depends on both sides: give a whole sequence "
                f"of length {self.seq_len} and its selection"
            )
        targets = np.zeros(len(x), np.int64)
        for i in np.flatnonzero(chosen):
            targets[i] = self._answer(x, chosen, i)
        return targets, chosen.astype(np.float32)

    def is_valid(self, inputs: np.ndarray, selected: np.ndarray) -> bool:
        """Whether (inputs, selected) is a well-posed instance: a whole sequence whose
        unselected tokens follow the task's rule and define every selected target."""
        x, chosen = np.asarray(inputs), np.asarray(selected, bool)
        if x.ndim != 1 or len(x) != self.seq_len or chosen.shape != x.shape:
            return False
        x = x.astype(np.int64)
        if outside(x, self.vocab_size).any():
            return False
        return bool(self._valid_masked(x, chosen))

    @abc.abstractmethod
    def _answer(self, x: np.ndarray, selected: np.ndarray, i: int) -> int:
        """The target of selected position i, from the sequence's unselected tokens."""

    @abc.abstractmethod
    def _valid_masked(self, x: np.ndarray, selected: np.ndarray) -> bool:
        """Whether the unselected tokens follow the task's rule and define every target."""

    def _corruptible(self, x: np.ndarray, selected: np.ndarray, low: int, high: int) -> bool:
        """Selected positions hold MASK or an id of [low, high), unselected ones the latter."""
        ok = (x >= low) & (x < high)
        return bool(np.all(ok | (selected & (x == self.MASK))))


# ------------------------------------------------------------------------------ masked copy


@dataclasses.dataclass(frozen=True)
class MaskedCopyConfig(MaskKnobs):
    """Knobs of `masked_copy`."""

    n_items: int = 8
    n_symbols: int = 8

    def problems(self) -> list[tuple[str, str]]:
        found = bounds(self, n_items=(1, (MAX_SEQ_LEN - 1) // 2), n_symbols=(2, MAX_SYMBOLS))
        return found + super().problems() + twin_problems(self)


@register
class MaskedCopy(MaskedTask):
    """x1..xN SEP x1..xN, masked: a selected token is the one at its twin in the other copy.

    Ids: 0 MASK, 1 SEP, symbols [2, 2 + n_symbols), drawn uniformly with repetition. The
    candidates are the 2N symbol positions, in N groups (k, N + 1 + k): a token and its twin
    are never both selected, so the twin always shows the answer, at a fixed offset of N + 1
    either way: fixed positional routing suffices (`position`). deps: the twin.
    """

    name = "masked_copy"
    context_need = "position"
    Config = MaskedCopyConfig
    SEP = 1

    def __init__(self, config: MaskedCopyConfig | None = None):
        super().__init__(config)
        n = self.config.n_items
        self.vocab_size = 2 + self.config.n_symbols
        self.seq_len = 2 * n + 1
        self.chance = 1.0 / self.config.n_symbols
        self.fill = (2, self.vocab_size)
        k = np.arange(n)
        self.positions_1PJ = np.stack([k, n + 1 + k], -1)[None].astype(np.int32)
        self.twin_L = np.concatenate([n + 1 + k, [-1], k]).astype(np.int32)

    def _clean(self, key, batch_size):
        c = self.config
        x_BI = 2 + below(random_bits(key, batch_size, c.n_items)[0], c.n_symbols)
        sep_B1 = jnp.full((batch_size, 1), self.SEP, jnp.int32)
        clean_BL = jnp.concatenate([x_BI, sep_B1, x_BI], axis=1)
        sources_BLJ = jnp.broadcast_to(
            jnp.asarray(self.twin_L)[None, :, None], (batch_size, self.seq_len, 1)
        )
        return clean_BL, jnp.asarray(self.positions_1PJ), sources_BLJ

    def _answer(self, x, selected, i):
        return x[self.twin_L[i]]

    def _valid_masked(self, x, selected):
        n = self.config.n_items
        if x[n] != self.SEP or selected[n]:
            return False
        first, second = np.r_[0:n], np.r_[n + 1 : 2 * n + 1]
        symbols = np.r_[first, second]
        if not self._corruptible(x[symbols], selected[symbols], *self.fill):
            return False
        both = selected[first] & selected[second]
        agree = selected[first] | selected[second] | (x[first] == x[second])
        return not both.any() and bool(agree.all())


# ---------------------------------------------------------------------------- masked recall


@dataclasses.dataclass(frozen=True)
class MaskedRecallConfig(MaskKnobs):
    """Knobs of `masked_recall`."""

    n_pairs: int = 4
    n_distractors: int = 4
    n_keys: int = 16
    n_values: int = 16

    def problems(self) -> list[tuple[str, str]]:
        found = bounds(
            self,
            n_pairs=(1, 1024),
            n_distractors=(0, 1024),
            n_keys=(1, MAX_SYMBOLS),
            n_values=(2, MAX_SYMBOLS),
        )
        entries = self.n_pairs + self.n_distractors
        for field in ("n_keys", "n_values"):
            if getattr(self, field) < entries:
                found.append(
                    (
                        field,
                        f"must be >= n_pairs + n_distractors = {entries} (every entry has "
                        f"its own key and value), got {getattr(self, field)}",
                    )
                )
        length = 2 * (2 * self.n_pairs + self.n_distractors)
        if length > MAX_SEQ_LEN:
            why = f"2 * (2 * n_pairs + n_distractors) tokens must be <= {MAX_SEQ_LEN}"
            found.append(("n_distractors", f"{why}, got {length}"))
        return found + super().problems() + twin_problems(self)


@register
class MaskedRecall(MaskedTask):
    """Key-value entries in random slots, each key of a pair twice with its value, masked:
    a selected value is the value beside the other occurrence of its key.

    Ids: 0 MASK, keys [1, 1 + n_keys), values after them. A sequence is 2P + D slots of two
    tokens (key, value), in a uniformly random order: each of the P paired keys fills two
    slots with the same value, each of the D distractor keys one slot; keys and values are
    distinct over the P + D entries. The candidates are the value positions of the paired
    keys, in P groups (the two occurrences), so the other occurrence always shows the answer;
    where it stands varies, so it must be found by matching keys (`content`). Distractors
    are never selected: their values occur once, like the twin of a masked value, so the bag
    of tokens cannot single the answer out. deps of a selected value at 2s + 1: its own key
    (2s), the key of the other occurrence (2s'), and that value (2s' + 1).
    """

    name = "masked_recall"
    context_need = "content"
    Config = MaskedRecallConfig

    def __init__(self, config: MaskedRecallConfig | None = None):
        super().__init__(config)
        c = self.config
        self.n_slots = 2 * c.n_pairs + c.n_distractors
        self.vocab_size = 1 + c.n_keys + c.n_values
        self.seq_len = 2 * self.n_slots
        self.chance = 1.0 / c.n_values
        self.fill = (1 + c.n_keys, self.vocab_size)
        # Canonical slot c holds entry c // 2 (pairs) or c - P (distractors); its twin c ^ 1.
        P = c.n_pairs
        self.entry_C = np.r_[np.arange(2 * P) // 2, P + np.arange(c.n_distractors)]
        self.twin_C = np.r_[np.arange(2 * P) ^ 1, np.full(c.n_distractors, -1)]

    def _clean(self, key, batch_size):
        c, n_slots, P = self.config, self.n_slots, self.config.n_pairs
        entries = c.n_pairs + c.n_distractors
        key_bits, value_bits, slot_bits = random_bits(
            key, batch_size, c.n_keys, c.n_values, n_slots
        )
        keys_BI = 1 + distinct(key_bits, entries)
        values_BI = 1 + c.n_keys + distinct(value_bits, entries)
        canon_BC = distinct(slot_bits, n_slots)  # slot c holds canonical slot canon[c]
        slot_of_BC = jnp.argsort(canon_BC, axis=-1).astype(jnp.int32)  # and back
        entry_BC = jnp.asarray(self.entry_C)[canon_BC]
        pair_BC2 = jnp.stack(
            [
                jnp.take_along_axis(keys_BI, entry_BC, 1),
                jnp.take_along_axis(values_BI, entry_BC, 1),
            ],
            -1,
        )
        clean_BL = pair_BC2.reshape(batch_size, self.seq_len)
        positions_BPJ = 2 * slot_of_BC[:, : 2 * P].reshape(batch_size, P, 2) + 1
        twin_BC = jnp.asarray(self.twin_C)[canon_BC]
        twin_slot_BC = jnp.take_along_axis(slot_of_BC, jnp.maximum(twin_BC, 0), 1)
        twin_slot_BC = jnp.where(twin_BC >= 0, twin_slot_BC, -1)
        c_1C = jnp.arange(n_slots)[None, :]
        value_sources_BCJ = jnp.stack(
            [
                jnp.broadcast_to(2 * c_1C, twin_slot_BC.shape),
                jnp.where(twin_slot_BC >= 0, 2 * twin_slot_BC, -1),
                jnp.where(twin_slot_BC >= 0, 2 * twin_slot_BC + 1, -1),
            ],
            -1,
        )
        none_BCJ = jnp.full_like(value_sources_BCJ, -1)
        sources_BLJ = jnp.stack([none_BCJ, value_sources_BCJ], 2).reshape(
            batch_size, self.seq_len, 3
        )
        return clean_BL, positions_BPJ, sources_BLJ

    def bag_ceiling(self):
        """An upper bound: the best reader of the bag told also which tokens were selected
        and how each was replaced. Kept at the own position it knows the answer; else the
        answer is any of the values seen once among the unselected tokens (the D
        distractors, the own twin, the twins of the other selected values not kept, whose
        kept token would name theirs), all exchangeable."""
        from scipy.stats import binom

        c = self.config
        P, D, keep = c.n_pairs, c.n_distractors, c.keep_share
        q = min(1.0, 2 * c.mask_rate)
        others_Y = np.arange(P)
        share_Y = binom.pmf(others_Y, P - 1, q * (1.0 - keep))
        natural = P * q * (keep + (1.0 - keep) * float(np.sum(share_Y / (D + 1 + others_Y))))
        forced = (1.0 - q) ** P * (keep + (1.0 - keep) / (D + 1))
        value = (natural + forced) / expected_selected(P, 2, c.mask_rate)
        how = (
            "upper bound: the bag reader also told which tokens were masked, replaced or kept "
            "(the answer is one of the values seen once)"
        )
        return value, 0.0, how

    def _slots(self, x):
        return x[0::2], x[1::2]

    def _answer(self, x, selected, i):
        keys, values = self._slots(x)
        s = i // 2
        unselected = ~selected[1::2]
        (others,) = np.nonzero((keys == keys[s]) & unselected & (np.arange(len(keys)) != s))
        return values[others[0]]

    def _valid_masked(self, x, selected):
        nk = self.config.n_keys
        keys, values = self._slots(x)
        chosen = selected[1::2]
        if selected[0::2].any() or np.any(keys < 1) or np.any(keys > nk):
            return False
        if not self._corruptible(values, chosen, *self.fill):
            return False
        for key in np.unique(keys):
            known = values[(keys == key) & ~chosen]
            if len(np.unique(known)) > 1:  # a key has one value
                return False
            if len(known) == 0 and np.any((keys == key) & chosen):  # unanswerable
                return False
        return True
