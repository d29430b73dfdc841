"""The host loop of training: run folder, logs, checkpoints, resume, around the compiled core.

`train` loads the task's data once (or takes it from a sweep), builds the experiment's
`Programs` (ablate/core.py: the pure step, chunk and evaluation, compiled once for all seeds)
and runs them: evaluate at step 0, then dispatch a chunk of steps, check the fetched metrics,
log, evaluate, draw and save, until done. The logger writes what it is given and computes
nothing. In a multi-process run every process runs this loop; process 0 alone writes logs
and results.

Faults `train` survives (each proved by tests/test_reliability.py): a kill at any moment
(resume from the newest checkpoint that passes its checksums; logs and TensorBoard are cut
back to it, and the metrics of a half-logged window ride in the checkpoint, so the resumed
run logs exactly what an uninterrupted one would); SIGTERM (save at the next dispatch
boundary, `Preempted`); NaN/Inf (`Diverged` with the first bad step, before anything of
that step is saved); token ids the model cannot take (`DataError`, checked on the host
before compiling and counted on the device every step); a full disk (`CheckpointError` or
`OSError`, older checkpoints untouched); two processes on one run folder (a lock).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ablate.checkpoint import Checkpointer, CheckpointMismatch
from ablate.config import ConfigError, flatten
from ablate.core import (
    CROSS_PER_HEAD,
    INVALID_TOKENS,
    PER_HEAD,
    Examples,
    Programs,
    TrainState,
    bad_ids,
)
from ablate.data import DataError  # one class for every bad-data error (exit 3)
from ablate.distributed import any_process, check_mesh, is_primary, on_primary
from ablate.experiment import Experiment
from ablate.logging import MetricsFile, TensorBoardWriter, truncate_events
from ablate.metrics import nan_to_none, perplexity
from ablate.plots import patterns_png
from ablate.runfolder import (  # noqa: F401  (Preempted: part of this API)
    BACKUP_CONFIG,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FINAL_FILE,
    KEPT_FINAL,
    METRICS_FILE,
    PATTERNS_FILE,
    PATTERNS_INIT_FILE,
    Preempted,
    RunFolderBusy,
    RunLock,
    SigtermFlag,
    check_run_config,
    free_name,
    note,
    seed_dir,
    write_atomic,
    write_npz,
)
from ablate.tasks import TaskData
from ablate.tasks.base import outside

HPARAM_METRICS = ("eval/accuracy", "eval/sequence_accuracy", "eval/loss", "eval/chance")


class Diverged(RuntimeError):
    """Loss or parameters became NaN/Inf; `step` is the first bad step."""

    def __init__(self, step: int, seed: int, what: str):
        self.step, self.seed = step, seed
        super().__init__(f"training diverged at step {step} (seed {seed}): {what} is not finite")


def check_data(programs: Programs, arrays: Any) -> None:
    """Raise DataError if a seed's first training batch or the first eval batch is unusable."""
    exp, sampler, replicated = programs.exp, programs.sampler, programs.placement.replicated
    # Replicated outputs: every process of a multi-host run can read them.
    first_train = jax.device_get(
        jax.jit(
            jax.vmap(lambda k, a: sampler.train(a, k, 0), in_axes=(0, None)),
            out_shardings=replicated,
        )(programs.keys_Z, arrays)
    )
    batches = [
        (f"training batch 1 of seed {s}", jax.tree.map(lambda x, k=k: x[k], first_train))
        for k, s in enumerate(exp.train.seeds)
    ]
    first_eval = jax.jit(lambda a: sampler.eval(a, 0), out_shardings=replicated)(arrays)
    batches.append(("eval batch 1", jax.device_get(first_eval)))
    problems = []
    for where, batch in batches:
        problems += batch_problems(batch, exp, where)
    if problems:
        raise DataError(
            f"task {exp.task.name!r} gives batches this model cannot take:\n  "
            + "\n  ".join(problems)
        )


