"""Sweeps: a grid of tasks x attention variants x other fields, each point training all its
seeds at once, with a results table that survives crashes and resumes without duplicates.

The `[sweep]` table of an experiment file:

    [sweep]
    name = "context_quick"                   # the sweep folder under --workdir
    variants = ["learned", "uniform", { label = "frozen_embed", attention = "frozen",
                                        freeze = ["token_embed", "pos_embed"] }]
    tasks = [{ name = "assoc_recall", n_pairs = 8 },
             { name = "assoc_recall", label = "recall_2hop", pair_tokens = "separate" },
             { name = "majority", overrides = { "train.steps" = 500 } }]
    grid = { "model.n_layers" = [1, 2] }     # optional: more fields, each a list
    probe = ["learned"]                      # optional: post-hoc head ablation of these variants

In an encoder-decoder sweep (seq2seq tasks), a variant table may also set
`decoder_attention` and `cross_attention` (a variant name alone sets `attention`, the
encoder's), e.g. `{ label = "uniform_cross", cross_attention = "uniform" }`; rows then
carry the cross-attention's alignment beside the decoder's.

A task entry's `label` names it in run folders and the report (default: the task name);
`overrides` holds dotted fields for that task's points only. The rest of the file (`[model]`, `[optim]`, `[train]`) is the base every point starts
from. Each point is validated before anything trains. Every point runs through
`train_point`, here or on a worker (`--executor ray|slurm`, `ablate.executors`; or a
`--shard i/n` of the points in another process), which leaves its rows (one per seed) in
its run folder; the driver collects them into `results.jsonl` (`ResultsTable.collect`) as
runs finish. A point already recorded as ok is skipped on rerun, and failed points are
retried (their old rows replaced, never duplicated). In one process, each task's data is
read once per sweep and shared by all its points (`SharedData`).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import itertools
import json
import math
import os
import secrets
import socket
import time
import traceback
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ablate.config import (
    ConfigError,
    apply_overrides,
    dotted,
    load_toml,
    one_of,
    set_dotted,
    to_dict,
)
from ablate.distributed import check_mesh, is_primary, on_primary
from ablate.experiment import NAME_RE, Experiment, build_experiment, safe_join
from ablate.metrics import nan_to_none, perplexity
from ablate.model import frozen_parts
from ablate.runfolder import (
    METRICS_FILE,
    RESULTS_CSV,
    RESULTS_FILE,
    ROWS_FILE,
    SHARED_MARKER,
    SWEEP_FILE,
    RunFolderBusy,
    read_jsonl,
    write_atomic,
    write_jsonl,
)
from ablate.seq2seq import Seq2SeqConfig
from ablate.seq2seq import frozen_parts as seq2seq_frozen_parts
from ablate.tasks import TaskData
from ablate.train import Diverged, Preempted, train


@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration of the sweep: a run folder trained with all seeds at once."""

    run_name: str
    task: str
    variant: str
    grid: dict[str, Any]
    experiment: Experiment
    probe: bool = False


VARIANT_KEYS = ("label", "attention", "decoder_attention", "cross_attention", "freeze")
# A variant table sets at least one of these (the last two: encoder-decoder models only).
ATTENTION_KEYS = ("attention", "decoder_attention", "cross_attention")
# The tables a grid field or a task's override may name (`model.n_layers`, `train.steps`).
FIELD_SECTIONS = ("task", "model", "optim", "train")


def _name_problem(value: Any) -> str | None:
    """Why `value` cannot name a run folder, or None."""
    if isinstance(value, str) and NAME_RE.fullmatch(value):
        return None
    return f"{value!r} must be a string of letters, digits, '_', '-', '.' (no path separators)"


def _entries(data: Mapping[str, Any], key: str, what: str, problems: list) -> list[Any]:
    """sweep.`key` as a non-empty list (else [] and a problem)."""
    value = data[key]
    if not isinstance(value, list) or not value:
        problems.append((f"sweep.{key}", f"must be a non-empty list of {what}, got {value!r}"))
        return []
    return value


def _fields(value: Any, path: str, problems: list, *, lists: bool) -> dict[str, Any]:
    """A table of dotted fields (`"model.n_layers" = ...`) checked, as {field: value}."""
    if not isinstance(value, Mapping):
        shape = '"section.field" = [values, ...]' if lists else '"section.field" = value'
        problems.append((path, f"must be a table of {shape}, got {value!r}"))
        return {}
    out = {}
    for key, v in value.items():
        parts = key.split(".")
        if len(parts) < 2 or parts[0] not in FIELD_SECTIONS or not all(parts):
            problems.append(
                (
                    dotted(path, key),
                    f"must be a quoted dotted field of {', '.join(FIELD_SECTIONS)}, "
                    'like "model.n_layers"',
                )
            )
        elif lists and (not isinstance(v, list) or not v):
            problems.append((dotted(path, key), f"must be a non-empty list of values, got {v!r}"))
        else:
            out[key] = v
    return out


