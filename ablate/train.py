"""The training engine: K seeds of one experiment in one compiled, scanned program.

`Engine` holds the compiled pieces: `init` (K models from K seeds, vmapped), `train_chunk`
(`steps_per_dispatch` steps in one `lax.scan`, batches generated on the device, the state
donated, all seeds vmapped) and `evaluate` (held-out metrics and per-head attention
metrics). `train` is the host loop around them: run folder, logs, checkpoints, resume.

The model is split once (`nnx.split(model, nnx.Param, ...)`): gradients and the optimiser
see only `nnx.Param`; `Fixed`/`Frozen` state rides along in `rest`, never updated.
Per-step randomness is `fold_in(key, step)`, so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ablate.checkpoint import Checkpointer, abstract_like
from ablate.config import ConfigError
from ablate.experiment import Experiment, OptimConfig
from ablate.logging import MetricsFile, TensorBoardWriter, flatten, patterns_png
from ablate.metrics import attention_metrics, token_metrics, uniform_alignment
from ablate.model import Transformer, visibility

CONFIG_FILE = "config.json"
FINAL_FILE = "final.json"
PATTERNS_FILE = "patterns_final.npz"
HPARAM_METRICS = ("eval/accuracy", "eval/sequence_accuracy", "eval/loss", "eval/chance")


class Diverged(RuntimeError):
    """Loss or parameters became NaN/Inf; `step` is the first bad step."""

    def __init__(self, step: int, seed: int, what: str):
        self.step, self.seed = step, seed
        super().__init__(f"training diverged at step {step} (seed {seed}): {what} is not finite")


class Preempted(RuntimeError):
    """SIGTERM received: the state was saved at `step` and the run can be resumed."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"stopped by SIGTERM; saved a checkpoint at step {step}; rerun to resume")


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

    def __init__(self, exp: Experiment):
        self.exp = exp
        self.task = exp.task
        cfg = exp.model
        self.tx, self.schedule = make_optimizer(exp.optim, exp.train.steps)
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        self.graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
        self.has_pattern_NH = np.array(
            [block.attention.has_pattern_H for block in abstract.blocks], dtype=bool
        )
        self.keys_K = seed_keys(exp.train.seeds)
        self.eval_key = jax.random.PRNGKey(exp.train.eval_seed)
        self._chunk = jax.jit(jax.vmap(self._chunk_one), donate_argnums=0)
        self._evaluate = jax.jit(jax.vmap(self._evaluate_one, in_axes=(0, 0)))
        self._patterns = jax.jit(jax.vmap(self._patterns_one, in_axes=(0, 0)))
        self.compiled_chunk = None
        self.compile_seconds = float("nan")

    # --- per-seed pure functions (vmapped over the seed axis) ---

    def _init_one(self, key: jax.Array) -> TrainState:
        model = Transformer(self.exp.model, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return TrainState(jnp.zeros((), jnp.int32), params, rest, self.tx.init(params))

    def _step_one(self, state: TrainState, key: jax.Array) -> tuple[TrainState, dict]:
        step = state.step
        batch = self.task.sample(
            jax.random.fold_in(jax.random.fold_in(key, 1), step), self.exp.train.batch_size
        )
        dropout_key = jax.random.fold_in(jax.random.fold_in(key, 2), step)

        def loss_fn(params):
            model = nnx.merge(self.graphdef, params, state.rest)
            out = model(batch.inputs, dropout_key=dropout_key)
            metrics = token_metrics(out.logits, batch.targets, batch.weights)
            return metrics["loss"], metrics

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt = self.tx.update(grads, state.opt, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics |= {
            "grad_norm": _global_norm(grads),
            "param_norm": _global_norm(params),
            "learning_rate": self.schedule(step),
        }
        return TrainState(step + 1, params, state.rest, opt), metrics

    def _chunk_one(self, state: TrainState, key: jax.Array) -> tuple[TrainState, dict]:
        return jax.lax.scan(
            lambda s, _: self._step_one(s, key), state, length=self.exp.train.steps_per_dispatch
        )

    def _eval_batch(self, i: int):
        return self.task.sample(jax.random.fold_in(self.eval_key, i), self.exp.train.batch_size)

    def _evaluate_one(self, params, rest) -> dict:
        model = nnx.merge(self.graphdef, params, rest)

        def one(i):
            batch = self._eval_batch(i)
            out = model(batch.inputs, return_patterns=True)
            m = token_metrics(out.logits, batch.targets, batch.weights)
            heads = [attention_metrics(p, batch.deps, batch.weights) for p in out.patterns]
            for name in ("alignment", "entropy", "distance"):
                m[name] = jnp.stack([h[name] for h in heads])  # (N, H)
            B, L = batch.inputs.shape
            visible = visibility(L, self.exp.model.causal, None, B)
            m["uniform_alignment"] = uniform_alignment(batch.deps, visible, batch.weights)
            return m

        per_batch = jax.lax.map(one, jnp.arange(self.exp.train.eval_batches))
        return jax.tree.map(lambda x: x.mean(0), per_batch)

    def _patterns_one(self, params, rest):
        model = nnx.merge(self.graphdef, params, rest)
        batch = self._eval_batch(0)
        out = model(batch.inputs[:1], return_patterns=True)
        return jnp.stack([p[0] for p in out.patterns]), batch.deps[0], batch.weights[0]

    # --- host-facing, all seeds at once ---

    def init(self) -> TrainState:
        return jax.jit(jax.vmap(self._init_one))(self.keys_K)

    def train_chunk(self, state: TrainState) -> tuple[TrainState, dict]:
        """`steps_per_dispatch` steps for every seed; metrics shaped (K, steps)."""
        if self.compiled_chunk is None:
            t0 = time.perf_counter()
            self.compiled_chunk = self._chunk.lower(state, self.keys_K).compile()
            self.compile_seconds = time.perf_counter() - t0
        return self.compiled_chunk(state, self.keys_K)

    def evaluate(self, state: TrainState) -> dict[str, np.ndarray]:
        """Held-out metrics per seed (leading axis K); per-head arrays are (K, N, H)."""
        out = jax.device_get(self._evaluate(state.params, state.rest))
        for name in ("alignment", "entropy", "distance"):
            out[name] = np.where(self.has_pattern_NH[None], out[name], np.nan)
        return out

    def patterns(self, state: TrainState):
        """(probs (K, N, H, L, S), deps (K, L, S), weights (K, L)) of the first eval sequence."""
        return jax.device_get(self._patterns(state.params, state.rest))


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _state_is_finite(state: TrainState) -> jax.Array:
    leaves = jax.tree.leaves(state.params)
    return jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in leaves]), 0
    )