def batch_problems(batch, exp: Experiment, where: str) -> list[str]:
    """What makes a host-side batch unusable for `exp.model`, each with its first location."""
    model = exp.model
    n_out = model.vocab_size
    inputs, targets, weights = (np.asarray(x) for x in (batch.inputs, batch.targets, batch.weights))
    found = []
    if inputs.ndim != 2 or not np.issubdtype(inputs.dtype, np.integer):
        return [
            f"{where}: inputs must be integer token ids shaped (batch, length), got "
            f"{inputs.dtype}{list(inputs.shape)}"
        ]
    if getattr(batch, "source", None) is not None:  # a seq2seq batch: its source too
        source = np.asarray(batch.source)
        if source.ndim != 2 or source.shape[1] > model.source_len:
            found.append(
                f"{where}: sources shaped {list(source.shape)} do not fit model.source_len = "
                f"{model.source_len}"
            )
        elif (bad := outside(source, model.source_vocab_size)).any():
            b, i = (int(x) for x in np.argwhere(bad)[0])
            found.append(
                f"{where}: {int(bad.sum())} source token ids outside [0, "
                f"model.source_vocab_size = {model.source_vocab_size}); first: {source[b, i]} "
                f"at sequence {b}, position {i}"
            )
    if inputs.shape[1] > model.seq_len:
        found.append(
            f"{where}: sequences of length {inputs.shape[1]} exceed model.seq_len = "
            f"{model.seq_len} (the position table has {model.seq_len} rows)"
        )

    def first_bad(mask, values, name, allowed):
        if mask.any():
            b, i = (int(x) for x in np.argwhere(mask)[0])
            found.append(
                f"{where}: {int(mask.sum())} {name} outside {allowed}; first: "
                f"{values[b, i]:g} at sequence {b}, position {i}"
            )

    vocab = f"[0, model.vocab_size = {model.vocab_size})"
    if targets.shape != inputs.shape or weights.shape != inputs.shape:
        first_bad(outside(inputs, model.vocab_size), inputs, "token ids", vocab)
        found.append(
            f"{where}: targets {list(targets.shape)} and weights "
            f"{list(weights.shape)} must be shaped like inputs {list(inputs.shape)}"
        )
        return found
    bad_inputs, bad_targets = bad_ids(inputs, targets, weights, model)
    first_bad(bad_inputs, inputs, "token ids", vocab)
    first_bad(bad_targets, targets, "labels", f"[0, {n_out}) at scored positions")
    first_bad(~np.isfinite(weights) | (weights < 0), weights, "weights", "[0, inf)")
    return found


@dataclasses.dataclass
class RunResult:
    """What a finished run reports (also written to final.json)."""

    run_dir: str
    seeds: list[int]
    final: dict[str, list]
    chance: float
    steps: int
    wall_seconds: float
    compile_seconds: float


def train(
    exp: Experiment,
    run_dir: str | Path,
    *,
    data: TaskData | None = None,
    progress: bool = True,
    allow_config_change: bool = False,
    stop_after: int | None = None,
) -> RunResult:
    """Train every seed of `exp` in `run_dir`, resuming from its latest good checkpoint.

    `data` is the task's loaded data (`exp.task.load()`, read here when not given: a sweep
    loads it once for all the runs of a task). `stop_after` ends the loop early at that step
    (with a checkpoint), as a preemption would.
    """
    run_dir = Path(run_dir)
    # Before the run folder is made: a mesh this machine cannot hold leaves nothing behind,
    # and neither does data that cannot be read.
    check_mesh(exp.train.mesh, len(exp.train.seeds), exp.train.batch_size)
    data = exp.task.load() if data is None else data
    with SigtermFlag() as sigterm:
        # In a multi-process run, process 0 holds the lock for all (they share the folder);
        # what only process 0 does is agreed on (`on_primary`): a failure stops them all.
        lock = on_primary(lambda: RunLock(run_dir, sigterm), "locking the run folder")
        try:
            return _train_locked(
                exp,
                data,
                run_dir,
                sigterm,
                progress=progress,
                allow_config_change=allow_config_change,
                stop_after=stop_after,
            )
        finally:
            if lock is not None:
                lock.release()


