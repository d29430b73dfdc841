"""Reference levels of a task: what a reader that cannot learn context is able to reach.

A variant's accuracy means little against chance alone. For every synthetic task (the
registered ones and any added later) this module states three levels, each per scored
target token, like the `accuracy` metric:

  chance         the best accuracy without looking at the input (the target's index known);
  fixed routing  the best accuracy of a reader that, for each scored target position i, sees
                 its own token x_i and ONE fixed other visible position j(i) (what a fixed
                 pattern that copies one position can get; the reference for random_fixed
                 and gaussian);
  bag            the best accuracy from the multiset of visible tokens plus the target's own
                 token and index (what order-free averaging can get; the reference for
                 uniform).

A level is exact where the task derives it (`Task.chance`, `Task.bag_ceiling()`) and
otherwise estimated from a large sample: a lookup table from the reader's view to the most
frequent target is fit on one part of the sample and scored on a held-out part, with the
standard error over sequences. A held-out lookup is a lower bound of the best reader where
views rarely repeat (the bag of a long sequence): exact derivations serve those tasks.

`audit(task)` checks a task's claim about what it needs against these readers (the test
suite runs it over every registered task): a `none` task gives nothing away through one fixed
other position, a `content` task leaves most of the answer out of fixed routing's reach,
and a `position` task is solved by it. Visibility is the task's own: causal, or every
position for a `bidirectional` (masked-LM) task; `reference_levels(causal=...)` reads a task
as a model with that masking would (`causal=False`: every position is visible).

A seq2seq task (the encoder-decoder's) is read through `Seq2SeqView`: the source, then the
decoder's inputs, as one causal sequence, scored at the decoder's targets. A reader of
target i then sees every source position and the decoder prefix, as the decoder does, so
the three levels mean the same there: chance (the task's, exact or estimated as it says),
fixed routing (the own decoder token and ONE fixed other position, source or prefix: what
a fixed cross-attention pattern can get) and the bag (the multiset of source tokens and
prefix tokens, the own token and the index: what uniform attention can get).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ablate.tasks import Task

# Split in three: fit, choose the position, score. ABLATE_REFERENCE_SEQUENCES lowers it where
# the levels' precision does not matter (the test suite's sweeps).
N_SEQUENCES = int(os.environ.get("ABLATE_REFERENCE_SEQUENCES", 3 * 2**14))
CHUNK = 4096
# Audit thresholds (fractions of accuracy): see `audit`.
NONE_MARGIN = 0.05
CONTENT_MAX_SHARE = 0.5
POSITION_MIN = 0.98


@dataclasses.dataclass(frozen=True)
class Level:
    """One reference accuracy: its value, standard error (0 if exact) and how it was got."""

    value: float
    se: float
    method: str

    def __str__(self) -> str:
        return f"{self.value:.3f}" + (f" +- {self.se:.3f}" if self.se else "")


@dataclasses.dataclass(frozen=True)
class ReferenceLevels:
    """Chance, fixed-routing and bag ceilings of one task (see the module docstring)."""

    chance: Level
    fixed_routing: Level
    bag: Level

    def row(self, prefix: str = "") -> dict[str, Any]:
        """The flat fields a results row carries (`prefix`: of conflict sequences)."""
        out: dict[str, Any] = {}
        for name, level in (
            ("chance", self.chance),
            ("fixed_routing_ceiling", self.fixed_routing),
            ("bag_ceiling", self.bag),
        ):
            name = prefix + name
            out[name], out[f"{name}_se"], out[f"{name}_method"] = (
                level.value,
                level.se,
                level.method,
            )
        return out


def no_levels_row() -> dict[str, Any]:
    """The row fields of a task without reference levels (real data)."""
    why = "not computable: real data has no known generating rule"
    return {
        "fixed_routing_ceiling": None,
        "fixed_routing_ceiling_method": why,
        "bag_ceiling": None,
        "bag_ceiling_method": why,
    }


@dataclasses.dataclass
class Sample:
    """Host copies of many sequences of a task: inputs and targets [n, L], scored [n, L]."""

    inputs: np.ndarray
    targets: np.ndarray
    scored: np.ndarray


def draw(task: Task, n_sequences: int | None = None, seed: int = 0) -> Sample:
    """n sequences of `task` (default N_SEQUENCES), drawn on the device in chunks by its own
    sampler."""
    n_sequences = n_sequences or N_SEQUENCES
    chunk = min(CHUNK, n_sequences)
    sample = jax.jit(lambda key: task.sample(key, chunk)[:3])
    parts = [
        jax.device_get(sample(jax.random.fold_in(jax.random.PRNGKey(seed), c)))
        for c in range(math.ceil(n_sequences / chunk))
    ]
    inputs, targets, weights = (np.concatenate(p)[:n_sequences] for p in zip(*parts, strict=True))
    return Sample(inputs.astype(np.int64), targets.astype(np.int64), weights > 0)


def _fit_predict(keys_A: np.ndarray, t_A: np.ndarray, keys_B: np.ndarray) -> np.ndarray:
    """Predictions for keys_B of the table key -> most frequent target in A (-1: unseen)."""
    if len(keys_A) == 0:
        return np.full(len(keys_B), -1, np.int64)
    order = np.lexsort((t_A, keys_A))
    k, t = keys_A[order], t_A[order]
    new = np.r_[True, (k[1:] != k[:-1]) | (t[1:] != t[:-1])]
    starts = np.flatnonzero(new)
    counts = np.diff(np.r_[starts, len(k)])
    run_k, run_t = k[starts], t[starts]
    best = np.lexsort((-counts, run_k))  # per key, the most frequent target first
    run_k, run_t = run_k[best], run_t[best]
    first = np.r_[True, run_k[1:] != run_k[:-1]]
    table_k, table_t = run_k[first], run_t[first]
    at = np.minimum(np.searchsorted(table_k, keys_B), len(table_k) - 1)
    return np.where(table_k[at] == keys_B, table_t[at], -1)


def _mode(t: np.ndarray) -> int:
    return int(np.bincount(t).argmax()) if len(t) else 0


def _ratio(correct_S: np.ndarray, scored_S: np.ndarray, method: str) -> Level:
    """Accuracy over scored tokens with its standard error over sequences (ratio estimator)."""
    total = scored_S.sum()
    p = correct_S.sum() / max(total, 1)
    n = len(scored_S)
    se = math.sqrt(np.sum((correct_S - p * scored_S) ** 2) * n / max(n - 1, 1)) / max(total, 1)
    return Level(float(p), float(se), method)


class _Splits:
    """The sample cut in three (fit, choose, score), with per-position views."""

    def __init__(self, sample: Sample, causal: bool):
        n = len(sample.inputs)
        self.parts = [slice(0, n // 3), slice(n // 3, 2 * n // 3), slice(2 * n // 3, n)]
        self.sample, self.causal = sample, causal
        self.L = sample.inputs.shape[1]
        self.vocab = int(sample.inputs.max()) + 1
        self.positions = [i for i in range(self.L) if sample.scored[:, i].any()]

    def rows(self, part: int, i: int) -> np.ndarray:
        s = self.parts[part]
        return np.flatnonzero(self.sample.scored[s, i]) + s.start

    def visible(self, i: int) -> range:
        return range(i) if self.causal else range(self.L)

    def correct(self, keys_of, choose: bool) -> tuple[np.ndarray, np.ndarray]:
        """Per scored-part sequence (correct, scored) counts of the best reader `keys_of`.

        keys_of(rows, i) -> a list of candidate key arrays (one per fixed position the
        reader may use); with `choose`, the candidate is picked on the middle part.
        """
        t = self.sample.targets
        score = self.parts[2]
        correct_S = np.zeros(score.stop - score.start)
        scored_S = self.sample.scored[score].sum(1).astype(float)
        for i in self.positions:
            fit, mid, out = (self.rows(p, i) for p in range(3))
            fallback = _mode(t[fit, i])
            candidates_fit, candidates_mid, candidates_out = (
                keys_of(rows, i) for rows in (fit, mid, out)
            )
            pick = 0
            if choose and len(candidates_fit) > 1:
                hits = [
                    np.sum(_guess(_fit_predict(kf, t[fit, i], km), fallback) == t[mid, i])
                    for kf, km in zip(candidates_fit, candidates_mid, strict=True)
                ]
                pick = int(np.argmax(hits))
            guess = _guess(
                _fit_predict(candidates_fit[pick], t[fit, i], candidates_out[pick]), fallback
            )
            np.add.at(correct_S, out - score.start, guess == t[out, i])
        return correct_S, scored_S


def _guess(predicted: np.ndarray, fallback: int) -> np.ndarray:
    return np.where(predicted >= 0, predicted, fallback)


def _estimated(n: int, what: str) -> str:
    return f"estimated: held-out lookup of {what}, fit on {n // 3} sequences, scored on {n // 3}"


def estimate_chance(splits: _Splits) -> Level:
    """The best constant per target position."""
    c, s = splits.correct(lambda rows, i: [np.zeros(len(rows), np.int64)], choose=False)
    return _ratio(c, s, _estimated(len(splits.sample.inputs), "the position alone"))


def estimate_fixed_routing(splits: _Splits, own: bool = True) -> Level:
    """Own token (if `own`) plus one fixed other visible position, the best one per position.

    The own token alone is a candidate too: where it says much (a kept token in masked LM)
    and the pairs of tokens are many, the lookup of the pair is sparser than the reader is.
    """
    x, V = splits.sample.inputs, splits.vocab

    def keys_of(rows, i):
        alone = x[rows, i] if own else np.zeros(len(rows), np.int64)
        others = [j for j in splits.visible(i) if j != i]
        return [alone] + [(x[rows, i] * V if own else 0) + x[rows, j] for j in others]

    c, s = splits.correct(keys_of, choose=True)
    what = "the own token and one fixed other position" if own else "one fixed other position"
    return _ratio(c, s, _estimated(len(splits.sample.inputs), what))


def estimate_route(splits: _Splits, task: Task) -> Level:
    """The declared cheap route: a lookup from the tokens at the task's `cheap_positions`,
    with or without the own token (whichever scores better on the middle part: the own token
    multiplies the views, which a finite sample fits less well when it adds nothing)."""
    x, V = splits.sample.inputs, splits.vocab

    def keys_of(rows, i):
        key = np.zeros(len(rows), np.int64)
        for j in task.cheap_positions(i):
            key = key * V + x[rows, j]
        return [key, key * V + x[rows, i]]

    c, s = splits.correct(keys_of, choose=True)
    return _ratio(c, s, _estimated(len(splits.sample.inputs), "the declared cheap route"))


def estimate_bag(splits: _Splits) -> Level:
    """The multiset of visible tokens, the own token and the index (a lower bound when sparse)."""
    x = splits.sample.inputs
    rng = np.random.default_rng(0)
    # An additive hash of the multiset: a sum of random 64-bit words, wrapping.
    word_V, own_V = (rng.integers(0, 2**63, splits.vocab, dtype=np.uint64) for _ in range(2))
    with np.errstate(over="ignore"):
        words_SL = word_V[x]
        bags_SL = np.cumsum(words_SL, axis=1, dtype=np.uint64)
        if not splits.causal:
            bags_SL = np.broadcast_to(bags_SL[:, -1:], bags_SL.shape)
        keys_SL = bags_SL + own_V[x] * np.uint64(3)

    c, s = splits.correct(lambda rows, i: [keys_SL[rows, i]], choose=False)
    what = "the bag of visible tokens and the own token"
    return _ratio(c, s, _estimated(len(x), what) + " (a lower bound where bags rarely repeat)")


def own_visibility(task: Task) -> bool:
    """`causal` as the task is written to be read: causal, unless it is bidirectional."""
    return not getattr(task, "bidirectional", False)


def bag_level(task: Task, splits: _Splits) -> Level:
    """The task's derived bag ceiling (for the visibility it is written for), else the
    held-out estimate on `splits`."""
    derived = task.bag_ceiling() if splits.causal == own_visibility(task) else None
    return estimate_bag(splits) if derived is None else Level(*map(_plain, derived))


def _plain(x):
    return x if isinstance(x, str) else float(x)


class Seq2SeqView:
    """A seq2seq task read as one causal sequence: source positions [0, S), then the
    decoder's inputs (ids shifted past the source's, so a bag never confuses the two), with
    the targets at the decoder's positions."""

    has_dependencies = True

    def __init__(self, task: Task):
        self.task, self.chance = task, task.chance
        self.seq_len = task.source_len + task.seq_len

    def sample(self, key: jax.Array, batch_size: int):
        b = self.task.sample(key, batch_size)
        zeros_BS = jnp.zeros_like(b.source)
        inputs = jnp.concatenate([b.source, b.inputs + self.task.source_vocab_size], axis=1)
        targets = jnp.concatenate([zeros_BS, b.targets], axis=1)
        weights = jnp.concatenate([zeros_BS.astype(b.weights.dtype), b.weights], axis=1)
        return inputs, targets, weights

    def bag_ceiling(self):
        return None


