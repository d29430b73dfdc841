"""The training engine: K seeds of one experiment in one compiled, scanned program.

`Engine` holds the compiled pieces: `init` (K models from K seeds, vmapped), `train_chunk`
(`steps_per_dispatch` steps in one `lax.scan`, batches generated on the device, the state
donated, all seeds vmapped) and `evaluate` (held-out metrics and per-head attention
metrics). `train` is the host loop around them: run folder, logs, checkpoints, resume.

The model is split once (`nnx.split(model, nnx.Param, ...)`): gradients and the optimiser
see only `nnx.Param`; `Fixed`/`Frozen` state rides along in `rest`, never updated.
Per-step randomness is `fold_in(key, step)`, so a resumed run sees the same batches.

Placement (ablate/distributed.py): the same jitted functions carry sharding annotations for
the run's mesh: the seed axis over the `seeds` devices, batch rows over `data`. In a
multi-process run every process runs this loop; process 0 alone writes logs and results.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ablate.ablation import edited
from ablate.checkpoint import Checkpointer, CheckpointMismatch, abstract_like
from ablate.config import ConfigError, flatten
from ablate.data import DataError  # one class for every bad-data error (exit 3)
from ablate.distributed import Placement, any_process, check_mesh, is_primary, on_primary
from ablate.experiment import Experiment, OptimConfig
from ablate.logging import MetricsFile, TensorBoardWriter, truncate_events
from ablate.metrics import (
    attention_metrics,
    descent_direction,
    gradient_alignment,
    nan_to_none,
    perplexity,
    token_metrics,
    uniform_alignment,
)
from ablate.model import Transformer, visibility
from ablate.plots import patterns_png
from ablate.runfolder import (  # noqa: F401  (Preempted: part of this API)
    BACKUP_CONFIG,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FINAL_FILE,
    KEPT_FINAL,
    METRICS_FILE,
    PATTERNS_FILE,
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

HPARAM_METRICS = ("eval/accuracy", "eval/sequence_accuracy", "eval/loss", "eval/chance")
# Counted on the device every step, checked on the host, never logged.
INVALID_TOKENS = "invalid_tokens"


class Diverged(RuntimeError):
    """Loss or parameters became NaN/Inf; `step` is the first bad step."""

    def __init__(self, step: int, seed: int, what: str):
        self.step, self.seed = step, seed
        super().__init__(f"training diverged at step {step} (seed {seed}): {what} is not finite")


class TrainState(NamedTuple):
    """Everything that changes during training; every leaf has a leading seed axis."""

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt: optax.OptState


def make_optimizer(
    cfg: OptimConfig, total_steps: int
) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW (decay on matrices only) with warmup and schedule, after global-norm clipping."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, cfg.learning_rate, warmup, max(total_steps, warmup + 1)
        )
    else:
        schedule = (
            optax.join_schedules(
                [
                    optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
                    optax.constant_schedule(cfg.learning_rate),
                ],
                [warmup],
            )
            if warmup
            else optax.constant_schedule(cfg.learning_rate)
        )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask
    )
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*parts, adamw), schedule


def seed_keys(seeds) -> jax.Array:
    """One base PRNG key per seed (raw uint32 data, stacked on the seed axis)."""
    return jnp.stack([jax.random.PRNGKey(s) for s in seeds])


class Engine:
    """The compiled functions of one experiment, for all its seeds at once."""

    def __init__(self, exp: Experiment, local: bool = False):
        """`local`: on one device of this process, ignoring the run's mesh (for probing)."""
        self.exp = exp
        self.task = exp.task
        cfg = exp.model
        self.tx, self.schedule = make_optimizer(exp.optim, exp.train.steps)
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        self.graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
        self.has_pattern_NH = np.array(
            [block.attention.has_pattern_H for block in abstract.blocks], dtype=bool
        )
        self.qk_scores_NH = np.array(
            [block.attention.qk_scores_H for block in abstract.blocks], dtype=bool
        )
        tc = exp.train
        # Refuses a mesh that does not fit the devices, seeds or batch (before any compile).
        self.placement = place = Placement(tc.mesh, len(tc.seeds), tc.batch_size, local)
        self.keys_K = place.put(seed_keys(tc.seeds), place.per_seed)
        self.eval_key = jax.random.PRNGKey(tc.eval_seed)
        # One set of functions for every mesh: the seed axis is vmapped and split over the
        # `seeds` devices, batch rows over `data` (`_step_one`); host-bound outputs are
        # replicated, so every process of a multi-host run can read them.
        vmap = lambda f: jax.vmap(f, spmd_axis_name="seeds")
        abstract_K = jax.eval_shape(vmap(self._init_one), self.keys_K)
        self.state_sharding = state = place.state(abstract_K)
        self._init = jax.jit(vmap(self._init_one), in_shardings=place.per_seed, out_shardings=state)
        self._chunk = jax.jit(
            vmap(self._chunk_one),
            in_shardings=(state, place.per_seed),
            out_shardings=(state, place.replicated),
            donate_argnums=0,
        )
        weights = (state.params, state.rest)
        self._evaluate = jax.jit(
            vmap(self._evaluate_one), in_shardings=weights, out_shardings=place.replicated
        )
        self._patterns = jax.jit(
            vmap(self._patterns_one), in_shardings=weights, out_shardings=place.replicated
        )
        self._finite = jax.jit(
            _state_is_finite, in_shardings=(state,), out_shardings=place.replicated
        )
        self.compiled_chunk = None
        self.compile_seconds = float("nan")

    # --- per-seed pure functions (vmapped over the seed axis) ---

    def _init_one(self, key: jax.Array) -> TrainState:
        model = Transformer(self.exp.model, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return TrainState(jnp.zeros((), jnp.int32), params, rest, self.tx.init(params))

    def batch_at(self, key: jax.Array, step: jax.Array):
        """The training batch of `step` for the seed whose key is `key`.

        A function of (seed, step) and the task alone, never of the attention variant: the
        paired design (every variant of a seed sees the same batches in the same order).
        """
        return self.task.sample_at(jax.random.fold_in(key, 1), step, self.exp.train.batch_size)

    def _step_one(self, state: TrainState, key: jax.Array) -> tuple[TrainState, dict]:
        step = state.step
        batch = self.placement.rows(self.batch_at(key, step))
        dropout_key = jax.random.fold_in(jax.random.fold_in(key, 2), step)

        def loss_fn(params):
            model = nnx.merge(self.graphdef, params, state.rest)
            out = model(batch.inputs, valid_BL=self._valid(batch), dropout_key=dropout_key)
            metrics = token_metrics(out.logits, batch.targets, batch.weights)
            return metrics["loss"], metrics

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt = self.tx.update(grads, state.opt, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics |= {
            "grad_norm": _global_norm(grads),
            "param_norm": _global_norm(params),
            "learning_rate": self.schedule(step),
            INVALID_TOKENS: self._count_invalid(batch),
        }
        return TrainState(step + 1, params, state.rest, opt), metrics

    def _count_invalid(self, batch) -> jax.Array:
        # An embedding lookup past the table gives NaN and a label past the head gives a NaN
        # loss (NOTES.md): count them so the host can name the cause instead of "diverged".
        vocab = self.exp.model.vocab_size
        bad_inputs = (batch.inputs < 0) | (batch.inputs >= vocab)
        bad_targets = ((batch.targets < 0) | (batch.targets >= vocab)) & (batch.weights > 0)
        return bad_inputs.sum() + bad_targets.sum()

    def _chunk_one(self, state: TrainState, key: jax.Array) -> tuple[TrainState, dict]:
        return jax.lax.scan(
            lambda s, _: self._step_one(s, key), state, length=self.exp.train.steps_per_dispatch
        )

    def _eval_batch(self, i: int):
        # Held-out: real-data tasks draw from their eval split, synthetic ones from other keys.
        key = jax.random.fold_in(self.eval_key, i)
        return self.placement.rows(self.task.eval_sample(key, self.exp.train.batch_size))

    def _valid(self, batch) -> jax.Array | None:
        """valid_BL for padded tasks (attention masks padding out), else None."""
        pad_id = self.task.pad_id
        return None if pad_id is None else batch.inputs != pad_id

    def _evaluate_one(self, params, rest) -> dict:
        model = nnx.merge(self.graphdef, params, rest)

        def one(i):
            batch = self._eval_batch(i)
            valid_BL = self._valid(batch)
            out = model(batch.inputs, valid_BL=valid_BL, return_patterns=True)
            m = token_metrics(out.logits, batch.targets, batch.weights)
            heads = [
                attention_metrics(p, batch.deps, batch.weights, valid_BL) for p in out.patterns
            ]
            for name in ("alignment", "entropy", "distance"):
                m[name] = jnp.stack([h[name] for h in heads])  # (N, H)
            B, L = batch.inputs.shape
            visible = visibility(L, self.exp.model.causal, valid_BL, B)
            m["uniform_alignment"] = uniform_alignment(batch.deps, visible, batch.weights)
            if not (self.task.has_dependencies and self.exp.train.gradient_alignment):
                # Real data has no mask to pull towards; or the pull was not asked for.
                m["gradient_alignment"] = jnp.full(self.has_pattern_NH.shape, jnp.nan)
                return m
            grads = self._pattern_gradients(model, batch, valid_BL, out.patterns)
            m["gradient_alignment"] = jnp.stack(
                [
                    gradient_alignment(
                        descent_direction(g, p, visible, qk_H), batch.deps, batch.weights
                    )
                    for g, p, qk_H in zip(grads, out.patterns, self.qk_scores_NH)
                ]
            )
            return m

        per_batch = jax.lax.map(one, jnp.arange(self.exp.train.eval_batches))
        return jax.tree.map(lambda x: x.mean(0), per_batch)

    def _pattern_gradients(self, model, batch, valid_BL, patterns) -> tuple[jax.Array, ...]:
        """dL/dp per layer: the eval loss's gradient with respect to each head's pattern, the
        other patterns held at their values (each pattern is fed back in through a mixer
        edit, so the forward values are unchanged)."""
        N, H = self.has_pattern_NH.shape
        B, L = batch.inputs.shape
        mix_NH = jnp.asarray(self.has_pattern_NH, jnp.float32)
        no_output_NBLHK = jnp.zeros((N, B, L, H, self.exp.model.head_dim), patterns[0].dtype)

        def loss(deltas):
            fill_NBHLS = jnp.stack([jax.lax.stop_gradient(p) + d for p, d in zip(patterns, deltas)])
            ones_NH, zeros_NH = jnp.ones((N, H)), jnp.zeros((N, H))
            ablated = edited(model, ones_NH, mix_NH, fill_NBHLS, zeros_NH, no_output_NBLHK)
            out = ablated(batch.inputs, valid_BL=valid_BL)
            return token_metrics(out.logits, batch.targets, batch.weights)["loss"]

        return jax.grad(loss)(tuple(jnp.zeros_like(p) for p in patterns))

    def _patterns_one(self, params, rest):
        model = nnx.merge(self.graphdef, params, rest)
        batch = self._eval_batch(0)
        valid_BL = self._valid(batch)
        out = model(
            batch.inputs[:1],
            valid_BL=None if valid_BL is None else valid_BL[:1],
            return_patterns=True,
        )
        return jnp.stack([p[0] for p in out.patterns]), batch.deps[0], batch.weights[0]

    # --- host-facing, all seeds at once ---

    def init(self) -> TrainState:
        return self._init(self.keys_K)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of `init()`'s state (the restore target)."""
        return abstract_like(jax.eval_shape(self.init), self.state_sharding)

    def params_finite(self, state: TrainState) -> np.ndarray:
        """(K,) bool: which seeds' parameters are all finite."""
        return np.asarray(self._finite(state))

    def check_data(self) -> None:
        """Raise DataError if a seed's first training batch or the first eval batch is unusable."""
        B = self.exp.train.batch_size
        # Replicated outputs: every process of a multi-host run can read them.
        first_train = jax.device_get(
            jax.jit(
                jax.vmap(lambda k: self.task.sample_at(jax.random.fold_in(k, 1), 0, B)),
                out_shardings=self.placement.replicated,
            )(self.keys_K)
        )
        batches = [
            (f"training batch 1 of seed {s}", jax.tree.map(lambda x, k=k: x[k], first_train))
            for k, s in enumerate(self.exp.train.seeds)
        ]
        first_eval = jax.jit(lambda: self._eval_batch(0), out_shardings=self.placement.replicated)()
        batches.append(("eval batch 1", jax.device_get(first_eval)))
        problems = []
        for where, batch in batches:
            problems += batch_problems(batch, self.exp, where)
        if problems:
            raise DataError(
                f"task {self.task.name!r} gives batches this model cannot take:\n  "
                + "\n  ".join(problems)
            )

    def compile(self, state: TrainState) -> None:
        """Compile `train_chunk` for `state` (done once; a no-op afterwards)."""
        if self.compiled_chunk is None:
            t0 = time.perf_counter()
            self.compiled_chunk = self._chunk.lower(state, self.keys_K).compile()
            self.compile_seconds = time.perf_counter() - t0

    def train_chunk(self, state: TrainState) -> tuple[TrainState, dict]:
        """`steps_per_dispatch` steps for every seed; metrics shaped (K, steps)."""
        self.compile(state)
        return self.compiled_chunk(state, self.keys_K)

    def evaluate(self, state: TrainState) -> dict[str, np.ndarray]:
        """Held-out metrics per seed (leading axis K); per-head arrays are (K, N, H)."""
        out = jax.device_get(self._evaluate(state.params, state.rest))
        for name in ("alignment", "entropy", "distance", "gradient_alignment"):
            out[name] = np.where(self.has_pattern_NH[None], out[name], np.nan)
        return out

    def patterns(self, state: TrainState):
        """(probs (K, N, H, L, S), deps (K, L, S), weights (K, L)) of the first eval sequence."""
        return jax.device_get(self._patterns(state.params, state.rest))


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

    first_bad(
        (inputs < 0) | (inputs >= model.vocab_size),
        inputs,
        "token ids",
        f"[0, model.vocab_size = {model.vocab_size})",
    )
    scored = weights > 0
    if targets.shape != inputs.shape or weights.shape != inputs.shape:
        found.append(
            f"{where}: targets {list(targets.shape)} and weights "
            f"{list(weights.shape)} must be shaped like inputs {list(inputs.shape)}"
        )
    else:
        first_bad(
            scored & ((targets < 0) | (targets >= n_out)),
            targets,
            "labels",
            f"[0, {n_out}) at scored positions",
        )
        first_bad(~np.isfinite(weights) | (weights < 0), weights, "weights", "[0, inf)")
    return found


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _state_is_finite(state: TrainState) -> jax.Array:
    leaves = jax.tree.leaves(state.params)
    return jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in leaves]), 0
    )


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
    progress: bool = True,
    allow_config_change: bool = False,
    stop_after: int | None = None,
) -> RunResult:
    """Train every seed of `exp` in `run_dir`, resuming from its latest good checkpoint.

    `stop_after` ends the loop early at that step (with a checkpoint), as a preemption would.
    """
    run_dir = Path(run_dir)
    # Before the run folder is made: a mesh this machine cannot hold leaves nothing behind.
    check_mesh(exp.train.mesh, len(exp.train.seeds), exp.train.batch_size)
    with SigtermFlag() as sigterm:
        # In a multi-process run, process 0 holds the lock for all (they share the folder);
        # what only process 0 does is agreed on (`on_primary`): a failure stops them all.
        lock = on_primary(lambda: RunLock(run_dir, sigterm), "locking the run folder")
        try:
            return _train_locked(exp, run_dir, sigterm, progress, allow_config_change, stop_after)
        finally:
            if lock is not None:
                lock.release()


