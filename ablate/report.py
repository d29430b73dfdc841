"""The sweep report: numbers, plots and plain-words statements from a sweep folder alone.

Reads `results.jsonl` (one row per run and seed), `sweep.json` (the command) and, per run
folder, `metrics.jsonl` (curves) and the optional `patterns_final.npz` (heatmaps); never a
model. Writes `REPORT.md` in the sweep folder and `report/` (PNG plots, `summary.json`).
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
from matplotlib.figure import Figure

from ablate.config import ConfigError
from ablate.metrics import (
    bootstrap_interval,
    nan_to_none,
    paired_context_dependence,
    perplexity,
)

# File names written by ablate.sweep / ablate.train (not imported: both pull in training).
RESULTS_FILE, SWEEP_FILE, METRICS_FILE = "results.jsonl", "sweep.json", "metrics.jsonl"
PATTERNS_FILE = "patterns_final.npz"

# Wording thresholds; context dependence is a fraction of learned attention's gain over chance.
ALMOST_ALL = 0.8  # whole interval above this: "almost entirely"
NEGLIGIBLE = 0.05  # a few % of the gain is within seed noise: counts as 0
MATCHES = 0.2  # interval touching 0 and topping out below this: the variant matches learned
LEARNED_MIN_GAIN = 0.05  # learned must close 5% of the chance-to-perfect gap to have learned
SOLVES = 0.2  # a variant with frozen W_q/W_k keeping >= 80% of learned's gain solves the task
HEAD_PART = re.compile(r"layer \d+ head \d+: (.+)")  # how model.frozen_parts names one head
VERDICTS = {
    "almost entirely": "performance depends almost entirely on learned attention",
    "partly": "performance depends partly on learned attention",
    "not measurably": "performance does not measurably depend on learned attention "
    "(the interval includes 0)",
    "does not need": "{v} matches learned, so the task does not need learned context "
    "for this variant",
    "exceeds": "{v} does better than learned attention",
    "undefined": "which is undefined",
}
HOW_TO_READ = """## How to read this

- **Accuracy**: per scored target token on held-out batches; mean over seeds with a 95%
  bootstrap interval over seeds in brackets. *Chance* is the best accuracy without looking
  at the input.
- **Context dependence** of a variant = (acc_learned - acc_variant) / (acc_learned - chance):
  1 = the variant loses everything learned attention gains over chance, 0 = it loses
  nothing, below 0 = it does better. Undefined when learned attention does not beat chance.
