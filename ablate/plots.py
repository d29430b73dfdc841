"""Every figure ablate draws, with matplotlib (imported only when a figure is drawn).

Two kinds: PNG bytes with their size, for TensorBoard images and the probe's files
(`patterns_png`, `drop_heatmap_png`, `pruning_png`; pyplot with the Agg backend), and the
report's figures, written to a path without a "Software" stamp (`bars`, `curves_plot`,
`pattern_grid`; matplotlib's `Figure` without pyplot). The callers compute what is drawn;
nothing here reads a run folder.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ablate.metrics import finite

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _png(draw: Callable[[Any], Figure]) -> tuple[bytes, int, int]:
    """(png, width, height) of the figure `draw(plt)` returns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    width, height = fig.canvas.get_width_height()
    plt.close(fig)
    return buf.getvalue(), width, height


def patterns_png(
    probs_HLS: np.ndarray,
    deps_LS: np.ndarray,
    title: str,
    *,
    has_pattern_H: np.ndarray | None = None,
) -> tuple[bytes, int, int]:
    """One row of head patterns beside the task's dependency mask, as (png, width, height)."""
    H = probs_HLS.shape[0]

    def draw(plt):
        fig, axes = plt.subplots(1, H + 1, figsize=(1.9 * (H + 1), 2.1), dpi=80, squeeze=False)
        for h in range(H):
            ax = axes[0, h]
            if has_pattern_H is not None and not has_pattern_H[h]:
                ax.text(0.5, 0.5, "no pattern", ha="center", va="center", fontsize=7)
            else:
                ax.imshow(probs_HLS[h], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"head {h}", fontsize=7)
        axes[0, H].imshow(deps_LS, cmap="Reds", vmin=0, vmax=1)
        axes[0, H].set_title("dependencies", fontsize=7)
        for ax in axes[0]:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        return fig

    return _png(draw)


def drop_heatmap_png(
    drop_ZNH: np.ndarray | dict[str, np.ndarray],
    titles: list[str],
    kind: str,
    measure: str = "accuracy drop",
) -> tuple[bytes, int, int]:
    """A drop (`measure`, e.g. accuracy drop or loss increase) per layer (rows) and head
    (columns), one panel per seed (or the mean).

    `drop_ZNH` may be a dict {title of a kind of attention: its (Z, N, H)}: one row of
    panels per kind, each panel titled by its kind and seed, one colour scale for all.
    """
    rows = drop_ZNH if isinstance(drop_ZNH, dict) else {"": drop_ZNH}
    Z, _, H = next(iter(rows.values())).shape
    N = sum(x.shape[1] for x in rows.values())
    every = np.concatenate([x.ravel() for x in rows.values()])
    magnitudes = np.abs(every[np.isfinite(every)])
    vmax = max(float(magnitudes.max()) if magnitudes.size else 0.0, 1e-3)
    digits = 2 if vmax >= 0.1 else 3  # small drops (a loss in nats) keep a third digit
    # Each kind's row as tall as its layers (one kind: the plain grid).
    extra = {} if len(rows) == 1 else {"height_ratios": [x.shape[1] for x in rows.values()]}

    def draw(plt):
        # Every further row of panels needs room for its titles and axis labels.
        size = (1.0 * H * Z + 2.2, 0.7 * N + 1.8 + 1.0 * (len(rows) - 1))
        fig, axes = plt.subplots(
            len(rows), Z, figsize=size, dpi=90, squeeze=False, layout="constrained", **extra
        )
        for axes_row, (part, part_ZNH) in zip(axes, rows.items()):
            for ax, drop_NH, title in zip(axes_row, part_ZNH, titles):
                image = ax.imshow(drop_NH, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
                for (n, h), v in np.ndenumerate(drop_NH):
                    text = "n/a" if np.isnan(v) else f"{v:.{digits}f}"
                    color = "white" if abs(v) > 0.6 * vmax else "black"  # NaN compares False
                    ax.text(h, n, text, ha="center", va="center", fontsize=7, color=color)
                ax.set(xlabel="head", ylabel="layer", xticks=range(H))
                ax.set(yticks=range(drop_NH.shape[0]))
                if part:
                    ax.set_title(f"{part}\n{title}", fontsize=8)
                else:
                    ax.set(title=title)
        fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label=measure)
        fig.suptitle(f"{kind} ablation: {measure} per head", fontsize=9)
        return fig

    return _png(draw)


def pruning_png(
    pruning_K2P: np.ndarray, seeds, chance: float | None, measure: str = "accuracy"
) -> tuple[bytes, int, int]:
    """A measure (accuracy, or e.g. loss) as heads are removed, least important first,
    beside a random order; `chance` is drawn as a line where given."""
    P = pruning_K2P.shape[1] // 2

    def draw(plt):
        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=90, layout="constrained")
        for k, seed in enumerate(seeds):
            name = seed if isinstance(seed, str) else f"seed {seed}"  # or a model's name
            (line,) = ax.plot(pruning_K2P[k, :P], "-o", ms=3, label=f"by importance, {name}")
            ax.plot(pruning_K2P[k, P:], "--", color=line.get_color(), label=f"random, {name}")
        if chance is not None:
            ax.axhline(chance, color="gray", lw=0.8, ls=":", label="chance")
        ax.set(xlabel="heads removed", ylabel=measure, title="pruning (Michel et al. 2019)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
        return fig

    return _png(draw)


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})


