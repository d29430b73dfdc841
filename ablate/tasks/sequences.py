"""Tasks over a list of items: copy, reverse, sort, and selective copy.

Axis letters: the table in `ablate.model`.
"""

from __future__ import annotations

import abc
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
    at_least,
    below,
    bounds,
    deps_from_sources,
    distinct,
    make_batch,
    mode_share,
    random_bits,
    register,
    static_batch,
)


@dataclasses.dataclass(frozen=True)
class ItemsConfig(Knobs):
    """Knobs of `copy`, `reverse` and `sort`."""

    n_items: int = 8
    n_symbols: int = 8

    def problems(self) -> list[tuple[str, str]]:
        return bounds(self, n_items=(1, MAX_SEQ_LEN // 2), n_symbols=(2, MAX_SYMBOLS))


class _ItemsTask(Task):
    """x1..xN SEP BLANK..BLANK: from SEP on, position N+k must output answer k (no teacher forcing).

    Ids: 0 BLANK, 1 SEP, symbols [2, 2 + n_symbols), drawn uniformly with repetition.
    """

    Config = ItemsConfig
    BLANK, SEP = 0, 1

    def __init__(self, config: ItemsConfig | None = None):
        super().__init__(config)
        c = self.config
        self.vocab_size = 2 + c.n_symbols
        self.seq_len = 2 * c.n_items
        self.chance = 1.0 / c.n_symbols
        i_L = np.arange(self.seq_len)
        self.scored_L = i_L >= c.n_items
        self.deps_LL = self.scored_L[:, None] & self._dep_rule(i_L[:, None], i_L[None, :])

    @abc.abstractmethod
    def _dep_rule(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Which item positions j determine the answer at position i (host, numpy)."""

    @abc.abstractmethod
    def _answers(self, x_BI: jax.Array) -> jax.Array:
        """The answers for the data items x_BI, in output order."""

    @abc.abstractmethod
    def _solve_items(self, items: np.ndarray) -> np.ndarray:
        """The answers for one sequence's items (host, numpy)."""

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        c = self.config
        x_BI = 2 + below(random_bits(key, batch_size, c.n_items)[0], c.n_symbols)
        tail_BI = jnp.full((batch_size, c.n_items), self.BLANK, jnp.int32).at[:, 0].set(self.SEP)
        inputs_BL = jnp.concatenate([x_BI, tail_BI], axis=1)
        targets_BL = jnp.concatenate([jnp.zeros_like(x_BI), self._answers(x_BI)], axis=1)
        return static_batch(inputs_BL, targets_BL, self.scored_L, self.deps_LL)

    def bag_ceiling(self):
        # Copy and reverse: the answer is one of N exchangeable items (sort overrides this).
        return mode_share(self.config.n_items, self.config.n_symbols)

    def _solve(self, x, targets, weights):
        n = self.config.n_items
        if len(x) > n:
            answers = self._solve_items(x[:n])
            targets[n:], weights[n:] = answers[: len(x) - n], 1.0

    def _valid(self, x):
        n = self.config.n_items
        tail = x[n:]
        return (
            bool(np.all(x[:n] >= 2))
            and (len(tail) == 0 or tail[0] == self.SEP)
            and bool(np.all(tail[1:] == self.BLANK))
        )


@register
class Copy(_ItemsTask):
    """Copy: position N+k outputs x(k+1); deps: that one data position."""

    name = "copy"
    context_need = "position"

    def _dep_rule(self, i, j):
        return j == i - self.config.n_items

    def _answers(self, x_BI):
        return x_BI

    def _solve_items(self, items):
        return items


@register
class Reverse(_ItemsTask):
    """Reverse: position N+k outputs x(N-k); deps: that one data position."""

    name = "reverse"
    context_need = "position"

    def _dep_rule(self, i, j):
        return j == 2 * self.config.n_items - 1 - i

    def _answers(self, x_BI):
        return x_BI[:, ::-1]

    def _solve_items(self, items):
        return items[::-1]


@register
class Sort(_ItemsTask):
    """Sort: position N+k outputs the (k+1)-th smallest item; deps: all data positions.

    Any data token can move any order statistic, so every data position is a dependency. The
    chance level is the mean over k of the mode probability of the k-th order statistic of N
    uniform draws, since a position-aware constant predictor gets exactly that. The multiset
    of items determines the output, so an order-free reader (counts and the output index)
    suffices: labelled `bag`.
    """

    name = "sort"
    context_need = "bag"

    def __init__(self, config: ItemsConfig | None = None):
        super().__init__(config)
        self.chance = _order_statistic_chance(self.config.n_items, self.config.n_symbols)

    def _dep_rule(self, i, j):
        return j < self.config.n_items

    def bag_ceiling(self):
        return 1.0, 0.0, "exact: the sorted items are a function of their multiset"

    def _answers(self, x_BI):
        return jnp.sort(x_BI, axis=-1)

    def _solve_items(self, items):
        return np.sort(items)


def _order_statistic_chance(n: int, m: int) -> float:
    """Mean over k of max_v P(the k-th smallest of n uniform draws from range(m) is v)."""
    c_Y = np.arange(n + 1)
    log_comb_Y = np.array(
        [math.lgamma(n + 1) - math.lgamma(c + 1) - math.lgamma(n - c + 1) for c in c_Y]
    )
    best_I, previous_I = np.zeros(n), np.zeros(n)
    # Blocks of v keep memory at 256 x n; v = m - 1 (where every cdf is 1) comes last.
    for start in range(0, m - 1, 256):
        p_M1 = (np.arange(start, min(start + 256, m - 1)) + 1.0)[:, None] / m
        count_pmf_MY = np.exp(log_comb_Y + c_Y * np.log(p_M1) + (n - c_Y) * np.log1p(-p_M1))
        # P(k-th smallest <= v) = P(at least k + 1 draws are <= v)
        cdf_MI = np.cumsum(count_pmf_MY[:, ::-1], axis=1)[:, ::-1][:, 1:]
        pmf_MI = np.diff(cdf_MI, axis=0, prepend=previous_I[None, :])
        best_I, previous_I = np.maximum(best_I, pmf_MI.max(axis=0)), cdf_MI[-1]
    return float(np.maximum(best_I, 1.0 - previous_I).mean())


@dataclasses.dataclass(frozen=True)
class SelectiveCopyConfig(Knobs):
    """Knobs of `selective_copy`."""

    n_items: int = 4
    n_symbols: int = 8
    seq_len: int = 16

    def problems(self) -> list[tuple[str, str]]:
        found = bounds(
            self,
            n_items=(1, MAX_SEQ_LEN // 2),
            n_symbols=(2, MAX_SYMBOLS),
            seq_len=(2, MAX_SEQ_LEN),
        )
        why = "2 * n_items: a region holding the items, then one answer per item"
        return found + at_least("seq_len", self.seq_len, 2 * self.n_items, why)


@register
class SelectiveCopy(Task):
    """N data tokens scattered among blanks, then SEP and blanks: output the data tokens in order.

    Ids: 0 BLANK, 1 SEP, symbols [2, 2 + n_symbols). The region before SEP has length
    seq_len - n_items; positions SEP.. output the k-th data token. deps: the position of the
    data token being copied. The positions differ per sequence, so no fixed positional pattern
    solves it: routing must read content, if only blank versus non-blank (hence "content").
    """

    name = "selective_copy"
    context_need = "content"
    Config = SelectiveCopyConfig
    BLANK, SEP = 0, 1

    def __init__(self, config: SelectiveCopyConfig | None = None):
        super().__init__(config)
        c = self.config
        self.vocab_size = 2 + c.n_symbols
        self.seq_len = c.seq_len
        self.region = c.seq_len - c.n_items
        self.chance = 1.0 / c.n_symbols

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        n, region, seq_len = self.config.n_items, self.region, self.seq_len
        pos_bits, item_bits = random_bits(key, batch_size, region, n)
        pos_BI = jnp.sort(distinct(pos_bits, n), axis=-1)
        x_BI = 2 + below(item_bits, self.config.n_symbols)
        rows_B1 = jnp.arange(batch_size)[:, None]
        region_BU = (
            jnp.full((batch_size, region), self.BLANK, jnp.int32).at[rows_B1, pos_BI].set(x_BI)
        )
        tail_BI = jnp.full((batch_size, n), self.BLANK, jnp.int32).at[:, 0].set(self.SEP)
        inputs_BL = jnp.concatenate([region_BU, tail_BI], axis=1)
        targets_BL = jnp.concatenate([jnp.zeros_like(region_BU), x_BI], axis=1)
        weights_L = jnp.arange(seq_len) >= region
        weights_BL = jnp.broadcast_to(weights_L[None, :], (batch_size, seq_len))
        src_BL = jnp.concatenate([jnp.full((batch_size, region), -1, jnp.int32), pos_BI], axis=1)
        deps_BLL = deps_from_sources(src_BL[:, :, None], seq_len)
        return make_batch(inputs_BL, targets_BL, weights_BL, deps_BLL)

    def bag_ceiling(self):
        return mode_share(self.config.n_items, self.config.n_symbols)

    def _solve(self, x, targets, weights):
        if len(x) > self.region:
            data = x[: self.region][x[: self.region] != self.BLANK]
            targets[self.region :] = data[: len(x) - self.region]
            weights[self.region :] = 1.0

    def _valid(self, x):
        n, region = self.config.n_items, x[: self.region]
        tail = x[self.region :]
        n_data = int(np.sum(region != self.BLANK))
        return (
            bool(np.all(region != self.SEP))
            and n_data <= n
            and n_data + (self.region - len(region)) >= n
            and (len(tail) == 0 or tail[0] == self.SEP)
            and bool(np.all(tail[1:] == self.BLANK))
        )