def _variant_entry(entry: Any, path: str, problems: list) -> tuple[str, dict[str, Any]] | None:
    """(label, model overrides) for a variant given as a name or a table; None if refused."""
    if isinstance(entry, str):
        return entry, {"attention": entry}
    if not isinstance(entry, Mapping):
        problems.append(
            (
                path,
                f"expected a variant name or a table of {', '.join(VARIANT_KEYS)}, got {entry!r}",
            )
        )
        return None
    found = [
        (dotted(path, k), f"unknown key; a variant table has {', '.join(VARIANT_KEYS)}")
        for k in entry
        if k not in VARIANT_KEYS
    ]
    if "label" not in entry:
        found.append((f"{path}.label", "required in a variant table"))
    if not any(k in entry for k in ATTENTION_KEYS):
        found.append((f"{path}.attention", "required in a variant table"))
    if "label" in entry and (message := _name_problem(entry["label"])):
        found.append((f"{path}.label", message))
    problems.extend(found)
    if found:
        return None
    return entry["label"], {k: entry[k] for k in (*ATTENTION_KEYS, "freeze") if k in entry}


def _task_entry(
    entry: Any, path: str, index: int, problems: list
) -> tuple[str, str, dict, dict] | None:
    """(path, label, task table, overrides) of a task entry; None if refused."""
    if not isinstance(entry, Mapping):
        problems.append(
            (path, f"expected a task table (name, its knobs, label, overrides), got {entry!r}")
        )
        return None
    task = dict(entry)
    n_problems = len(problems)
    overrides = _fields(task.pop("overrides", {}), f"{path}.overrides", problems, lists=False)
    if "label" in task:
        label = task.pop("label")
        if message := _name_problem(label):
            problems.append((f"{path}.label", message))
    else:  # the task's name; one that is unknown is the task's to report
        name = task.get("name")
        label = name if _name_problem(name) is None else f"task{index}"
    if len(problems) > n_problems:
        return None
    return path, label, task, overrides


def expand(data: Mapping[str, Any], default_name: str = "sweep") -> tuple[str, list[Point]]:
    """The sweep's name and every point, all validated (every problem raised at once).

    The shape of the file is checked first (each section a table, `sweep.tasks` and
    `sweep.variants` lists of the allowed entries, grid values lists), so that every point
    merges plain tables; then each point is validated as an experiment.
    """
    problems: list[tuple[str, str]] = []
    sweep = data.get("sweep", {})
    if not isinstance(sweep, Mapping):
        problems.append(("sweep", f"must be a table (a [sweep] section), got {sweep!r}"))
        sweep = {}
    # A section of the wrong shape is reported once here and left out of the points.
    base = {}
    for key, value in data.items():
        if key in FIELD_SECTIONS and not isinstance(value, Mapping):
            problems.append((key, f"must be a table (a [{key}] section), got {value!r}"))
        elif key != "sweep":
            base[key] = value
    allowed = {"name", "variants", "tasks", "grid", "probe"}
    for key in sweep:
        if key not in allowed:
            problems.append(
                (dotted("sweep", key), f"unknown field; allowed: {', '.join(sorted(allowed))}")
            )
    name = sweep.get("name", default_name)
    if message := _name_problem(name):
        problems.append(("sweep.name", message))

    if "tasks" in sweep:
        entries = _entries(sweep, "tasks", "task tables", problems)
        tasks = [(f"sweep.tasks[{i}]", e) for i, e in enumerate(entries)]
    elif "task" in base or "task" not in data:
        tasks = [("task", base.get("task", {}))]
    else:
        tasks = []  # [task] is not a table: reported above
    tasks = [t for i, (path, e) in enumerate(tasks) if (t := _task_entry(e, path, i, problems))]

    if "variants" in sweep:
        entries = _entries(sweep, "variants", "variant names or tables", problems)
        variants = [
            v
            for i, e in enumerate(entries)
            if (v := _variant_entry(e, f"sweep.variants[{i}]", problems)) is not None
        ]
        all_variants = len(variants) == len(entries)
    else:  # the base model's attention, as it is (a name, or one entry per layer)
        attention = base.get("model", {}).get("attention", "learned")
        variants = [(attention if _name_problem(attention) is None else "model", {})]
        all_variants = True

    probe = sweep.get("probe", False)
    if isinstance(probe, list) and all(isinstance(v, str) for v in probe):
        labels = [label for label, _ in variants]
        if all_variants:  # else the refused variants' labels are unknown
            problems += [
                (f"sweep.probe[{i}]", one_of(v, labels))
                for i, v in enumerate(probe)
                if v not in labels
            ]
    elif isinstance(probe, bool):
        probe = ["learned"] if probe else []
    else:
        problems.append(
            ("sweep.probe", f"must be true, false or a list of variant labels, got {probe!r}")
        )
        probe = []
    grid = _fields(sweep.get("grid", {}), "sweep.grid", problems, lists=True)

    points, run_names = [], set()
    grid_keys = sorted(grid)
    for task_path, task_label, task_table, task_overrides in tasks:
        for label, model_over in variants:
            for values in itertools.product(*(grid[k] for k in grid_keys)):
                point_grid = dict(zip(grid_keys, values))
                suffix = "".join(f"-{k.split('.')[-1]}{v}" for k, v in point_grid.items())
                run_name = f"{task_label}-{label}{suffix}"
                if _name_problem(run_name):  # labels are checked: a grid value made it so
                    problems.append(
                        (
                            "sweep.grid",
                            f"the values {point_grid} make the run name {run_name!r}: a folder "
                            "name needs letters, digits, '_', '-', '.'",
                        )
                    )
                    continue
                if run_name in run_names:
                    problems.append((task_path, f"two points share the run name {run_name!r}"))
                    continue
                run_names.add(run_name)
                point = copy.deepcopy(dict(base))
                point["task"] = copy.deepcopy(task_table)
                point["model"] = {**point.get("model", {}), **copy.deepcopy(model_over)}
                point["name"] = run_name
                fields = [(dotted("sweep.grid", k), k, v) for k, v in point_grid.items()]
                fields += [
                    (dotted(f"{task_path}.overrides", k), k, v) for k, v in task_overrides.items()
                ]
                try:
                    for path, key, value in fields:
                        set_dotted(point, key.split("."), copy.deepcopy(value), path)
                    exp = build_experiment(point)
                except ConfigError as e:
                    problems.extend((f"{p} (in point {run_name})", m) for p, m in e.problems)
                    continue
                points.append(
                    Point(run_name, task_label, label, point_grid, exp, probe=label in probe)
                )
    if problems:
        raise ConfigError(problems)
    return name, points


