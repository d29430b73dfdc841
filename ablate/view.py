"""The attention viewer: one self-contained HTML page per sweep or run (`view.html`).

Built from run folders alone (no model): per run its `config.json`, the examples training
stored (`patterns_init.npz` at step 0 and `patterns_final.npz` at the end: the first few
eval sequences of every seed, every layer's patterns on them, their tokens, targets and
dependency masks; ablate/train.py `write_examples`), and the per-head eval metrics of those
two steps from `metrics.jsonl` (alignment, gradient alignment, entropy). The page is
ablate/view_page.html with the data inlined as JSON: its script and style are ours and
inline, so it opens from disk with no server and no network.

What is embedded is what the page draws: per example, seed and stage, the pattern rows of
the scored target positions only (a target's attention over the key positions), rounded to
multiples of 1/255 and stored as one byte each (base64). A page's size is about
runs x seeds x 2 stages x examples x layers x heads x scored targets x key length bytes x 4/3.

The page takes its selection from the URL fragment (`view.html#task=mqar&variant=learned&
seed=1&example=2&layer=1&head=0&target=9`; `head=all` for small multiples), applied through
its own controls (each value set on its select element, then a change event), which is
how the browser test drives it.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ablate.config import ConfigError
from ablate.runfolder import (
    CONFIG_FILE,
    METRICS_FILE,
    PATTERNS_FILE,
    PATTERNS_INIT_FILE,
    RESULTS_FILE,
    VIEW_FILE,
    note,
    read_jsonl,
    write_atomic,
)

TEMPLATE = Path(__file__).with_name("view_page.html")
DATA_MARK = "/*ABLATE_VIEW_DATA*/null"
# Written into every page: a view.html without it is not ours, and is never replaced.
GENERATOR = '<meta name="generator" content="ablate view">'
STAGES = (("init", PATTERNS_INIT_FILE), ("final", PATTERNS_FILE))
LEVELS = 255  # pattern values are stored as round(p * LEVELS), one byte each
HEAD_METRICS = ("alignment", "gradient_alignment", "entropy")
UNIFORM_METRICS = ("uniform_alignment", "uniform_entropy")


@dataclass(frozen=True)
class RunEntry:
    """One run folder to show, and its names in the page."""

    name: str
    task: str
    variant: str
    run_dir: Path


def find_runs(folder: Path) -> list[RunEntry]:
    """The runs of a sweep folder (its results table's order) or the run a run folder holds."""
    if (folder / RESULTS_FILE).is_file():
        entries: dict[str, RunEntry] = {}
        for row in read_jsonl(folder / RESULTS_FILE):
            if row.get("run") and row["run"] not in entries:
                entries[row["run"]] = RunEntry(
                    row["run"],
                    str(row.get("task") or row["run"]),
                    str(row.get("variant") or row["run"]),
                    folder / row.get("run_dir", row["run"]),
                )
        return list(entries.values())
    if (folder / CONFIG_FILE).is_file():
        config = json.loads((folder / CONFIG_FILE).read_text())
        return [RunEntry(folder.name, config["task"]["name"], folder.name, folder)]
    raise ConfigError(
        [
            (
                "folder",
                f"{folder} is neither a sweep folder (with {RESULTS_FILE}) nor a run folder "
                f"(with {CONFIG_FILE})",
            )
        ]
    )


def quantize(probs: np.ndarray) -> np.ndarray:
    """Pattern values as bytes: round(p * 255), clipped to [0, 255]."""
    return np.clip(np.rint(np.asarray(probs, np.float64) * LEVELS), 0, LEVELS).astype(np.uint8)


def _b64(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values).tobytes()).decode("ascii")


def _nested(values: Any) -> Any:
    """Per-head metrics as nested lists with None for NaN/missing (JSON has no NaN)."""
    if values is None:
        return None
    if isinstance(values, list):
        return [_nested(v) for v in values]
    return float(values) if isinstance(values, int | float) and math.isfinite(values) else None


def _metrics(run_dir: Path, steps: dict[str, int], seeds: list[int], cross: bool) -> dict:
    """Per stage, the eval metrics of each seed at that stage's step (None where absent)."""
    rows: dict[tuple[int, int], dict] = {}
    if (run_dir / METRICS_FILE).is_file():
        for row in read_jsonl(run_dir / METRICS_FILE):
            if row.get("kind") == "eval":
                rows[(row["step"], row["seed"])] = row  # the last one wins
    names = [*HEAD_METRICS, *UNIFORM_METRICS]
    names += [f"cross_{n}" for n in names] if cross else []
    out = {}
    for stage, step in steps.items():
        per_seed = [rows.get((step, s), {}) for s in seeds]
        out[stage] = {n: [_nested(r.get(n)) for r in per_seed] for n in names}
    return out


