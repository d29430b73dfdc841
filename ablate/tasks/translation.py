"""Sequence-to-sequence tasks for the encoder-decoder: a source sentence, its translation.

A seq2seq task draws a source (`Seq2SeqBatch.source`, [B, S], padded after its length)
and the target the decoder is trained on by teacher forcing: decoder inputs BOS y_1 .. y_T
(then PAD), targets y_1 .. y_T EOS (then unscored 0). Every task states two dependency
masks: `cross_deps[b, i, j]` marks the source positions j that decide target i (what
cross-attention alignment is measured against), `deps[b, i, j]` the decoder positions
(what decoder self-attention alignment is measured against). The targets of these four
tasks are functions of the source alone, so `deps` is empty (decoder self-attention has
nothing to find; its alignment is NaN). EOS is decided by the source's length, which every
variant sees through the padding mask, not by a source token: its row marks no position
and does not count in alignment.

Ids: source 0 PAD, symbols [1, 1 + n_symbols); target 0 PAD, 1 BOS, 2 EOS, symbols
[3, 3 + n_symbols). The source length is uniform in [min_items, n_items], its symbols
uniform and independent. The lexicon (a bijection of symbols), the word classes and the
phrases are drawn once from `table_seed` (a fixed language, the same for every sequence).

  translate          y_i = lex(s_i) (monotone word-for-word); cross_deps {i}
  translate_reorder  as translate, but every adjacent (A, N) pair of word classes is
                     written (N, A) (as adjective-noun order flips between languages);
                     pairs cannot overlap, so the rule is local; cross_deps: the target's
                     position and the neighbour whose class decides the swap ({i, i+1} where
                     s_i is A, {i - 1, i} where it is N)
  reverse_copy       y_i = s_(n-1-i) (as a target symbol); cross_deps {n - 1 - i}
  phrase_translate   each source symbol becomes its phrase of 1 .. max_phrase target
                     symbols; cross_deps: the source position whose phrase the target is in.
                     Which phrase and which piece a target position holds also depends on
                     the earlier source tokens' phrase lengths (not marked: the mask is the
                     word alignment, what decides a token's content given its place)

What each needs (`context_need`, checked by the audit on the view below): `translate`
"position" (one fixed source position per target); `reverse_copy` "content" (which source
position depends on the length), "position" with one length; `translate_reorder` and
`phrase_translate` "partial": the own decoder token and one fixed position answer part
(measured at the defaults: fixed routing 0.65 and 0.75 against chance 0.18 and 0.17; in
phrase_translate the previous target token often tells the next piece of its phrase).

`reference(source)` is the host-side solver (numpy), `cross_sources(source)` the host
dependency rule the masks are tested against. Reference levels of these tasks:
`ablate.reference.reference_levels` reads the source and the decoder prefix as one causal
view (`Seq2SeqView`).

Axis letters: the table in `ablate.model` (S source positions).
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
    Knobs,
    Task,
    at_most,
    below,
    bounds,
    deps_from_sources,
    random_bits,
    register,
)

PAD, BOS, EOS = 0, 1, 2
FIRST_SYMBOL = 3  # target ids of symbols start here; source ids at 1
HOST_CHANCE_SEQUENCES = 5000


class Seq2SeqBatch(NamedTuple):
    """One batch of a seq2seq task. The first four fields are the decoder's, as in `Batch`
    (inputs are BOS + the shifted targets), so code that reads a decoder batch reads these."""

    inputs: jax.Array  # int32 [B, L] decoder inputs
    targets: jax.Array  # int32 [B, L], 0 where not scored
    weights: jax.Array  # float32 [B, L]
    deps: jax.Array  # bool [B, L, L]: decoder positions that decide target i
    source: jax.Array  # int32 [B, S], PAD after the source's length
    cross_deps: jax.Array  # bool [B, L, S]: source positions that decide target i


@dataclasses.dataclass(frozen=True)
class TranslationConfig(Knobs):
    """Knobs of the seq2seq tasks: source lengths in [min_items, n_items], the alphabet, and
    the seed of the language's tables."""

    n_items: int = 8
    min_items: int = 4
    n_symbols: int = 16
    table_seed: int = 0

    def problems(self) -> list[tuple[str, str]]:
        found = bounds(
            self,
            n_items=(1, MAX_SEQ_LEN // 4),
            min_items=(1, MAX_SEQ_LEN // 4),
            n_symbols=(2, MAX_SYMBOLS),
            table_seed=(0, 2**31 - 1),
        )
        return found + at_most("min_items", self.min_items, self.n_items, "n_items is the most")


@dataclasses.dataclass(frozen=True)
class PhraseConfig(TranslationConfig):
    """Knobs of `phrase_translate`: those of the others, and the longest phrase."""

    max_phrase: int = 3

    def problems(self) -> list[tuple[str, str]]:
        return super().problems() + bounds(self, max_phrase=(1, 3))


class Seq2SeqTask(Task):
    """A source-to-target task read by an encoder-decoder (see the module docstring)."""

    seq2seq: ClassVar[bool] = True
    pad_id = PAD
    Config = TranslationConfig
    #: Target tokens per source token at most (the target's length is n_items * this + 1).
    expansion: ClassVar[int] = 1

    def __init__(self, config: TranslationConfig | None = None):
        super().__init__(config)
        c = self.config
        self.source_len = c.n_items
        self.source_vocab_size = 1 + c.n_symbols
        self.seq_len = c.n_items * self._expansion() + 1
        self.vocab_size = FIRST_SYMBOL + c.n_symbols
        rng = np.random.default_rng(c.table_seed)
        # lex[source id] -> target id (0 for PAD, never read)
        self.lexicon = np.r_[0, FIRST_SYMBOL + rng.permutation(c.n_symbols)].astype(np.int32)
        self.word_class = np.r_[False, rng.permutation(np.arange(c.n_symbols) % 2 == 0)]
        self._tables(rng)
        self.chance = self._chance()

    def _expansion(self) -> int:
        return 1

    def _tables(self, rng: np.random.Generator) -> None:
        """Draw further task tables (after the lexicon and classes, from the same stream)."""

    def special_tokens(self) -> dict[int, str]:
        return {PAD: "PAD", BOS: "BOS", EOS: "EOS"}

    def source_labels(self, ids) -> list[str]:
        """A label per source id (PAD, else the id)."""
        return ["PAD" if int(i) == PAD else str(int(i)) for i in np.asarray(ids).ravel()]

    def source_valid(self, source_BS: jax.Array) -> jax.Array:
        """valid_BS: the source's real positions (cross-attention and the encoder hide the rest)."""
        return source_BS != PAD

    # ------------------------------------------------------------------ device sampler

    def sample(self, key: jax.Array, batch_size: int) -> Seq2SeqBatch:
        c, S = self.config, self.source_len
        len_bits, sym_bits = random_bits(key, batch_size, 1, S)
        n_B = c.min_items + below(len_bits[:, 0], c.n_items - c.min_items + 1)
        real_BS = jnp.arange(S)[None, :] < n_B[:, None]
        source_BS = jnp.where(real_BS, 1 + below(sym_bits, c.n_symbols), PAD)
        targets_BL, total_B, src_BLJ = self._targets(source_BS, n_B)
        L = self.seq_len
        t_1L = jnp.arange(L)[None, :]
        scored_BL = t_1L <= total_B[:, None]
        targets_BL = jnp.where(t_1L == total_B[:, None], EOS, jnp.where(scored_BL, targets_BL, 0))
        shifted_BL = jnp.concatenate(
            [jnp.full((batch_size, 1), BOS, jnp.int32), targets_BL[:, :-1]], axis=1
        )
        inputs_BL = jnp.where(scored_BL, shifted_BL, PAD)
        src_BLJ = jnp.where(
            scored_BL[:, :, None] & (t_1L < total_B[:, None])[:, :, None], src_BLJ, -1
        )
        return Seq2SeqBatch(
            inputs_BL.astype(jnp.int32),
            targets_BL.astype(jnp.int32),
            scored_BL.astype(jnp.float32),
            jnp.zeros((batch_size, L, L), bool),
            source_BS.astype(jnp.int32),
            deps_from_sources(src_BLJ, S),
        )

    @abc.abstractmethod
    def _targets(self, source_BS, n_B):
        """(targets_BL before EOS, target lengths T_B, source positions src_BLJ of each)."""

    # ------------------------------------------------------------------ host side

    def _length(self, source: np.ndarray) -> int:
        return int(np.sum(np.asarray(source) != PAD))

    def is_valid(self, source: np.ndarray) -> bool:
        """Whether `source` is a well-posed source: symbols, then padding, a length in range."""
        x = np.asarray(source).astype(np.int64)
        c = self.config
        if x.shape != (self.source_len,):
            return False
        n = self._length(x)
        return (
            c.min_items <= n <= c.n_items
            and bool(np.all(x[n:] == PAD))
            and bool(np.all((x[:n] >= 1) & (x[:n] <= c.n_symbols)))
        )

    def reference(self, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(targets, weights) over the decoder's L positions, from the source alone."""
        x = np.asarray(source).astype(np.int64)
        body = self._host_targets(x)
        targets = np.zeros(self.seq_len, np.int64)
        weights = np.zeros(self.seq_len, np.float32)
        targets[: len(body)] = body
        targets[len(body)] = EOS
        weights[: len(body) + 1] = 1.0
        return targets, weights

    def decoder_inputs(self, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Teacher forcing: BOS, then the targets shifted by one, PAD where unscored."""
        inputs = np.r_[BOS, targets[:-1]]
        return np.where(weights > 0, inputs, PAD)

    @abc.abstractmethod
    def cross_sources(self, source: np.ndarray) -> list[list[int]]:
        """Per target position (EOS and padding: []), the source positions that decide it."""

    @abc.abstractmethod
    def _host_targets(self, x: np.ndarray) -> np.ndarray:
        """The target symbols (before EOS) of a host-side source, by the task's rule."""

    def _chance(self) -> float:
        """Best accuracy of a constant per target position, estimated on host-drawn sources
        (subclasses derive it exactly where they can)."""
        c, rng = self.config, np.random.default_rng(12345)
        counts = np.zeros((self.seq_len, self.vocab_size), np.int64)
        for _ in range(HOST_CHANCE_SEQUENCES):
            n = rng.integers(c.min_items, c.n_items + 1)
            x = np.zeros(self.source_len, np.int64)
            x[:n] = rng.integers(1, c.n_symbols + 1, n)
            t, w = self.reference(x)
            counts[np.flatnonzero(w), t[w > 0]] += 1
        return float(counts.max(1).sum() / counts.sum())

    def _length_chance(self, symbol_shares) -> float:
        """Exact chance for 1:1 tasks: at position i the target is EOS when n = i, else a
        symbol whose best share (among symbols, given i < n) `symbol_shares(i, n)` says."""
        c = self.config
        lengths = np.arange(c.min_items, c.n_items + 1)
        p_n = np.full(len(lengths), 1.0 / len(lengths))
        best, scored = 0.0, 0.0
        for i in range(c.n_items + 1):
            p_eos = p_n[lengths == i].sum()
            longer = lengths > i
            p_symbol = sum(p * symbol_shares(i, n) for p, n in zip(p_n[longer], lengths[longer]))
            best += max(p_eos, p_symbol)
            scored += p_n[lengths >= i].sum()
        return float(best / scored)


class OneToOne(Seq2SeqTask):
    """A seq2seq task whose target i is the lexicon's word for ONE source position pi(i)."""

    def _chance(self):
        # A target is the lexicon's word for one uniform source symbol (a bijection), so
        # each symbol's share is 1 / n_symbols; a task whose classes say more overrides this.
        return self._length_chance(lambda i, n: 1.0 / self.config.n_symbols)

    def _targets(self, source_BS, n_B):
        """(targets_BL before EOS, target lengths T_B, source positions src_BLJ of each)."""
        pi_BL, src_BLJ = self._alignment(source_BS, n_B)
        lex = jnp.asarray(self.lexicon)
        targets_BL = lex[jnp.take_along_axis(source_BS, pi_BL, axis=1)]
        B, _, J = src_BLJ.shape
        targets_BL = jnp.concatenate([targets_BL, jnp.zeros((B, 1), jnp.int32)], axis=1)
        src_BLJ = jnp.concatenate([src_BLJ, jnp.full((B, 1, J), -1, jnp.int32)], axis=1)
        return targets_BL, n_B, src_BLJ

    @abc.abstractmethod
    def _alignment(self, source_BS, n_B):
        """(pi_BS: the source position each target copies, src_BSJ: the positions deciding it)."""


@register
class Translate(OneToOne):
    """Monotone word-for-word translation with a fixed random lexicon."""

    name = "translate"
    context_need = "position"

    def _alignment(self, source_BS, n_B):
        B, S = source_BS.shape
        pi_BS = jnp.broadcast_to(jnp.arange(S)[None, :], (B, S))
        return pi_BS, pi_BS[:, :, None]

    def _host_targets(self, x):
        return self.lexicon[x[: self._length(x)]]

    def cross_sources(self, source):
        n = self._length(source)
        return [[i] for i in range(n)] + [[] for _ in range(self.seq_len - n)]


@register
class TranslateReorder(OneToOne):
    """Translation where every adjacent (A, N) pair of word classes is written (N, A)."""

    name = "translate_reorder"
    context_need = "partial"

    def _alignment(self, source_BS, n_B):
        B, S = source_BS.shape
        is_a_BS = jnp.asarray(self.word_class)[source_BS] & (source_BS != PAD)
        is_n_BS = ~jnp.asarray(self.word_class)[source_BS] & (source_BS != PAD)
        false_B1 = jnp.zeros((B, 1), bool)
        next_n_BS = jnp.concatenate([is_n_BS[:, 1:], false_B1], axis=1)
        prev_a_BS = jnp.concatenate([false_B1, is_a_BS[:, :-1]], axis=1)
        i_1S = jnp.arange(S)[None, :]
        pi_BS = jnp.where(
            is_a_BS & next_n_BS, i_1S + 1, jnp.where(is_n_BS & prev_a_BS, i_1S - 1, i_1S)
        )
        # The neighbour whose class decides: the next one after an A, the previous after an N.
        other_BS = jnp.where(is_a_BS, i_1S + 1, i_1S - 1)
        other_BS = jnp.where((other_BS >= 0) & (other_BS < n_B[:, None]), other_BS, -1)
        src_BSJ = jnp.stack([jnp.broadcast_to(i_1S, (B, S)), other_BS], axis=-1)
        return pi_BS, src_BSJ

    def _order(self, x):
        n, a = self._length(x), self.word_class[x]
        pi = np.arange(n)
        for i in range(n):
            if a[i] and i + 1 < n and not a[i + 1]:
                pi[i] = i + 1
            elif not a[i] and i > 0 and a[i - 1]:
                pi[i] = i - 1
        return pi

    def _host_targets(self, x):
        return self.lexicon[x[self._order(x)]]

    def cross_sources(self, source):
        n, a = self._length(source), self.word_class[np.asarray(source)]
        out = []
        for i in range(n):
            other = i + 1 if a[i] else i - 1
            out.append([i] + ([other] if 0 <= other < n else []))
        return out + [[] for _ in range(self.seq_len - n)]

    def _chance(self):
        # Given the classes, a target symbol is uniform within its class (the lexicon is a
        # bijection of uniform symbols), so only the target's class share matters.
        n_sym = self.config.n_symbols
        n_a = int(self.word_class.sum())
        pa, pn = n_a / n_sym, 1 - n_a / n_sym

        def shares(i, n):
            right, left = i + 1 < n, i > 0
            p_class_n = pa * pn * right + pn * (1 - pa * left)
            p_class_a = pn * pa * left + pa * (1 - pn * right)
            return max(p_class_n / (n_sym - n_a), p_class_a / n_a)

        return self._length_chance(shares)


@register
class ReverseCopy(OneToOne):
    """The source reversed (each symbol written as its target id): y_i = s_(n-1-i)."""

    name = "reverse_copy"
    context_need = "content"

    def __init__(self, config: TranslationConfig | None = None):
        super().__init__(config)
        if self.config.min_items == self.config.n_items:  # one length: fixed positions suffice
            self.context_need = "position"
        self.lexicon = np.r_[0, FIRST_SYMBOL + np.arange(self.config.n_symbols)].astype(np.int32)

    def _alignment(self, source_BS, n_B):
        B, S = source_BS.shape
        pi_BS = jnp.clip(n_B[:, None] - 1 - jnp.arange(S)[None, :], 0, S - 1)
        return pi_BS, pi_BS[:, :, None]

    def _host_targets(self, x):
        n = self._length(x)
        return self.lexicon[x[:n][::-1]]

    def cross_sources(self, source):
        n = self._length(source)
        return [[n - 1 - i] for i in range(n)] + [[] for _ in range(self.seq_len - n)]


@register
class PhraseTranslate(Seq2SeqTask):
    """Each source symbol becomes a fixed phrase of 1 .. max_phrase target symbols."""

    name = "phrase_translate"
    context_need = "partial"
    Config = PhraseConfig

    def _expansion(self) -> int:
        return self.config.max_phrase

    def _tables(self, rng):
        c = self.config
        self.phrase_len = np.r_[0, rng.integers(1, c.max_phrase + 1, c.n_symbols)]
        phrases = FIRST_SYMBOL + rng.integers(0, c.n_symbols, (c.n_symbols + 1, c.max_phrase))
        self.phrases = np.where(
            np.arange(c.max_phrase)[None, :] < self.phrase_len[:, None], phrases, 0
        ).astype(np.int32)

    def _targets(self, source_BS, n_B):
        B, S = source_BS.shape
        L = self.seq_len
        len_BS = jnp.asarray(self.phrase_len)[source_BS]  # PAD has length 0
        end_BS = jnp.cumsum(len_BS, axis=1)
        start_BS = end_BS - len_BS
        t_1L1 = jnp.arange(L)[None, :, None]
        # The phrase target t is in: how many phrases end at or before t.
        j_BL = jnp.sum(end_BS[:, None, :] <= t_1L1, axis=-1)
        total_B = end_BS[:, -1]
        inside_BL = jnp.arange(L)[None, :] < total_B[:, None]
        j_BL = jnp.minimum(j_BL, S - 1)
        offset_BL = jnp.arange(L)[None, :] - jnp.take_along_axis(start_BS, j_BL, axis=1)
        symbol_BL = jnp.take_along_axis(source_BS, j_BL, axis=1)
        phrases = jnp.asarray(self.phrases)
        offset_BL = jnp.clip(offset_BL, 0, self.config.max_phrase - 1)
        targets_BL = jnp.where(inside_BL, phrases[symbol_BL, offset_BL], 0)
        return targets_BL, total_B, jnp.where(inside_BL, j_BL, -1)[:, :, None]

    def _host_targets(self, x):
        n = self._length(x)
        return np.concatenate([self.phrases[s, : self.phrase_len[s]] for s in x[:n]])

    def cross_sources(self, source):
        x = np.asarray(source)
        out = [[j] for j in range(self._length(x)) for _ in range(self.phrase_len[x[j]])]
        return out + [[] for _ in range(self.seq_len - len(out))]