def _train_locked(exp, run_dir, sigterm, progress, allow_config_change, stop_after) -> RunResult:
    t_start = time.perf_counter()
    tc = exp.train
    config = exp.to_dict()
    changed = check_run_config(run_dir, config, allow_config_change)
    if tc.compile_cache:
        enable_compile_cache()

    engine = Engine(exp)
    if jax.device_count() > 1:
        note(engine.placement.describe())
    engine.check_data()
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, keep=tc.keep_checkpoints)
    logger = None
    try:
        ckpt.remove_unfinished()
        try:
            restored = ckpt.restore_latest(engine.abstract_state())
        except CheckpointMismatch as e:
            raise ConfigError([("", str(e))]) from None
        for problem in ckpt.problems:
            note(problem)
        if restored is None:
            if ckpt.problems:
                note(f"no intact checkpoint left in {ckpt.directory}: starting from step 0")
            start, state, pending = 0, engine.init(), []
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
        chance = float(exp.task.chance)
        logger = _Logger(engine, writers, metrics_file, chance)
        _stop_if_asked(sigterm, start)

        if start == 0:
            logger.evaluation(state, 0)
            logger.heatmaps(state, 0, "init")
        _stop_if_asked(sigterm, start)
        engine.compile(state)
        _stop_if_asked(sigterm, start)
        step, final = _loop(
            exp, engine, state, start, pending, logger, ckpt, sigterm, stop_after, progress
        )
    finally:
        _close_quietly(logger, ckpt)

    result = RunResult(
        run_dir=str(run_dir),
        seeds=list(tc.seeds),
        final={k: np.asarray(v).tolist() for k, v in final.items()},
        chance=chance,
        steps=step,
        wall_seconds=time.perf_counter() - t_start,
        compile_seconds=engine.compile_seconds,
    )
    if step == tc.steps:
        final_json = dataclasses.asdict(result)
        on_primary(lambda: _write_json(run_dir / FINAL_FILE, final_json), f"writing {FINAL_FILE}")
    return result


