"""What ablate measures: accuracy, attention alignment/entropy/distance, context dependence.

Device-side functions (jax) run inside compiled eval steps; host-side statistics (numpy)
serve the sweep report. Axis letters: the table in `ablate.model`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def token_metrics(
    logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array
) -> dict[str, jax.Array]:
    """Cross-entropy over scored positions, per-token and per-sequence accuracy."""
    ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
    total = jnp.maximum(weights_BL.sum(), 1.0)
    correct_BL = (logits_BLV.argmax(-1) == targets_BL).astype(jnp.float32)
    # A sequence counts as solved when every scored position in it is right.
    wrong_B = ((1.0 - correct_BL) * weights_BL).sum(-1)
    scored_B = (weights_BL.sum(-1) > 0).astype(jnp.float32)
    return {
        "loss": (ce_BL * weights_BL).sum() / total,
        "accuracy": (correct_BL * weights_BL).sum() / total,
        "sequence_accuracy": ((wrong_B == 0) * scored_B).sum() / jnp.maximum(scored_B.sum(), 1.0),
    }


def context_deps(
    deps_BLS: jax.Array, weights_BL: jax.Array, exclude_self: bool = True
) -> tuple[jax.Array, jax.Array]:
    """The dependency mask without each position itself, and the rows that keep any.

    A target may depend on its own input token (the query key in recall), but attending to
    oneself is not finding context: alignment counts only the other positions, over the
    scored rows that have some (a task like `memorize` has none: its alignment is NaN).
    In cross-attention (`exclude_self=False`) queries and keys are different sequences, so
    source position i is context for target i like any other.
    """
    L, S = deps_BLS.shape[1:]
    context_BLS = deps_BLS & ~jnp.eye(L, S, dtype=bool)[None] if exclude_self else deps_BLS
    rows_BL = weights_BL * context_BLS.any(-1)
    return context_BLS, rows_BL


def attention_metrics(
    probs_BHLS: jax.Array,
    deps_BLS: jax.Array,
    weights_BL: jax.Array,
    valid_BL: jax.Array | None = None,
    *,
    exclude_self: bool = True,
) -> dict[str, jax.Array]:
    """Per-head alignment with the dependency mask, entropy and mean attention distance.

    alignment_H: sum_j A_ij M_ij over context positions j != i (see `context_deps`),
    averaged over scored positions i; entropy_H and distance_H: averaged over every real
    (non-padding) query position.
    """
    probs_BHLS = probs_BHLS.astype(jnp.float32)
    context_BLS, rows_BL = context_deps(deps_BLS, weights_BL, exclude_self)
    deps_B1LS = context_BLS[:, None].astype(jnp.float32)
    w_B1L = rows_BL[:, None].astype(jnp.float32)
    n_rows = w_B1L.sum((0, 2))
    alignment_H = ((probs_BHLS * deps_B1LS).sum(-1) * w_B1L).sum((0, 2)) / jnp.maximum(n_rows, 1)
    alignment_H = jnp.where(n_rows > 0, alignment_H, jnp.nan)
    B, _, L, S = probs_BHLS.shape
    real_B1L = jnp.ones((B, 1, L)) if valid_BL is None else valid_BL[:, None].astype(jnp.float32)
    plogp_BHLS = jnp.where(probs_BHLS > 0, probs_BHLS * jnp.log(jnp.maximum(probs_BHLS, 1e-30)), 0)
    entropy_BHL = -plogp_BHLS.sum(-1)
    dist_LS = jnp.abs(jnp.arange(L)[:, None] - jnp.arange(S)[None, :]).astype(jnp.float32)
    distance_BHL = (probs_BHLS * dist_LS[None, None]).sum(-1)
    n_real = jnp.maximum(real_B1L.sum((0, 2)), 1.0)
    return {
        "alignment": alignment_H,
        "entropy": (entropy_BHL * real_B1L).sum((0, 2)) / n_real,
        "distance": (distance_BHL * real_B1L).sum((0, 2)) / n_real,
    }


def uniform_alignment(
    deps_BLS: jax.Array, visible_BLS: jax.Array, weights_BL: jax.Array, exclude_self: bool = True
):
    """The alignment uniform attention would get: mean of |M_i within V(i)| / |V(i)|."""
    context_BLS, rows_BL = context_deps(deps_BLS, weights_BL, exclude_self)
    visible = visible_BLS.astype(jnp.float32)
    share_BL = (context_BLS * visible).sum(-1) / jnp.maximum(visible.sum(-1), 1.0)
    n_rows = rows_BL.sum()
    return jnp.where(n_rows > 0, (share_BL * rows_BL).sum() / jnp.maximum(n_rows, 1.0), jnp.nan)


def uniform_entropy(visible_BLS: jax.Array, valid_BL: jax.Array | None = None) -> jax.Array:
    """The entropy uniform attention would have: log |V(i)|, averaged over every real
    (non-padding) query position as `attention_metrics` averages entropy_H."""
    real_BL = jnp.ones(visible_BLS.shape[:2]) if valid_BL is None else valid_BL.astype(jnp.float32)
    log_n_BL = jnp.log(jnp.maximum(visible_BLS.astype(jnp.float32).sum(-1), 1.0))
    return (log_n_BL * real_BL).sum() / jnp.maximum(real_BL.sum(), 1.0)


def descent_direction(
    grad_BHLS: jax.Array, probs_BHLS: jax.Array, visible_BLS: jax.Array, qk_scores_H
) -> jax.Array:
    """Where the loss pushes each head's attention: minus the gradient, per target row.

    grad_BHLS is dL/dp, the loss's gradient with respect to the pattern (other patterns held
    fixed). Since o_i = sum_j p_ij v_j, dL/dp_ij = <dL/do_i, v_j>: the push is towards the
    positions whose values would lower the loss. For a head whose pattern is softmax(scores)
    (qk_scores_H), the direction is on the scores, -dL/ds = -p * (g - <p, g>), which is what
    W_q/W_k training follows. Any other pattern is read on the simplex: -(g - mean_V(i) g)
    over the visible positions (a row-constant push would change nothing).
    """
    visible_B1LS = visible_BLS[:, None].astype(jnp.float32)
    g, p = grad_BHLS.astype(jnp.float32), probs_BHLS.astype(jnp.float32)
    on_scores = -p * (g - (p * g).sum(-1, keepdims=True))
    mean_BHL1 = (g * visible_B1LS).sum(-1, keepdims=True) / jnp.maximum(
        visible_B1LS.sum(-1, keepdims=True), 1.0
    )
    on_pattern = -(g - mean_BHL1)
    qk_1H11 = jnp.asarray(qk_scores_H, bool)[None, :, None, None]
    return jnp.where(qk_1H11, on_scores, on_pattern) * visible_B1LS


def gradient_alignment(
    direction_BHLS: jax.Array,
    deps_BLS: jax.Array,
    weights_BL: jax.Array,
    exclude_self: bool = True,
) -> jax.Array:
    """Per head, the share of the descent direction's positive part on the dependency
    positions (context positions j != i, as for alignment), averaged over scored rows.

    A row with no positive part (no pull at all) does not count; NaN where no row counts.
    Compare with `uniform_alignment`, the share a uniform push over V(i) would put there.
    """
    context_BLS, rows_BL = context_deps(deps_BLS, weights_BL, exclude_self)
    up_BHLS = jnp.maximum(direction_BHLS, 0.0)
    total_BHL = up_BHLS.sum(-1)
    share_BHL = (up_BHLS * context_BLS[:, None]).sum(-1) / jnp.maximum(total_BHL, 1e-30)
    w_BHL = rows_BL[:, None] * (total_BHL > 0)
    n_H = w_BHL.sum((0, 2))
    return jnp.where(n_H > 0, (share_BHL * w_BHL).sum((0, 2)) / jnp.maximum(n_H, 1.0), jnp.nan)


def context_dependence(acc_learned: float, acc_variant: float, chance: float) -> float:
    """(acc_learned - acc_variant) / (acc_learned - chance): 1 = all of it, 0 = none.

    NaN when learned attention itself is not above chance (the ratio then means nothing).
    """
    gap = acc_learned - chance
    if gap <= 1e-9:
        return float("nan")
    return (acc_learned - acc_variant) / gap


MIN_SEEDS = 3  # fewer values give no interval: a mean of 1 or 2 seeds is stated as such
BCA_MIN_SEEDS = 8


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean over seeds with its 95% interval (low/high NaN when none can be formed)."""

    mean: float
    low: float
    high: float
    n: int
    method: str  # "t", "bca", or "none" (fewer than MIN_SEEDS values)

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def describe(self) -> str:
        """What the interval is, for a table header: '95% t-interval over 5 seeds'."""
        seeds = f"{self.n} seed{'s' * (self.n != 1)}"
        if not self.has_interval:
            return f"{seeds}: no interval (needs >= {MIN_SEEDS})"
        name = {"t": "Student-t interval", "bca": "BCa bootstrap interval"}[self.method]
        return f"95% {name} over {seeds}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def mean_interval(
    values: Sequence[float],
    *,
    method: str = "t",
    level: float = 0.95,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> Interval:
    """The mean of the finite values with a `level` interval over them (scipy.stats).

    method "t": Student-t, mean +- t_{n-1} * s / sqrt(n) (coverage 0.95 for normal values;
    tests/test_metrics.py simulates it). "bca": scipy's BCa bootstrap, only from BCA_MIN_SEEDS
    values on (with 8 normal values its coverage is ~0.86, below the t-interval's: it is an
    option for many seeds and skewed values, not the default). Fewer than MIN_SEEDS values
    give the mean alone: no interval is claimed from one or two seeds. `bounds` is the range
    the mean can take (an accuracy lies in [0, 1]): the interval is cut to it, which keeps
    its coverage.
    """
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    mean = float(x.mean())
    if n < MIN_SEEDS:
        return Interval(mean, math.nan, math.nan, n, "none")
    if np.all(x == x[0]):  # no spread: every resample and every t-interval is the point
        return Interval(mean, mean, mean, n, method)
    if method == "t":
        low, high = stats.t.interval(level, n - 1, loc=mean, scale=stats.sem(x))
    elif method == "bca":
        if n < BCA_MIN_SEEDS:
            raise ValueError(f"a BCa interval needs >= {BCA_MIN_SEEDS} values, got {n}")
        ci = stats.bootstrap(
            (x,), np.mean, method="BCa", confidence_level=level, random_state=0
        ).confidence_interval
        low, high = ci.low, ci.high
    else:
        raise ValueError(f"unknown interval method {method!r}; choose t or bca")
    low, high = max(float(low), bounds[0]), min(float(high), bounds[1])
    return Interval(mean, low, high, n, method)