class ResultsTable:
    """results.jsonl: one row per (run, seed); rewritten atomically, never duplicated.

    Rows enter it one way, `collect`: from the rows.jsonl each finished run leaves in its run
    folder, whoever trained it (this process, a shard, a Ray or SLURM worker). A driver killed
    and rerun collects what the workers finished meanwhile; only the driver writes the table.
    Rows are kept in the sweep's point order (`order`), so the table does not depend on which
    worker finished first.
    """

    def __init__(self, path: Path, order: Sequence[str] = ()):
        self.path = path
        self.order = {run: i for i, run in enumerate(order)}

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def done(self) -> set[str]:
        """Runs whose every row is ok (skipped on resume)."""
        return {run for run, rows in _by_run(self.rows()).items() if _all_ok(rows)}

    def collect(self, runs: Sequence[str]) -> list[str]:
        """Bring the rows of these runs' folders into the table (a run without rows.jsonl
        keeps the rows it has, as in a sweep folder from before rows.jsonl); returns the
        runs whose rows changed. One atomic rewrite, none when nothing changed."""
        by_run = _by_run(self.rows())
        changed = []
        for run in runs:
            new = point_rows(self.path.parent, run)
            if new and new != by_run.get(run):
                by_run[run] = new
                changed.append(run)
        if changed:
            ordered = sorted(by_run, key=lambda run: self.order.get(run, len(self.order)))
            rows = [r for run in ordered for r in by_run[run]]
            write_jsonl(self.path, rows)
            self._write_csv(rows)
        return changed

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        import csv

        columns = [
            "run",
            "task",
            "context_need",
            "variant",
            "seed",
            "status",
            "accuracy",
            "sequence_accuracy",
            "loss",
            "perplexity",
            "chance",
            "fixed_routing_ceiling",
            "bag_ceiling",
            "alignment_max",
            "alignment_uniform",
            "alignment_max_init",
            "gradient_alignment_max_init",
            "gradient_alignment_max_peak",
            "gradient_alignment_peak_step",
            "gradient_alignment_max",
            "alignment_onset_step",
            "loss_onset_step",
            "accuracy_onset_step",
            "gradient_alignment_onset_step",
            "eval_spacing",
            "alignment_mean",
            "entropy_mean",
            "entropy_min",
            "entropy_uniform",
            "cheap_level",
            "conflict_accuracy",
            "conflict_accuracy_onset_step",
            "conflict_cheap_agreement",
            "cheap_phase_start",
            "cheap_phase_end",
            "alignment_cheap_max",
            "alignment_cheap_onset_step",
            "conflict_alignment_max",
            "conflict_alignment_cheap_max",
            "steps",
            "wall_seconds",
            "compile_seconds",
            "error",
        ]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.path.with_name(RESULTS_CSV), text.getvalue())