def _write_config(run_dir: Path, config: dict, changed: list[str]) -> None:
    """config.json, the one it replaces kept under a free name when it changed (allowed)."""
    if changed:
        backup = free_name(run_dir, BACKUP_CONFIG, ".json")
        shutil.copyfile(run_dir / CONFIG_FILE, backup)
        note(f"config changed (allowed): {'; '.join(changed)}; old one kept as {backup.name}")
    _write_json(run_dir / CONFIG_FILE, config)


def _loop(exp, engine, state, start, pending, logger, ckpt, sigterm, stop_after, progress):
    """Dispatch, log, evaluate and save until done; returns (step, final eval metrics)."""
    tc = exp.train
    bar = _progress(progress and is_primary(), tc.steps, start, exp.name)
    step, t_window, drawn = start, time.perf_counter(), None
    final = engine.evaluate(state) if start >= tc.steps else {}
    try:
        while step < tc.steps:
            state, chunk_metrics = engine.train_chunk(state)
            pending.append(chunk_metrics)
            step += tc.steps_per_dispatch
            last = step == tc.steps
            log_now = last or step % tc.log_every == 0
            eval_now = last or (tc.eval_every and step % tc.eval_every == 0)
            draw_now = last or (tc.heatmap_every and step % tc.heatmap_every == 0)
            checked = log_now or eval_now or draw_now
            if checked:
                # Nothing of a bad step is logged, evaluated or saved.
                logger.check(pending, step)
                _check_params(engine, state, step, tc.seeds)
            if log_now:
                rate = _steps_in(pending) / (time.perf_counter() - t_window)
                shown = logger.training(pending, step, rate, engine.compile_seconds)
                pending, t_window = [], time.perf_counter()
                bar.update(step - bar.n)
                bar.set_postfix(shown)
            # Everything logged for a step is written before that step's checkpoint, so a
            # resume from it never writes the step twice.
            if eval_now:
                final = logger.evaluation(state, step)
            if draw_now:
                drawn = logger.heatmaps(state, step, "trained")
            if last and logger.file is not None:
                probs, deps, weights = drawn
                write_npz(
                    logger.file.path.parent / PATTERNS_FILE,
                    probs=probs,
                    deps=deps,
                    weights=weights,
                    has_pattern=engine.has_pattern_NH,
                )
                logger.hparams(exp)
            # Read the flag only now: a SIGTERM during the evaluation above still saves here.
            # Every process must agree to stop (a SIGTERM may reach only some).
            preempted = any_process(sigterm.raised)
            stopping = preempted or (stop_after is not None and step >= stop_after)
            if last or stopping or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                if not checked:
                    logger.check(pending, step)
                    _check_params(engine, state, step, tc.seeds)
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
        bar.close()
    return step, final


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


