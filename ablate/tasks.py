"""Synthetic sequence-tagging tasks, sampled on the device, with their ground-truth dependencies.

Every task is read by a causal language model: the target at position i is a function of
inputs[0..i] only, and `Batch.deps[b, i, j]` marks the input positions j <= i that determine
it (the mask M that attention alignment is measured against). Unscored positions have
target 0, weight 0 and an all-False deps row.

`sample(key, batch_size)` is pure jax.numpy/jax.random, so it runs inside a jitted, scanned,
vmapped training step. `reference` and `is_valid` are independent host-side (numpy)
definitions of the same task, used by the tests. Both accept a prefix inputs[:n] as well as a
whole sequence: `reference` then gives the targets of the first n positions, and `is_valid`
says whether the prefix can be completed to a valid instance. `is_valid` accepts every
well-posed instance (targets defined by the task's rule), which is a superset of what
`sample` draws: e.g. an MQAR query may name a key that another query already named.

`chance` is the accuracy per scored token of the best predictor that sees no input token but
may know the target's position (what a model without any context could reach); for most
tasks the targets are uniform so it is 1/(number of answer values), for `sort` it is the
mean mode probability of each order statistic. `leaks_future` is True when an input after a
scored position reveals its target (teacher forcing), so only causal models may train on it.

Axis letters: B batch, L sequence length, P key-value pairs, N data items, R region length,
S source positions per target, M symbols.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ablate.config import ConfigError, check, from_dict, in_range, one_of

MAX_SEQ_LEN = 4096
MAX_SYMBOLS = (
    8192  # per alphabet (keys, values, symbols); distinct draws argsort B x this many words
)
MAX_VOCAB = 65536


class Batch(NamedTuple):
    """One batch of a task: token ids, targets, target weights and the dependency mask."""

    inputs: jax.Array  # int32 [B, L]
    targets: jax.Array  # int32 [B, L], 0 where not scored
    weights: jax.Array  # float32 [B, L], 1.0 at scored positions
    deps: jax.Array  # bool [B, L, L]: deps[b, i, j] iff input j determines target i


def _bounds(config: Any, **ranges: tuple[int, int]) -> list[tuple[str, str]]:
    """(field, message) for each named field of `config` outside its inclusive range."""
    found = []
    for field, (low, high) in ranges.items():
        message = in_range(getattr(config, field), low, high)
        if message:
            found.append((field, message))
    return found


def _at_least(field: str, value: int, bound: int, why: str) -> list[tuple[str, str]]:
    """[(field, message naming the bound and why)] if value < bound, else []."""
    return [] if value >= bound else [(field, f"must be >= {bound} ({why}), got {value}")]


def _at_most(field: str, value: int, bound: int, why: str) -> list[tuple[str, str]]:
    """[(field, message naming the bound and why)] if value > bound, else []."""
    return [] if value <= bound else [(field, f"must be <= {bound} ({why}), got {value}")]


class _Knobs:
    """Base of the task configs: validated as soon as they are built."""

    def problems(self) -> list[tuple[str, str]]:
        return []

    def __post_init__(self):
        check(self)


def _random_bits(key: jax.Array, batch_size: int, *widths: int) -> list[jax.Array]:
    """Independent uint32 blocks [B, w], one per width, cut from one call to the generator.

    One call, not one per quantity: each call compiles its own copy of the generator, which
    dominates a sampler's compile time on CPU.
    """
    bits_BW = jax.random.bits(key, (batch_size, sum(widths)), jnp.uint32)
    edges = np.cumsum((0, *widths))
    return [bits_BW[:, a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _below(bits: jax.Array, n: int) -> jax.Array:
    """Uniform int32 in [0, n) (modulo bias at most n / 2**32)."""
    return (bits % n).astype(jnp.int32)


def _distinct(bits_BN: jax.Array, k: int) -> jax.Array:
    """[B, k] int32: per row, k distinct values of range(N) in uniformly random order."""
    # argsort is stable, so even tied draws give a permutation.
    return jnp.argsort(bits_BN, axis=-1)[:, :k].astype(jnp.int32)


def _deps_from_sources(src_BLS: jax.Array, seq_len: int) -> jax.Array:
    """deps[b, i, j] = any_s src[b, i, s] == j; negative sources mark nothing."""
    j_111L = jnp.arange(seq_len)[None, None, None, :]
    return jnp.any(src_BLS[:, :, :, None] == j_111L, axis=2)


def _batch(inputs_BL, targets_BL, weights_BL, deps_BLL) -> Batch:
    return Batch(
        inputs_BL.astype(jnp.int32),
        targets_BL.astype(jnp.int32),
        weights_BL.astype(jnp.float32),
        deps_BLL.astype(jnp.bool_),
    )


def _static_batch(inputs_BL, targets_BL, weights_L: np.ndarray, deps_LL: np.ndarray) -> Batch:
    """A Batch whose scored positions and deps are the same for every sequence."""
    batch_size, seq_len = inputs_BL.shape
    weights_BL = jnp.broadcast_to(jnp.asarray(weights_L)[None, :], (batch_size, seq_len))
    deps_BLL = jnp.broadcast_to(jnp.asarray(deps_LL)[None], (batch_size, seq_len, seq_len))
    return _batch(inputs_BL, targets_BL, weights_BL, deps_BLL)


class Task(abc.ABC):
    """A task: device-side sampler plus host-side reference solver and validity check."""

    #: False for tasks without a ground-truth dependency mask (real data): no alignment.
    has_dependencies: ClassVar[bool] = True
    #: The padding id, for tasks whose sequences are padded (None: never padded).
    pad_id: ClassVar[int | None] = None

    name: ClassVar[str]
    # "content" (content-dependent routing needed), "position" (fixed routing suffices),
    # "bag" (the bag of visible tokens determines the answer; fixed positions hold candidates)
    # or "none" (a control: the bag determines it and no fixed position gives anything away).
    context_need: ClassVar[str]
    leaks_future: ClassVar[bool] = False
    Config: ClassVar[type]
    vocab_size: int
    seq_len: int
    chance: float

    def __init__(self, config: Any = None):
        config = self.Config() if config is None else config
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.name} needs a {self.Config.__name__}, got {config!r}")
        self.config = config

    @abc.abstractmethod
    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        """A batch of `batch_size` sequences drawn from `key` (pure; jit and vmap safe)."""

    def sample_at(self, key: jax.Array, step: jax.Array, batch_size: int) -> Batch:
        """The training batch of `step` in the stream of one seed (`key`).

        Synthetic tasks draw fresh sequences from `fold_in(key, step)`; data-backed tasks walk
        their examples in a shuffled order, each once per epoch. Either way the batch is a
        function of (seed, step) alone, so a resumed run sees the batches it would have seen.
        """
        return self.sample(jax.random.fold_in(key, step), batch_size)

    def eval_sample(self, key: jax.Array, batch_size: int) -> Batch:
        """A held-out batch; synthetic tasks draw it like training batches (other keys)."""
        return self.sample(key, batch_size)

    def reference(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(targets, weights) of one valid sequence or prefix, computed from its inputs alone."""
        x = self._host(inputs)
        targets, weights = np.zeros(len(x), np.int64), np.zeros(len(x), np.float32)
        self._solve(x, targets, weights)
        return targets, weights

    def is_valid(self, inputs: np.ndarray) -> bool:
        """Whether one sequence (or a prefix of one) is a well-posed instance of the task."""
        x = np.asarray(inputs)
        if x.ndim != 1 or not 0 < len(x) <= self.seq_len:
            return False
        x = x.astype(np.int64)
        if x.min() < 0 or x.max() >= self.vocab_size:
            return False
        return bool(self._valid(x))

    def _host(self, inputs: np.ndarray) -> np.ndarray:
        x = np.asarray(inputs).astype(np.int64)
        if x.ndim != 1 or len(x) > self.seq_len:
            raise ValueError(f"{self.name}: expected one sequence of length <= {self.seq_len}")
        return x

    def bag_ceiling(self) -> tuple[float, float, str] | None:
        """(value, standard error, how) of the best accuracy from the bag of visible tokens.

        The bag is the multiset of the tokens a causal reader sees, plus the target's own
        token and index (what order-free averaging can use). None: not derived, so
        `ablate.reference` estimates it from a sample.
        """
        return None

    def _solve(self, x: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> None:
        raise TypeError(f"{self.name} has no host-side reference solver")

    def _valid(self, x: np.ndarray) -> bool:
        raise TypeError(f"{self.name} has no host-side validity rule")


EXACT_MAX_COUNT = 128  # beyond this many draws the multinomial maximum is sampled


def mode_share(n: int, m: int) -> tuple[float, float, str]:
    """E[max_v c_v] / n for counts c of n uniform draws from m values, with its SE and how.

    This is the bag ceiling of a task whose answer is one of n exchangeable draws: given only
    the counts, P(answer = v) = c_v / n, so the best guess is a most frequent value.
    Exact (a recursion over values of binomial splits) up to EXACT_MAX_COUNT draws.
    """
    from scipy.stats import binom

    if n > EXACT_MAX_COUNT or m > EXACT_MAX_COUNT:
        rng = np.random.default_rng(0)
        draws = 20000
        top = np.array(
            [np.bincount(rng.integers(0, m, n), minlength=m).max() for _ in range(draws)]
        )
        share = top / n
        return (
            float(share.mean()),
            float(share.std(ddof=1) / math.sqrt(draws)),
            (f"estimated: {draws} sampled count vectors"),
        )
    r_R = np.arange(n + 1)
    k_K = np.arange(n + 1)
    expected_max = 0.0
    for c in range(n):  # E[max] = sum over c of P(max > c)
        # q[r]: P(the remaining values all get <= c of the r draws left), value by value.
        q_R = (r_R <= c).astype(float)
        for values_left in range(2, m + 1):
            pmf_RK = binom.pmf(k_K[None, :], r_R[:, None], 1.0 / values_left)
            pmf_RK[:, c + 1 :] = 0.0
            rest_RK = np.where(
                k_K[None, :] <= r_R[:, None], q_R[np.maximum(r_R[:, None] - k_K[None, :], 0)], 0.0
            )
            q_R = (pmf_RK * rest_RK).sum(1)
        expected_max += 1.0 - q_R[n]
    return expected_max / n, 0.0, "exact: E[largest count] / n of the exchangeable draws"


TASKS: dict[str, type[Task]] = {}


def _register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """Names of the registered tasks, sorted (the data-backed ones included)."""
    # The data-backed tasks live in ablate.data, which builds on this module.
    import ablate.data  # noqa: F401

    return sorted(TASKS)


def make_task(name: str, params: Mapping[str, Any] | None = None, path: str = "task") -> Task:
    """Build task `name` from plain-data knobs; problems are reported under `path`."""
    dot = f"{path}." if path else ""
    if name not in task_names():
        choices = ", ".join(task_names())
        raise ConfigError([(f"{dot}name", f"unknown task {name!r}; choose one of {choices}")])
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError([(path, f"expected a table of task knobs, got {params!r}")])
    cls = TASKS[name]
    return cls(from_dict(cls.Config, params or {}, path))


# ---------------------------------------------------------------------------- recall


@dataclasses.dataclass(frozen=True)
class AssocRecallConfig(_Knobs):
    """Knobs of `assoc_recall`."""

    n_pairs: int = 8
    n_keys: int = 8
    n_values: int = 8
    pair_tokens: str = "joint"

    def problems(self) -> list[tuple[str, str]]:
        found = _bounds(self, n_pairs=(1, 1024), n_keys=(1, MAX_SYMBOLS), n_values=(2, MAX_SYMBOLS))
        if message := one_of(self.pair_tokens, ("joint", "separate")):
            found.append(("pair_tokens", message))
        keys = f"n_keys allows {self.n_keys} distinct keys"
        found += _at_most("n_pairs", self.n_pairs, self.n_keys, keys)
        vocab = self.n_keys * (self.n_values + 1) + self.n_values
        if self.pair_tokens == "joint" and vocab > MAX_VOCAB:
            message = (
                f"n_keys * (n_values + 1) + n_values ids (one per pair) must be <= {MAX_VOCAB}"
            )
            found.append(("n_values", f"{message}, got {vocab}"))
        return found


@_register
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
        key_bits, value_bits, query_bits = _random_bits(key, batch_size, c.n_keys, n_pairs, 1)
        keys_BP = _distinct(key_bits, n_pairs)
        values_BP = _below(value_bits, c.n_values)
        query_B1 = _below(query_bits, n_pairs)
        answer_B1 = jnp.take_along_axis(values_BP, query_B1, axis=1) + c.n_keys
        if self.joint:
            context_BC = self.pair_base + keys_BP * c.n_values + values_BP
            src_B1S = query_B1[:, :, None]
        else:
            context_BC = jnp.stack([keys_BP, values_BP + c.n_keys], axis=-1)
            context_BC = context_BC.reshape(batch_size, 2 * n_pairs)
            src_B1S = jnp.stack([2 * query_B1, 2 * query_B1 + 1], axis=-1)
        query_key_B1 = jnp.take_along_axis(keys_BP, query_B1, axis=1)
        inputs_BL = jnp.concatenate([context_BC, query_key_B1], axis=1)
        last_L = jnp.arange(seq_len) == seq_len - 1
        targets_BL = jnp.where(last_L[None, :], answer_B1, 0)
        weights_BL = jnp.broadcast_to(last_L[None, :], (batch_size, seq_len))
        self_B1S = jnp.full((batch_size, 1, 1), seq_len - 1, jnp.int32)
        src_B1S = jnp.concatenate([src_B1S, self_B1S], axis=-1)
        src_BLS = jnp.where(last_L[None, :, None], src_B1S, -1)
        return _batch(inputs_BL, targets_BL, weights_BL, _deps_from_sources(src_BLS, seq_len))

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
class MQARConfig(_Knobs):
    """Knobs of `mqar`."""

    n_pairs: int = 4
    seq_len: int = 16
    n_keys: int = 8
    n_values: int = 8
    distinct_values: bool = True

    def problems(self) -> list[tuple[str, str]]:
        found = _bounds(
            self,
            n_pairs=(1, 1024),
            seq_len=(3, MAX_SEQ_LEN),
            n_keys=(1, MAX_SYMBOLS),
            n_values=(2, MAX_SYMBOLS),
        )
        keys = f"n_keys allows {self.n_keys} distinct keys"
        found += _at_most("n_pairs", self.n_pairs, self.n_keys, keys)
        if self.distinct_values:
            values = f"n_values allows {self.n_values} distinct values (distinct_values = true)"
            found += _at_most("n_pairs", self.n_pairs, self.n_values, values)
        why = "3 * n_pairs: key and value per pair, then one query per pair"
        return found + _at_least("seq_len", self.seq_len, 3 * self.n_pairs, why)


@_register
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
        key_bits, value_bits, slot_bits = _random_bits(
            key, batch_size, c.n_keys, value_width, region
        )
        keys_BP = 1 + _distinct(key_bits, n_pairs)
        if c.distinct_values:
            values_BP = 1 + c.n_keys + _distinct(value_bits, n_pairs)
        else:
            values_BP = 1 + c.n_keys + _below(value_bits, c.n_values)
        context_BC = jnp.stack([keys_BP, values_BP], axis=-1).reshape(batch_size, 2 * n_pairs)
        # A slot's rank among iid draws: the P lowest-ranked slots hold queries, and the rank
        # names the pair asked, so both the slots and the query order are uniform.
        rank_BR = jnp.argsort(jnp.argsort(slot_bits, axis=-1), axis=-1).astype(jnp.int32)
        is_query_BR = rank_BR < n_pairs
        pair_BR = jnp.minimum(rank_BR, n_pairs - 1)
        queries_BR = jnp.take_along_axis(keys_BP, pair_BR, axis=1)
        answers_BR = jnp.take_along_axis(values_BP, pair_BR, axis=1)
        inputs_BL = jnp.concatenate(
            [context_BC, jnp.where(is_query_BR, queries_BR, self.FILLER)], axis=1
        )
        zeros_BC = jnp.zeros((batch_size, 2 * n_pairs), jnp.int32)
        targets_BL = jnp.concatenate([zeros_BC, jnp.where(is_query_BR, answers_BR, 0)], axis=1)
        pair_BL = jnp.concatenate([zeros_BC - 1, jnp.where(is_query_BR, pair_BR, -1)], axis=1)
        scored_BL = pair_BL >= 0
        self_BL = jnp.where(scored_BL, jnp.arange(seq_len)[None, :], -1)
        # An unscored row has pair -1, so its key and value sources (-2, -1) mark nothing.
        src_BLS = jnp.stack([2 * pair_BL, 2 * pair_BL + 1, self_BL], axis=-1)
        return _batch(inputs_BL, targets_BL, scored_BL, _deps_from_sources(src_BLS, seq_len))

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


# ---------------------------------------------------------------------------- induction


@dataclasses.dataclass(frozen=True)
class InductionConfig(_Knobs):
    """Knobs of `induction`."""

    repeat_len: int = 8
    n_symbols: int = 16
    max_gap: int = 8

    def problems(self) -> list[tuple[str, str]]:
        found = _bounds(
            self,
            repeat_len=(2, (MAX_SEQ_LEN - 1) // 2),
            n_symbols=(2, MAX_SYMBOLS),
            max_gap=(0, MAX_SEQ_LEN - 1 - 2 * self.repeat_len),
        )
        why = "repeat_len: the repeated tokens are distinct, so each occurs once before"
        return found + _at_least("n_symbols", self.n_symbols, self.repeat_len, why)


@_register
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
        bits_BM, gap_bits_B1 = _random_bits(key, batch_size, c.n_symbols, 1)
        r_BT = 2 + _distinct(bits_BM, T)
        gap_B1 = _below(gap_bits_B1, c.max_gap + 1)
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
        return _batch(inputs_BL, targets_BL, scored_BL, deps_BLL)

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


# ---------------------------------------------------------------------------- copy family


@dataclasses.dataclass(frozen=True)
class ItemsConfig(_Knobs):
    """Knobs of `copy`, `reverse` and `sort`."""

    n_items: int = 8
    n_symbols: int = 8

    def problems(self) -> list[tuple[str, str]]:
        return _bounds(self, n_items=(1, MAX_SEQ_LEN // 2), n_symbols=(2, MAX_SYMBOLS))


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
    def _answers(self, x_BN: jax.Array) -> jax.Array:
        """The answers for the data items x_BN, in output order."""

    @abc.abstractmethod
    def _solve_items(self, items: np.ndarray) -> np.ndarray:
        """The answers for one sequence's items (host, numpy)."""

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        c = self.config
        x_BN = 2 + _below(_random_bits(key, batch_size, c.n_items)[0], c.n_symbols)
        tail_BN = jnp.full((batch_size, c.n_items), self.BLANK, jnp.int32).at[:, 0].set(self.SEP)
        inputs_BL = jnp.concatenate([x_BN, tail_BN], axis=1)
        targets_BL = jnp.concatenate([jnp.zeros_like(x_BN), self._answers(x_BN)], axis=1)
        return _static_batch(inputs_BL, targets_BL, self.scored_L, self.deps_LL)

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


@_register
class Copy(_ItemsTask):
    """Copy: position N+k outputs x(k+1); deps: that one data position."""

    name = "copy"
    context_need = "position"

    def _dep_rule(self, i, j):
        return j == i - self.config.n_items

    def _answers(self, x_BN):
        return x_BN

    def _solve_items(self, items):
        return items


@_register
class Reverse(_ItemsTask):
    """Reverse: position N+k outputs x(N-k); deps: that one data position."""

    name = "reverse"
    context_need = "position"

    def _dep_rule(self, i, j):
        return j == 2 * self.config.n_items - 1 - i

    def _answers(self, x_BN):
        return x_BN[:, ::-1]

    def _solve_items(self, items):
        return items[::-1]


@_register
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

    def _answers(self, x_BN):
        return jnp.sort(x_BN, axis=-1)

    def _solve_items(self, items):
        return np.sort(items)


def _order_statistic_chance(n: int, m: int) -> float:
    """Mean over k of max_v P(the k-th smallest of n uniform draws from range(m) is v)."""
    c_C = np.arange(n + 1)
    log_comb_C = np.array(
        [math.lgamma(n + 1) - math.lgamma(c + 1) - math.lgamma(n - c + 1) for c in c_C]
    )
    best_N, previous_N = np.zeros(n), np.zeros(n)
    # Blocks of v keep memory at 256 x n; v = m - 1 (where every cdf is 1) comes last.
    for start in range(0, m - 1, 256):
        p_V1 = (np.arange(start, min(start + 256, m - 1)) + 1.0)[:, None] / m
        count_pmf_VC = np.exp(log_comb_C + c_C * np.log(p_V1) + (n - c_C) * np.log1p(-p_V1))
        # P(k-th smallest <= v) = P(at least k + 1 draws are <= v)
        cdf_VN = np.cumsum(count_pmf_VC[:, ::-1], axis=1)[:, ::-1][:, 1:]
        pmf_VN = np.diff(cdf_VN, axis=0, prepend=previous_N[None, :])
        best_N, previous_N = np.maximum(best_N, pmf_VN.max(axis=0)), cdf_VN[-1]
    return float(np.maximum(best_N, 1.0 - previous_N).mean())


@dataclasses.dataclass(frozen=True)
class SelectiveCopyConfig(_Knobs):
    """Knobs of `selective_copy`."""

    n_items: int = 4
    n_symbols: int = 8
    seq_len: int = 16

    def problems(self) -> list[tuple[str, str]]:
        found = _bounds(
            self,
            n_items=(1, MAX_SEQ_LEN // 2),
            n_symbols=(2, MAX_SYMBOLS),
            seq_len=(2, MAX_SEQ_LEN),
        )
        why = "2 * n_items: a region holding the items, then one answer per item"
        return found + _at_least("seq_len", self.seq_len, 2 * self.n_items, why)


@_register
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
        pos_bits, item_bits = _random_bits(key, batch_size, region, n)
        pos_BN = jnp.sort(_distinct(pos_bits, n), axis=-1)
        x_BN = 2 + _below(item_bits, self.config.n_symbols)
        rows_B1 = jnp.arange(batch_size)[:, None]
        region_BR = (
            jnp.full((batch_size, region), self.BLANK, jnp.int32).at[rows_B1, pos_BN].set(x_BN)
        )
        tail_BN = jnp.full((batch_size, n), self.BLANK, jnp.int32).at[:, 0].set(self.SEP)
        inputs_BL = jnp.concatenate([region_BR, tail_BN], axis=1)
        targets_BL = jnp.concatenate([jnp.zeros_like(region_BR), x_BN], axis=1)
        weights_L = jnp.arange(seq_len) >= region
        weights_BL = jnp.broadcast_to(weights_L[None, :], (batch_size, seq_len))
        src_BL = jnp.concatenate([jnp.full((batch_size, region), -1, jnp.int32), pos_BN], axis=1)
        deps_BLL = _deps_from_sources(src_BL[:, :, None], seq_len)
        return _batch(inputs_BL, targets_BL, weights_BL, deps_BLL)

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


# ---------------------------------------------------------------------------- controls


@dataclasses.dataclass(frozen=True)
class MajorityConfig(_Knobs):
    """Knobs of `majority`."""

    n_items: int = 32
    n_symbols: int = 8

    def problems(self) -> list[tuple[str, str]]:
        return _bounds(self, n_items=(1, MAX_SEQ_LEN - 1), n_symbols=(2, MAX_SYMBOLS))


def balanced_counts(n: int, m: int) -> np.ndarray:
    """Counts of m symbols summing to n, the first a unique mode by one, the rest level.

    The mode gets the fewest copies that can still lead, ceil((n + m - 1) / m); the other
    symbols share the rest as evenly as possible, so one token says as little as possible
    about which symbol leads.
    """
    mode = -(-(n + m - 1) // m)
    q, r = divmod(n - mode, m - 1)
    return np.array([mode] + [q + 1] * r + [q] * (m - 1 - r), np.int64)


@_register
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
        self.slot_rank_N = np.repeat(np.arange(c.n_symbols), counts).astype(np.int32)

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        n, m = self.config.n_items, self.config.n_symbols
        symbol_bits, slot_bits = _random_bits(key, batch_size, m, n)
        symbol_of_rank_BM = _distinct(symbol_bits, m)  # rank 0 is the mode
        slots_BN = jnp.asarray(self.slot_rank_N)[_distinct(slot_bits, n)]
        x_BN = jnp.take_along_axis(symbol_of_rank_BM, slots_BN, axis=1) + 1
        query_B1 = jnp.full((batch_size, 1), self.QUERY, jnp.int32)
        inputs_BL = jnp.concatenate([x_BN, query_B1], axis=1)
        targets_BL = jnp.where(self.scored_L[None, :], symbol_of_rank_BM[:, :1] + 1, 0)
        return _static_batch(inputs_BL, targets_BL, self.scored_L, self.deps_LL)

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
class MemorizeConfig(_Knobs):
    """Knobs of `memorize`."""

    seq_len: int = 16
    n_keys: int = 32
    n_values: int = 8
    table_seed: int = 0

    def problems(self) -> list[tuple[str, str]]:
        found = _bounds(
            self,
            seq_len=(1, MAX_SEQ_LEN),
            n_keys=(1, MAX_SYMBOLS),
            n_values=(2, MAX_SYMBOLS),
            table_seed=(0, 2**31 - 1),
        )
        return found + _at_most(
            "n_values", self.n_values, self.n_keys, "n_keys: each value answers a key"
        )


@_register
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
        inputs_BL = c.n_values + _below(_random_bits(key, batch_size, c.seq_len)[0], c.n_keys)
        targets_BL = jnp.asarray(self.table)[inputs_BL - c.n_values]
        scored_L = np.ones(c.seq_len, bool)
        return _static_batch(inputs_BL, targets_BL, scored_L, np.diag(scored_L))

    def bag_ceiling(self):
        return 1.0, 0.0, "exact: the own token determines the target"

    def _solve(self, x, targets, weights):
        targets[:], weights[:] = self.table[x - self.config.n_values], 1.0

    def _valid(self, x):
        return bool(np.all(x >= self.config.n_values))
