"""Controls: tasks that need no pairwise routing (majority: the bag; memorize: none).

Axis letters: the table in `ablate.model`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from ablate.tasks.base import (
    MAX_SEQ_LEN,
    MAX_SYMBOLS,
    Batch,
    Knobs,
    Task,
    at_most,
    below,
    bounds,
    distinct,
    random_bits,
    register,
    static_batch,
)


@dataclasses.dataclass(frozen=True)
class MajorityConfig(Knobs):
    """Knobs of `majority`."""

    n_items: int = 32
    n_symbols: int = 8

    def problems(self) -> list[tuple[str, str]]:
        return bounds(self, n_items=(1, MAX_SEQ_LEN - 1), n_symbols=(2, MAX_SYMBOLS))


def balanced_counts(n: int, m: int) -> np.ndarray:
    """Counts of m symbols summing to n, the first a unique mode by one, the rest level.

    The mode gets the fewest copies that can still lead, ceil((n + m - 1) / m); the other
    symbols share the rest as evenly as possible, so one token says as little as possible
    about which symbol leads.
    """
    mode = -(-(n + m - 1) // m)
    q, r = divmod(n - mode, m - 1)
    return np.array([mode] + [q + 1] * r + [q] * (m - 1 - r), np.int64)


@register
class Majority(Task):
    """N symbols then a QUERY token whose target is the most frequent symbol (a unique mode).

    Ids: 0 QUERY, symbols [1, 1 + n_symbols). The counts are balanced (`balanced_counts`):
    the mode leads the others by one copy at most, and which symbol gets which count and
    where each copy stands are uniformly random. So no position is special and one token
    says little about the answer (with counts drawn freely, the mode of 16 draws from 8
    symbols holds 28% of the positions: one fixed position would already give 0.28 against
    the 1/8 chance), while the bag of tokens determines it. Chance is 1/n_symbols. deps:
    all data positions. Averaging suffices: a control.
    """

    name = "majority"
    context_need = "none"
    Config = MajorityConfig
    QUERY = 0

    def __init__(self, config: MajorityConfig | None = None):
        super().__init__(config)
        c = self.config
        self.vocab_size = 1 + c.n_symbols
        self.seq_len = c.n_items + 1
        self.chance = 1.0 / c.n_symbols
        i_L = np.arange(self.seq_len)
        self.scored_L = i_L == c.n_items
        self.deps_LL = self.scored_L[:, None] & (i_L[None, :] < c.n_items)
        counts = balanced_counts(c.n_items, c.n_symbols)
        self.slot_rank_I = np.repeat(np.arange(c.n_symbols), counts).astype(np.int32)

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        n, m = self.config.n_items, self.config.n_symbols
        symbol_bits, slot_bits = random_bits(key, batch_size, m, n)
        symbol_of_rank_BM = distinct(symbol_bits, m)  # rank 0 is the mode
        slots_BI = jnp.asarray(self.slot_rank_I)[distinct(slot_bits, n)]
        x_BI = jnp.take_along_axis(symbol_of_rank_BM, slots_BI, axis=1) + 1
        query_B1 = jnp.full((batch_size, 1), self.QUERY, jnp.int32)
        inputs_BL = jnp.concatenate([x_BI, query_B1], axis=1)
        targets_BL = jnp.where(self.scored_L[None, :], symbol_of_rank_BM[:, :1] + 1, 0)
        return static_batch(inputs_BL, targets_BL, self.scored_L, self.deps_LL)

    def bag_ceiling(self):
        return 1.0, 0.0, "exact: the counts name the mode"

    def _solve(self, x, targets, weights):
        if len(x) == self.seq_len:
            counts = np.bincount(x[:-1], minlength=self.vocab_size)
            targets[-1], weights[-1] = np.argmax(counts), 1.0

    def _valid(self, x):
        n = self.config.n_items
        if np.any(x[:n] == self.QUERY) or (len(x) > n and x[n] != self.QUERY):
            return False
        if len(x) < n:  # filling the rest with a current front-runner makes its lead unique
            return True
        counts = np.bincount(x[:n], minlength=self.vocab_size)
        return int(np.sum(counts == counts.max())) == 1


@dataclasses.dataclass(frozen=True)
class MemorizeConfig(Knobs):
    """Knobs of `memorize`."""

    seq_len: int = 16
    n_keys: int = 32
    n_values: int = 8
    table_seed: int = 0

    def problems(self) -> list[tuple[str, str]]:
        found = bounds(
            self,
            seq_len=(1, MAX_SEQ_LEN),
            n_keys=(1, MAX_SYMBOLS),
            n_values=(2, MAX_SYMBOLS),
            table_seed=(0, 2**31 - 1),
        )
        return found + at_most(
            "n_values", self.n_values, self.n_keys, "n_keys: each value answers a key"
        )


@register
class Memorize(Task):
    """Every token is a key; its target is the value a fixed table (from table_seed) assigns.

    Ids: values [0, n_values), keys [n_values, n_values + n_keys). The table is the same for
    all sequences (memorisation, no in-context retrieval) and balanced: each value answers
    floor or ceil(n_keys / n_values) keys, so chance is ceil(n_keys / n_values) / n_keys.
    deps: the position itself.
    """

    name = "memorize"
    context_need = "none"
    Config = MemorizeConfig

    def __init__(self, config: MemorizeConfig | None = None):
        super().__init__(config)
        c = self.config
        self.vocab_size = c.n_values + c.n_keys
        self.seq_len = c.seq_len
        rng = np.random.default_rng(c.table_seed)
        self.table = rng.permutation(np.arange(c.n_keys) % c.n_values).astype(np.int32)
        self.chance = math.ceil(c.n_keys / c.n_values) / c.n_keys

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        c = self.config
        inputs_BL = c.n_values + below(random_bits(key, batch_size, c.seq_len)[0], c.n_keys)
        targets_BL = jnp.asarray(self.table)[inputs_BL - c.n_values]
        scored_L = np.ones(c.seq_len, bool)
        return static_batch(inputs_BL, targets_BL, scored_L, np.diag(scored_L))

    def bag_ceiling(self):
        return 1.0, 0.0, "exact: the own token determines the target"

    def _solve(self, x, targets, weights):
        targets[:], weights[:] = self.table[x - self.config.n_values], 1.0

    def _valid(self, x):
        return bool(np.all(x >= self.config.n_values))