def _examples(first: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The examples' tokens, scored targets and dependency positions (from seed 0: the eval
    sequences are the same for every seed)."""
    out = []
    weights_EL = first["weights"][0]
    for e in range(weights_EL.shape[0]):
        scored = [int(i) for i in np.flatnonzero(weights_EL[e] > 0)]
        example = {
            "tokens": [str(t) for t in first["input_labels"][e]],
            "scored": scored,
            "targets": [str(first["target_labels"][e][i]) for i in scored],
            "deps": [[int(j) for j in np.flatnonzero(first["deps"][0, e, i])] for i in scored],
            "source": None,
            "cross_deps": None,
        }
        if "source_labels" in first:
            example["source"] = [str(t) for t in first["source_labels"][e]]
            example["cross_deps"] = [
                [int(j) for j in np.flatnonzero(first["cross_deps"][0, e, i])] for i in scored
            ]
        out.append(example)
    return out


def _attention(stored: dict[str, np.ndarray], examples, key: str) -> list[list[str]]:
    """[seed][example] base64 of the bytes (N, H, scored targets, key positions)."""
    probs_ZENHLS = stored[key]
    return [
        [_b64(quantize(probs_ZENHLS[z, e][:, :, ex["scored"], :])) for e, ex in enumerate(examples)]
        for z in range(probs_ZENHLS.shape[0])
    ]


def run_data(entry: RunEntry) -> dict[str, Any] | None:
    """What the page shows of one run; None when the run stored no examples."""
    stored = {}
    for stage, filename in STAGES:
        path = entry.run_dir / filename
        if path.is_file():
            with np.load(path) as data:
                if "inputs" in data:  # runs of ablate before the viewer stored one sequence
                    stored[stage] = {k: data[k] for k in data.files}
    if not stored:
        return None
    config = json.loads((entry.run_dir / CONFIG_FILE).read_text())
    seeds = list(config["train"]["seeds"])
    first = stored.get("final", stored.get("init"))
    examples = _examples(first)
    cross = "cross_probs" in first
    N, H = first["probs"].shape[2:4]
    steps = {stage: int(s["step"]) for stage, s in stored.items()}
    model = config["model"]
    return {
        "name": entry.name,
        "task": entry.task,
        "variant": entry.variant,
        "seeds": seeds,
        "layers": int(N),
        "heads": int(H),
        "causal": bool(model.get("causal", True)),
        "seq2seq": cross,
        "has_pattern": first["has_pattern"].tolist(),
        "cross_has_pattern": first["cross_has_pattern"].tolist() if cross else None,
        "steps": steps,
        "examples": examples,
        "attention": {stage: _attention(s, examples, "probs") for stage, s in stored.items()},
        "cross": {stage: _attention(s, examples, "cross_probs") for stage, s in stored.items()}
        if cross
        else None,
        "metrics": _metrics(entry.run_dir, steps, seeds, cross),
    }


def page_data(folder: str | Path) -> dict[str, Any]:
    """Everything the page embeds for a sweep or run folder."""
    folder = Path(folder)
    runs, missing = [], []
    for entry in find_runs(folder):
        data = run_data(entry)
        (runs if data is not None else missing).append(data or entry.name)
    if missing:
        note(f"view: no stored examples in {', '.join(missing)} (not finished, or older runs)")
    return {"title": folder.resolve().name, "levels": LEVELS, "runs": runs, "missing": missing}


def render(data: dict[str, Any]) -> str:
    """The page with `data` inlined (every `<` escaped: no string can end the script)."""
    page = TEMPLATE.read_text()
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return page.replace(DATA_MARK, payload, 1)


def write_view(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write the viewer page of a sweep or run folder (default `FOLDER/view.html`).

    A file in its place that this function did not write is left alone (ConfigError).
    """
    folder = Path(folder)
    data = page_data(folder)  # a page with no runs says so (a sweep whose runs all failed)
    path = Path(out) if out is not None else folder / VIEW_FILE
    if path.is_file() and GENERATOR not in path.read_text(errors="replace")[:4000]:
        raise ConfigError(
            [
                (
                    "out",
                    f"{path} exists and was not written by `ablate view`; refusing to replace "
                    "it (move it, or pass --out OTHER.html)",
                )
            ]
        )
    write_atomic(path, render(data))
    return path