def _train_locked(
    exp, data, run_dir, sigterm, *, progress, allow_config_change, stop_after
) -> RunResult:
    t_start = time.perf_counter()
    tc = exp.train
    config = exp.to_dict()
    changed = check_run_config(run_dir, config, allow_config_change)
    if tc.compile_cache:
        enable_compile_cache()

    programs = Programs(exp)
    if jax.device_count() > 1:
        note(programs.placement.describe())
    arrays = programs.place(data.arrays)
    check_data(programs, arrays)
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, keep=tc.keep_checkpoints)
    logger = bar = None
    try:
        ckpt.remove_unfinished()
        try:
            restored = ckpt.restore_latest(programs.abstract_state())
        except CheckpointMismatch as e:
            raise ConfigError([("", str(e))]) from None
        for problem in ckpt.problems:
            note(problem)
        if restored is None:
            if ckpt.problems:
                note(f"no intact checkpoint left in {ckpt.directory}: starting from step 0")
            start, state, pending = 0, programs.init(), []
        else:
            start, state, meta = restored
            pending = _pending_from_meta(meta)
            note(f"resuming {run_dir} from checkpoint step {start}")
        # Written only once the checkpoint is known to fit, so a refused change leaves it.
        on_primary(lambda: _write_config(run_dir, config, changed), "writing config.json")
        _stop_if_asked(sigterm, start)
        if start >= tc.steps and (run_dir / FINAL_FILE).is_file():
            return RunResult(**json.loads((run_dir / FINAL_FILE).read_text()))
        if changed and (run_dir / FINAL_FILE).is_file():
            # The run is being extended (an allowed config change): keep the old result.
            kept_as = KEPT_FINAL.format(step=start)
            on_primary(
                lambda: os.replace(run_dir / FINAL_FILE, free_name(run_dir, kept_as, ".json")),
                "keeping final.json",
            )

        # Logs are cut back to the checkpoint (everything if there is none), whatever each
        # file held at the kill; the hparams session is rewritten at the end.
        # Only process 0 writes logs; the others compute the same values and drop them.
        keep_through = start if restored is not None else -1

        def open_logs():
            metrics_file = MetricsFile(run_dir / METRICS_FILE)
            metrics_file.truncate_after(keep_through)
            for s in tc.seeds:
                truncate_events(seed_dir(run_dir, s), keep_through, drop_hparams=start < tc.steps)
            return metrics_file, [TensorBoardWriter(seed_dir(run_dir, s)) for s in tc.seeds]

        metrics_file, writers = on_primary(open_logs, "opening the logs") or (None, [])
        chance = float(data.chance)
        has_pattern_NH = programs.definition.has_pattern_NH
        cross_NH = programs.definition.cross_has_pattern_NH
        logger = _Logger(writers, metrics_file, chance, tc.seeds, has_pattern_NH, cross_NH)
        _stop_if_asked(sigterm, start)

        if start == 0:
            logger.evaluation(programs.evaluate(state, arrays), 0)
            drawn = programs.patterns(state, arrays)
            logger.heatmaps(drawn, 0, "init")
            if metrics_file is not None:
                write_examples(run_dir / PATTERNS_INIT_FILE, drawn, 0, programs)
        _stop_if_asked(sigterm, start)
        programs.compile(state, arrays)
        _stop_if_asked(sigterm, start)

        # Dispatch, log, evaluate and save until done.
        bar = _progress(progress and is_primary(), tc.steps, start, exp.name)
        step, t_window, drawn = start, time.perf_counter(), None
        eval_at = set(tc.eval_steps())
        final = programs.evaluate(state, arrays) if start >= tc.steps else {}
        while step < tc.steps:
            state, chunk_metrics = programs.train_chunk(state, arrays)
            pending.append(chunk_metrics)
            step += tc.steps_per_dispatch
            last = step == tc.steps
            log_now = last or step % tc.log_every == 0
            eval_now = step in eval_at  # holds the last step
            draw_now = last or (tc.heatmap_every and step % tc.heatmap_every == 0)
            checked = log_now or eval_now or draw_now
            if checked:
                # Nothing of a bad step is logged, evaluated or saved.
                check_window(pending, step, exp)
                _check_params(programs, state, step, tc.seeds)
            if log_now:
                rate = _steps_in(pending) / (time.perf_counter() - t_window)
                shown = logger.training(pending, step, rate, programs.compile_seconds)
                pending, t_window = [], time.perf_counter()
                bar.update(step - bar.n)
                bar.set_postfix(shown)
            # Everything logged for a step is written before that step's checkpoint, so a
            # resume from it never writes the step twice.
            if eval_now:
                final = programs.evaluate(state, arrays)
                logger.evaluation(final, step)
            if draw_now:
                drawn = programs.patterns(state, arrays)
                logger.heatmaps(drawn, step, "trained")
            if last and metrics_file is not None:
                write_examples(run_dir / PATTERNS_FILE, drawn, step, programs)
                logger.hparams(exp)
            # Read the flag only now: a SIGTERM during the evaluation above still saves here.
            # Every process must agree to stop (a SIGTERM may reach only some).
            preempted = any_process(sigterm.raised)
            stopping = preempted or (stop_after is not None and step >= stop_after)
            if last or stopping or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                if not checked:
                    check_window(pending, step, exp)
                    _check_params(programs, state, step, tc.seeds)
                logger.flush()
                # The metrics of a half-logged window ride along, so the resumed run logs the
                # same rows as an uninterrupted one.
                meta = {"step": step, "name": exp.name, "pending": _pending_to_meta(pending)}
                ckpt.save(step, state, meta)
            if last:
                break
            if preempted or any_process(sigterm.raised):  # also when it came during the save
                raise Preempted(step)
            if stopping:
                break
    finally:
        _close_quietly(bar, logger, ckpt)

    result = RunResult(
        run_dir=str(run_dir),
        seeds=list(tc.seeds),
        final={k: np.asarray(v).tolist() for k, v in final.items()},
        chance=chance,
        steps=step,
        wall_seconds=time.perf_counter() - t_start,
        compile_seconds=programs.compile_seconds,
    )
    if step == tc.steps:
        final_json = dataclasses.asdict(result)
        on_primary(lambda: _write_json(run_dir / FINAL_FILE, final_json), f"writing {FINAL_FILE}")
    return result