def reference_levels(
    task: Task, *, causal: bool | None = None, n_sequences: int | None = None, seed: int = 0
) -> ReferenceLevels | None:
    """The task's three reference levels; None for tasks without a generating rule (real data).

    `causal`: the visibility of the readers (None: the task's own, see `own_visibility`).
    A seq2seq task is read through `Seq2SeqView` (its own visibility: `causal` is ignored).
    """
    if not task.has_dependencies:
        return None
    if getattr(task, "seq2seq", False):
        task, causal = Seq2SeqView(task), True
    causal = own_visibility(task) if causal is None else causal
    splits = _Splits(draw(task, n_sequences, seed), causal)
    chance = Level(float(task.chance), 0.0, "exact: derived by the task")
    bag = bag_level(task, splits)
    return ReferenceLevels(chance, estimate_fixed_routing(splits), bag)


class ConflictSequences:
    """A task's conflict sequences (where only the content route answers) read as a task of
    their own, so that their reference levels are the same readers' levels."""

    has_dependencies = True

    def __init__(self, task: Task):
        self.task, self.chance, self.seq_len = task, task.chance, task.seq_len
        self.bidirectional = task.bidirectional

    def sample(self, key: jax.Array, batch_size: int):
        return self.task.conflict_sample(key, batch_size)

    def bag_ceiling(self):
        return self.task.conflict_bag_ceiling()


