"""The sweep report: numbers, plots and plain-words statements from a sweep folder alone.

Reads `results.jsonl` (one row per run and seed), `sweep.json` (the command) and, per run
folder, `metrics.jsonl` (curves) and the optional `patterns_final.npz` (heatmaps); never a
model. Writes `REPORT.md` in the sweep folder and `report/` (PNG plots drawn by
ablate.plots, `summary.json`).
Rows are grouped by (task, grid point); failed or diverged rows are listed and left out of
every statistic. Every sentence is chosen by thresholds on measured numbers and intervals.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ablate.attention import MIXERS
from ablate.config import ConfigError
from ablate.metrics import (
    Interval,
    finite,
    mean_interval,
    nan_to_none,
    paired_dependence,
    perplexity,
)
from ablate.plots import bars, curves_plot, pattern_grid
from ablate.runfolder import (
    DROP_PNG,
    METRICS_FILE,
    PATTERNS_FILE,
    PROBE_DIR,
    PROBE_FILE,
    PRUNING_PNG,
    REPORT_DIR,
    REPORT_FILE,
    RESULTS_FILE,
    SWEEP_FILE,
    read_jsonl,
    write_atomic,
)

# Verdict bounds on context dependence (a fraction of learned attention's gain over chance);
# a verdict reads the interval's bounds only, never the mean.
ESSENTIAL = 0.8  # whole interval above: the variant loses almost all of the gain
DISPENSABLE = 0.2  # interval holds 0 and stays below this: no measurable loss
PULL_PARTS = ("_init", "_peak", "")
PULL = tuple(f"gradient_alignment_max{x}" for x in PULL_PARTS)
ONSETS = (
    "alignment_onset_step",
    "loss_onset_step",
    "accuracy_onset_step",
    "gradient_alignment_onset_step",
)
# Tasks with a cheap route (results rows of competing tasks): shares, then onset steps.
ROUTES = (
    "conflict_accuracy",
    "alignment_cheap_max",
    "conflict_alignment_max",
    "conflict_alignment_cheap_max",
    "gradient_alignment_cheap_max_peak",
    "conflict_gradient_alignment_max_init",
    "conflict_gradient_alignment_max_peak",
    "conflict_gradient_alignment_max",
    "conflict_cheap_agreement",
)
ROUTE_ONSETS = (
    "conflict_accuracy_onset_step",
    "alignment_cheap_onset_step",
    "conflict_gradient_alignment_peak_step",
    "cheap_phase_start",
    "cheap_phase_end",
)
# A seed gives the cheap route's answer on at least this share of conflict targets: "cheap".
CHEAP_AGREEMENT = 0.9
# How far (learned - uniform) may stray, as a whole interval, for "stays at the uniform level"
# on a control: attention mass for alignment, nats for entropy.
UNIFORM_ALIGNMENT_TOLERANCE = 0.02
UNIFORM_ENTROPY_TOLERANCE = 0.05
LEVELS = (("chance", "chance"), ("fixed_routing_ceiling", "fixed"), ("bag_ceiling", "bag"))
VERDICT_TEXT = {
    "essential": "{v} loses almost all of learned attention's gain over chance (context "
    "dependence {dep}, the whole interval above {essential}): the task needs what {v} lacks, "
    "{lacks}",
    "partial": "{v} loses part of learned attention's gain over chance (context dependence "
    "{dep}: the interval excludes 0 and does not lie above {essential}); it lacks {lacks}",
    "minor": "{v} loses a small but measurable part of learned attention's gain over chance "
    "(context dependence {dep}: the interval excludes 0 and stays below {dispensable}); it "
    "lacks {lacks}",
    "dispensable": "{v} loses no measurable part of learned attention's gain (context "
    "dependence {dep}: the interval includes 0 and stays below {dispensable}): at this size "
    "and budget the task does not need what {v} lacks, {lacks}",
    "inconclusive": "{v}'s loss is not settled by {n} seeds (context dependence {dep}: the "
    "interval includes 0 and losses above {dispensable}); it lacks {lacks}",
    "better": "{v} does better than learned attention (context dependence {dep}, the whole "
    "interval below 0); it lacks {lacks}",
    "too few seeds": "{v}: context dependence {dep}; with {n} seed(s) there is no interval, "
    "so no verdict",
}
HOW_TO_READ = """## How to read this

- **Accuracy**: per scored target token on held-out batches; the mean over seeds with a 95%
  Student-t interval over seeds in brackets (method and number of seeds in each table's
  header; one or two seeds give the mean alone, no interval).
- **Reference levels** (computed by `ablate.reference` for every synthetic task): *chance*,
  the best accuracy without looking at the input; the *fixed-routing ceiling*, the best
  accuracy of a reader that sees the target's own token and ONE fixed other position (what a
  fixed pattern that copies a position can get); the *bag ceiling*, the best accuracy from
  the multiset of visible tokens plus the own token and index (what order-free averaging can
  get). Exact where the task derives them, else estimated (held-out, with a standard error).
  A variant is *at* a level when its interval overlaps the level +- 2 SE. They are the levels
  of those idealised readers, not bounds on the variants: a two-layer `uniform` model with
  position embeddings is not order-free (the MLP between two averages binds tokens to their
  positions, and causal averaging adds each prefix's mean), and a fixed pattern with several
  heads and layers reads more than one position; a variant above its level says so.
- **Intervals are over seeds**, each seed evaluated on the same held-out sequences (their
  number is in the table header): they cover seed-to-seed variation, not the choice of test
  sequences; a zero width means every seed scored the same on them.
- **Context dependence** of a variant = (acc_learned - acc_variant) / (acc_learned - chance)
  per seed (the paired design: for one seed every variant starts from the same shared
  weights and sees the same batches), then its mean and interval over seeds. 1 = the variant
  loses everything learned attention gains over chance, 0 = nothing, below 0 = it does
  better. On a synthetic masked-LM task the own-token level takes chance's place (a reader
  of the masked position's own input alone gets the kept tokens right). Undefined when
  learned attention's interval is not above that level. Real-text masked LM has no such
  level here: its dependences are read against the unigram chance.
- **Verdicts** read the interval's bounds only: *essential* (above 0.8), *partial* (above 0,
  reaching 0.2 but not wholly above 0.8), *minor* (above 0, below 0.2), *dispensable* (includes
  0, below 0.2), *inconclusive* (includes 0 and 0.2), *better* (below 0).
