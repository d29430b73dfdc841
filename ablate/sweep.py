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

A task entry's `label` names it in run folders and the report (default: the task name);
`overrides` holds dotted fields for that task's points only. The rest of the file (`[model]`, `[optim]`, `[train]`) is the base every point starts
from. Each point is validated before anything trains; rows go to `results.jsonl` (one per
run and seed) as runs finish; a point already recorded as ok is skipped on rerun, and
failed points are retried (their old rows replaced, never duplicated).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ablate.config import ConfigError, apply_overrides, load_toml, to_dict
from ablate.distributed import check_mesh, is_primary, on_primary
from ablate.experiment import NAME_RE, Experiment, build_experiment, safe_join
from ablate.metrics import nan_to_none, perplexity
from ablate.model import frozen_parts
from ablate.train import Diverged, Preempted, train

RESULTS_FILE = "results.jsonl"
SWEEP_FILE = "sweep.json"


@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration of the sweep: a run folder trained with all seeds at once."""

    run_name: str
    task: str
    variant: str
    grid: dict[str, Any]
    experiment: Experiment
    probe: bool = False


def _variant_entry(entry: Any, path: str) -> tuple[str, dict[str, Any]]:
    """(label, model overrides) for a variant given as a name or a table."""
    if isinstance(entry, str):
        return entry, {"attention": entry}
    if isinstance(entry, Mapping):
        unknown = set(entry) - {"label", "attention", "freeze"}
        if unknown:
            raise ConfigError(
                [
                    (
                        path,
                        f"unknown keys {sorted(unknown)}; a variant table has "
                        "label, attention, freeze",
                    )
                ]
            )
        if "label" not in entry or "attention" not in entry:
            raise ConfigError([(path, "a variant table needs label and attention")])
        model = {"attention": entry["attention"]}
        if "freeze" in entry:
            model["freeze"] = entry["freeze"]
        return str(entry["label"]), model
    raise ConfigError([(path, f"expected a variant name or table, got {entry!r}")])


def expand(data: Mapping[str, Any], default_name: str = "sweep") -> tuple[str, list[Point]]:
    """The sweep's name and every point, all validated (every problem raised at once)."""
    sweep = dict(data.get("sweep", {}))
    problems: list[tuple[str, str]] = []
    allowed = {"name", "variants", "tasks", "grid", "probe"}
    for key in sweep:
        if key not in allowed:
            problems.append(
                (f"sweep.{key}", f"unknown field; allowed: {', '.join(sorted(allowed))}")
            )
    name = sweep.get("name", default_name)
    if not isinstance(name, str) or not NAME_RE.match(name):
        problems.append(("sweep.name", f"{name!r} must be letters, digits, '_', '-', '.'"))
    base = {k: v for k, v in data.items() if k != "sweep"}
    tasks = sweep.get("tasks") or [base.get("task", {})]
    variants = sweep.get("variants") or [base.get("model", {}).get("attention", "learned")]
    probe = sweep.get("probe", False)
    probe = ["learned"] if probe is True else ([] if probe is False else probe)
    if not isinstance(probe, list) or not all(isinstance(v, str) for v in probe):
        problems.append(("sweep.probe", "must be true, false or a list of variant labels"))
        probe = []
    grid = sweep.get("grid", {})
    if not isinstance(grid, Mapping) or not all(isinstance(v, list) for v in grid.values()):
        problems.append(("sweep.grid", "must be a table of field = [values, ...]"))
        grid = {}

    points, labels = [], set()
    grid_keys = sorted(grid)
    for t_idx, task_entry in enumerate(tasks):
        if not isinstance(task_entry, Mapping):
            problems.append((f"sweep.tasks[{t_idx}]", f"expected a task table, got {task_entry!r}"))
            continue
        task_entry = dict(task_entry)
        task_overrides = task_entry.pop("overrides", {})
        task_label = str(task_entry.pop("label", task_entry.get("name", "task")))
        for v_idx, v_entry in enumerate(variants):
            try:
                label, model_over = _variant_entry(v_entry, f"sweep.variants[{v_idx}]")
            except ConfigError as e:
                if t_idx == 0:
                    problems.extend(e.problems)
                continue
            for values in itertools.product(*(grid[k] for k in grid_keys)):
                point_grid = dict(zip(grid_keys, values))
                suffix = "".join(f"-{k.split('.')[-1]}{v}" for k, v in point_grid.items())
                run_name = f"{task_label}-{label}{suffix}"
                if run_name in labels:
                    problems.append(
                        (f"sweep.tasks[{t_idx}]", f"two points share the run name {run_name!r}")
                    )
                    continue
                labels.add(run_name)
                point = dict(base)
                point["task"] = task_entry
                point["model"] = {**base.get("model", {}), **model_over}
                point["name"] = run_name
                overrides = [f"{k}={json.dumps(v)}" for k, v in point_grid.items()]
                overrides += [f"{k}={json.dumps(v)}" for k, v in dict(task_overrides).items()]
                try:
                    exp = build_experiment(apply_overrides(point, overrides))
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
    """results.jsonl: one row per (run, seed); rewritten atomically, never duplicated."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def done(self) -> set[str]:
        """Runs whose every row is ok (skipped on resume)."""
        status: dict[str, bool] = {}
        for r in self.rows():
            status[r["run"]] = status.get(r["run"], True) and r["status"] == "ok"
        return {run for run, ok in status.items() if ok}

    def replace_run(self, run: str, new_rows: list[dict[str, Any]]) -> None:
        rows = [r for r in self.rows() if r["run"] != run] + new_rows
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(self.path)
        self._write_csv(rows)

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
            "steps",
            "wall_seconds",
            "compile_seconds",
            "error",
        ]
        tmp = self.path.with_name("results.csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path.with_name("results.csv"))


def task_levels(exp: Experiment, cache: dict | None = None) -> dict[str, Any]:
    """The task's reference levels as row fields (computed once per task and visibility)."""
    from ablate.reference import no_levels_row, reference_levels

    cache = {} if cache is None else cache
    key = (exp.task.name, repr(exp.task.config), exp.model.causal)
    if key not in cache:
        levels = reference_levels(exp.task, causal=exp.model.causal)
        cache[key] = no_levels_row() if levels is None else levels.row()
    return cache[key]