def _close_quietly(logger, ckpt) -> None:
    # Cleanup must not hide the error that brought us here (e.g. a full disk fails the flush).
    for close in (getattr(logger, "close", None), ckpt.close):
        if close is None:
            continue
        try:
            close()
        except Exception as e:  # noqa: BLE001
            note(f"while closing: {type(e).__name__}: {e}")


def _check_params(engine: Engine, state: TrainState, step: int, seeds) -> None:
    ok_K = engine.params_finite(state)
    if not ok_K.all():
        raise Diverged(step, seeds[int(np.argmin(ok_K))], "a parameter")


class _Logger:
    """Turns fetched metrics into TensorBoard scalars/images and JSON lines.

    Without a metrics file (processes other than 0) it computes what must agree and writes
    nothing.
    """

    def __init__(self, engine: Engine, writers, metrics_file: MetricsFile, chance: float):
        self.engine, self.writers, self.file, self.chance = engine, writers, metrics_file, chance
        self.seeds = list(engine.exp.train.seeds)

    def check(self, pending, step: int) -> None:
        """Raise DataError/Diverged naming the first bad step of the unlogged window."""
        if not pending:
            return
        pending[:] = jax.device_get(pending)
        merged = {k: np.concatenate([p[k] for p in pending], axis=1) for k in pending[0]}
        first = step - merged["loss"].shape[1] + 1  # the step the window's column 0 belongs to
        invalid = merged[INVALID_TOKENS] > 0
        if invalid.any():
            seed_idx, offset = np.argwhere(invalid)[0]
            raise DataError(
                f"step {first + int(offset)} (seed {self.seeds[seed_idx]}): the task produced "
                f"{int(merged[INVALID_TOKENS][seed_idx, offset])} token ids or labels outside "
                f"the model's vocabulary ({self.engine.exp.model.vocab_size}); nothing of this "
                "step was saved"
            )
        # The earliest bad step of any of them: a NaN gradient makes the next loss NaN too.
        # param_norm is of the parameters after the step's update.
        checked = {"loss": "loss", "grad_norm": "grad_norm", "param_norm": "a parameter"}
        bad = np.stack([~np.isfinite(merged[name]) for name in checked], -1)  # seed, step, name
        if bad.any():
            offset = int(np.argwhere(bad.any(axis=(0, 2)))[0, 0])
            seed_idx, which = (int(i) for i in np.argwhere(bad[:, offset])[0])
            raise Diverged(first + offset, self.seeds[seed_idx], list(checked.values())[which])

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

    def evaluation(self, state: TrainState, step: int) -> dict[str, np.ndarray]:
        out = self.engine.evaluate(state)
        if self.file is None:
            return out
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
            N, H = out["alignment"].shape[1:]
            for layer in range(N):
                for head in range(H):
                    if not self.engine.has_pattern_NH[layer, head]:
                        continue
                    for name in ("alignment", "entropy", "distance", "gradient_alignment"):
                        scalars[f"attention/{name}/layer{layer}_head{head}"] = out[name][
                            k, layer, head
                        ]
                # NaN where a head has no pattern, or the task no dependency mask (real text).
                if np.isfinite(out["alignment"][k, layer]).any():
                    scalars[f"attention/alignment_max/layer{layer}"] = np.nanmax(
                        out["alignment"][k, layer]
                    )
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
        return out

    def heatmaps(self, state: TrainState, step: int, label: str):
        """Pattern images of the first eval sequence per seed; returns the arrays drawn."""
        probs_KNHLS, deps_KLS, weights_KL = self.engine.patterns(state)
        for k, writer in enumerate(self.writers):
            for layer in range(probs_KNHLS.shape[1]):
                png, w, h = patterns_png(
                    probs_KNHLS[k, layer],
                    deps_KLS[k] & (weights_KL[k][:, None] > 0),
                    f"layer {layer} ({label}, step {step})",
                    has_pattern_H=self.engine.has_pattern_NH[layer],
                )
                writer.image(f"patterns/layer{layer}/{label}", png, w, h, step)
        return probs_KNHLS, deps_KLS, weights_KL

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