def _by_run(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_run: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_run.setdefault(r["run"], []).append(r)
    return by_run


def _all_ok(rows: Sequence[dict[str, Any]]) -> bool:
    return bool(rows) and all(r["status"] == "ok" for r in rows)


class SharedData:
    """Each task's data, read once for all the sweep's points of that task (every variant
    and grid value shares one copy) and dropped after its last point. A task whose data
    cannot be read fails each of its points with the same error, read once."""

    def __init__(self, points: Sequence[Point]):
        self.left = Counter(_task_key(p.experiment) for p in points)
        self.loaded: dict[tuple[str, str], TaskData | Exception] = {}

    def take(self, point: Point) -> TaskData:
        key = _task_key(point.experiment)
        if key not in self.loaded:
            try:
                self.loaded[key] = point.experiment.task.load()
            except Exception as e:  # noqa: BLE001 - re-raised for every point of the task
                self.loaded[key] = e
        found = self.loaded[key]
        if isinstance(found, Exception):
            raise found
        return found

    def release(self, point: Point) -> None:
        key = _task_key(point.experiment)
        self.left[key] -= 1
        if not self.left[key]:
            self.loaded.pop(key, None)


def _task_key(exp: Experiment) -> tuple[str, str]:
    return exp.task.name, repr(exp.task.config)


def task_levels(exp: Experiment, cache: dict | None = None) -> dict[str, Any]:
    """The task's reference levels as row fields (computed once per task and visibility)."""
    from ablate.reference import conflict_levels, no_levels_row, reference_levels

    cache = {} if cache is None else cache
    key = (exp.task.name, repr(exp.task.config), exp.model.causal)
    if key not in cache:
        levels = reference_levels(exp.task, causal=exp.model.causal)
        cache[key] = no_levels_row() if levels is None else levels.row()
        if conflict := conflict_levels(exp.task, causal=exp.model.causal):
            cache[key] |= conflict.row("conflict_")
    return cache[key]


def _point_fields(
    point: Point, seed: int, levels: dict[str, Any], chance: float | None
) -> dict[str, Any]:
    """What every row of a point says about its configuration (chance: None where the
    task's data could not be read)."""
    exp = point.experiment
    return {
        "run": point.run_name,
        "task": point.task,
        "context_need": exp.task.context_need,
        "variant": point.variant,
        "attention": to_dict(exp.model.attention),
        **(
            {
                "decoder_attention": to_dict(exp.model.decoder_attention),
                "cross_attention": to_dict(exp.model.cross_attention),
            }
            if isinstance(exp.model, Seq2SeqConfig)
            else {}
        ),
        "frozen": (
            seq2seq_frozen_parts(exp.model)
            if isinstance(exp.model, Seq2SeqConfig)
            else frozen_parts(exp.model)
        ),
        "grid": point.grid,
        "seed": seed,
        "chance": chance,
        # A masked-LM task's own token gives a share of answers away (the kept tokens).
        **(
            {"own_token_level": exp.task.own_token_level}
            if hasattr(exp.task, "own_token_level")
            else {}
        ),
        **levels,
        **(
            {
                "cheap_route": exp.task.cheap_route,
                "cheap_level": exp.task.cheap_level,
                "conflict_share": exp.task.conflict_share,
            }
            if exp.task.cheap_route
            else {}
        ),
        "eval_sequences": exp.train.eval_batches * exp.train.batch_size,
        "run_dir": point.run_name,
    }


def _finite(per_head: Any) -> np.ndarray:
    """The finite values of a per-head (N, H) array or list (None or NaN: no pattern)."""
    values = np.asarray(per_head, dtype=float).ravel()
    return values[np.isfinite(values)]


def _float(x: Any) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _entropy_fields(final: dict[str, Any], k: int) -> dict[str, Any]:
    """Seed k's mean-head alignment, attention entropy (per head, mean and lowest over
    heads) and uniform attention's entropy (None in a run from before it was measured)."""
    alignment, entropy = _finite(final["alignment"][k]), _finite(final["entropy"][k])
    uniform = final.get("uniform_entropy")
    return {
        "alignment_mean": float(alignment.mean()) if alignment.size else None,
        "entropy": nan_to_none(np.asarray(final["entropy"][k], dtype=float).tolist()),
        "entropy_mean": float(entropy.mean()) if entropy.size else None,
        "entropy_min": float(entropy.min()) if entropy.size else None,
        "entropy_uniform": None if uniform is None else _float(uniform[k]),
    }


def _rows_for(point: Point, result, history: dict, levels: dict) -> list[dict[str, Any]]:
    rows = []
    for k, seed in enumerate(result.seeds):
        alignment = np.asarray(result.final["alignment"][k], dtype=float)
        finite = alignment[np.isfinite(alignment)]
        rows.append(
            {
                **_point_fields(point, seed, levels, result.chance),
                "status": "ok",
                "error": "",
                "accuracy": result.final["accuracy"][k],
                "sequence_accuracy": result.final["sequence_accuracy"][k],
                "loss": result.final["loss"][k],
                "perplexity": perplexity(result.final["loss"][k]),
                "alignment": nan_to_none(alignment.tolist()),
                "alignment_max": float(finite.max()) if finite.size else None,
                "alignment_uniform": nan_to_none(result.final["uniform_alignment"][k]),
                **_route_fields(result.final, k),
                **_cross_fields(result.final, k),
                "alignment_max_init": None,
                **_entropy_fields(result.final, k),
                **history.get(seed, {}),
                "steps": result.steps,
                "wall_seconds": result.wall_seconds,
                "compile_seconds": result.compile_seconds,
            }
        )
    return rows


def _route_fields(final: dict[str, Any], k: int) -> dict[str, Any]:
    """Seed k's last eval on a task with a cheap route (nothing otherwise): the accuracy on
    conflict sequences, and best-head alignment and pull against each route's mask."""
    if "conflict_accuracy" not in final:
        return {}
    best = lambda name: _best_head(nan_to_none(np.asarray(final[name][k], float).tolist()))
    return {
        "conflict_accuracy": float(final["conflict_accuracy"][k]),
        "conflict_cheap_agreement": float(final["conflict_cheap_agreement"][k]),
        "alignment_cheap_max": best("alignment_cheap"),
        "alignment_uniform_cheap": nan_to_none(float(final["uniform_alignment_cheap"][k])),
        "conflict_alignment_max": best("conflict_alignment"),
        "conflict_alignment_cheap_max": best("conflict_alignment_cheap"),
        "gradient_alignment_cheap_max": best("gradient_alignment_cheap"),
        "conflict_alignment_uniform": nan_to_none(float(final["conflict_uniform_alignment"][k])),
        "conflict_gradient_alignment_max": best("conflict_gradient_alignment"),
    }


def _cross_fields(final: dict[str, Any], k: int) -> dict[str, Any]:
    """Seed k's last eval of an encoder-decoder (nothing otherwise): cross-attention's
    alignment per decoder layer and head, its best head, uniform's, and the best head's pull."""
    if "cross_alignment" not in final:
        return {}
    per_head = nan_to_none(np.asarray(final["cross_alignment"][k], float).tolist())
    pull = nan_to_none(np.asarray(final["cross_gradient_alignment"][k], float).tolist())
    return {
        "cross_alignment": per_head,
        "cross_alignment_max": _best_head(per_head),
        "cross_alignment_uniform": nan_to_none(float(final["cross_uniform_alignment"][k])),
        "cross_gradient_alignment_max": _best_head(pull),
    }


def _failed_rows(
    point: Point, status: str, error: str, wall: float, levels: dict, chance: float | None
) -> list[dict[str, Any]]:
    return [
        {**_point_fields(point, seed, levels, chance), "status": status, "error": error}
        | {"wall_seconds": wall}
        for seed in point.experiment.train.seeds
    ]


PROBE_KINDS = ("zero", "mean_pattern")


def _probe(run_dir: Path, rows: list[dict[str, Any]], data: TaskData) -> list[dict[str, Any]]:
    """Post-hoc head ablation of a finished run; a probe failure is noted, not fatal."""
    from ablate.probe import probe_run

    try:
        probe_run(run_dir, kinds=PROBE_KINDS, data=data)
    except Exception as e:  # noqa: BLE001 - the run itself is fine; say what the probe hit
        return [{**r, "error": f"probe failed: {type(e).__name__}: {e}"} for r in rows]
    return rows


def _best_head(per_head: Any) -> float | None:
    values = [a for r in per_head or [] for a in r if a is not None]
    return max(values) if values else None


def onset_step(
    steps: Sequence[int],
    values: Sequence[float | None],
    target: float | None,
    *,
    rises: bool,
    start: float | None = None,
    settled: bool = False,
) -> int | None:
    """The first eval step at which a curve has covered half of its way from its step-0 value
    (or `start`) to `target`: value(s) >= v0 + (target - v0) / 2 for a rising curve (<= for a
    falling one); with `settled`, the first from which it stays there to the end (a curve
    that rose, fell back and rose again gets the last rise).

    The crossing itself lies between the eval before that step and that step: the onset is
    only as fine as the evals. None when there is no step-0 value or no target, or when the
    curve does not move the stated way (target - v0 not > 0 for rising, not < 0 for falling:
    no rise, no onset; one eval alone never moves). Steps without a value are skipped.
    """
    if not steps or steps[0] != 0 or values[0] is None or target is None:
        return None
    v0 = values[0] if start is None else start
    sign = 1.0 if rises else -1.0
    half = sign * (target - v0) / 2
    if not half > 0:
        return None
    past = [(s, sign * (v - v0) >= half) for s, v in zip(steps, values) if v is not None]
    if not settled:
        return next((s for s, beyond in past if beyond), None)
    onset = None
    for s, beyond in past:
        onset = (onset if onset is not None else s) if beyond else None
    return onset


def _eval_history(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Per seed, from the run's metrics file: best-head alignment at step 0, and the best
    head's gradient alignment (the loss's pull on the dependency positions) at step 0, at
    its peak (with the step) and at the last eval; the onsets (`onset_step`) of the
    best-head alignment (half way to its last eval), of the loss (half way down to its last
    eval) and of the pull (half way to its peak); and the widest gap between evals.

    "Best head" is the largest value over heads at each eval (the curve the report draws), so
    it may be another head at another step.
    """
    out: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[int, dict]] = {}
    for row in read_jsonl(run_dir / METRICS_FILE):
        if row.get("kind") == "eval":
            evals.setdefault(row["seed"], {})[row["step"]] = row  # the last one wins
    for seed, by_step in evals.items():
        steps = sorted(by_step)
        pull, peak = _best_head_curve(steps, by_step, "gradient_alignment")
        align = [_best_head(by_step[s].get("alignment")) for s in steps]
        loss = [_float(by_step[s].get("loss")) for s in steps]
        accuracy = [_float(by_step[s].get("accuracy")) for s in steps]
        # The loss starts above the loss of knowing only the answers' distribution (about
        # -log chance); its fall to there is not context, so its onset is measured from there.
        chance = _float(by_step[steps[0]].get("chance"))
        loss_start = loss[0]
        if loss_start is not None and chance is not None and chance > 0:
            loss_start = min(loss_start, -math.log(chance))
        head = _final_best_head(by_step[steps[-1]].get("alignment"))
        onsets = {
            "loss_onset_step": onset_step(steps, loss, loss[-1], rises=False, start=loss_start),
            "accuracy_onset_step": onset_step(steps, accuracy, accuracy[-1], rises=True),
        }
        if head is not None:  # the head that ends most aligned: its alignment and its pull
            layer, h = head
            own = [_head(by_step[s].get("alignment"), layer, h) for s in steps]
            own_pull = [_head(by_step[s].get("gradient_alignment"), layer, h) for s in steps]
            known_own = [v for v in own_pull if v is not None]
            onsets["alignment_onset_step"] = onset_step(steps, own, own[-1], rises=True)
            onsets["gradient_alignment_onset_step"] = onset_step(
                steps, own_pull, max(known_own) if known_own else None, rises=True
            )
            onsets["onset_head"] = f"layer {layer} head {h}"
        else:
            onsets["alignment_onset_step"] = onsets["gradient_alignment_onset_step"] = None
        out[seed] = {
            "alignment_max_init": align[0] if steps[0] == 0 else None,
            "gradient_alignment_max_init": pull.get(0),
            "gradient_alignment_max_peak": None if peak is None else pull[peak],
            "gradient_alignment_peak_step": peak,
            "gradient_alignment_max": pull[steps[-1]],
            **onsets,
            "eval_spacing": int(np.diff(steps).max()) if len(steps) > 1 else None,
            # The widest gap between an onset's eval and the eval before it.
            "onset_spacing": _onset_spacing(steps, onsets),
            **_entropy_init(by_step, steps),
        }
        if by_step[steps[-1]].get("conflict_accuracy") is not None:
            out[seed] |= _route_history(steps, by_step)
    return out


CHEAP_MAJORITY = 0.5  # a seed is on the cheap route while most conflict answers are its
ROUTE_TAIL = 3  # evals over which the conflict accuracy's last rise is taken


def _best_head_curve(
    steps: list[int], by_step: dict[int, dict], name: str
) -> tuple[dict[int, float | None], int | None]:
    """The best head's value of a per-head metric at each eval, and the step of its peak."""
    curve = {s: _best_head(by_step[s].get(name)) for s in steps}
    known = [s for s in steps if curve[s] is not None]
    return curve, max(known, key=lambda s: curve[s]) if known else None


def _final_best_head(per_head: Any) -> tuple[int, int] | None:
    """(layer, head) of the largest value in a per-head list of lists (None: none finite)."""
    cells = [
        (v, layer, h)
        for layer, row in enumerate(per_head or [])
        for h, v in enumerate(row)
        if v is not None and math.isfinite(v)
    ]
    return max(cells)[1:] if cells else None


def _head(per_head: Any, layer: int, h: int) -> float | None:
    try:
        return _float(per_head[layer][h])
    except (TypeError, IndexError):
        return None


def _onset_spacing(steps: list[int], onsets: dict[str, Any]) -> int | None:
    gaps = [
        s - steps[steps.index(s) - 1]
        for name, s in onsets.items()
        if name.endswith("_onset_step") and s is not None and s in steps and steps.index(s) > 0
    ]
    return max(gaps) if gaps else None


def _entropy_init(by_step: dict[int, dict], steps: list[int]) -> dict[str, Any]:
    """Mean-over-heads and lowest-head entropy at step 0 (what training moved it from)."""
    if steps[0] != 0:
        return {}
    values = [v for row in by_step[0].get("entropy") or [] for v in row if _float(v) is not None]
    if not values:
        return {}
    return {"entropy_mean_init": float(np.mean(values)), "entropy_min_init": float(min(values))}


def _route_history(steps: list[int], by_step: dict[int, dict]) -> dict[str, Any]:
    """For a task with a cheap route: when the conflict accuracy (the content route's) rose
    for good (`settled`: half way from step 0 to its end and never back below), its rise over
    the last ROUTE_TAIL evals (still moving?), the cheap phase (the evals from the first at
    which most conflict answers were the cheap route's until the first after it at which they
    were not; None where it never began or never ended), the onset of the best head's
    alignment with the cheap route's mask, and the best head's pull towards the cheap route,
    and on conflict sequences towards the content route, at init and at its peak."""
    conflict = [_float(by_step[s].get("conflict_accuracy")) for s in steps]
    cheap = [_best_head(by_step[s].get("alignment_cheap")) for s in steps]
    agreement = [_float(by_step[s].get("conflict_cheap_agreement")) for s in steps]
    on_cheap = [a is not None and a >= CHEAP_MAJORITY for a in agreement]
    start = next((s for s, on in zip(steps, on_cheap) if on), None)
    end = None
    if start is not None:
        after = steps.index(start)
        end = next((s for s, on in zip(steps[after:], on_cheap[after:]) if not on), None)
    tail = conflict[-1 - ROUTE_TAIL] if len(steps) > ROUTE_TAIL else None
    out = {
        "conflict_accuracy_onset_step": onset_step(
            steps, conflict, conflict[-1], rises=True, settled=True
        ),
        "conflict_accuracy_tail_rise": None
        if tail is None or conflict[-1] is None
        else conflict[-1] - tail,
        "cheap_phase_start": start,
        "cheap_phase_end": end,
        "alignment_cheap_onset_step": onset_step(steps, cheap, cheap[-1], rises=True),
    }
    for name in ("gradient_alignment_cheap", "conflict_gradient_alignment"):
        pull, peak = _best_head_curve(steps, by_step, name)
        out[f"{name}_max_init"] = pull.get(0)
        out[f"{name}_max_peak"] = None if peak is None else pull[peak]
        out[f"{name}_peak_step"] = peak
    return out


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`--shard i/n` as (i, n): this process runs points i, i + n, i + 2n, ... of the sweep."""
    if text is None:
        return None
    i, sep, n = str(text).partition("/")
    if sep and i.strip().isdigit() and n.strip().isdigit() and int(i) < int(n):
        return int(i), int(n)
    raise ConfigError(
        [("--shard", f"{text!r} must be i/n with whole numbers 0 <= i < n, e.g. 0/2 and 1/2")]
    )


def shared_marker(sweep_dir: Path) -> str:
    """The token in the sweep folder's marker, written the first time (and kept, so that
    workers still running for an earlier driver find the token they were given)."""
    path = sweep_dir / SHARED_MARKER
    try:
        return json.loads(path.read_text())["token"]
    except (OSError, ValueError, KeyError, TypeError):
        token = secrets.token_hex(8)
        write_atomic(path, json.dumps({"token": token, "host": socket.gethostname()}) + "\n")
        return token


def shared_problem(sweep_dir: Path, token: str, driver: str) -> str | None:
    """Why this worker does not see the driver's sweep folder (None: it does)."""
    path = sweep_dir / SHARED_MARKER
    try:
        found = json.loads(path.read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        found = None
    if found == token:
        return None
    what = "finds no" if found is None else "finds another sweep's"
    return (
        f"the worker on {socket.gethostname()} {what} marker {path} written by the driver on "
        f"{driver}: it does not see the driver's sweep folder. The work folder (--workdir) must "
        "be on storage every worker shares, at the same path (NFS, a cluster file system); "
        "see the README, 'Sweeps across machines'"
    )


def train_point(
    point: Point,
    sweep_dir: Path,
    level_cache: dict,
    shared: SharedData,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train one point (all its seeds) and leave its rows in its run folder (ROWS_FILE);
    returns them. The one way a point runs, whoever runs it: the local loop, a shard, a Ray
    task or a SLURM array task (`point_job`). A failure becomes rows that say so."""
    t0 = time.perf_counter()
    levels, chance = task_levels(point.experiment, level_cache), None
    run_dir = safe_join(sweep_dir, point.run_name)
    try:
        data = shared.take(point)
        chance = data.chance
        result = train(point.experiment, run_dir, data=data, progress=progress)
        rows = _rows_for(point, result, _eval_history(run_dir), levels)
        if point.probe:
            rows = _probe(run_dir, rows, data)
    except Diverged as e:
        wall = time.perf_counter() - t0
        rows = _failed_rows(point, "diverged", str(e), wall, levels, chance)
    except (KeyboardInterrupt, SystemExit, Preempted, RunFolderBusy):
        # Preempted: the run saved its state; the sweep stops and a rerun resumes it. Busy:
        # another process trains this run; its rows are its own to write.
        raise
    except Exception as e:  # noqa: BLE001 - one point's failure must not stop the sweep
        tb = traceback.format_exc(limit=3)
        error = f"{type(e).__name__}: {e}\n{tb}"
        rows = _failed_rows(point, "failed", error, time.perf_counter() - t0, levels, chance)
    finally:
        shared.release(point)
    on_primary(lambda: _write_rows(run_dir, rows), f"writing {ROWS_FILE}")
    return rows


def _write_rows(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)  # a point may fail before its run starts
        write_jsonl(run_dir / ROWS_FILE, rows)
    except OSError:  # the folder cannot hold them (a file in its way): beside it, still read
        write_jsonl(_rows_beside(run_dir), rows)


def _rows_beside(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.{ROWS_FILE}"


def point_rows(sweep_dir: Path, run: str) -> list[dict[str, Any]]:
    """The rows a point left (in its run folder, else beside it); [] if it left none."""
    return read_jsonl(sweep_dir / run / ROWS_FILE) or read_jsonl(_rows_beside(sweep_dir / run))


@dataclasses.dataclass(frozen=True)
class PointJob:
    """What a worker is sent for one point: the point, the driver's sweep folder (absolute),
    the token of its marker and the driver's host (to check it shares the folder)."""

    point: Point
    sweep_dir: str
    marker: str
    driver: str
    gpus: float = 0.0  # the share of one accelerator the point was given


# A Ray worker process runs many points: each task's reference levels are computed once.
_WORKER_LEVELS: dict = {}


def point_job(job: PointJob) -> dict[str, str]:
    """A worker's whole part in a sweep (one Ray task, one SLURM array task): check that it
    sees the driver's folder (before anything compiles), then `train_point` unless the run
    already has ok rows. Returns {"status", "message"}: the rows' status, or `not_shared`,
    `busy` (another process trains the run) or `preempted`, which leave no rows."""
    sweep_dir = Path(job.sweep_dir)
    if problem := shared_problem(sweep_dir, job.marker, job.driver):
        return {"status": "not_shared", "message": problem}
    if _all_ok(point_rows(sweep_dir, job.point.run_name)):
        return {"status": "ok", "message": "already done"}
    if 0 < job.gpus < 1:  # JAX would take 75% of the device; leave room for its co-tenants
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 * job.gpus:.3f}")
    try:
        rows = train_point(job.point, sweep_dir, _WORKER_LEVELS, SharedData([job.point]), False)
    except RunFolderBusy as e:
        return {"status": "busy", "message": str(e)}
    except Preempted as e:
        return {"status": "preempted", "message": str(e)}
    return {"status": rows[0]["status"], "message": rows[0]["error"].split("\n")[0][:300]}


def points_without_rows(sweep_dir: str | Path) -> list[str]:
    """The points sweep.json lists that have no row in the results table."""
    sweep_dir = Path(sweep_dir)
    meta_path = sweep_dir / SWEEP_FILE
    if not meta_path.is_file():
        return []
    have = {r["run"] for r in read_jsonl(sweep_dir / RESULTS_FILE)}
    return [p for p in json.loads(meta_path.read_text())["points"] if p not in have]


def collect_results(sweep_dir: str | Path) -> list[str]:
    """Collect every run folder's rows into the sweep's results table (what `ablate report`
    does first, merging what shards or workers left); returns the runs whose rows changed."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []  # the report says what is missing
    meta_path = sweep_dir / SWEEP_FILE
    points = json.loads(meta_path.read_text())["points"] if meta_path.is_file() else []
    runs = points + sorted(
        d.name
        for d in sweep_dir.iterdir()
        if point_rows(sweep_dir, d.name) and d.name not in points
    )
    return ResultsTable(sweep_dir / RESULTS_FILE, order=points).collect(runs)


def run_sweep(
    experiment_file: str | Path,
    *,
    overrides: Sequence[str] = (),
    workdir: str | Path = "runs",
    progress: bool = True,
    report: bool = True,
    executor: str = "local",
    shard: str | None = None,
    options: Any = None,
) -> str:
    """Run every point not yet done, collect their rows, then write the report; returns a
    short summary.

    `executor` runs the points here one after another (`local`), as Ray tasks or as a SLURM
    job array (`options`: `executors.RayOptions` / `SlurmOptions`); `shard` ("i/n") runs this
    process's slice of the points here and leaves merging to `ablate report`.
    """
    from ablate import executors

    slice_ = parse_shard(shard)
    engine = executors.check(executor, options, sharded=slice_ is not None)
    data = apply_overrides(load_toml(experiment_file), overrides)
    name, points = expand(data, default_name=Path(experiment_file).stem)
    remote = executor != "local"
    refused: dict[tuple[str, str], list[str]] = {}  # one line per problem, naming its runs
    for point in [] if remote else points:  # a worker checks its own devices (in `train`)
        tc = point.experiment.train
        try:
            check_mesh(tc.mesh, len(tc.seeds), tc.batch_size)
        except ConfigError as e:
            for problem in e.problems:
                refused.setdefault(problem, []).append(point.run_name)
    if refused:  # before the sweep folder is made
        raise ConfigError(
            [
                (path, f"{msg} ({'every run' if len(runs) == len(points) else ', '.join(runs)})")
                for (path, msg), runs in refused.items()
            ]
        )
    sweep_dir = safe_join(workdir, name)
    sweep_dir.mkdir(parents=True, exist_ok=True)

    # In a multi-process run every process trains every point; process 0 writes the files.
    def write_sweep_files():
        write_atomic(
            sweep_dir / SWEEP_FILE,
            json.dumps(
                {
                    "name": name,
                    "experiment_file": str(experiment_file),
                    "overrides": list(overrides),
                    "command": " ".join(
                        [
                            "ablate",
                            "sweep",
                            str(experiment_file),
                            *(f"--set {o}" for o in overrides),
                        ]
                    ),
                    "points": [p.run_name for p in points],
                },
                indent=2,
            ),
        )
        return shared_marker(sweep_dir)

    # The driver of remote workers never starts JAX (it would take an accelerator's memory).
    primary = True if remote else is_primary()
    marker = write_sweep_files() if remote else on_primary(write_sweep_files, "writing the sweep")
    table = ResultsTable(sweep_dir / RESULTS_FILE, order=[p.run_name for p in points])
    if slice_ is not None:  # a shard writes run folders only; `ablate report` merges them
        here, legacy = points[slice_[0] :: slice_[1]], _by_run(table.rows())
        done = {
            p.run_name
            for p in here
            if _all_ok(point_rows(sweep_dir, p.run_name) or legacy.get(p.run_name))
        }
    else:
        here = points
        if primary:
            table.collect([p.run_name for p in points])  # what workers finished meanwhile
        done = table.done()
    todo = [p for p in here if p.run_name not in done]

    from tqdm.auto import tqdm

    where = "" if slice_ is None else f" shard {shard}"
    bar = tqdm(
        total=len(here),
        initial=len(here) - len(todo),
        desc=f"sweep {name}{where}",
        unit="run",
        disable=not (progress and primary),
    )
    counts: Counter = Counter()

    def finished(run: str, status: str) -> None:
        counts[status] += 1
        if primary and slice_ is None:
            table.collect([run])
        bar.update(1)

    if not remote:
        level_cache, shared = {}, SharedData(todo)
        for point in todo:
            bar.set_postfix_str(point.run_name)
            rows = train_point(point, sweep_dir, level_cache, shared, progress=progress)
            finished(point.run_name, rows[0]["status"])
    else:
        by_run = {p.run_name: p for p in todo}
        host = socket.gethostname()
        gpus = getattr(options, "gpus_per_point", 0.0)
        jobs = {
            p.run_name: PointJob(p, str(sweep_dir.absolute()), marker, host, gpus) for p in todo
        }

        def on_result(run: str, outcome: dict[str, str]) -> None:
            if outcome["status"] == "not_shared":
                raise ConfigError([("--workdir", outcome["message"])])
            # The worker died (or its job ended) mid-point; rows it finished are kept.
            if outcome["status"] == "lost" and not _all_ok(point_rows(sweep_dir, run)):
                rows = _failed_rows(by_run[run], "failed", outcome["message"], None, {}, None)
                _write_rows(sweep_dir / run, rows)
            finished(run, outcome["status"])

        engine(point_job, jobs, options, sweep_dir, on_result)
    bar.close()
    failures = sum(n for status, n in counts.items() if status in ("failed", "diverged", "lost"))
    unfinished = counts["busy"] + counts["preempted"]
    lines = [
        f"sweep folder: {sweep_dir}",
        f"{len(here)} runs{where}: {len(here) - len(todo)} already done, "
        f"{len(todo) - failures - unfinished} trained now, {failures} failed"
        + (f", {unfinished} stopped or busy elsewhere (rerun to finish)" if unfinished else ""),
    ]
    if slice_ is not None:
        lines.append(f"merge the shards' rows and report: ablate report {sweep_dir}")
    elif report and primary:
        from ablate.report import write_report
        from ablate.view import write_view

        lines.append(f"report: {write_report(sweep_dir)}")
        try:
            lines.append(f"view: {write_view(sweep_dir)} (open it in a browser)")
        except ConfigError as e:  # a view.html ablate did not write: kept, and said so
            lines.append(f"view: not written ({e}); `ablate view {sweep_dir} --out FILE`")
    lines.append(f"TensorBoard: ablate tensorboard {sweep_dir}")
    return "\n".join(lines)