def _point_fields(point: Point, seed: int, levels: dict[str, Any]) -> dict[str, Any]:
    """What every row of a point says about its configuration."""
    exp = point.experiment
    return {
        "run": point.run_name,
        "task": point.task,
        "context_need": exp.task.context_need,
        "variant": point.variant,
        "attention": to_dict(exp.model.attention),
        "frozen": frozen_parts(exp.model),
        "grid": point.grid,
        "seed": seed,
        "chance": exp.task.chance,
        **levels,
        "run_dir": point.run_name,
    }


def _rows_for(point: Point, result, init_alignment: dict, levels: dict) -> list[dict[str, Any]]:
    rows = []
    for k, seed in enumerate(result.seeds):
        alignment = np.asarray(result.final["alignment"][k], dtype=float)
        finite = alignment[np.isfinite(alignment)]
        rows.append(
            {
                **_point_fields(point, seed, levels),
                "status": "ok",
                "error": "",
                "accuracy": result.final["accuracy"][k],
                "sequence_accuracy": result.final["sequence_accuracy"][k],
                "loss": result.final["loss"][k],
                "perplexity": perplexity(result.final["loss"][k]),
                "alignment": nan_to_none(alignment.tolist()),
                "alignment_max": float(finite.max()) if finite.size else None,
                "alignment_uniform": nan_to_none(result.final["uniform_alignment"][k]),
                "alignment_max_init": init_alignment.get(seed),
                "steps": result.steps,
                "wall_seconds": result.wall_seconds,
                "compile_seconds": result.compile_seconds,
            }
        )
    return rows