def conflict_levels(
    task: Task, *, causal: bool | None = None, n_sequences: int | None = None, seed: int = 0
) -> ReferenceLevels | None:
    """The reference levels on a task's conflict sequences (None: the task has one route).

    What a reader without content reaches where the routes disagree: conflict accuracy above
    both ceilings is the content route's; at or below them, no sign of it.
    """
    if task.cheap_route is None:
        return None
    return reference_levels(
        ConflictSequences(task), causal=causal, n_sequences=n_sequences, seed=seed
    )


def audit(task: Task, *, n_sequences: int | None = None, seed: int = 0) -> list[str]:
    """What is wrong with a task's claim about the context it needs (empty: nothing), read
    with the task's own visibility (every position for a bidirectional task).

    - the task's chance level agrees with the estimated best constant predictor;
    - `none`: no single fixed other position (without the own token) beats chance by more
      than NONE_MARGIN (the answer is not sitting at a fixed place), and the bag of visible
      tokens determines the answer (bag ceiling >= POSITION_MIN: averaging suffices);
    - `bag`: the bag determines the answer (bag ceiling >= POSITION_MIN) and fixed routing
      closes at most CONTENT_MAX_SHARE of the gap from chance to 1;
    - `content`: fixed routing and the bag each close at most CONTENT_MAX_SHARE of the gap
      from chance to 1 (neither one fixed position nor order-free counting answers it);
    - `position`: fixed routing reaches at least POSITION_MIN;
    - `partial`: fixed routing closes more than CONTENT_MAX_SHARE of the gap (so it is not a
      `content` task) but stays below POSITION_MIN (so content routing closes the rest);
    - `competing`: the declared cheap route reaches the task's stated `cheap_level`, no one
      fixed position beats the larger of that level and what a `content` task may leave
      (CONTENT_MAX_SHARE of the gap), and the bag closes at most CONTENT_MAX_SHARE of it.
    """
    if getattr(task, "seq2seq", False):
        view = Seq2SeqView(task)
        view.context_need, view.name = task.context_need, task.name
        task = view
    splits = _Splits(draw(task, n_sequences, seed), causal=own_visibility(task))
    found = []
    chance = estimate_chance(splits)
    if abs(chance.value - task.chance) > 4 * chance.se + 0.01:
        found.append(f"chance is stated as {task.chance:.3f} but the best constant gets {chance}")
    need = task.context_need
    bag = bag_level(task, splits)
    if need == "none":
        other = estimate_fixed_routing(splits, own=False)
        if other.value > task.chance + NONE_MARGIN:
            found.append(
                f"a `none` task, yet one fixed other position gives {other} (chance "
                f"{task.chance:.3f}, allowed up to +{NONE_MARGIN})"
            )
    if need in ("none", "bag") and bag.value < POSITION_MIN:
        found.append(f"a `{need}` task, yet the bag of tokens reaches only {bag}")
    if need in ("content", "position", "bag"):
        fixed = estimate_fixed_routing(splits)
        limited = [("fixed routing", fixed)] + ([("the bag of tokens", bag)] * (need == "content"))
        for name, level in limited:
            share = (level.value - task.chance) / max(1 - task.chance, 1e-9)
            if need in ("content", "bag") and share > CONTENT_MAX_SHARE:
                found.append(
                    f"a `{need}` task, yet {name} reaches {level}: {share:.2f} of the gap "
                    f"from chance to 1 (allowed up to {CONTENT_MAX_SHARE})"
                )
        if need == "position" and fixed.value < POSITION_MIN:
            found.append(f"a `position` task, yet fixed routing reaches only {fixed}")
    if need == "partial":
        fixed = estimate_fixed_routing(splits)
        share = (fixed.value - task.chance) / max(1 - task.chance, 1e-9)
        if share <= CONTENT_MAX_SHARE or fixed.value >= POSITION_MIN:
            found.append(
                f"a `partial` task, yet fixed routing reaches {fixed} ({share:.2f} of the gap "
                f"from chance to 1; `partial` means above {CONTENT_MAX_SHARE}, below "
                f"{POSITION_MIN} in accuracy)"
            )
    if need == "competing":
        found += _audit_competing(task, splits, bag)
    needs = ("none", "bag", "content", "position", "competing", "partial")
    if need not in needs:
        found.append(f"context_need {need!r} is not one of {', '.join(needs)}")
    return found


def _audit_competing(task: Task, splits: _Splits, bag: Level) -> list[str]:
    """The `competing` clauses of `audit`: nothing cheaper than the declared cheap route."""
    found = []
    route = estimate_route(splits, task)
    if abs(route.value - task.cheap_level) > 4 * route.se + 0.01:
        found.append(
            f"the cheap route is stated to reach {task.cheap_level:.3f} but reaches {route}"
        )
    fixed = estimate_fixed_routing(splits)
    gap = max(1 - task.chance, 1e-9)
    allowed = max(task.cheap_level, task.chance + CONTENT_MAX_SHARE * gap)
    if fixed.value > allowed + 4 * fixed.se + 0.01:
        found.append(
            f"a `competing` task, yet fixed routing reaches {fixed}, more than the declared "
            f"cheap route ({task.cheap_level:.3f}) or a content task's allowance"
        )
    if (bag.value - task.chance) / gap > CONTENT_MAX_SHARE:
        found.append(f"a `competing` task, yet the bag of tokens reaches {bag}")
    return found
