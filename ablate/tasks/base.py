"""What every task is: the batch, the task spec and its loaded data, the registry, shared helpers.

A `Task` is a spec: built from its knobs alone, it knows its cheap facts (vocabulary size,
sequence length, knobs; for synthetic tasks also the chance level) and reads nothing. What a
task needs from disk or the hub is read by `Task.load()` into a `TaskData`, once per `train`,
`probe` or sweep, and its arrays go into the compiled programs as an argument
(`sample_at(arrays, ...)`, `eval_sample(arrays, ...)`). Synthetic tasks load nothing: their
arrays are `()` and they draw every batch from a key.

Every task but the masked-LM ones is read by a causal language model: the target at position
i is a function of inputs[0..i] only, and `Batch.deps[b, i, j]` marks the input positions
j <= i that determine it (the mask M that attention alignment is measured against).
Unscored positions have target 0, weight 0 and an all-False deps row. A `bidirectional`
task (masked LM, `ablate.tasks.masked`) has targets that depend on positions on both sides
(deps may have j > i): only a bidirectional model (`model.causal = false`) may train on it,
and its host-side `reference` and `is_valid` take whole sequences with their selection of
masked positions.

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
mean mode probability of each order statistic. Real data measures it on the loaded training
split (`TaskData.chance`). For masked LM the own token at a masked position is an input (MASK,
a random token or the kept original), so chance excludes what it gives away. `leaks_future`
is True when an input after a scored position reveals its target (teacher forcing), so only
causal models may train on it.

Axis letters: the table in `ablate.model` (tasks use B, L, P, Q, I, J, C, M, T, U, W, Y).
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ablate.config import check, in_range

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


def outside(ids, size: int):
    """Where ids fall outside [0, size) (numpy or jax alike): the one token-id range check."""
    return (ids < 0) | (ids >= size)


def bounds(config: Any, **ranges: tuple[int, int]) -> list[tuple[str, str]]:
    """(field, message) for each named field of `config` outside its inclusive range."""
    found = []
    for field, (low, high) in ranges.items():
        message = in_range(getattr(config, field), low, high)
        if message:
            found.append((field, message))
    return found


def at_least(field: str, value: int, bound: int, why: str) -> list[tuple[str, str]]:
    """[(field, message naming the bound and why)] if value < bound, else []."""
    return [] if value >= bound else [(field, f"must be >= {bound} ({why}), got {value}")]


def at_most(field: str, value: int, bound: int, why: str) -> list[tuple[str, str]]:
    """[(field, message naming the bound and why)] if value > bound, else []."""
    return [] if value <= bound else [(field, f"must be <= {bound} ({why}), got {value}")]


class Knobs:
    """Base of the task configs: validated as soon as they are built."""

    def problems(self) -> list[tuple[str, str]]:
        return []

    def __post_init__(self):
        check(self)


def random_bits(key: jax.Array, batch_size: int, *widths: int) -> list[jax.Array]:
    """Independent uint32 blocks [B, w], one per width, cut from one call to the generator.

    One call, not one per quantity: each call compiles its own copy of the generator, which
    dominates a sampler's compile time on CPU.
    """
    bits_BW = jax.random.bits(key, (batch_size, sum(widths)), jnp.uint32)
    edges = np.cumsum((0, *widths))
    return [bits_BW[:, a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


def below(bits: jax.Array, n: int) -> jax.Array:
    """Uniform int32 in [0, n) (modulo bias at most n / 2**32)."""
    return (bits % n).astype(jnp.int32)


def distinct(bits_BI: jax.Array, k: int) -> jax.Array:
    """[B, k] int32: per row, k distinct values of range(N) in uniformly random order."""
    # argsort is stable, so even tied draws give a permutation.
    return jnp.argsort(bits_BI, axis=-1)[:, :k].astype(jnp.int32)


def deps_from_sources(src_BLJ: jax.Array, seq_len: int) -> jax.Array:
    """deps[b, i, j] = any_s src[b, i, s] == j; negative sources mark nothing."""
    j_111L = jnp.arange(seq_len)[None, None, None, :]
    return jnp.any(src_BLJ[:, :, :, None] == j_111L, axis=2)


def make_batch(inputs_BL, targets_BL, weights_BL, deps_BLL) -> Batch:
    return Batch(
        inputs_BL.astype(jnp.int32),
        targets_BL.astype(jnp.int32),
        weights_BL.astype(jnp.float32),
        deps_BLL.astype(jnp.bool_),
    )


def static_batch(inputs_BL, targets_BL, weights_L: np.ndarray, deps_LL: np.ndarray) -> Batch:
    """A Batch whose scored positions and deps are the same for every sequence."""
    batch_size, seq_len = inputs_BL.shape
    weights_BL = jnp.broadcast_to(jnp.asarray(weights_L)[None, :], (batch_size, seq_len))
    deps_BLL = jnp.broadcast_to(jnp.asarray(deps_LL)[None], (batch_size, seq_len, seq_len))
    return make_batch(inputs_BL, targets_BL, weights_BL, deps_BLL)


class TaskData(NamedTuple):
    """What `Task.load` read: the arrays the compiled programs sample from, and the chance level."""

    arrays: Any  # a pytree of device arrays; () for tasks that sample from a key alone
    chance: float  # synthetic tasks derive it; real data measures it on the training split


class Task(abc.ABC):
    """A task spec: device-side sampler plus host-side reference solver and validity check."""

    #: False for tasks without a ground-truth dependency mask (real data): no alignment.
    has_dependencies: ClassVar[bool] = True
    #: The padding id, for tasks whose sequences are padded (None: never padded).
    pad_id: ClassVar[int | None] = None
    #: True for tasks read by an encoder-decoder (ablate/tasks/translation.py): a source
    #: beside the decoder's sequence, and a cross-attention dependency mask.
    seq2seq: ClassVar[bool] = False

    #: A task with a second, cheaper route to the answer names it in words (None: one route)
    #: and defines `cheap_positions`, `cheap_level` (that route's accuracy on the training
    #: distribution), `conflict_sample` (sequences where only the content route answers) and
    #: `conflict_share` (the share of training targets where the two routes disagree).
    cheap_route: ClassVar[str | None] = None
    cheap_level: float
    conflict_share: float

    name: ClassVar[str]
    # "content" (content-dependent routing needed), "position" (fixed routing suffices),
    # "bag" (the bag of visible tokens determines the answer; fixed positions hold candidates)
    # "none" (a control: the bag determines it and no fixed position gives anything away)
    # "competing" (a content route that is always right and a declared cheap route), or
    # "partial" (fixed routing answers part, above what a content task may leave, not all).
    context_need: ClassVar[str]
    leaks_future: ClassVar[bool] = False
    #: True when a target depends on later positions too (masked LM): deps may have j > i,
    #: experiments refuse causal models, and reference levels read every position.
    bidirectional: ClassVar[bool] = False
    Config: ClassVar[type]
    vocab_size: int
    seq_len: int
    chance: float  # synthetic tasks; real data measures it when loaded (TaskData.chance)

    def __init__(self, config: Any = None):
        config = self.Config() if config is None else config
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.name} needs a {self.Config.__name__}, got {config!r}")
        self.config = config

    @abc.abstractmethod
    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        """A batch of `batch_size` sequences drawn from `key` (pure; jit and vmap safe)."""

    def load(self) -> TaskData:
        """Read what the task samples from (the only I/O a task does); synthetic: nothing."""
        return TaskData((), self.chance)

    def sample_at(self, arrays: Any, key: jax.Array, step: jax.Array, batch_size: int) -> Batch:
        """The training batch of `step` in the stream of one seed (`key`).

        `arrays` is `TaskData.arrays` (passed into the compiled step, never closed over).
        Synthetic tasks draw fresh sequences from `fold_in(key, step)`; data-backed tasks walk
        their examples in a shuffled order, each once per epoch. Either way the batch is a
        function of (seed, step) alone, so a resumed run sees the batches it would have seen.
        """
        return self.sample(jax.random.fold_in(key, step), batch_size)

    def eval_sample(self, arrays: Any, key: jax.Array, batch_size: int) -> Batch:
        """A held-out batch; synthetic tasks draw it like training batches (other keys)."""
        return self.sample(key, batch_size)

    def valid_mask(self, inputs_BL: jax.Array) -> jax.Array | None:
        """valid_BL for padded tasks (attention masks padding out), else None."""
        return None if self.pad_id is None else inputs_BL != self.pad_id

    def token_labels(self, ids: Any) -> list[str]:
        """A readable label per token id (the attention viewer's): the task's own name of a
        special token (its class constants in capitals: BOS, SEP, BLANK, MASK, ...), else
        the id."""
        names = self.special_tokens()
        return [names.get(int(i), str(int(i))) for i in np.asarray(ids).ravel()]

    def special_tokens(self) -> dict[int, str]:
        """{id: name} of the task's special tokens, read from its integer class constants."""
        names: dict[int, str] = {}
        for cls in reversed(type(self).__mro__):
            for name, value in vars(cls).items():
                if name.isupper() and isinstance(value, int) and not isinstance(value, bool):
                    names[value] = name
        return names

    def cheap_positions(self, i: int) -> list[int]:
        """The fixed positions the cheap route reads for the target at position i."""
        raise TypeError(f"{self.name} has no cheap route")

    def conflict_sample(self, key: jax.Array, batch_size: int) -> Batch:
        """Sequences where the routes disagree (only the content route answers them)."""
        raise TypeError(f"{self.name} has no cheap route")

    def cheap_answer(self, inputs_BL: jax.Array) -> jax.Array:
        """[B, L] the answer the cheap route gives at each position: the token at its one
        position (a copy route; a task whose cheap route reads more positions overrides
        this), the own token where it reads none."""
        source_L = np.arange(self.seq_len)
        for i in range(self.seq_len):
            positions = self.cheap_positions(i)
            if len(positions) > 1:
                raise TypeError(
                    f"{self.name}: a cheap route over several positions needs its own cheap_answer"
                )
            source_L[i] = positions[0] if positions else i
        return inputs_BL[:, source_L]

    def conflict_bag_ceiling(self) -> tuple[float, float, str] | None:
        """`bag_ceiling` of the conflict sequences (None: estimated from a sample)."""
        return None

    def cheap_deps(self, weights_BL: jax.Array) -> jax.Array:
        """The cheap route's mask [B, L, L] (its positions and the target's own, at scored
        rows): what alignment and the loss's pull are also measured against."""
        route_LL = np.zeros((self.seq_len, self.seq_len), bool)
        for i in range(self.seq_len):
            route_LL[i, self.cheap_positions(i)] = True
            route_LL[i, i] = True
        return (weights_BL > 0)[:, :, None] & jnp.asarray(route_LL)[None]

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
        if outside(x, self.vocab_size).any():
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
    r_Y = np.arange(n + 1)
    k_Y = np.arange(n + 1)
    expected_max = 0.0
    for c in range(n):  # E[max] = sum over c of P(max > c)
        # q[r]: P(the remaining values all get <= c of the r draws left), value by value.
        q_Y = (r_Y <= c).astype(float)
        for values_left in range(2, m + 1):
            pmf_YY = binom.pmf(k_Y[None, :], r_Y[:, None], 1.0 / values_left)
            pmf_YY[:, c + 1 :] = 0.0
            rest_YY = np.where(
                k_Y[None, :] <= r_Y[:, None], q_Y[np.maximum(r_Y[:, None] - k_Y[None, :], 0)], 0.0
            )
            q_Y = (pmf_YY * rest_YY).sum(1)
        expected_max += 1.0 - q_Y[n]
    return expected_max / n, 0.0, "exact: E[largest count] / n of the exchangeable draws"


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: add a task to the one registry, under its `name`."""
    TASKS[cls.name] = cls
    return cls