- **Best-head alignment**: the attention mass the best head puts on the positions each
  target depends on (the task's ground truth), beside what uniform attention would put there.
- **Gradient alignment** (the loss's pull): per head, the share of the descent direction of
  the loss on its attention (on the scores of learned/frozen heads, on the pattern of any
  other head) that falls on the dependency positions, beside the share a uniform push would
  give. Since o_i = sum_j p_ij v_j, dL/dp_ij = <dL/do_i, v_j>: first-order training raises
  attention where a position's value would lower the loss. Read its curve beside alignment's
  and accuracy's (only as finely as the evals are spaced); score- and pattern-based pulls are
  not on one scale.
- **Onsets** (learned attention): per seed, the first eval step at which a curve has gone
  half way from its step-0 value to its end: the alignment of the head that ends most
  aligned, and that head's pull (to its peak), so both onsets are of one head; the accuracy
  up to its last eval; the loss down to its last eval, measured from the lower of its step-0
  value and -log chance (a random model's loss starts far above the loss of knowing only
  which answers occur, and that first fall uses no context). None for a seed whose curve did
  not move that way. Steps are only as fine as the evals: the true
  crossing lies between the onset's eval and the one before it. Orders are read per seed
  (alignment onset - loss onset, alignment onset - accuracy onset, pull onset - alignment
  onset) from the interval's bounds:
  *before* (wholly below 0), *after* (wholly above 0), else not distinguishable at this eval
  spacing.
- **Two routes** (tasks with a cheap route besides the content one): which route the model
  answers by is read on conflict sequences, where the cheap route's answer is wrong and only
  content answers: *content* when the conflict accuracy's interval lies above what readers
  without content reach there (the larger of their fixed-routing and bag ceilings); *cheap*
  when the model gives the cheap route's answer on at least 0.9 of conflict targets (the
  interval's lower bound); else content is not shown. A seed's *cheap phase* runs from the
  first eval at which most of its conflict answers are the cheap route's to the first after
  it at which they are not. The verdict is the state at the last eval: the report says when
  the conflict accuracy was still rising there. Alignment and pull on the training
  distribution do not separate the routes (the content positions include the cheap one
  wherever the routes agree); on conflict sequences they do.
- **Controls** (tasks that need no pairwise context): learned attention's final alignment
  (best head, mean over heads) and entropy (mean over heads, most concentrated head) minus
  what uniform attention over the visible positions gives (its alignment; its entropy, the
  log of the number of visible positions averaged over query positions as the heads'
  entropy is), per seed. *Stays at the uniform level* only when the whole interval lies
  within +-0.02 (mass) or +-0.05 nats (entropy).
"""
NEEDS = {
    "content": "needs content",
    "position": "needs position",
    "bag": "needs only the bag of tokens",
    "none": "control: no pairwise context",
    "competing": "two routes: content, or a cheap one",
    "partial": "fixed routing answers part, content the rest",
    "unknown": "real data",
}


def _stat(values: Iterable[Any], bounds=(0.0, 1.0)) -> dict[str, Any] | None:
    """Mean and 95% interval over seeds as a dict (None when no finite value); the interval
    is cut to `bounds`, the range of the quantity (accuracy and alignment: [0, 1])."""
    i = mean_interval([float(v) for v in values if finite(v)], bounds=bounds)
    return None if i.n == 0 else i.as_dict()


def _interval(s: dict[str, Any]) -> Interval:
    return Interval(**{k: s[k] for k in ("mean", "low", "high", "n", "method")})


def verdict(dependence: dict[str, Any]) -> str:
    """The verdict word of a context-dependence interval, from its bounds alone."""
    if not finite(dependence["mean"]):
        return "undefined"
    if not _interval(dependence).has_interval:
        return "too few seeds"
    low, high = dependence["low"], dependence["high"]
    if high < 0:
        return "better"
    if low > ESSENTIAL:
        return "essential"
    if low > 0:
        return "minor" if high < DISPENSABLE else "partial"
    return "dispensable" if high < DISPENSABLE else "inconclusive"


def _levels(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The task's reference levels from its rows: {name: {value, se, method}} (value None
    where not computable: real data)."""
    first = next((r for r in rows if "bag_ceiling_method" in r), rows[0])
    out = {}
    for field, _ in LEVELS:
        value = first.get(field)
        out[field] = dict(
            value=float(value) if finite(value) else None,
            se=float(first.get(f"{field}_se") or 0.0),
            method=first.get(f"{field}_method")
            or ("stated by the task" if field == "chance" else "not recorded (an older sweep)"),
        )
    return out


def _relation(acc: dict[str, Any] | None, level: dict[str, Any]) -> str | None:
    """below / at / above a reference level, from the accuracy interval (None: no claim)."""
    if acc is None or level["value"] is None or not _interval(acc).has_interval:
        return None
    low, high = level["value"] - 2 * level["se"], level["value"] + 2 * level["se"]
    if acc["high"] < low:
        return "below"
    return "above" if acc["low"] > high else "at"


def _attention_names(attention: Any) -> set[str]:
    """The variant names in a row's attention spec (a name, per layer, or per head)."""
    if isinstance(attention, str):
        return {attention}
    if isinstance(attention, dict):
        return _attention_names(attention.get("variant", attention.get("name", "")))
    if isinstance(attention, list | tuple):
        return set().union(*(_attention_names(a) for a in attention)) if attention else set()
    return set()


# An encoder-decoder row's attention specs and where each applies, in the report's words.
SEQ2SEQ_SPECS = (
    ("attention", "encoder"),
    ("decoder_attention", "decoder self-attention"),
    ("cross_attention", "cross-attention"),
)


def _lacks(row: dict[str, Any], label: str) -> tuple[str, str]:
    """(long, short) words for what a variant lacks against learned attention; for an
    encoder-decoder row, named per kind of attention that is not learned."""
    if "cross_attention" in row:
        parts = [
            (where, _lacks({"attention": row.get(spec)}, label))
            for spec, where in SEQ2SEQ_SPECS
            if _attention_names(row.get(spec)) - {"learned"}
        ]
        if not parts:
            return "nothing", "nothing"
        return (
            "; ".join(f"in {where}, {long}" for where, (long, _) in parts),
            ", ".join(f"{short} ({where})" for where, (_, short) in parts),
        )
    names = _attention_names(row.get("attention")) or {label}
    # Each variant states its own words (`Mixer.lacks`); a name no longer registered has none.
    known = [MIXERS[n].lacks for n in sorted(names) if n in MIXERS and MIXERS[n].lacks]
    if names == {"learned"} or not known:
        long = short = "learned attention in some heads" if names - {"learned"} else "nothing"
    elif len(names) == 1:
        long, short = known[0]
    else:
        # Mixed heads: each non-learned variant's words, said of some heads; the rest are
        # learned only when the spec names learned too.
        rest = " (the other heads are learned)" if "learned" in names else ""
        long = "in some heads, " + "; in some heads, ".join(k[0] for k in known) + rest
        short = ", ".join(sorted({k[1] for k in known})) + " (some heads)"
    if any(p["kind"] == "embedding" for p in row.get("frozen") or []):
        long, short = long + "; its embeddings stay at init too", short + ", trained embeddings"
    return long, short


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (task, grid point): each variant's accuracy, context dependence and alignment."""
    grouped: dict[str, dict[str, Any]] = {}
    runs: dict[str, dict[str, Any]] = {}
    for r in rows:
        grid = r.get("grid") or {}
        g = grouped.setdefault(r["task"] + json.dumps(grid, sort_keys=True), {"runs": {}})
        g["runs"].setdefault(r["variant"], []).append(r)
        # All seeds of a run train at once, so wall time and the error are per run.
        new = dict(run=r["run"], status="ok", error="", seeds=[], failed=[])
        new |= dict(wall_seconds=r.get("wall_seconds"), compile_seconds=r.get("compile_seconds"))
        run = runs.setdefault(r["run"], new)
        ok = r.get("status") == "ok"
        run["seeds" if ok else "failed"].append(r.get("seed"))
        if not ok:
            run["status"] = r.get("status")
            run["error"] = ((r.get("error") or "").strip().splitlines() or [""])[0]
    return {
        "groups": [_summarize_group(g["runs"]) for g in grouped.values()],
        "failed": [r for r in runs.values() if r["failed"]],
        "runs": list(runs.values()),
    }


def _by_seed(rows: list[dict[str, Any]], field: str = "accuracy") -> dict[Any, float]:
    return {
        r.get("seed"): float(r[field])
        for r in rows
        if r.get("status") == "ok" and finite(r.get(field))
    }


def _paired(rows: list[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """Mean and interval over seeds of row[a] - row[b], from the rows holding both."""
    return _stat(
        (r[a] - r[b] for r in rows if finite(r.get(a)) and finite(r.get(b))),
        (-math.inf, math.inf),
    )


def _onset_order(good: list[dict[str, Any]]) -> dict[str, Any]:
    """The paired onset differences (steps) over seeds, the widest eval gap, and how many
    seeds recorded no alignment onset (their alignment did not rise)."""
    spacing = [r["eval_spacing"] for r in good if finite(r.get("eval_spacing"))]
    near = [r["onset_spacing"] for r in good if finite(r.get("onset_spacing"))]
    heads = sorted({r["onset_head"] for r in good if r.get("onset_head")})
    return dict(
        onset_spacing=max(near) if near else None,
        onset_heads=heads,
        alignment_minus_loss_onset=_paired(good, "alignment_onset_step", "loss_onset_step"),
        alignment_minus_accuracy_onset=_paired(good, "alignment_onset_step", "accuracy_onset_step"),
        pull_minus_alignment_onset=_paired(
            good, "gradient_alignment_onset_step", "alignment_onset_step"
        ),
        eval_spacing=max(spacing) if spacing else None,
        alignment_onset_missing=sum(
            "alignment_onset_step" in r and r["alignment_onset_step"] is None for r in good
        ),
    )


def _versus_uniform(good: list[dict[str, Any]]) -> dict[str, Any]:
    """Final alignment and entropy minus uniform attention's, paired per seed (the row)."""
    return dict(
        alignment_max_minus_uniform=_paired(good, "alignment_max", "alignment_uniform"),
        alignment_mean_minus_uniform=_paired(good, "alignment_mean", "alignment_uniform"),
        entropy_mean_minus_uniform=_paired(good, "entropy_mean", "entropy_uniform"),
        entropy_min_minus_uniform=_paired(good, "entropy_min", "entropy_uniform"),
        entropy_mean_change=_paired(good, "entropy_mean", "entropy_mean_init"),
        entropy_min_change=_paired(good, "entropy_min", "entropy_min_init"),
    )


# An encoder-decoder's cross-attention fields of a results row (sweep._cross_fields).
CROSS = ("cross_alignment_max", "cross_alignment_uniform", "cross_gradient_alignment_max")


def _summarize_group(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    first = next(iter(runs.values()))[0]
    all_rows = [r for rs in runs.values() for r in rs]
    ok_rows = [r for r in all_rows if r.get("status") == "ok"]
    chance = next((float(r["chance"]) for r in all_rows if finite(r.get("chance"))), math.nan)
    learned_by_seed = _by_seed(runs.get("learned", []))
    learned_acc = _stat(learned_by_seed.values())
    # What no context gives: chance, or on a masked-LM task the level of reading the own
    # token alone (kept tokens give their answer away), when that is higher.
    own = next(
        (float(r["own_token_level"]) for r in all_rows if finite(r.get("own_token_level"))), None
    )
    floor = chance if own is None else own if math.isnan(chance) else max(chance, own)
    # Learned attention has learned when its interval lies above that floor (with fewer than
    # MIN_SEEDS seeds, when its mean does: stated as such).
    learns = learned_acc is not None and (
        learned_acc["low"] > floor
        if _interval(learned_acc).has_interval
        else learned_acc["mean"] > floor
    )
    levels = _levels(all_rows)
    variants = {}
    for label in sorted(runs, key=lambda v: v != "learned"):  # learned first, else as run
        rs, good = runs[label], [r for r in runs[label] if r.get("status") == "ok"]
        e = variants[label] = dict(run=rs[0]["run"], run_dir=rs[0].get("run_dir") or rs[0]["run"])
        e |= dict(seeds=[r.get("seed") for r in good], seeds_ok=len(good), seeds_total=len(rs))
        e["frozen"] = rs[0].get("frozen") or []
        e["lacks"], e["lacks_short"] = _lacks(rs[0], label) if label != "learned" else ("", "-")
        for name in ("accuracy", "alignment_max", "alignment_max_init", *PULL, *ROUTES, *CROSS):
            e[name] = _stat(r.get(name) for r in good)
        for name in ("gradient_alignment_peak_step", *ONSETS, *ROUTE_ONSETS):
            e[name] = _stat((r.get(name) for r in good), (0.0, math.inf))
        e |= _onset_order(good)
        e["conflict_tail_rise"] = _stat(
            (r.get("conflict_accuracy_tail_rise") for r in good), (-1.0, 1.0)
        )
        e["cheap_phase_seeds"] = sum(r.get("cheap_phase_start") is not None for r in good)
        e["cheap_phase_left"] = sum(r.get("cheap_phase_end") is not None for r in good)
        e["conflict_per_seed"] = [
            r["conflict_accuracy"] for r in good if finite(r.get("conflict_accuracy"))
        ]
        e |= _versus_uniform(good)
        # exp(held-out loss); rows of older sweeps have only the loss.
        e["perplexity"] = _stat(
            (r.get("perplexity", perplexity(r.get("loss"))) for r in good), (1.0, math.inf)
        )
        e["levels"] = {short: _relation(e["accuracy"], levels[f]) for f, short in LEVELS}
        e["dependence"] = e["difference"] = e["verdict"] = None
        e["per_seed"] = {}
        if label != "learned" and learns and e["accuracy"]:
            paired = paired_dependence(learned_by_seed, _by_seed(good), floor)
            if paired["seeds"]:
                e["dependence"] = paired["dependence"].as_dict()
                e["difference"] = paired["difference"].as_dict()
                e["per_seed"] = {
                    str(s): dict(
                        difference=paired["difference_per_seed"][s],
                        dependence=paired["dependence_per_seed"][s],
                    )
                    for s in paired["seeds"]
                }
                e["verdict"] = verdict(e["dependence"])
    uniform = _stat(r.get("alignment_uniform") for r in ok_rows)
    grid = first.get("grid") or {}
    label = first["task"] + (
        f" ({', '.join(f'{k}={v}' for k, v in sorted(grid.items()))})" if grid else ""
    )
    group = dict(task=first["task"], grid=grid, label=label, chance=chance, levels=levels)
    group["own_token_level"] = own
    group["eval_sequences"] = first.get("eval_sequences")
    group |= dict(context_need=first.get("context_need"), variants=variants)
    group["alignment_uniform"] = uniform["mean"] if uniform else None
    group["cheap_route"], group["cheap_level"] = first.get("cheap_route"), first.get("cheap_level")
    group["conflict_share"] = first.get("conflict_share")
    ceilings = [first.get(f"conflict_{f}") for f in ("fixed_routing_ceiling", "bag_ceiling")]
    group["conflict_top"] = max((c for c in ceilings if finite(c)), default=chance)
    for name in ("alignment_uniform_cheap", "conflict_alignment_uniform"):
        level = _stat(r.get(name) for r in ok_rows)
        group[name] = level["mean"] if level else None
    group["learned_learns"] = learns if "learned" in runs else None
    group["statement"] = _statement(group)
    return group


def _fmt(s: dict[str, Any] | None, digits: int = 2) -> str:
    if s is None or not finite(s["mean"]):
        return "n/a"
    if not _interval(s).has_interval:
        return f"{s['mean']:.{digits}f} ({s['n']} seed{'s' * (s['n'] > 1)}, no interval)"
    return f"{s['mean']:.{digits}f} [{s['low']:.{digits}f}, {s['high']:.{digits}f}]"


_OLD_HEAD_PART = re.compile(r"(layer \d+ head \d+): (.+)")


def _upgraded_row(row: dict) -> dict:
    """A results row as today's sweep writes it. Rows of earlier versions name the frozen
    parts in text ("layer 0 head 1: W_q, W_k", "token_embed"); today each is an entry of
    `model.frozen_parts` (part, kind, what, content_routing)."""
    frozen = row.get("frozen")
    if not frozen or not all(isinstance(p, str) for p in frozen):
        return row
    entries = []
    for text in frozen:
        if head := _OLD_HEAD_PART.fullmatch(text):
            what = head.group(2)
            entries.append({"part": head.group(1), "kind": "head", "what": what,
                            "content_routing": "W_q" in what})  # fmt: skip
        elif text.startswith("layer."):
            entries.append({"part": text, "kind": "layer", "what": "every weight of the block",
                            "content_routing": False})  # fmt: skip
        else:
            what = {"token_embed": "token embeddings", "pos_embed": "position embeddings"}
            entries.append({"part": text, "kind": "embedding", "what": what.get(text, text),
                            "content_routing": False})  # fmt: skip
    return {**row, "frozen": entries}


def _frozen_text(parts: list[str]) -> str:
    """Frozen parts (model.frozen_parts' entries) in few words: per-head entries are counted,
    not listed one by one."""
    per_head = Counter(p["what"] for p in parts if p["kind"] == "head")
    other = [p["part"] for p in parts if p["kind"] != "head"]
    return ", ".join(other + [f"{w} in {n} head{'s' * (n > 1)}" for w, n in per_head.items()])


def _level_text(g: dict[str, Any], e: dict[str, Any]) -> str:
    """'above chance 0.12, at the bag ceiling 0.25, ...' from the accuracy interval."""
    names = {"chance": "chance", "fixed": "the fixed-routing ceiling", "bag": "the bag ceiling"}
    parts = []
    for field, short in LEVELS:
        level, rel = g["levels"][field], e["levels"][short]
        if rel is not None:
            parts.append(f"{rel} {names[short]} {level['value']:.2f}")
    return ", ".join(parts)


def _reference_surprise(k: str, e: dict[str, Any]) -> str | None:
    """A sentence when a variant beats the level that should bound what it can do."""
    names = _attention_names(k)
    if e["levels"].get("bag") == "above" and k == "uniform":
        return (
            "`uniform` exceeds the bag ceiling: a two-layer uniform model is not order-free "
            "(the MLP between its averages binds tokens to their position embeddings, and "
            "causal averaging adds each prefix's mean)."
        )
    if e["levels"].get("fixed") == "above" and names & {"random_fixed", "gaussian"}:
        return (
            f"`{k}` exceeds the fixed-routing ceiling: its heads mix many fixed positions, "
            "across layers, more than the one fixed position of the ceiling's reader."
        )
    return None


def _pull_text(g: dict[str, Any], learned: dict[str, Any]) -> str | None:
    """The loss's pull on learned heads (gradient alignment) at init, peak and end."""
    init, peak, end = (learned[name] for name in PULL)
    u = g["alignment_uniform"]
    if peak is None or u is None or u > 0.9:
        return None
    step = learned["gradient_alignment_peak_step"]
    text = (
        f"The loss's pull on learned heads (the share of its descent direction on the "
        f"dependency positions, best head; a uniform push gives {u:.2f})"
    )
    text += f" was {_fmt(init)} at init" if init else ""
    text += f", peaked at {_fmt(peak)}"
    text += f" (step {step['mean']:.0f} on average)" if step else ""
    text += f" and ended at {_fmt(end)}" if end else ""
    if _interval(peak).has_interval:
        if peak["low"] > u:
            text += ": training pushed attention towards the context the task depends on"
        elif peak["high"] <= u:
            text += ": the loss never pulled attention towards the dependency positions"
    return text + "."


def route_taken(g: dict[str, Any], e: dict[str, Any]) -> str | None:
    """Which route a variant's model answers by at the end, from conflict sequences (where
    the cheap route is wrong and only content answers): "content" (the conflict accuracy's
    whole interval above `conflict_top`, what readers without content reach there: the
    larger of their fixed-routing and bag ceilings), "cheap" (the cheap route's answer given
    on at least CHEAP_AGREEMENT of conflict targets, the interval's lower bound), "no
    content" (the conflict accuracy not above `conflict_top`: content not shown), "unclear"
    (its interval straddles `conflict_top`); None: no cheap route, or no interval."""
    conflict, agree = e.get("conflict_accuracy"), e.get("conflict_cheap_agreement")
    if not g.get("cheap_route") or conflict is None or not _interval(conflict).has_interval:
        return None
    if conflict["low"] > g["conflict_top"]:
        return "content"
    if agree is not None and _interval(agree).has_interval and agree["low"] >= CHEAP_AGREEMENT:
        return "cheap"
    return "no content" if conflict["high"] <= g["conflict_top"] else "unclear"


ROUTE_TEXT = {
    "content": "it answers by content",
    "cheap": "it answers as the cheap route does",
    "no content": "content is not shown: not above what a reader without content reaches "
    "there, nor does it give the cheap route's answer throughout",
    "unclear": "the interval straddles that level: which route it took is not shown",
}


def _route_text(g: dict[str, Any], learned: dict[str, Any]) -> str | None:
    """Which route learned attention took on a task with two, when, and whether it was still
    moving at the end."""
    route = route_taken(g, learned)
    if route is None:
        return None
    conflict, agree = learned["conflict_accuracy"], learned["conflict_cheap_agreement"]
    n = learned["seeds_ok"]
    share = g.get("conflict_share")
    text = (
        f"Two routes answer this task: by content (always right) and a cheap one, "
        f"{g['cheap_route']}, which alone reaches {g['cheap_level']:.2f} here"
        + (
            f" (the routes disagree on {share:.3f} of training targets)"
            if share is not None
            else ""
        )
        + ". On conflict sequences, where the cheap route's answer is wrong and only content "
        f"answers, learned attention reaches {_fmt(conflict)} at the end (chance "
        f"{g['chance']:.2f}; readers without content reach {g['conflict_top']:.2f} there"
        + (
            f"; per seed {', '.join(f'{a:.2f}' for a in learned['conflict_per_seed'])}"
            if route in ("no content", "unclear")
            else ""
        )
        + ")"
        + (f" and gives the cheap route's answer on {_fmt(agree)} of them" if agree else "")
        + f": {ROUTE_TEXT[route]}"
    )
    if route == "content" and (onset := learned["conflict_accuracy_onset_step"]) is not None:
        text += f" (conflict accuracy half way up for good at step {_fmt(onset, 0)})"
    content, u = learned["conflict_alignment_max"], g.get("conflict_alignment_uniform")
    if route == "content" and content is not None and u is not None:
        # Accuracy says content is used; attention says whether it is read where it sits.
        bar = (1.0 + u) / 2
        if _interval(content).has_interval and content["low"] > bar:
            text += f", and its attention lands on the asked pair (best head {_fmt(content)})"
        else:
            text += (
                f", but no head's attention is shown to concentrate on the asked pair (best "
                f"head {_fmt(content)}, not wholly above {bar:.2f}, half way from uniform to "
                "1): one head attending to the pair is not shown to be how it answers (the "
                "mass may be spread over heads and layers)"
            )
    text += "."
    entered, left = learned["cheap_phase_seeds"], learned["cheap_phase_left"]
    if entered:
        start, end = learned["cheap_phase_start"], learned["cheap_phase_end"]
        text += (
            f" {entered} of {n} seeds went through a cheap phase (most conflict answers the "
            f"cheap route's), from step {_fmt(start, 0)}"
        )
        text += f"; {left} of them left it, at step {_fmt(end, 0)}" if left else "; none left it"
        text += "."
    elif n:
        text += " No seed went through a cheap phase (most conflict answers the cheap route's)."
    rise = learned.get("conflict_tail_rise")
    if rise is not None and _interval(rise).has_interval and rise["low"] > 0:
        text += (
            f" The conflict accuracy was still rising at the end ({_fmt(rise)} over the last "
            "evals): this is where training stood at this budget, not where it settles."
        )
    content, cheap = learned["conflict_alignment_max"], learned["conflict_alignment_cheap_max"]
    if content is not None and cheap is not None:
        text += (
            f" On conflict sequences the best head puts {_fmt(content)} of its attention on "
            f"the content route's positions (uniform: {g.get('conflict_alignment_uniform') or float('nan'):.2f})"
            f" and the best head {_fmt(cheap)} on the cheap route's"
        )
        if g.get("alignment_uniform_cheap") is not None:
            text += f" (uniform: about {g['alignment_uniform_cheap']:.2f})"
        text += "."
    init, peak, end = (learned[f"conflict_gradient_alignment_max{x}"] for x in PULL_PARTS)
    u = g.get("conflict_alignment_uniform")
    if end is not None and u is not None:
        text += (
            f" There the loss's pull on the content route's positions (best head; a uniform "
            f"push gives {u:.2f}) went from {_fmt(init)} at init to {_fmt(end)} at the end "
            "(the target's value sits at those positions, so a pull there is expected once "
            "values carry the tokens; what it measures is whether training is pushed that way)"
        )
        if share == 0:
            text += (
                "; training never sees such targets here (the cheap route is right on every "
                "training query), so nothing follows this pull"
            )
        text += "."
    return text


def _order(d: dict[str, Any] | None) -> str | None:
    """before / after / not distinguishable, from a paired difference's interval bounds
    (None: no interval)."""
    if d is None or not _interval(d).has_interval:
        return None
    if d["high"] < 0:
        return "before"
    return "after" if d["low"] > 0 else "not distinguishable"


def _order_text(d: dict[str, Any], first: str, second: str, spacing: str) -> str:
    """'first's onset comes before second's' (or after, or cannot be told apart)."""
    order = _order(d)
    if order is None:
        return f"with {d['n']} seed(s) there is no interval, so no order is claimed"
    if order == "not distinguishable":
        return (
            f"the interval includes 0: {first}'s and {second}'s onsets are not told apart "
            f"(at {spacing}, with these seeds)"
        )
    return f"{first}'s onset comes {order} {second}'s"


def _onset_text(g: dict[str, Any], learned: dict[str, Any]) -> str | None:
    """When learned heads' alignment rose, against the loss's fall and the pull's rise."""
    u = g["alignment_uniform"]
    if learned["alignment_max"] is None or u is None or u > 0.9:
        return None  # no alignment, or it cannot tell (see the alignment sentence)
    align, loss, accuracy, pull = (learned[name] for name in ONSETS)
    missing, n = learned["alignment_onset_missing"], learned["seeds_ok"]
    gap = learned.get("onset_spacing") or learned["eval_spacing"]
    spacing = f"evals at most {gap} steps apart around the onsets" if gap else "this eval spacing"
    if align is None:
        if missing == n and n:
            return (
                "The best-head alignment of learned heads did not rise above its step-0 value "
                f"in any of the {n} seeds: it has no onset."
            )
        return None
    text = (
        "Onsets (the first eval at which a curve has gone half way from its step-0 value to "
        "its end; steps only as fine as the evals, "
        + (
            f"at most {gap} steps apart around the onsets"
            if gap
            else "whose spacing is not recorded"
        )
        + "): the alignment of the head that ends most aligned"
        + (f" ({', '.join(learned['onset_heads'])})" if learned.get("onset_heads") else "")
        + f" at step {_fmt(align, 0)}"
    )
    if loss is not None:
        text += (
            f", the loss (from the lower of its step-0 value and -log chance, the loss of "
            f"knowing only which answers occur) at step {_fmt(loss, 0)}"
        )
    if accuracy is not None:
        text += f", the accuracy at step {_fmt(accuracy, 0)}"
    if missing:
        text += f" ({missing} of {n} seeds' alignment did not rise: no onset, left out)"
    if (d := learned["alignment_minus_loss_onset"]) is not None:
        text += f"; per seed, alignment onset - loss onset is {_fmt(d, 0)} steps: "
        text += _order_text(d, "the alignment", "the loss", spacing)
    if (d := learned.get("alignment_minus_accuracy_onset")) is not None:
        text += f"; alignment onset - accuracy onset is {_fmt(d, 0)} steps: "
        text += _order_text(d, "the alignment", "the accuracy", spacing)
    text += "."
    if pull is not None and (d := learned["pull_minus_alignment_onset"]) is not None:
        text += (
            f" The loss's pull on that head got half way to its peak at step {_fmt(pull, 0)}; per seed, "
            f"pull onset - alignment onset is {_fmt(d, 0)} steps: "
            + _order_text(d, "the pull", "the alignment", spacing)
            + "."
        )
    return text


def _uniform_level(d: dict[str, Any], tolerance: float, unit: str = "", below: str = "") -> str:
    """Whether (learned - uniform) stays at 0, from its interval's bounds and a tolerance;
    `below` says what a move below means."""
    if not _interval(d).has_interval:
        return f"with {d['n']} seed(s) there is no interval, so no claim"
    within = f"+-{tolerance}{unit}"
    if d["low"] >= -tolerance and d["high"] <= tolerance:
        return f"it stays at the uniform level (the interval lies within {within})"
    if d["low"] <= 0 <= d["high"]:
        return (
            "not distinguishable from the uniform level, but the interval reaches beyond "
            f"{within}, so it is not shown to stay there"
        )
    if d["low"] > 0:
        return f"it ends above the uniform level by {d['mean']:.2f}{unit}"
    return f"it ends below the uniform level by {-d['mean']:.2f}{unit}" + (
        f" ({below})" if below else ""
    )


def _control_text(g: dict[str, Any], learned: dict[str, Any]) -> str | None:
    """On a control task (no pairwise context to find): whether learned attention's
    alignment and entropy stay where uniform weighting puts them, and how far training moved
    the entropy from init."""
    best, mean = learned["alignment_max_minus_uniform"], learned["alignment_mean_minus_uniform"]
    if g["alignment_uniform"] is not None and g["alignment_uniform"] > 0.9:
        best = mean = None  # the mask is almost every visible position: alignment cannot tell
    ent, low = learned["entropy_mean_minus_uniform"], learned["entropy_min_minus_uniform"]
    tol_a, tol_e, nats = UNIFORM_ALIGNMENT_TOLERANCE, UNIFORM_ENTROPY_TOLERANCE, " nats"
    concentrated = "more concentrated than uniform attention"
    parts = []
    if best is not None:
        text = (
            "Control (no pairwise context to find): learned attention's final alignment minus "
            f"uniform attention's is {_fmt(best)} for the best head: {_uniform_level(best, tol_a)}"
        )
        if mean is not None:
            text += f"; averaged over heads {_fmt(mean)}: {_uniform_level(mean, tol_a)}"
        parts.append(text + ".")
    elif learned["alignment_max"] is None and ent is not None:
        parts.append(
            "Control without context dependencies (each target depends on its own token "
            "only): alignment does not apply, only entropy."
        )
    if ent is not None:
        text = (
            "Learned attention's entropy minus that of uniform attention over the visible "
            "positions (log of their number, averaged over query positions as the heads' "
            f"entropy is) is {_fmt(ent)} nats averaged over heads: "
            + _uniform_level(ent, tol_e, nats, concentrated)
        )
        if low is not None:
            text += f"; for the most concentrated head {_fmt(low)}: " + _uniform_level(
                low, tol_e, nats, concentrated
            )
        change, low_change = learned["entropy_mean_change"], learned["entropy_min_change"]
        if change is not None:
            text += (
                f". Training moved it by {_fmt(change)} nats from init averaged over heads"
                + (f" ({_fmt(low_change)} for the most concentrated head)" if low_change else "")
                + " (entropy is averaged over every query position, scored or not)"
            )
        parts.append(text + ".")
    return " ".join(parts) or None


def _statement(g: dict[str, Any]) -> str:
    """The plain-words paragraph for one task, every clause chosen from the numbers."""
    v, chance, learned = g["variants"], g["chance"], g["variants"].get("learned")
    need = NEEDS.get(g["context_need"], f"needs {g['context_need']}")
    opening = f"On {g['label']} ({need})"
    # Variants without an ok seed are named in the closing sentence on failures.
    others = {k: e for k, e in v.items() if k != "learned" and e["accuracy"]}
    reach = [f"`{k}` reaches {_fmt(e['accuracy'])}" for k, e in others.items()]
    reach_text = f"; {'; '.join(reach)}." if reach else "."
    out = []
    if learned is None or learned["accuracy"] is None:
        out.append(
            f"{opening} there is no successful run with learned attention (chance "
            f"{chance:.2f}), so context dependence is not defined{reach_text}"
        )
    elif not g["learned_learns"]:
        own = g.get("own_token_level")
        floor = (
            f"the own-token level {own:.2f} (chance {chance:.2f}; a masked token's input is "
            "its own token in a share of cases)"
            if own is not None and own > chance
            else f"chance {chance:.2f}"
        )
        n = learned["accuracy"].get("n")
        seeds = f" with {n} seed{'s' * (n != 1)}" if n else ""
        out.append(
            f"{opening}, learned attention reaches only {_fmt(learned['accuracy'])}, not shown"
            f" above {floor}{seeds}: it is not shown to have learned the task, so context"
            f" dependence is undefined{reach_text}"
        )
    else:
        where = _level_text(g, learned)
        out.append(
            f"{opening}, learned attention reaches {_fmt(learned['accuracy'])}"
            + (f" ({where})" if where else f" (chance {chance:.2f})")
            + ("." if others else "; no other variant to compare.")
        )
    for k, e in others.items():
        where = _level_text(g, e)
        if where:
            out.append(f"`{k}` reaches {_fmt(e['accuracy'])}: {where}.")
        if surprise := _reference_surprise(k, e):
            out.append(surprise)
        if e["dependence"] is not None:
            text = VERDICT_TEXT[e["verdict"]].format(
                v=f"`{k}`",
                dep=_fmt(e["dependence"]),
                lacks=e["lacks"],
                n=e["dependence"]["n"],
                essential=ESSENTIAL,
                dispensable=DISPENSABLE,
            )
            out.append(text[0].upper() + text[1:] + ".")
        if any(p["content_routing"] for p in e["frozen"]):
            # DESIGN: frozen W_q/W_k alone does not mean "no learned context"; one sentence.
            embeds = any(p["kind"] == "embedding" for p in e["frozen"])
            trains = (
                "the value/output projections, MLPs, norms and readout still train, so "
                "the fixed W_q/W_k of later layers read representations training shapes"
                if embeds
                else "the embeddings and the rest of the model still train and can steer "
                "its fixed random routing"
            )
            out.append(
                f"`{k}` is not a no-learned-context ablation: it keeps content-dependent "
                f"routing (kept at init: {_frozen_text(e['frozen'])}), and {trains}."
            )
    if g["context_need"] == "unknown":
        # Real data: perplexity says more than accuracy (for language modelling above all).
        ppl = [f"`{k}` {_fmt(e['perplexity'])}" for k, e in v.items() if e["perplexity"]]
        if ppl:
            out.append(f"Perplexity (exp of the held-out loss; lower is better): {'; '.join(ppl)}.")
    if learned is not None and learned["alignment_max"] is not None:
        a, u, init = learned["alignment_max"], g["alignment_uniform"], learned["alignment_max_init"]
        text = f"Learned heads put {a['mean']:.2f} of their mass on the dependency positions"
        text += f" (best head) vs {init['mean']:.2f} at init" if init else " (best head)"
        if u is not None:
            text += f" (uniform: {u:.2f})"
            if u > 0.9:
                text += (
                    ": the dependency positions are almost every visible position, so "
                    "alignment cannot tell here"
                )
            elif _interval(a).has_interval and a["low"] > u:
                text += ", more than uniform attention would"
            elif _interval(a).has_interval and a["high"] <= u:
                text += ": no more than uniform attention, the heads did not concentrate there"
        best = {k: e["alignment_max"]["mean"] for k, e in others.items() if e["alignment_max"]}
        aligned = [f"`{k}` {a:.2f}" for k, a in best.items()]
        out.append(
            text + (f"; best heads of other variants: {', '.join(aligned)}." if aligned else ".")
        )
    if learned is not None and (pull := _pull_text(g, learned)):
        out.append(pull)
    if learned is not None and (route := _route_text(g, learned)):
        out.append(
            "(On the training distribution the content route's positions include the cheap "
            "route's wherever the two agree, so the alignment and pull above do not tell the "
            "routes apart; conflict sequences do.) " + route
        )
    # On a task with two routes, accuracy and alignment onsets mix the routes: the route
    # sentence times them instead.
    if learned is not None and not g.get("cheap_route") and (onsets := _onset_text(g, learned)):
        out.append(onsets)
    if (
        learned is not None
        and g["context_need"] == "none"
        and (control := _control_text(g, learned))
    ):
        out.append(control)
    lost = [
        f"`{k}` ({e['seeds_total'] - e['seeds_ok']} of {e['seeds_total']})"
        for k, e in v.items()
        if e["seeds_ok"] < e["seeds_total"]
    ]
    if lost:
        out.append(f"Seeds that failed or diverged, left out of these numbers: {', '.join(lost)}.")
    return " ".join(out)


def _curves(run_dir: Path, seeds: list[int]) -> dict[str, list[float]] | None:
    """Eval curves (mean over the given seeds): accuracy, best-head and uniform alignment,
    perplexity. An encoder-decoder's alignment and pull are its cross-attention's (the
    decoder's own attention has no dependency mask on the seq2seq tasks)."""
    by_step: dict[int, dict[int, dict]] = {}
    for row in read_jsonl(run_dir / METRICS_FILE):
        if row.get("kind") == "eval" and row.get("seed") in seeds:
            by_step.setdefault(row["step"], {})[row["seed"]] = row  # the last one wins

    if not by_step:
        return None

    def best(alignment):
        values = [a for layer in alignment or [] for a in layer if finite(a)]
        return max(values) if values else None

    def mean(step, fn):
        values = [x for x in map(fn, by_step[step].values()) if finite(x)]
        return float(np.mean(values)) if values else math.nan

    steps = sorted(by_step)
    cross = any("cross_alignment" in r for rows in by_step.values() for r in rows.values())
    part = "cross_" if cross else ""
    return {
        "step": steps,
        "cross": cross,
        "accuracy": [mean(s, lambda r: r.get("accuracy")) for s in steps],
        "conflict": [mean(s, lambda r: r.get("conflict_accuracy")) for s in steps],
        "cheap_agreement": [mean(s, lambda r: r.get("conflict_cheap_agreement")) for s in steps],
        "alignment": [mean(s, lambda r: best(r.get(f"{part}alignment"))) for s in steps],
        "pull": [mean(s, lambda r: best(r.get(f"{part}gradient_alignment"))) for s in steps],
        "uniform": [mean(s, lambda r: r.get(f"{part}uniform_alignment")) for s in steps],
        "perplexity": [mean(s, lambda r: perplexity(r.get("loss"))) for s in steps],
    }


def _load_patterns(npz: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str] | None:
    """(patterns NHLS, scored dependency mask LS, has-pattern NH or None, which attention) of
    the first seed in a run's patterns file; None when the file is unusable. An
    encoder-decoder's are its cross-attention's (target x source, beside the word alignment)."""
    try:
        with np.load(npz) as data:
            part = "cross_" if "cross_probs" in data else ""
            # Since the viewer: an axis of examples after the seed's (its first is drawn).
            first = (0, 0) if "inputs" in data else (0,)
            probs_NHLS = np.asarray(data[f"{part}probs"][first], dtype=float)
            scored_L = np.asarray(data["weights"][first]) > 0
            mask_LS = np.asarray(data[f"{part}deps"][first], bool) & scored_L[:, None]
            has = f"{part}has_pattern"
            has_NH = np.asarray(data[has], bool) if has in data else None
    except (OSError, KeyError, ValueError, IndexError):
        return None
    return probs_NHLS, mask_LS, has_NH, "cross-attention, " if part else ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _seconds(x: Any) -> str:
    return f"{x:.1f}" if finite(x) else "-"


def _header(stats: Iterable[dict[str, Any] | None]) -> str:
    """The interval method and seed count of a table's cells: one text if they agree."""
    described = {_interval(s).describe() for s in stats if s}
    if len(described) == 1:
        return described.pop()
    return "95% Student-t intervals over seeds; seeds per cell differ (see the detail tables)"


def _level_cell(level: dict[str, Any]) -> str:
    if level["value"] is None:
        return "n/a"
    return f"{level['value']:.2f}" + (f" +- {level['se']:.3f}" if level["se"] else "")


def _answer(summary: dict) -> list[str]:
    """The Answer section: one table, task x variant, verdicts from interval bounds."""
    groups = summary["groups"]
    cells = [e["accuracy"] for g in groups for e in g["variants"].values()]
    held = {g.get("eval_sequences") for g in groups} - {None}
    on = f", each seed on the same {held.pop()} held-out sequences" if len(held) == 1 else ""
    lines = ["## Answer", "", f"Accuracy and context dependence: {_header(cells)}{on}.", ""]
    lines += [
        "| task (needs) | chance / fixed / bag | variant | lacks | accuracy | vs levels "
        "| context dependence | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        lv = g["levels"]
        levels = " / ".join(_level_cell(lv[f]) for f, _ in LEVELS)
        task = f"{g['label']} ({NEEDS.get(g['context_need'], g['context_need'])})"
        for k, e in g["variants"].items():
            rel = ", ".join(f"{r} {s}" for s, r in e["levels"].items() if r) or "-"
            if k == "learned":
                dep, word = "reference", "-" if g["learned_learns"] else "not shown to learn"
            else:
                dep = _fmt(e["dependence"]) if e["dependence"] else "undefined"
                word = e["verdict"] or "-"
            lines.append(
                f"| {task} | {levels} | {k} | {e['lacks_short']} | {_fmt(e['accuracy'])} "
                f"| {rel} | {dep} | {word} |"
            )
            task, levels = "", ""
    lines += ["", "One paragraph per task follows, worded from the same numbers.", ""]
    return lines


def _why(summary: dict) -> list[str]:
    """The section "Why attention learned context here": per task, learned heads' pull,
    alignment and onsets side by side, and for tasks with two routes the route taken."""
    rows = []
    for g in summary["groups"]:
        e = g["variants"].get("learned")
        if e is None or not g["learned_learns"] or e["alignment_max"] is None:
            continue
        u = g["alignment_uniform"]
        tells = u is not None and u <= 0.9  # else the mask is almost every visible position
        pull = " / ".join(_fmt(e[name]) for name in PULL) if tells else "n/a (mask ~ all)"
        step = e["gradient_alignment_peak_step"] if tells else None
        onsets = " / ".join(
            _fmt(e[name], 0)
            if tells or name in ("loss_onset_step", "accuracy_onset_step")
            else "n/a"
            for name in ONSETS
        )
        if g.get("cheap_route"):
            onsets += (
                f" (cheap phase from {_fmt(e['cheap_phase_start'], 0)} in "
                f"{e['cheap_phase_seeds']} seeds)"
                if e["cheap_phase_seeds"]
                else " (no cheap phase)"
            )
        route = route_taken(g, e)
        route_cell = "-" if route is None else f"{route} ({_fmt(e['conflict_accuracy'])})"
        conflict_pull = " / ".join(
            _fmt(e[f"conflict_gradient_alignment_max{x}"]) for x in PULL_PARTS
        )
        route_cell += f" | {conflict_pull if route else '-'}"
        rows.append(
            f"| {g['label']} | {u:.2f} | {_fmt(e['alignment_max_init'])} -> "
            f"{_fmt(e['alignment_max'])} | {pull} | {_fmt(step, 0)} | {onsets} "
            f"| {route_cell} |"
            if u is not None
            else None
        )
    rows = [r for r in rows if r]
    if not rows:
        return []
    return [
        "## Why attention learned context here",
        "",
        "Learned attention only, best head per eval; intervals over seeds. The pull is the "
        "share of the loss's descent direction on the dependency positions (a uniform push "
        "gives the uniform share); onsets are the first eval at which a curve has gone half "
        "way from step 0 to its end (the pull: to its peak), as fine as the evals. On a task "
        "with two routes, the route is read from the accuracy on conflict sequences (in "
        "brackets), where only the content route answers (there the onsets mix the routes: "
        "the head that ends most aligned may be the cheap route's); the conflict pull is the loss's "
        "pull on those sequences towards the content route's positions (the training "
        "distribution's masks overlap where the routes agree). Each task's paragraph below "
        "words these from the interval bounds.",
        "",
        "| task | uniform share | alignment init -> end | pull init / peak / end "
        "| pull peak step | onset: alignment / loss / accuracy / pull "
        "| route (conflict accuracy) | conflict pull init / peak / end |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _cross_table(g: dict) -> list[str]:
    """An encoder-decoder task's cross-attention per variant: the best head's alignment with
    the task's word alignment (cross_deps) beside uniform attention's over the real source
    positions, and the best head's pull; nothing for decoder-only tasks."""
    rows = [
        f"| `{k}` | {_fmt(e['cross_alignment_max'])} | {_fmt(e['cross_alignment_uniform'])} "
        f"| {_fmt(e['cross_gradient_alignment_max'])} |"
        for k, e in g["variants"].items()
        if e.get("cross_alignment_max")
    ]
    if not rows:
        return []
    return [
        "Cross-attention (decoder queries over the encoder's output), best head at the end; "
        "the decoder's own attention has no dependency mask on these tasks (their targets "
        "are functions of the source), so its alignment is not defined:",
        "",
        "| variant | best-head cross alignment | uniform attention's | best-head pull |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def _markdown(summary: dict, meta: dict, plots: dict) -> str:
    cmd = meta.get("command")
    lines = [f"# Report: {meta['name']}", "", "Reproduce:", ""]
    lines += [f"```\n{cmd}\n```" if cmd else "(no sweep.json: command unknown)", ""]
    lines += _answer(summary) if summary["groups"] else ["No results yet.", ""]
    lines += _why(summary)
    lines += [HOW_TO_READ]
    lines += ["![accuracy](report/accuracy.png)", "", "![dependence](report/dependence.png)", ""]
    for g in summary["groups"]:
        lines += [f"## {g['label']}", "", g["statement"], ""]
        levels = [
            f"{name} {_level_cell(g['levels'][f])} ({g['levels'][f]['method']})"
            for f, name in zip(
                (f for f, _ in LEVELS), ("chance", "fixed-routing ceiling", "bag ceiling")
            )
        ]
        lines += ["Reference levels: " + "; ".join(levels) + ".", ""]
        real = g["context_need"] == "unknown"  # real data: perplexity, no alignment
        stats = [e["accuracy"] for e in g["variants"].values()]
        on = f", each on the same {g['eval_sequences']} held-out sequences"
        lines += [
            f"Intervals: {_header(stats)}{on if g.get('eval_sequences') else ''}.",
            "",
            "| variant | frozen | accuracy | learned - variant (paired) | context dependence | "
            + ("perplexity" if real else "best-head alignment")
            + " | seeds ok/total |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, e in g["variants"].items():
            dep = "reference" if k == "learned" else _fmt(e["dependence"])
            diff = "-" if k == "learned" else _fmt(e["difference"])
            last = _fmt(e["perplexity"] if real else e["alignment_max"])
            lines.append(
                f"| {k} | {_frozen_text(e['frozen']) or '-'} | {_fmt(e['accuracy'])} "
                f"| {diff} | {dep} | {last} | {e['seeds_ok']}/{e['seeds_total']} |"
            )
        per_seed = {k: e["per_seed"] for k, e in g["variants"].items() if e["per_seed"]}
        if per_seed:
            seeds = sorted({s for p in per_seed.values() for s in p}, key=str)
            lines += [
                "",
                "Context dependence per seed (paired: same initial weights, same batches):",
                "",
            ]
            lines += ["| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
            lines += ["|---|" + "---|" * len(seeds)]
            for k, p in per_seed.items():
                values = [p.get(s, {}).get("dependence") for s in seeds]
                lines.append(
                    f"| {k} | "
                    + " | ".join(f"{x:.2f}" if finite(x) else "-" for x in values)
                    + " |"
                )
        lines += [""]
        aligned = [(f"`{k}`", e["alignment_max"]) for k, e in g["variants"].items()]
        aligned = [(k, s) for k, s in aligned if s]
        learned = g["variants"].get("learned")
        if learned and learned["alignment_max_init"]:
            aligned.insert(1, ("`learned` at init", learned["alignment_max_init"]))
        if aligned:
            lines += ["| attention | best-head alignment |", "|---|---|"]
            lines += [f"| {k} | {_fmt(s)} |" for k, s in aligned]
            if g["alignment_uniform"] is not None:
                lines.append(
                    f"| what uniform attention would give | {g['alignment_uniform']:.2f} |"
                )
            lines.append("")
        lines += _cross_table(g)
        curve = plots["curves"].get(g["label"])
        lines += [f"![curves]({curve})" if curve else "(no metrics.jsonl: no curves)", ""]
        lines += [
            f"![patterns of {run}]({p})\n" for run, p in plots["patterns"].get(g["label"], [])
        ]
        for text, images in plots["probes"].get(g["label"], []):
            lines += [text, ""] + [f"![probe]({img})" for img in images] + [""]
    lines += ["## Failed runs", ""]
    if summary["failed"]:
        lines += ["| run | seeds | status | error |", "|---|---|---|---|"]
        lines += [
            f"| {f['run']} | {', '.join(map(str, f['failed']))} | {f['status']} | "
            f"{f['error'].replace('|', '/')} |"
            for f in summary["failed"]
        ]
    else:
        lines.append("None.")
    lines += ["", "## Wall time", "", "| run | seeds ok/total | wall s | compile s |"]
    lines.append("|---|---|---|---|")
    for r in summary["runs"]:
        lines.append(
            f"| {r['run']} | {len(r['seeds'])}/{len(r['seeds']) + len(r['failed'])} | "
            f"{_seconds(r['wall_seconds'])} | {_seconds(r['compile_seconds'])} |"
        )
    return "\n".join(lines) + "\n"


def _probe_heads(per_head: Any) -> tuple[list[str], np.ndarray]:
    """(names, seed-mean values) of every probed head, from probe.json's (Z, N, H) lists, or
    an encoder-decoder's {part: (Z, N, H)} (its heads named PART:LAYER:HEAD)."""
    parts = per_head if isinstance(per_head, dict) else {"": per_head}
    names, values = [], []
    for part, value in parts.items():
        value_NH = np.nanmean(np.asarray(value, dtype=float), axis=0)
        prefix = f"{part}:" if part else ""
        names += [f"{prefix}{n}:{h}" for n, h in np.ndindex(value_NH.shape)]
        values.append(value_NH.ravel())
    return names, np.concatenate(values)


def _probe_text(probe: dict[str, Any], variant: str) -> str:
    """Plain words for a run's post-hoc head ablation (probe.json), from its numbers."""
    base = float(np.mean(probe["baseline"]["accuracy"]))
    names, imp = _probe_heads(probe["importance"])
    most, least = int(np.nanargmax(imp)), int(np.nanargmin(imp))
    if "parts" in probe:  # an encoder-decoder: one ranking over its kinds of attention
        shape = f"{len(names)} heads of {', '.join(probe['parts'].values())}"
    else:
        shape = "{}x{} heads".format(*np.shape(probe["importance"])[1:])
    parts = [f"Post-hoc head ablation of `{variant}` (accuracy {base:.2f}, {shape}):"]
    if "zero" in probe["drop"]:
        _, drop = _probe_heads(probe["drop"]["zero"])
        parts.append(
            f"the most important head by gate gradient, {names[most]}, drops accuracy by "
            f"{drop[most]:.2f} when zeroed alone, the least important ({names[least]}) "
            f"by {drop[least]:.2f}; the largest single-head drop is {np.nanmax(drop):.2f}."
        )
    if "mean_pattern" in probe["drop"]:
        _, mp = _probe_heads(probe["drop"]["mean_pattern"])
        if np.isfinite(mp).any():
            parts.append(
                "Replacing one head's pattern by its mean over a reference batch (Hassid et al.) "
                f"costs at most {np.nanmax(mp):.2f}."
            )
    curve = np.mean(np.asarray(probe["pruning"]["accuracy_importance_order"], dtype=float), 0)
    T = len(names)
    kept = int(np.argmax(curve < base - 0.05)) - 1 if (curve < base - 0.05).any() else T
    parts.append(
        f"Removing heads least-important first, {max(kept, 0)} of {T} can go before accuracy "
        "falls by more than 0.05."
    )
    return " ".join(parts)


def write_report(sweep_dir: str | Path) -> Path:
    """Write REPORT.md, report/*.png and report/summary.json for a sweep; returns REPORT.md."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / RESULTS_FILE).is_file():
        why = f"{sweep_dir} has no {RESULTS_FILE}: not a sweep folder, or no run finished yet"
        raise ConfigError([("sweep_dir", why)])
    meta_path = sweep_dir / SWEEP_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.setdefault("name", sweep_dir.name)
    summary = summarize([_upgraded_row(r) for r in read_jsonl(sweep_dir / RESULTS_FILE)])
    out = sweep_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    for old in out.glob("*.png"):  # plots of runs no longer in the table must not linger
        old.unlink()
    labels = list(dict.fromkeys(k for g in summary["groups"] for k in g["variants"]))
    colors = {k: f"C{i % 10}" for i, k in enumerate(labels)}
    plots: dict[str, dict] = {"curves": {}, "patterns": {}, "probes": {}}
    bars(summary["groups"], "accuracy", out / "accuracy.png", "eval accuracy", colors)
    bars(summary["groups"], "dependence", out / "dependence.png", "context dependence", colors)
    for g in summary["groups"]:
        curves = {}
        for k, e in g["variants"].items():
            if c := _curves(sweep_dir / e["run_dir"], e["seeds"]):
                curves[k] = c
            npz, png = sweep_dir / e["run_dir"] / PATTERNS_FILE, f"patterns_{_slug(e['run'])}.png"
            drawn = _load_patterns(npz) if npz.is_file() else None
            if drawn is not None:
                *arrays, what = drawn
                pattern_grid(*arrays, out / png, f"{e['run']} ({what}first seed)")
                plots["patterns"].setdefault(g["label"], []).append(
                    (e["run"], f"{REPORT_DIR}/{png}")
                )
            probe_json = sweep_dir / e["run_dir"] / PROBE_DIR / PROBE_FILE
            if probe_json.is_file():
                probe = json.loads(probe_json.read_text())
                images = [
                    f"{e['run_dir']}/{PROBE_DIR}/{name}"
                    for name in (DROP_PNG.format(kind="zero"), PRUNING_PNG)
                    if (probe_json.parent / name).is_file()
                ]
                plots["probes"].setdefault(g["label"], []).append((_probe_text(probe, k), images))
        if curves:
            name = f"curves_{_slug(g['label'])}.png"
            curves_plot(g, curves, out / name, colors)
            plots["curves"][g["label"]] = f"{REPORT_DIR}/{name}"
    summary["sweep"] = {k: meta.get(k) for k in ("name", "command", "experiment_file")}
    write_atomic(out / "summary.json", json.dumps(nan_to_none(summary), indent=2) + "\n")
    path = sweep_dir / REPORT_FILE
    write_atomic(path, _markdown(summary, meta, plots))
    return path