def _bounds(s: dict[str, float]) -> tuple[float, float]:
    """(low, high), collapsed to the mean where the interval could not be formed."""
    ok = finite(s["low"]) and finite(s["high"])
    return (s["low"], s["high"]) if ok else (s["mean"], s["mean"])


def bars(groups: list[dict], field: str, path: Path, ylabel: str, colors: dict) -> None:
    """Grouped bars per task and variant with interval error bars (the report's groups)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.8 * len(groups)), 4.0))
    ax = fig.subplots()
    present = [k for k in colors if any(g["variants"].get(k, {}).get(field) for g in groups)]
    width = 0.8 / max(len(present), 1)
    for j, label in enumerate(present):
        xs, ys, err = [], [], [[], []]
        for i, g in enumerate(groups):
            s = g["variants"].get(label, {}).get(field)
            if s and finite(s["mean"]):
                low, high = _bounds(s)
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(s["mean"])
                err[0].append(s["mean"] - low)
                err[1].append(high - s["mean"])
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=label, color=colors[label])
    if field == "accuracy":
        marks = (("chance", "k", "--"), ("fixed_routing_ceiling", "C3", ":"))
        marks += (("bag_ceiling", "C2", "-."),)
        names = {"chance": "chance", "fixed_routing_ceiling": "fixed-routing ceiling"}
        names["bag_ceiling"] = "bag ceiling"
        for field_name, color, style in marks:
            shown = False
            for i, g in enumerate(groups):
                value = g["levels"][field_name]["value"]
                if value is not None:
                    label = None if shown else names[field_name]
                    ax.hlines(
                        value, i - 0.45, i + 0.45, color, style, lw=1.4, label=label, zorder=3
                    )
                    shown = True
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


def curves_plot(g: dict, curves: dict[str, dict], path: Path, colors: dict) -> None:
    """Over training, one line per variant: accuracy (and, on a task with two routes, the
    accuracy on conflict sequences, dashed), best-head alignment and the loss's pull
    (best-head gradient alignment), beside uniform; perplexity instead of the last two for
    real data, which has no dependency mask."""
    from matplotlib.figure import Figure

    real = g["context_need"] == "unknown"
    fig = Figure(figsize=(10.0 if real else 14.0, 3.6))
    axes = fig.subplots(1, 2 if real else 3)
    panels = ["perplexity"] if real else ["alignment", "pull"]
    cross = "cross-attention " if any(c.get("cross") for c in curves.values()) else ""
    ylabels = {
        "perplexity": "eval perplexity",
        "alignment": f"best-head {cross}alignment",
        "pull": f"loss's pull on the dependencies\n(best-head {cross}gradient alignment)",
    }
    ax_acc = axes[0]
    for label, c in curves.items():
        ax_acc.plot(c["step"], c["accuracy"], label=label, color=colors[label])
        if any(finite(y) for y in c.get("conflict", [])):  # a task with two routes
            ax_acc.plot(
                c["step"],
                c["conflict"],
                label=f"{label}, conflict sequences",
                color=colors[label],
                ls="--",
            )
            ax_acc.plot(
                c["step"],
                c["cheap_agreement"],
                label=f"{label}, conflict answers = the cheap route's",
                color=colors[label],
                ls=":",
            )
        for ax, right in zip(axes[1:], panels):
            # Step 0 (a random model: perplexity ~ vocabulary size) would flatten the rest.
            points = [(s, y) for s, y in zip(c["step"], c[right]) if right != "perplexity" or s > 0]
            if any(finite(y) for _, y in points):
                ax.plot(*zip(*points), label=label, color=colors[label])
    ax_acc.axhline(g["chance"], color="k", ls="--", lw=0.8, label="chance")
    if g.get("cheap_route"):
        ax_acc.axhline(
            g["conflict_top"], color="C4", ls="--", lw=0.8, label="no-content readers, conflicts"
        )
    for field, color, style, name in (
        ("fixed_routing_ceiling", "C3", ":", "fixed-routing ceiling"),
        ("bag_ceiling", "C2", "-.", "bag ceiling"),
    ):
        if g["levels"][field]["value"] is not None:
            ax_acc.axhline(g["levels"][field]["value"], color=color, ls=style, lw=0.8, label=name)
    ref = next((c for c in curves.values() if any(finite(u) for u in c["uniform"])), None)
    if ref and not real:
        for ax in axes[1:]:
            ax.plot(ref["step"], ref["uniform"], color="gray", ls=":", label="uniform")
    for ax, name in zip(axes, ["eval accuracy"] + [ylabels[p] for p in panels]):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{g['label']} (mean over ok seeds)")
    _save(fig, path)


def pattern_grid(
    probs_NHLS: np.ndarray, mask_LS: np.ndarray, has_NH: np.ndarray | None, path: Path, title: str
) -> None:
    """Every head's pattern (a row per layer) beside the dependency mask."""
    from matplotlib.figure import Figure

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