_params_finite = jax.jit(_state_is_finite)


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


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between dispatches (main thread only)."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def check_run_config(run_dir: Path, config: dict, allow_change: bool) -> None:
    """Refuse to resume a run folder whose saved config differs (unless allowed)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return
    saved = flatten(json.loads(path.read_text()))
    new = flatten(json.loads(json.dumps(config)))
    diff = [
        f"{k}: {saved.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
        for k in sorted(set(saved) | set(new))
        if saved.get(k) != new.get(k)
    ]
    if diff and not allow_change:
        raise ConfigError(
            [
                (
                    "",
                    f"{run_dir} holds a run with a different config; refusing to resume into it. "
                    "Changed: " + "; ".join(diff) + ". Use another --workdir/name, or "
                    "--allow-config-change to resume anyway.",
                )
            ]
        )


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
    t_start = time.perf_counter()
    tc = exp.train
    run_dir = Path(run_dir)
    config = exp.to_dict()
    check_run_config(run_dir, config, allow_config_change)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / CONFIG_FILE, config)
    if tc.compile_cache:
        enable_compile_cache()

    engine = Engine(exp)
    state = engine.init()
    ckpt = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints)
    restored = ckpt.restore_latest(abstract_like(state))
    start = 0
    if restored is not None:
        start, state, _ = restored
    if start >= tc.steps and (run_dir / FINAL_FILE).is_file():
        ckpt.close()
        return RunResult(**json.loads((run_dir / FINAL_FILE).read_text()))
    metrics_file = MetricsFile(run_dir / "metrics.jsonl")
    last_logged = metrics_file.truncate_after(start)
    writers = [
        TensorBoardWriter(run_dir / f"seed_{s}", skip_through_step=last_logged) for s in tc.seeds
    ]
    chance = float(exp.task.chance)
    logger = _Logger(engine, writers, metrics_file, chance)

    if start == 0:
        logger.evaluation(state, 0)
        logger.heatmaps(state, 0, "init")

    bar = _progress(progress, tc.steps, start, exp.name)
    step, pending, t_window = start, [], time.perf_counter()
    final = engine.evaluate(state) if start >= tc.steps else {}
    try:
        with _SigtermFlag() as sigterm:
            while step < tc.steps:
                state, chunk_metrics = engine.train_chunk(state)
                pending.append(chunk_metrics)
                step += tc.steps_per_dispatch
                last = step == tc.steps
                stopping = sigterm.raised or (stop_after is not None and step >= stop_after)
                if step % tc.log_every == 0 or last or stopping:
                    rate = len(pending) * tc.steps_per_dispatch / (time.perf_counter() - t_window)
                    shown = logger.training(pending, step, rate, engine.compile_seconds)
                    pending, t_window = [], time.perf_counter()
                    bar.update(step - bar.n)
                    bar.set_postfix(shown)
                # Everything logged for a step is written before that step's checkpoint, so a
                # resume from it never writes the step twice.
                if last or (tc.eval_every and step % tc.eval_every == 0):
                    final = logger.evaluation(state, step)
                if last or (tc.heatmap_every and step % tc.heatmap_every == 0):
                    drawn = logger.heatmaps(state, step, "trained")
                if last:
                    probs, deps, weights = drawn
                    np.savez_compressed(
                        run_dir / PATTERNS_FILE, probs=probs, deps=deps, weights=weights,
                        has_pattern=engine.has_pattern_NH,
                    )
                    logger.hparams(exp)
                if last or stopping or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
                    if pending:
                        logger.training(pending, step, float("nan"), engine.compile_seconds)
                        pending = []
                    _check_params(state, step, tc.seeds)
                    ckpt.save(step, state, {"step": step, "name": exp.name})
                if stopping and not last:
                    if sigterm.raised:
                        raise Preempted(step)
                    break
    finally:
        bar.close()
        logger.close()
        ckpt.close()

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
        _write_json(run_dir / FINAL_FILE, dataclasses.asdict(result))
    return result


def _check_params(state: TrainState, step: int, seeds) -> None:
    ok_K = np.asarray(_params_finite(state))
    if not ok_K.all():
        raise Diverged(step, seeds[int(np.argmin(ok_K))], "a parameter")


class _Logger:
    """Turns fetched metrics into TensorBoard scalars/images and JSON lines."""

    def __init__(self, engine: Engine, writers, metrics_file: MetricsFile, chance: float):
        self.engine, self.writers, self.file, self.chance = engine, writers, metrics_file, chance
        self.seeds = list(engine.exp.train.seeds)

    def training(self, pending, step: int, steps_per_sec: float, compile_s: float) -> dict:
        per_step = jax.device_get(pending)
        merged = {k: np.concatenate([p[k] for p in per_step], axis=1) for k in per_step[0]}
        n = merged["loss"].shape[1]
        for name in ("loss", "grad_norm"):
            bad = ~np.isfinite(merged[name])
            if bad.any():
                seed_idx, offset = np.argwhere(bad)[0]
                raise Diverged(step - n + int(offset) + 1, self.seeds[seed_idx], name)
        rows = []
        for k, (seed, writer) in enumerate(zip(self.seeds, self.writers)):
            values = {name: float(v[k].mean()) for name, v in merged.items()}
            values["learning_rate"] = float(merged["learning_rate"][k, -1])
            scalars = {f"train/{name}": v for name, v in values.items()}
            if math.isfinite(steps_per_sec):
                scalars["perf/steps_per_sec"] = steps_per_sec
                scalars["perf/compile_seconds"] = compile_s
            writer.scalars(scalars, step)
            rows.append({"step": step, "seed": seed, "kind": "train", **values})
        self.file.append(rows)
        return {"loss": f"{rows[0]['loss']:.3f}", "acc": f"{rows[0]['accuracy']:.3f}"}

    def evaluation(self, state: TrainState, step: int) -> dict[str, np.ndarray]:
        out = self.engine.evaluate(state)
        rows = []
        for k, (seed, writer) in enumerate(zip(self.seeds, self.writers)):
            scalars = {
                "eval/loss": out["loss"][k],
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
                    for name in ("alignment", "entropy", "distance"):
                        scalars[f"attention/{name}/layer{layer}_head{head}"] = out[name][
                            k, layer, head
                        ]
                valid = self.engine.has_pattern_NH[layer]
                if valid.any():
                    scalars[f"attention/alignment_max/layer{layer}"] = np.nanmax(
                        out["alignment"][k, layer]
                    )
            writer.scalars(scalars, step)
            row = {"step": step, "seed": seed, "kind": "eval", "chance": self.chance}
            for name, value in out.items():
                value = np.asarray(value[k])
                row[name] = value.tolist() if value.ndim else float(value)
            rows.append(_nan_to_none(row))
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
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


def _nan_to_none(row: dict) -> dict:
    def clean(v):
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return {k: clean(v) for k, v in row.items()}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


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