- **Best-head alignment**: the attention mass the best head puts on the positions each
  target depends on (the task's ground truth), beside what uniform attention would put there.
"""


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The results table as a list of rows (empty when the file is absent)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _bounds(s: dict[str, float]) -> tuple[float, float]:
    """(low, high), collapsed to the mean where the interval could not be formed."""
    ok = _finite(s["low"]) and _finite(s["high"])
    return (s["low"], s["high"]) if ok else (s["mean"], s["mean"])


def _stat(values: Iterable[Any]) -> dict[str, float] | None:
    """Mean and 95% bootstrap interval over seeds (None when no finite value)."""
    x = [float(v) for v in values if _finite(v)]
    if not x:
        return None
    mean, low, high = bootstrap_interval(x)
    return dict(mean=mean, low=low, high=high, n=len(x))


def _verdict(dependence: dict[str, float]) -> str:
    """The wording class of a context dependence interval."""
    if not _finite(dependence["mean"]):
        return "undefined"
    low, high = _bounds(dependence)
    if low > ALMOST_ALL:
        return "almost entirely"
    if low - NEGLIGIBLE <= 0 <= high + NEGLIGIBLE:
        return "does not need" if high <= MATCHES else "not measurably"
    return "exceeds" if high < 0 else "partly"


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


def _summarize_group(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    first = next(iter(runs.values()))[0]
    all_rows = [r for rs in runs.values() for r in rs]
    ok_rows = [r for r in all_rows if r.get("status") == "ok"]
    chance = next((float(r["chance"]) for r in all_rows if _finite(r.get("chance"))), math.nan)
    learned = [r["accuracy"] for r in runs.get("learned", []) if r.get("status") == "ok"]
    learned = [a for a in learned if _finite(a)]
    learned_acc = _stat(learned)
    learns = learned_acc is not None and (
        learned_acc["low"] > chance
        and learned_acc["mean"] - chance >= LEARNED_MIN_GAIN * (1 - chance)
    )
    variants = {}
    for label in sorted(runs, key=lambda v: v != "learned"):  # learned first, else as run
        rs, good = runs[label], [r for r in runs[label] if r.get("status") == "ok"]
        e = variants[label] = dict(run=rs[0]["run"], run_dir=rs[0].get("run_dir") or rs[0]["run"])
        e |= dict(seeds=[r.get("seed") for r in good], seeds_ok=len(good), seeds_total=len(rs))
        e["frozen"] = rs[0].get("frozen") or []
        for name in ("accuracy", "alignment_max", "alignment_max_init"):
            e[name] = _stat(r.get(name) for r in good)
        # exp(held-out loss); rows of older sweeps have only the loss.
        e["perplexity"] = _stat(r.get("perplexity", perplexity(r.get("loss"))) for r in good)
        e["dependence"], e["verdict"] = None, None
        if label != "learned" and learns and e["accuracy"]:
            accs = [r["accuracy"] for r in good if _finite(r.get("accuracy"))]
            mean, low, high = paired_context_dependence(learned, accs, chance)
            n = max(len(learned), len(accs))  # collapsed only when both have one seed
            e["dependence"] = dict(mean=mean, low=low, high=high, n=n)
            e["verdict"] = _verdict(e["dependence"])
    uniform = _stat(r.get("alignment_uniform") for r in ok_rows)
    grid = first.get("grid") or {}
    label = first["task"] + (
        f" ({', '.join(f'{k}={v}' for k, v in sorted(grid.items()))})" if grid else ""
    )
    group = dict(task=first["task"], grid=grid, label=label, chance=chance)
    group |= dict(context_need=first.get("context_need"), variants=variants)
    group["alignment_uniform"] = uniform["mean"] if uniform else None
    group["learned_learns"] = learns if "learned" in runs else None
    group["statement"] = _statement(group)
    return group


def _fmt(s: dict[str, float] | None) -> str:
    if s is None or not _finite(s["mean"]):
        return "n/a"
    if s["n"] == 1:
        return f"{s['mean']:.2f} (1 seed, no interval)"
    low, high = _bounds(s)
    return f"{s['mean']:.2f} [{low:.2f}, {high:.2f}]"


def _frozen_text(parts: list[str]) -> str:
    """Frozen parts in few words: per-head entries are counted, not listed one by one."""
    per_head = Counter(m.group(1) for p in parts if (m := HEAD_PART.match(p)))
    other = [p for p in parts if not HEAD_PART.match(p)]
    return ", ".join(other + [f"{w} in {n} head{'s' * (n > 1)}" for w, n in per_head.items()])


def _statement(g: dict[str, Any]) -> str:
    """The plain-words paragraph for one task, every clause chosen from the numbers."""
    v, chance, learned = g["variants"], g["chance"], g["variants"].get("learned")
    need = {
        "none": "needs no pairwise context",
        "unknown": "real data: what it needs is the question",
    }
    need = need.get(g["context_need"], f"needs {g['context_need']}")
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
        out.append(
            f"{opening}, learned attention itself reaches only {_fmt(learned['accuracy'])}"
            f" (chance {chance:.2f}): it did not learn the task, so context dependence"
            f" is undefined{reach_text}"
        )
    else:
        out.append(
            f"{opening}, learned attention reaches {_fmt(learned['accuracy'])} (chance "
            f"{chance:.2f})" + ("." if others else "; no other variant to compare.")
        )
    for k, e in others.items():
        if e["dependence"] is None:  # no learned reference: already said above
            continue
        frozen = f" (kept at init: {_frozen_text(e['frozen'])})" if e["frozen"] else ""
        out.append(
            f"`{k}`{frozen} reaches {_fmt(e['accuracy'])}: context dependence "
            f"{_fmt(e['dependence'])}, {VERDICTS[e['verdict']].format(v=f'`{k}`')}."
        )
        qk = any("W_q" in p or "W_k" in p for p in e["frozen"])
        if qk and g["context_need"] == "content" and e["dependence"]["mean"] <= SOLVES:
            # DESIGN: frozen W_q/W_k alone does not mean "no learned context".
            embeds = any("embed" in p for p in e["frozen"])
            who = "the layers left trainable" if embeds else "the trained embeddings"
            out.append(
                f"So `{k}` solves this content task although its W_q/W_k stay at random "
                f"init: {who} can steer the fixed random routing, and freezing these "
                "parts does not remove learned context."
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
            low, high = _bounds(a)
            text += f" (uniform: {u:.2f})"
            if low > u + NEGLIGIBLE:
                text += ", more than uniform attention would"
            elif high < u + NEGLIGIBLE:
                text += ": no more than uniform attention, the heads did not concentrate there"
        best = {k: e["alignment_max"]["mean"] for k, e in others.items() if e["alignment_max"]}
        aligned = [f"`{k}` {a:.2f}" for k, a in best.items()]
        out.append(
            text + (f"; best heads of other variants: {', '.join(aligned)}." if aligned else ".")
        )
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
    perplexity."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    by_step: dict[int, dict[int, dict]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a last line cut short by a crash
            continue
        if row.get("kind") == "eval" and row.get("seed") in seeds:
            by_step.setdefault(row["step"], {})[row["seed"]] = row  # the last one wins

    if not by_step:
        return None

    def best(alignment):
        values = [a for layer in alignment or [] for a in layer if _finite(a)]
        return max(values) if values else None

    def mean(step, fn):
        values = [x for x in map(fn, by_step[step].values()) if _finite(x)]
        return float(np.mean(values)) if values else math.nan

    steps = sorted(by_step)
    return {
        "step": steps,
        "accuracy": [mean(s, lambda r: r.get("accuracy")) for s in steps],
        "alignment": [mean(s, lambda r: best(r.get("alignment"))) for s in steps],
        "uniform": [mean(s, lambda r: r.get("uniform_alignment")) for s in steps],
        "perplexity": [mean(s, lambda r: perplexity(r.get("loss"))) for s in steps],
    }


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})


def _bars(groups: list[dict], field: str, path: Path, ylabel: str, colors: dict) -> None:
    """Grouped bars per task and variant with interval error bars."""
    fig = Figure(figsize=(max(6.0, 1.8 * len(groups)), 4.0))
    ax = fig.subplots()
    present = [k for k in colors if any(g["variants"].get(k, {}).get(field) for g in groups)]
    width = 0.8 / max(len(present), 1)
    for j, label in enumerate(present):
        xs, ys, err = [], [], [[], []]
        for i, g in enumerate(groups):
            s = g["variants"].get(label, {}).get(field)
            if s and _finite(s["mean"]):
                low, high = _bounds(s)
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(s["mean"])
                err[0].append(s["mean"] - low)
                err[1].append(high - s["mean"])
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=label, color=colors[label])
    if field == "accuracy":
        for i, g in enumerate(groups):
            ax.hlines(g["chance"], i - 0.45, i + 0.45, "k", "--", label=None if i else "chance")
    else:
        ax.axhline(0.0, color="k", lw=0.8)
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    if present:  # beside the axes: inside, it would hide the bars of the last group
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "no values to plot", transform=ax.transAxes, ha="center")
    ax.set_xticks(range(len(groups)), [g["label"] for g in groups], rotation=15, ha="right")
    ax.set_ylabel(ylabel)
    _save(fig, path)


def _curve_plot(g: dict, curves: dict[str, dict], path: Path, colors: dict) -> None:
    """Accuracy and best-head alignment over training, one line per variant (perplexity in
    place of alignment for real data, which has no dependency mask)."""
    fig = Figure(figsize=(10.0, 3.6))
    ax_acc, ax_right = fig.subplots(1, 2)
    right = "perplexity" if g["context_need"] == "unknown" else "alignment"
    for label, c in curves.items():
        ax_acc.plot(c["step"], c["accuracy"], label=label, color=colors[label])
        # Step 0 (a random model: perplexity ~ vocabulary size) would flatten the rest.
        points = [(s, y) for s, y in zip(c["step"], c[right]) if right == "alignment" or s > 0]
        if any(_finite(y) for _, y in points):
            ax_right.plot(*zip(*points), label=label, color=colors[label])
    ax_acc.axhline(g["chance"], color="k", ls="--", lw=0.8, label="chance")
    ref = next((c for c in curves.values() if any(_finite(u) for u in c["uniform"])), None)
    if ref and right == "alignment":
        ax_right.plot(ref["step"], ref["uniform"], color="gray", ls=":", label="uniform")
    ylabel = "eval perplexity" if right == "perplexity" else "best-head alignment"
    for ax, name in ((ax_acc, "eval accuracy"), (ax_right, ylabel)):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{g['label']} (mean over ok seeds)")
    _save(fig, path)


def _pattern_plot(npz: Path, path: Path, title: str) -> bool:
    """Heads of the first seed beside the dependency mask; False when the file is unusable."""
    try:
        with np.load(npz) as data:
            probs_NHLS = np.asarray(data["probs"][0], dtype=float)
            scored_L = np.asarray(data["weights"][0]) > 0
            mask_LS = np.asarray(data["deps"][0], bool) & scored_L[:, None]
            has_NH = np.asarray(data["has_pattern"], bool) if "has_pattern" in data else None
    except (OSError, KeyError, ValueError, IndexError):
        return False
    N, H = probs_NHLS.shape[:2]
    fig = Figure(figsize=(1.9 * (H + 1), 1.9 * N + 0.5))
    axes = fig.subplots(N, H + 1, squeeze=False)
    for n, h in np.ndindex(N, H):
        p = probs_NHLS[n, h]
        if (has_NH is not None and not has_NH[n, h]) or not np.isfinite(p).all():
            axes[n, h].text(0.5, 0.5, "no pattern", ha="center", va="center", fontsize=7)
        else:
            axes[n, h].imshow(p, cmap="viridis", vmin=0.0, vmax=1.0)
        axes[n, h].set_title(f"layer {n} head {h}", fontsize=7)
    for n in range(N):
        axes[n, H].imshow(mask_LS, cmap="Reds", vmin=0, vmax=1)
        axes[n, H].set_title("dependency mask", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    _save(fig, path)
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _seconds(x: Any) -> str:
    return f"{x:.1f}" if _finite(x) else "-"


def _markdown(summary: dict, meta: dict, plots: dict) -> str:
    cmd = meta.get("command")
    lines = [f"# Report: {meta['name']}", "", "Reproduce:", ""]
    lines += [f"```\n{cmd}\n```" if cmd else "(no sweep.json: command unknown)", "", HOW_TO_READ]
    lines += ["![accuracy](report/accuracy.png)", "", "![dependence](report/dependence.png)", ""]
    lines += [] if summary["groups"] else ["No results yet.", ""]
    for g in summary["groups"]:
        lines += [f"## {g['label']}", "", g["statement"], ""]
        real = g["context_need"] == "unknown"  # real data: perplexity, no alignment
        lines += [
            "| variant | frozen | accuracy [95% CI] | context dependence [95% CI] | "
            + ("perplexity [95% CI]" if real else "best-head alignment")
            + " | seeds ok/total |",
            "|---|---|---|---|---|---|",
        ]
        for k, e in g["variants"].items():
            dep = "reference" if k == "learned" else _fmt(e["dependence"])
            last = _fmt(e["perplexity"] if real else e["alignment_max"])
            lines.append(
                f"| {k} | {_frozen_text(e['frozen']) or '-'} | {_fmt(e['accuracy'])} "
                f"| {dep} | {last} | {e['seeds_ok']}/{e['seeds_total']} |"
            )
        lines += ["", f"Chance: {g['chance']:.2f}.", ""]
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


def _probe_text(probe: dict[str, Any], variant: str) -> str:
    """Plain words for a run's post-hoc head ablation (probe.json), from its numbers."""
    base = float(np.mean(probe["baseline"]["accuracy"]))
    imp_NH = np.nanmean(np.asarray(probe["importance"], dtype=float), axis=0)
    N, H = imp_NH.shape
    most = np.unravel_index(np.nanargmax(imp_NH), imp_NH.shape)
    least = np.unravel_index(np.nanargmin(imp_NH), imp_NH.shape)
    parts = [f"Post-hoc head ablation of `{variant}` (accuracy {base:.2f}, {N}x{H} heads):"]
    if "zero" in probe["drop"]:
        drop_NH = np.nanmean(np.asarray(probe["drop"]["zero"], dtype=float), axis=0)
        parts.append(
            f"the most important head by gate gradient, {most[0]}:{most[1]}, drops accuracy by "
            f"{drop_NH[most]:.2f} when zeroed alone, the least important ({least[0]}:{least[1]}) "
            f"by {drop_NH[least]:.2f}; the largest single-head drop is {np.nanmax(drop_NH):.2f}."
        )
    if "mean_pattern" in probe["drop"]:
        mp = np.asarray(probe["drop"]["mean_pattern"], dtype=float)
        if np.isfinite(mp).any():
            parts.append(
                "Replacing one head's pattern by its mean over a reference batch (Hassid et al.) "
                f"costs at most {np.nanmax(np.nanmean(mp, axis=0)):.2f}."
            )
    curve = np.mean(np.asarray(probe["pruning"]["accuracy_importance_order"], dtype=float), 0)
    kept = int(np.argmax(curve < base - 0.05)) - 1 if (curve < base - 0.05).any() else N * H
    parts.append(
        f"Removing heads least-important first, {max(kept, 0)} of {N * H} can go before accuracy "
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
    summary = summarize(load_rows(sweep_dir / RESULTS_FILE))
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.png"):  # plots of runs no longer in the table must not linger
        old.unlink()
    labels = list(dict.fromkeys(k for g in summary["groups"] for k in g["variants"]))
    colors = {k: f"C{i % 10}" for i, k in enumerate(labels)}
    plots: dict[str, dict] = {"curves": {}, "patterns": {}, "probes": {}}
    _bars(summary["groups"], "accuracy", out / "accuracy.png", "eval accuracy", colors)
    _bars(summary["groups"], "dependence", out / "dependence.png", "context dependence", colors)
    for g in summary["groups"]:
        curves = {}
        for k, e in g["variants"].items():
            if c := _curves(sweep_dir / e["run_dir"], e["seeds"]):
                curves[k] = c
            npz, png = sweep_dir / e["run_dir"] / PATTERNS_FILE, f"patterns_{_slug(e['run'])}.png"
            if npz.is_file() and _pattern_plot(npz, out / png, f"{e['run']} (first seed)"):
                plots["patterns"].setdefault(g["label"], []).append((e["run"], f"report/{png}"))
            probe_json = sweep_dir / e["run_dir"] / "probe" / "probe.json"
            if probe_json.is_file():
                probe = json.loads(probe_json.read_text())
                images = [
                    f"{e['run_dir']}/probe/{name}"
                    for name in ("drop_zero.png", "pruning.png")
                    if (probe_json.parent / name).is_file()
                ]
                plots["probes"].setdefault(g["label"], []).append((_probe_text(probe, k), images))
        if curves:
            name = f"curves_{_slug(g['label'])}.png"
            _curve_plot(g, curves, out / name, colors)
            plots["curves"][g["label"]] = f"report/{name}"
    summary["sweep"] = {k: meta.get(k) for k in ("name", "command", "experiment_file")}
    (out / "summary.json").write_text(json.dumps(nan_to_none(summary), indent=2) + "\n")
    path = sweep_dir / "REPORT.md"
    path.write_text(_markdown(summary, meta, plots))
    return path