def write_examples(path: Path, drawn: Examples, step: int, programs: Programs) -> None:
    """The viewer's examples of every seed at `step` (`Examples` with a leading Z axis):
    patterns in float16, the token ids with the task's label for each, which heads have a
    pattern. The eval sequences are the same for every seed, so the labels are seed 0's."""
    task, definition = programs.exp.task, programs.definition
    labels = lambda ids_EL: np.array([task.token_labels(ids_L) for ids_L in ids_EL], dtype=str)
    arrays = {
        "step": np.int64(step),
        "probs": drawn.probs.astype(np.float16),
        "deps": drawn.deps,
        "weights": drawn.weights,
        "inputs": drawn.inputs,
        "targets": drawn.targets,
        "input_labels": labels(drawn.inputs[0]),
        "target_labels": labels(drawn.targets[0]),
        "has_pattern": definition.has_pattern_NH,
    }
    if drawn.source is not None:  # an encoder-decoder: its source and cross-attention too
        arrays |= {
            "source": drawn.source,
            "source_labels": np.array([task.source_labels(s) for s in drawn.source[0]], dtype=str),
            "cross_probs": drawn.cross_probs.astype(np.float16),
            "cross_deps": drawn.cross_deps,
            "cross_has_pattern": definition.cross_has_pattern_NH,
        }
    write_npz(path, **arrays)


def _write_config(run_dir: Path, config: dict, changed: list[str]) -> None:
    """config.json, the one it replaces kept under a free name when it changed (allowed)."""
    if changed:
        backup = free_name(run_dir, BACKUP_CONFIG, ".json")
        shutil.copyfile(run_dir / CONFIG_FILE, backup)
        note(f"config changed (allowed): {'; '.join(changed)}; old one kept as {backup.name}")
    _write_json(run_dir / CONFIG_FILE, config)


def _stop_if_asked(sigterm: SigtermFlag, start: int | None) -> None:
    if any_process(sigterm.raised):
        raise Preempted(start, saved=False)


def _steps_in(pending) -> int:
    return sum(int(np.shape(p["loss"])[-1]) for p in pending)


def _pending_to_meta(pending) -> dict[str, Any]:
    if not pending:
        return {}
    host = jax.device_get(pending)
    merged = {k: np.concatenate([p[k] for p in host], axis=1) for k in host[0]}
    return {k: {"dtype": str(v.dtype), "values": v.tolist()} for k, v in merged.items()}


def _pending_from_meta(meta: dict) -> list[dict[str, np.ndarray]]:
    saved = meta.get("pending") or {}
    if not saved:
        return []
    return [{k: np.asarray(v["values"], dtype=v["dtype"]) for k, v in saved.items()}]


def _close_quietly(*things) -> None:
    # Cleanup must not hide the error that brought us here (e.g. a full disk fails the flush).
    for close in (getattr(thing, "close", None) for thing in things):
        if close is None:
            continue
        try:
            close()
        except Exception as e:  # noqa: BLE001
            note(f"while closing: {type(e).__name__}: {e}")


