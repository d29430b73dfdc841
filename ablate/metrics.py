"""What ablate measures: accuracy, attention alignment/entropy/distance, context dependence.

Device-side functions (jax) run inside compiled eval steps; host-side statistics (numpy)
serve the sweep report. Axis letters as in model.py (N layers, B batch, H heads, L, S).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def context_deps(deps_BLS: jax.Array, weights_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The dependency mask without each position itself, and the rows that keep any.

    A target may depend on its own input token (the query key in recall), but attending to
    oneself is not finding context: alignment counts only the other positions, over the
    scored rows that have some (a task like `memorize` has none: its alignment is NaN).
    """
    L, S = deps_BLS.shape[1:]
    context_BLS = deps_BLS & ~jnp.eye(L, S, dtype=bool)[None]
    rows_BL = weights_BL * context_BLS.any(-1)
    return context_BLS, rows_BL


def attention_metrics(
    probs_BHLS: jax.Array,
    deps_BLS: jax.Array,
    weights_BL: jax.Array,
    valid_BL: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Per-head alignment with the dependency mask, entropy and mean attention distance.

    alignment_H: sum_j A_ij M_ij over context positions j != i (see `context_deps`),
    averaged over scored positions i; entropy_H and distance_H: averaged over every real
    (non-padding) query position.
    """
    probs_BHLS = probs_BHLS.astype(jnp.float32)
    context_BLS, rows_BL = context_deps(deps_BLS, weights_BL)
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


def uniform_alignment(deps_BLS: jax.Array, visible_BLS: jax.Array, weights_BL: jax.Array):
    """The alignment uniform attention would get: mean of |M_i within V(i)| / |V(i)|."""
    context_BLS, rows_BL = context_deps(deps_BLS, weights_BL)
    visible = visible_BLS.astype(jnp.float32)
    share_BL = (context_BLS * visible).sum(-1) / jnp.maximum(visible.sum(-1), 1.0)
    n_rows = rows_BL.sum()
    return jnp.where(n_rows > 0, (share_BL * rows_BL).sum() / jnp.maximum(n_rows, 1.0), jnp.nan)


def context_dependence(acc_learned: float, acc_variant: float, chance: float) -> float:
    """(acc_learned - acc_variant) / (acc_learned - chance): 1 = all of it, 0 = none.

    NaN when learned attention itself is not above chance (the ratio then means nothing).
    """
    gap = acc_learned - chance
    if gap <= 1e-9:
        return float("nan")
    return (acc_learned - acc_variant) / gap


def bootstrap_interval(
    values: Sequence[float],
    statistic=np.mean,
    *,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(statistic, low, high): percentile bootstrap interval over the given values (seeds)."""
    x = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    point = float(statistic(x))
    if len(x) == 1:
        return point, point, point
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_resamples, len(x)))
    stats = np.apply_along_axis(statistic, 1, x[idx])
    tail = (1.0 - level) / 2.0
    return point, float(np.quantile(stats, tail)), float(np.quantile(stats, 1.0 - tail))


def paired_context_dependence(
    acc_learned: Sequence[float],
    acc_variant: Sequence[float],
    chance: float,
    *,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Context dependence from per-seed accuracies, with a bootstrap interval over seeds.

    Learned and variant seeds are resampled independently (seed i of one variant has no
    special relation to seed i of another); the statistic is the dependence of the means.
    """
    a = np.asarray(acc_learned, dtype=np.float64)
    b = np.asarray(acc_variant, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan"), float("nan")
    point = context_dependence(a.mean(), b.mean(), chance)
    if len(a) == 1 and len(b) == 1:
        return point, point, point
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, len(a), size=(n_resamples, len(a)))
    ib = rng.integers(0, len(b), size=(n_resamples, len(b)))
    stats = np.array(
        [context_dependence(ma, mb, chance) for ma, mb in zip(a[ia].mean(1), b[ib].mean(1))]
    )
    stats = stats[np.isfinite(stats)]
    if len(stats) == 0:
        return point, float("nan"), float("nan")
    tail = (1.0 - level) / 2.0
    return point, float(np.quantile(stats, tail)), float(np.quantile(stats, 1.0 - tail))


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