def _failed_rows(
    point: Point, status: str, error: str, wall: float, levels: dict
) -> list[dict[str, Any]]:
    return [
        {**_point_fields(point, seed, levels), "status": status, "error": error}
        | {"wall_seconds": wall}
        for seed in point.experiment.train.seeds
    ]


PROBE_KINDS = ("zero", "mean_pattern")


def _probe(run_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Post-hoc head ablation of a finished run; a probe failure is noted, not fatal."""
    from ablate.probe import probe_run

    try:
        probe_run(run_dir, kinds=PROBE_KINDS)
    except Exception as e:  # noqa: BLE001 - the run itself is fine; say what the probe hit
        return [{**r, "error": f"probe failed: {type(e).__name__}: {e}"} for r in rows]
    return rows


def _init_alignment(run_dir: Path) -> dict[int, float]:
    """Best head alignment at step 0 per seed, read from the run's metrics file."""
    out = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "eval" and row.get("step") == 0:
            values = [a for r in row["alignment"] for a in r if a is not None]
            out[row["seed"]] = max(values) if values else None
    return out


def run_sweep(
    experiment_file: str | Path,
    *,
    overrides: Sequence[str] = (),
    workdir: str | Path = "runs",
    progress: bool = True,
    report: bool = True,
) -> str:
    """Run every point not yet done, then write the report; returns a short summary."""
    data = apply_overrides(load_toml(experiment_file), overrides)
    name, points = expand(data, default_name=Path(experiment_file).stem)
    refused: dict[tuple[str, str], list[str]] = {}  # one line per problem, naming its runs
    for point in points:
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
    def write_sweep_file():
        (sweep_dir / SWEEP_FILE).write_text(
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
            )
        )

    on_primary(write_sweep_file, f"writing {SWEEP_FILE}")
    primary = is_primary()
    table = ResultsTable(sweep_dir / RESULTS_FILE)
    done = table.done()
    todo = [p for p in points if p.run_name not in done]

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(points),
        initial=len(points) - len(todo),
        desc=f"sweep {name}",
        unit="run",
        disable=not (progress and primary),
    )
    failures, level_cache = 0, {}
    for point in todo:
        bar.set_postfix_str(point.run_name)
        t0 = time.perf_counter()
        levels = task_levels(point.experiment, level_cache)
        try:
            run_dir = safe_join(sweep_dir, point.run_name)
            result = train(point.experiment, run_dir, progress=progress)
            rows = _rows_for(point, result, _init_alignment(run_dir), levels)
            if point.probe:
                rows = _probe(run_dir, rows)
        except Diverged as e:
            rows = _failed_rows(point, "diverged", str(e), time.perf_counter() - t0, levels)
        except (KeyboardInterrupt, SystemExit, Preempted):
            # Preempted: the run saved its state; the sweep stops and a rerun resumes it.
            raise
        except Exception as e:  # noqa: BLE001 - one point's failure must not stop the sweep
            tb = traceback.format_exc(limit=3)
            error = f"{type(e).__name__}: {e}\n{tb}"
            rows = _failed_rows(point, "failed", error, time.perf_counter() - t0, levels)
        failures += rows[0]["status"] != "ok"
        if primary:
            table.replace_run(point.run_name, rows)
        bar.update(1)
    bar.close()
    lines = [
        f"sweep folder: {sweep_dir}",
        f"{len(points)} runs: {len(points) - len(todo)} already done, "
        f"{len(todo) - failures} trained now, {failures} failed",
    ]
    if report and primary:
        from ablate.report import write_report

        lines.append(f"report: {write_report(sweep_dir)}")
    lines.append(f"TensorBoard: ablate tensorboard {sweep_dir}")
    return "\n".join(lines)