def _check_params(programs: Programs, state: TrainState, step: int, seeds) -> None:
    ok_Z = programs.params_finite(state)
    if not ok_Z.all():
        raise Diverged(step, seeds[int(np.argmin(ok_Z))], "a parameter")


def check_window(pending: list, step: int, exp: Experiment) -> None:
    """Raise DataError/Diverged naming the first bad step of the unlogged window (fetched in place)."""
    if not pending:
        return
    pending[:] = jax.device_get(pending)
    merged = {k: np.concatenate([p[k] for p in pending], axis=1) for k in pending[0]}
    first = step - merged["loss"].shape[1] + 1  # the step the window's column 0 belongs to
    invalid = merged[INVALID_TOKENS] > 0
    if invalid.any():
        seed_idx, offset = np.argwhere(invalid)[0]
        raise DataError(
            f"step {first + int(offset)} (seed {exp.train.seeds[seed_idx]}): the task produced "
            f"{int(merged[INVALID_TOKENS][seed_idx, offset])} token ids or labels outside "
            f"the model's vocabulary ({exp.model.vocab_size}); nothing of this "
            "step was saved"
        )
    # The earliest bad step of any of them: a NaN gradient makes the next loss NaN too.
    # param_norm is of the parameters after the step's update.
    checked = {"loss": "loss", "grad_norm": "grad_norm", "param_norm": "a parameter"}
    bad = np.stack([~np.isfinite(merged[name]) for name in checked], -1)  # seed, step, name
    if bad.any():
        offset = int(np.argwhere(bad.any(axis=(0, 2)))[0, 0])
        seed_idx, which = (int(i) for i in np.argwhere(bad[:, offset])[0])
        raise Diverged(first + offset, exp.train.seeds[seed_idx], list(checked.values())[which])