def paired_dependence(
    learned_by_seed: Mapping[Any, float], variant_by_seed: Mapping[Any, float], chance: float
) -> dict[str, Any]:
    """Per-seed paired comparison of a variant with learned attention (seeds in both).

    In the paired design a seed's variants share their initial weights and batches, so the
    per-seed difference carries the comparison's own variance. Returns the per-seed
    difference (learned - variant) and context dependence, and an Interval over seeds of
    each. A seed whose learned accuracy is not above chance has no dependence (NaN).
    """
    seeds = [s for s in learned_by_seed if s in variant_by_seed]
    diff = {s: learned_by_seed[s] - variant_by_seed[s] for s in seeds}
    dep = {s: context_dependence(learned_by_seed[s], variant_by_seed[s], chance) for s in seeds}
    return {
        "seeds": seeds,
        "difference_per_seed": diff,
        "dependence_per_seed": dep,
        "difference": mean_interval(list(diff.values())),
        "dependence": mean_interval(list(dep.values())),
    }


def perplexity(loss: Any) -> float | None:
    """exp(mean cross-entropy), capped at exp(50); None for a missing or non-finite loss."""
    if loss is None or not math.isfinite(float(loss)):
        return None
    return math.exp(min(float(loss), 50.0))


def nan_to_none(x: Any) -> Any:
    """A JSON-safe copy: every non-finite float (numpy scalars too) becomes None (null)."""
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [nan_to_none(v) for v in x]
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    return x


def finite(x: Any) -> bool:
    """Whether x is a finite number (a value read back from JSON may be None or NaN)."""
    return isinstance(x, int | float) and math.isfinite(x)
