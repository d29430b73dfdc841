"""Recall tasks: associative recall (one or two hops), multi-query recall (MQAR), induction.

Axis letters: the table in `ablate.model`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ablate.config import one_of
from ablate.tasks.base import (
    MAX_SEQ_LEN,
    MAX_SYMBOLS,
    MAX_VOCAB,
    Batch,
    Knobs,
    Task,
    at_least,
    at_most,
    below,
    bounds,
    deps_from_sources,
    distinct,
    make_batch,
    mode_share,
    random_bits,
    register,
)


@dataclasses.dataclass(frozen=True)
class AssocRecallConfig(Knobs):
    """Knobs of `assoc_recall`."""

    n_pairs: int = 8
    n_keys: int = 8
    n_values: int = 8
    pair_tokens: str = "joint"

    def problems(self) -> list[tuple[str, str]]:
        found = bounds(self, n_pairs=(1, 1024), n_keys=(1, MAX_SYMBOLS), n_values=(2, MAX_SYMBOLS))
        if message := one_of(self.pair_tokens, ("joint", "separate")):
            found.append(("pair_tokens", message))
        keys = f"n_keys allows {self.n_keys} distinct keys"
        found += at_most("n_pairs", self.n_pairs, self.n_keys, keys)
        vocab = self.n_keys * (self.n_values + 1) + self.n_values
        if self.pair_tokens == "joint" and vocab > MAX_VOCAB:
            message = (
                f"n_keys * (n_values + 1) + n_values ids (one per pair) must be <= {MAX_VOCAB}"
            )
            found.append(("n_values", f"{message}, got {vocab}"))
        return found


@register
class AssocRecall(Task):
    """Key-value pairs, then one query key at the last position; the target is its value.

    Ids: keys [0, n_keys) (also the query), values [n_keys, n_keys + n_values) (the targets),
    and with pair_tokens="joint" one id per (key, value) pair after those. "joint" puts a pair in
    one token (one hop: match the query against the pair token); "separate" writes key then
    value (two hops: find the key, read the token after it). Keys in a sequence are distinct,
    values uniform and independent. deps: the queried pair's position(s) and the query itself.

    With "joint" pair tokens the bag of tokens holds the answer (a pair token names its key
    and value), so an order-free reader could answer, while each fixed position holds one
    candidate answer: that configuration is labelled `bag` (no pairwise routing needed in
    principle; whether a finite model can read the answer from an average is what its variants
    measure). "separate" is a `content` task.
    """

    name = "assoc_recall"
    context_need = "content"
    Config = AssocRecallConfig

    def __init__(self, config: AssocRecallConfig | None = None):
        super().__init__(config)
        c = self.config
        self.joint = c.pair_tokens == "joint"
        self.pair_base = c.n_keys + c.n_values
        self.vocab_size = self.pair_base + (c.n_keys * c.n_values if self.joint else 0)
        self.seq_len = (1 if self.joint else 2) * c.n_pairs + 1
        self.chance = 1.0 / c.n_values
        if self.joint:
            self.context_need = "bag"

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        c, n_pairs, seq_len = self.config, self.config.n_pairs, self.seq_len
        key_bits, value_bits, query_bits = random_bits(key, batch_size, c.n_keys, n_pairs, 1)
        keys_BP = distinct(key_bits, n_pairs)
        values_BP = below(value_bits, c.n_values)
        query_B1 = below(query_bits, n_pairs)
        answer_B1 = jnp.take_along_axis(values_BP, query_B1, axis=1) + c.n_keys
        if self.joint:
            context_BC = self.pair_base + keys_BP * c.n_values + values_BP
            src_B1J = query_B1[:, :, None]
        else:
            context_BC = jnp.stack([keys_BP, values_BP + c.n_keys], axis=-1)
            context_BC = context_BC.reshape(batch_size, 2 * n_pairs)
            src_B1J = jnp.stack([2 * query_B1, 2 * query_B1 + 1], axis=-1)
        query_key_B1 = jnp.take_along_axis(keys_BP, query_B1, axis=1)
        inputs_BL = jnp.concatenate([context_BC, query_key_B1], axis=1)
        last_L = jnp.arange(seq_len) == seq_len - 1
        targets_BL = jnp.where(last_L[None, :], answer_B1, 0)
        weights_BL = jnp.broadcast_to(last_L[None, :], (batch_size, seq_len))
        self_B1J = jnp.full((batch_size, 1, 1), seq_len - 1, jnp.int32)
        src_B1J = jnp.concatenate([src_B1J, self_B1J], axis=-1)
        src_BLJ = jnp.where(last_L[None, :, None], src_B1J, -1)
        return make_batch(inputs_BL, targets_BL, weights_BL, deps_from_sources(src_BLJ, seq_len))

    def bag_ceiling(self):
        if self.joint:  # a pair token names its key and value: the bag holds the answer
            return 1.0, 0.0, "exact: each pair token carries its key and value"
        return mode_share(self.config.n_pairs, self.config.n_values)

    def _pairs(self, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nv = self.config.n_values
        if self.joint:
            return (context - self.pair_base) // nv, (context - self.pair_base) % nv
        return context[0::2], context[1::2] - self.config.n_keys

    def _solve(self, x, targets, weights):
        if len(x) == self.seq_len:
            keys, values = self._pairs(x[:-1])
            (match,) = np.flatnonzero(keys == x[-1])
            targets[-1], weights[-1] = values[match] + self.config.n_keys, 1.0

    def _valid(self, x):
        nk = self.config.n_keys
        context = x[: self.seq_len - 1]
        if self.joint:
            shape_ok = bool(np.all(context >= self.pair_base))
        else:
            shape_ok = bool(np.all(context[0::2] < nk) and np.all(context[1::2] >= nk))
            shape_ok = shape_ok and bool(np.all(context[1::2] < self.pair_base))
        keys, _ = self._pairs(context)
        if not shape_ok or len(np.unique(keys)) != len(keys):
            return False
        return len(x) < self.seq_len or (x[-1] < nk and x[-1] in keys)


@dataclasses.dataclass(frozen=True)
class MQARConfig(Knobs):
    """Knobs of `mqar`."""

    n_pairs: int = 4
    seq_len: int = 16
    n_keys: int = 8
    n_values: int = 8
    distinct_values: bool = True

    def problems(self) -> list[tuple[str, str]]:
        found = bounds(
            self,
            n_pairs=(1, 1024),
            seq_len=(3, MAX_SEQ_LEN),
            n_keys=(1, MAX_SYMBOLS),
            n_values=(2, MAX_SYMBOLS),
        )
        keys = f"n_keys allows {self.n_keys} distinct keys"
        found += at_most("n_pairs", self.n_pairs, self.n_keys, keys)
        if self.distinct_values:
            values = f"n_values allows {self.n_values} distinct values (distinct_values = true)"
            found += at_most("n_pairs", self.n_pairs, self.n_values, values)
        why = "3 * n_pairs: key and value per pair, then one query per pair"
        return found + at_least("seq_len", self.seq_len, 3 * self.n_pairs, why)


@register
class MQAR(Task):
    """Multi-query associative recall (Zoology): k1 v1 .. kP vP, then every key queried once.

    Ids: 0 filler, keys [1, 1 + n_keys), values after them. Keys are distinct and, by
    default, so are values (Zoology's recipe; `distinct_values = false` draws them with
    replacement, and then the most frequent value of the context is right more often than
    1/P without any pairing). The P queries sit at uniformly random distinct positions of
    the region after the context (Zoology draws power-law gaps), in random order, fillers
    elsewhere (unscored). The target at a query is its key's value. deps of a query: its
    matching key, that key's value, and the query itself.
    """

    name = "mqar"
    context_need = "content"
    Config = MQARConfig
    FILLER = 0

    def __init__(self, config: MQARConfig | None = None):
        super().__init__(config)
        c = self.config
        self.vocab_size = 1 + c.n_keys + c.n_values
        self.seq_len = c.seq_len
        self.chance = 1.0 / c.n_values

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        c, n_pairs, seq_len = self.config, self.config.n_pairs, self.seq_len
        region = seq_len - 2 * n_pairs
        value_width = c.n_values if c.distinct_values else n_pairs
        key_bits, value_bits, slot_bits = random_bits(
            key, batch_size, c.n_keys, value_width, region
        )
        keys_BP = 1 + distinct(key_bits, n_pairs)
        if c.distinct_values:
            values_BP = 1 + c.n_keys + distinct(value_bits, n_pairs)
        else:
            values_BP = 1 + c.n_keys + below(value_bits, c.n_values)
        context_BC = jnp.stack([keys_BP, values_BP], axis=-1).reshape(batch_size, 2 * n_pairs)
        # A slot's rank among iid draws: the P lowest-ranked slots hold queries, and the rank
        # names the pair asked, so both the slots and the query order are uniform.
        rank_BQ = jnp.argsort(jnp.argsort(slot_bits, axis=-1), axis=-1).astype(jnp.int32)
        is_query_BQ = rank_BQ < n_pairs
        pair_BQ = jnp.minimum(rank_BQ, n_pairs - 1)
        queries_BQ = jnp.take_along_axis(keys_BP, pair_BQ, axis=1)
        answers_BQ = jnp.take_along_axis(values_BP, pair_BQ, axis=1)
        inputs_BL = jnp.concatenate(
            [context_BC, jnp.where(is_query_BQ, queries_BQ, self.FILLER)], axis=1
        )
        zeros_BC = jnp.zeros((batch_size, 2 * n_pairs), jnp.int32)
        targets_BL = jnp.concatenate([zeros_BC, jnp.where(is_query_BQ, answers_BQ, 0)], axis=1)
        pair_BL = jnp.concatenate([zeros_BC - 1, jnp.where(is_query_BQ, pair_BQ, -1)], axis=1)
        scored_BL = pair_BL >= 0
        self_BL = jnp.where(scored_BL, jnp.arange(seq_len)[None, :], -1)
        # An unscored row has pair -1, so its key and value sources (-2, -1) mark nothing.
        src_BLJ = jnp.stack([2 * pair_BL, 2 * pair_BL + 1, self_BL], axis=-1)
        return make_batch(inputs_BL, targets_BL, scored_BL, deps_from_sources(src_BLJ, seq_len))

    def bag_ceiling(self):
        # Without order, the value paired with the query key is any of the P context values.
        if self.config.distinct_values:
            return 1.0 / self.config.n_pairs, 0.0, "exact: 1 / n_pairs distinct values"
        return mode_share(self.config.n_pairs, self.config.n_values)

    def _solve(self, x, targets, weights):
        context = 2 * self.config.n_pairs
        keys, values = x[0:context:2], x[1:context:2]
        for i in range(context, len(x)):
            if x[i] != self.FILLER:
                (match,) = np.flatnonzero(keys == x[i])
                targets[i], weights[i] = values[match], 1.0

    def _valid(self, x):
        nk, n_pairs, context = self.config.n_keys, self.config.n_pairs, 2 * self.config.n_pairs
        keys, values = x[0:context:2], x[1:context:2]
        if np.any(keys < 1) or np.any(keys > nk) or np.any(values <= nk):
            return False
        if len(np.unique(keys)) != len(keys):
            return False
        if self.config.distinct_values and len(np.unique(values)) != len(values):
            return False
        queries = x[context:][x[context:] != self.FILLER]
        if not np.all(np.isin(queries, keys)):  # values in the region are not queries either
            return False
        room = self.seq_len - len(x)
        return len(queries) <= n_pairs and len(queries) + room >= n_pairs


@dataclasses.dataclass(frozen=True)
class CompetingRecallConfig(Knobs):
    """Knobs of `competing_recall`."""

    n_pairs: int = 4
    n_keys: int = 8
    n_values: int = 8
    cheap_share: float = 0.5

    @property
    def distinct_values(self) -> bool:  # as MQAR's recipe: values are always distinct
        return True

    def problems(self) -> list[tuple[str, str]]:
        found = bounds(self, n_pairs=(2, 1024), n_keys=(2, MAX_SYMBOLS), n_values=(2, MAX_SYMBOLS))
        found += bounds(self, cheap_share=(0.0, 1.0))
        found += at_most("n_pairs", self.n_pairs, self.n_keys, f"{self.n_keys} distinct keys")
        values = f"n_values allows {self.n_values} distinct values"
        return found + at_most("n_pairs", self.n_pairs, self.n_values, values)


COIN = 2**16  # cheap_share's resolution: a 16-bit coin per sequence


@register
class CompetingRecall(MQAR):
    """Multi-query recall with two routes to each answer: by content, and a cheaper one.

    k1 v1 .. kP vP, then the P queries, one per slot right after the context (no fillers):
    the target at query slot t is the value of the key it names (distinct keys and values, as
    in `mqar`). With probability `cheap_share` (p) per sequence the queries come in context
    order (slot t names pair t); otherwise in a uniformly random order. Two strategies then
    help: the content route (find the key equal to the query, read the value after it) is
    always right; the cheap route (slot t copies position 2t + 1, a fixed position per
    target) is right in every query of an in-order sequence and, elsewhere, where a random
    order happens to leave pair t at slot t, so its accuracy is `cheap_level` = p + (1 - p)/P.
    At p = 1 both routes are perfect on the training distribution. deps (the content route's
    mask) are mqar's; the cheap route's mask is `cheap_deps`.

    Which route training took is read on conflict sequences (`conflict_sample`: random order,
    scored only at slots t whose query does not name pair t), where the cheap route's answer
    is always wrong (values are distinct) and only the content route answers. Labelled
    `competing` (the audit checks that nothing cheaper than the declared cheap route exists).
    """

    name = "competing_recall"
    context_need = "competing"
    Config = CompetingRecallConfig
    cheap_route = "slot t copies the value of pair t (a fixed position per query slot)"

    def __init__(self, config: CompetingRecallConfig | None = None):
        Task.__init__(self, config)
        c = self.config
        self.vocab_size, self.seq_len = 1 + c.n_keys + c.n_values, 3 * c.n_pairs
        self.chance = 1.0 / c.n_values
        self.threshold = round(c.cheap_share * COIN)
        p = self.threshold / COIN
        self.cheap_level = p + (1.0 - p) / c.n_pairs
        self.conflict_share = 1.0 - self.cheap_level  # random order, slot t not asking pair t

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        return self._draw(key, batch_size, conflict=False)

    def conflict_sample(self, key: jax.Array, batch_size: int) -> Batch:
        """Random-order sequences scored only where slot t does not ask pair t."""
        return self._draw(key, batch_size, conflict=True)

    def _draw(self, key: jax.Array, batch_size: int, conflict: bool) -> Batch:
        c, P, L = self.config, self.config.n_pairs, self.seq_len
        key_bits, value_bits, order_bits, coin_bits = random_bits(
            key, batch_size, c.n_keys, c.n_values, P, 1
        )
        keys_BP = 1 + distinct(key_bits, P)
        values_BP = 1 + c.n_keys + distinct(value_bits, P)
        slot_1P = jnp.arange(P)[None, :]
        in_order_B1 = (coin_bits % COIN < self.threshold) & (not conflict)
        pair_BP = jnp.where(in_order_B1, slot_1P, distinct(order_bits, P))
        context_BC = jnp.stack([keys_BP, values_BP], axis=-1).reshape(batch_size, 2 * P)
        queries_BP = jnp.take_along_axis(keys_BP, pair_BP, axis=1)
        answers_BP = jnp.take_along_axis(values_BP, pair_BP, axis=1)
        scored_BP = (pair_BP != slot_1P) if conflict else jnp.ones_like(pair_BP, bool)
        inputs_BL = jnp.concatenate([context_BC, queries_BP], axis=1)
        zeros_BC = jnp.zeros((batch_size, 2 * P), jnp.int32)
        targets_BL = jnp.concatenate([zeros_BC, jnp.where(scored_BP, answers_BP, 0)], axis=1)
        asked_BP = jnp.where(scored_BP, pair_BP, -1)
        pair_BL = jnp.concatenate([zeros_BC - 1, asked_BP], axis=1)
        scored_BL = pair_BL >= 0
        self_BL = jnp.where(scored_BL, jnp.arange(L)[None, :], -1)
        src_BLJ = jnp.stack([2 * pair_BL, 2 * pair_BL + 1, self_BL], axis=-1)
        return make_batch(inputs_BL, targets_BL, scored_BL, deps_from_sources(src_BLJ, L))

    def conflict_bag_ceiling(self):
        # Order-free, a conflict query's value is still any of the P distinct context values.
        return 1.0 / self.config.n_pairs, 0.0, "exact: 1 / n_pairs distinct values"

    def cheap_positions(self, i: int) -> list[int]:
        """Slot t = i - 2P copies the value of pair t, at position 2t + 1."""
        t = i - 2 * self.config.n_pairs
        return [2 * t + 1] if t >= 0 else []


# ---------------------------------------------------------------------------- induction


@dataclasses.dataclass(frozen=True)
class InductionConfig(Knobs):
    """Knobs of `induction`."""

    repeat_len: int = 8
    n_symbols: int = 16
    max_gap: int = 8

    def problems(self) -> list[tuple[str, str]]:
        found = bounds(
            self,
            repeat_len=(2, (MAX_SEQ_LEN - 1) // 2),
            n_symbols=(2, MAX_SYMBOLS),
            max_gap=(0, MAX_SEQ_LEN - 1 - 2 * self.repeat_len),
        )
        why = "repeat_len: the repeated tokens are distinct, so each occurs once before"
        return found + at_least("n_symbols", self.n_symbols, self.repeat_len, why)


@register
class Induction(Task):
    """BOS r1..rT, g fillers, r1..rT, fillers: in the second copy, predict what followed before.

    Ids: 0 BOS, 1 FILL, symbols [2, 2 + n_symbols); r is drawn without repetition so the
    previous occurrence of every token is unique. The gap g is uniform in [0, max_gap] per
    sequence and the rest of the fixed length is filled at the end, so the distance back to
    the previous occurrence varies: it must be found by content. With max_gap = 0 the
    distance is always T - 1 and fixed positional routing suffices, so that configuration is
    labelled `position`. Scored: the second-copy tokens r1..r(T-1), target r(t+1). deps: the
    first-copy position holding r(t+1) and the current position. The next input is the target
    itself (teacher forcing), so leaks_future is True.
    """

    name = "induction"
    context_need = "content"
    leaks_future = True
    Config = InductionConfig
    BOS, FILL = 0, 1

    def __init__(self, config: InductionConfig | None = None):
        super().__init__(config)
        c = self.config
        self.vocab_size = 2 + c.n_symbols
        self.seq_len = 1 + 2 * c.repeat_len + c.max_gap
        self.chance = 1.0 / c.n_symbols
        if c.max_gap == 0:
            self.context_need = "position"

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        c, T, L = self.config, self.config.repeat_len, self.seq_len
        bits_BM, gap_bits_B1 = random_bits(key, batch_size, c.n_symbols, 1)
        r_BT = 2 + distinct(bits_BM, T)
        gap_B1 = below(gap_bits_B1, c.max_gap + 1)
        i_1L = jnp.arange(L)[None, :]
        t_BL = i_1L - (T + 1 + gap_B1)  # index into the second copy
        first_1L = (i_1L >= 1) & (i_1L <= T)
        second_BL = (t_BL >= 0) & (t_BL < T)
        r_at_BL = jnp.take_along_axis(
            r_BT, jnp.clip(jnp.where(first_1L, i_1L - 1, t_BL), 0, T - 1), 1
        )
        inputs_BL = jnp.where(
            i_1L == 0, self.BOS, jnp.where(first_1L | second_BL, r_at_BL, self.FILL)
        )
        scored_BL = second_BL & (t_BL < T - 1)
        next_BL = jnp.take_along_axis(r_BT, jnp.clip(t_BL + 1, 0, T - 1), 1)
        targets_BL = jnp.where(scored_BL, next_BL, 0)
        source_BL = jnp.where(scored_BL, t_BL + 2, -1)
        j_11L = jnp.arange(L)[None, None, :]
        deps_BLL = scored_BL[:, :, None] & (
            (j_11L == source_BL[:, :, None]) | (j_11L == jnp.arange(L)[None, :, None])
        )
        return make_batch(inputs_BL, targets_BL, scored_BL, deps_BLL)

    def bag_ceiling(self):
        # At second-copy index t the bag shows which tokens appeared twice (r1..r(t+1)), not
        # their order: the target is any of the T - 1 - t seen once.
        T = self.config.repeat_len
        value = sum(1.0 / (T - 1 - t) for t in range(T - 1)) / (T - 1)
        return value, 0.0, "exact: mean over t of 1 / (tokens not yet repeated)"

    def _second_start(self, x) -> int | None:
        """Where the second copy starts (None if it has not started within x)."""
        after = np.flatnonzero(x[self.config.repeat_len + 1 :] != self.FILL)
        return None if len(after) == 0 else self.config.repeat_len + 1 + int(after[0])

    def _solve(self, x, targets, weights):
        T = self.config.repeat_len
        first, start = x[1 : T + 1], self._second_start(x)
        if start is None:
            return
        for i in range(start, min(start + T - 1, len(x))):
            (match,) = np.flatnonzero(first == x[i])
            targets[i], weights[i] = x[match + 2], 1.0

    def _valid(self, x):
        T = self.config.repeat_len
        first = x[1 : T + 1]
        if x[0] != self.BOS or np.any(first < 2) or len(np.unique(first)) != len(first):
            return False
        start = self._second_start(x)
        if start is None:  # only fillers so far: valid while the gap can still grow
            return len(x) - (T + 1) <= self.config.max_gap
        if start - (T + 1) > self.config.max_gap:
            return False
        second, tail = x[start : start + T], x[start + T :]
        return bool(np.array_equal(second, first[: len(second)])) and bool(
            np.all(tail == self.FILL)
        )