class _Logger:
    """Writes the metrics it is given as TensorBoard scalars/images and JSON lines.

    Without a metrics file (processes other than 0) it writes nothing.
    """

    def __init__(
        self,
        writers,
        metrics_file: MetricsFile | None,
        chance: float,
        seeds,
        has_pattern_NH,
        cross_has_pattern_NH=None,
    ):
        self.writers, self.file, self.chance = writers, metrics_file, chance
        self.seeds, self.has_pattern_NH = list(seeds), has_pattern_NH
        self.cross_has_pattern_NH = cross_has_pattern_NH

    def training(self, pending, step: int, steps_per_sec: float, compile_s: float) -> dict:
        if self.file is None:  # not process 0: nothing to write
            return {}
        per_step = jax.device_get(pending)
        merged = {k: np.concatenate([p[k] for p in per_step], axis=1) for k in per_step[0]}
        merged.pop(INVALID_TOKENS, None)
        rows = []
        for k, (seed, writer) in enumerate(zip(self.seeds, self.writers)):
            values = {name: float(v[k].mean()) for name, v in merged.items()}
            values["learning_rate"] = float(merged["learning_rate"][k, -1])
            scalars = {f"train/{name}": v for name, v in values.items()}
            if math.isfinite(steps_per_sec):
                scalars["perf/steps_per_sec"] = steps_per_sec
                scalars["perf/compile_seconds"] = compile_s
            writer.scalars(scalars, step)
            # Flushed before the metrics row: whatever metrics.jsonl shows, TensorBoard has.
            writer.flush()
            rows.append({"step": step, "seed": seed, "kind": "train", **values})
        self.file.append(rows)
        return {"loss": f"{rows[0]['loss']:.3f}", "acc": f"{rows[0]['accuracy']:.3f}"}

    def evaluation(self, out: dict[str, np.ndarray], step: int) -> None:
        """The held-out metrics of every seed (leading axis Z), as `Programs.evaluate` gives them."""
        if self.file is None:
            return
        rows = []
        for k, (seed, writer) in enumerate(zip(self.seeds, self.writers)):
            scalars = {
                "eval/loss": out["loss"][k],
                "eval/perplexity": perplexity(out["loss"][k]) or math.nan,
                "eval/accuracy": out["accuracy"][k],
                "eval/sequence_accuracy": out["sequence_accuracy"][k],
                "eval/chance": self.chance,
                "attention/alignment_uniform": out["uniform_alignment"][k],
            }
            if "conflict_accuracy" in out:  # a task with a cheap route
                scalars["eval/conflict_accuracy"] = out["conflict_accuracy"][k]
                scalars["attention/alignment_uniform_cheap"] = out["uniform_alignment_cheap"][k]
            N, H = out["alignment"].shape[1:]
            for layer in range(N):
                for head in range(H):
                    if not self.has_pattern_NH[layer, head]:
                        continue
                    for name in (n for n in PER_HEAD if n in out):
                        scalars[f"attention/{name}/layer{layer}_head{head}"] = out[name][
                            k, layer, head
                        ]
                # NaN where a head has no pattern, or the task no dependency mask (real text).
                if np.isfinite(out["alignment"][k, layer]).any():
                    scalars[f"attention/alignment_max/layer{layer}"] = np.nanmax(
                        out["alignment"][k, layer]
                    )
            if self.cross_has_pattern_NH is not None:
                scalars |= self._cross_scalars(out, k)
            # Real text has no alignment: no NaN curves in TensorBoard.
            scalars = {
                t: v for t, v in scalars.items() if not t.startswith("attention/") or np.isfinite(v)
            }
            writer.scalars(scalars, step)
            row = {"step": step, "seed": seed, "kind": "eval", "chance": self.chance}
            for name, value in out.items():
                value = np.asarray(value[k])
                row[name] = value.tolist() if value.ndim else float(value)
            rows.append(nan_to_none(row))
        self.file.append(rows)

    def _cross_scalars(self, out: dict, k: int) -> dict:
        """Cross-attention scalars of seed k: per decoder layer and head, and the best head."""
        scalars = {"attention/cross_alignment_uniform": out["cross_uniform_alignment"][k]}
        N, H = out["cross_alignment"].shape[1:]
        for layer in range(N):
            for head in range(H):
                if self.cross_has_pattern_NH[layer, head]:
                    for name in CROSS_PER_HEAD:
                        scalars[f"attention/{name}/layer{layer}_head{head}"] = out[name][
                            k, layer, head
                        ]
            if np.isfinite(out["cross_alignment"][k, layer]).any():
                scalars[f"attention/cross_alignment_max/layer{layer}"] = np.nanmax(
                    out["cross_alignment"][k, layer]
                )
        return scalars

    def heatmaps(self, drawn: Examples, step: int, label: str) -> None:
        """Pattern images of the first eval sequence per seed, as `Programs.patterns` gives them
        (an encoder-decoder's cross-attention too, `patterns/cross_layerN`)."""
        scored_ZL = drawn.weights[:, 0] > 0
        parts = [("", drawn.probs, drawn.deps, self.has_pattern_NH)]
        if drawn.cross_probs is not None:
            parts.insert(
                0, ("cross_", drawn.cross_probs, drawn.cross_deps, self.cross_has_pattern_NH)
            )
        for prefix, probs_ZENHLS, deps_ZELS, has_pattern_NH in parts:
            what = "cross-attention layer" if prefix else "layer"
            for k, writer in enumerate(self.writers):
                for layer in range(probs_ZENHLS.shape[2]):
                    png, w, h = patterns_png(
                        probs_ZENHLS[k, 0, layer],
                        deps_ZELS[k, 0] & scored_ZL[k][:, None],
                        f"{what} {layer} ({label}, step {step})",
                        has_pattern_H=has_pattern_NH[layer],
                    )
                    writer.image(f"patterns/{prefix}layer{layer}/{label}", png, w, h, step)

    def hparams(self, exp: Experiment) -> None:
        hp = flatten(exp.to_dict())
        for seed, writer in zip(self.seeds, self.writers):
            writer.hparams(
                {**hp, "seed": seed}, trial_id=f"{exp.name}/seed_{seed}", metrics=HPARAM_METRICS
            )

    def flush(self):
        """Put everything logged so far on disk (before a checkpoint refers to it)."""
        for w in self.writers:
            w.flush()
        if self.file is not None:
            self.file.sync()

    def close(self):
        for w in self.writers:
            w.close()


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))


def _progress(enabled: bool, total: int, initial: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=name,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        leave=False,
    )


def enable_compile_cache(path: str | Path | None = None) -> Path:
    """Turn on JAX's persistent compilation cache (default ~/.cache/ablate/jax)."""
    cache = Path(
        path or os.environ.get("ABLATE_CACHE_DIR") or Path.home() / ".cache" / "ablate" / "jax"
    )
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return cache
