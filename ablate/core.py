"""The functional training core: pure per-seed functions, and the programs compiled from them.

Each function takes what it is a function of, as in nanodo's train module: the model
definition (`Definition`: the experiment, the model's graph, which heads have patterns),
the optimiser (`Optimizer`), the sampler (`Sampler`: where batches come from), and as
arguments the state, the seed's key and the task's loaded arrays (`TaskData.arrays`,
passed into the compiled programs, never closed over):

  init_state    one seed's model and optimiser state from its key
  train_step    one step: the batch of (seed, step), loss, gradients, update, metrics
  train_chunk   `steps_per_dispatch` steps in one `lax.scan`
  evaluate      held-out metrics and per-head attention metrics over the eval batches
  example_patterns  the patterns of the first few eval sequences (viewer, heatmaps)

`eval_batch` is the one held-out batch function (with the validity mask `valid_BL` of padded
tasks); training and the probe both draw through it. `bad_ids` is the one check of token ids
and labels against the model (on the host before compiling, on the device every step).

`Programs` jits these once per experiment, vmapped over the seed axis and placed on the
run's mesh (ablate/distributed.py): the seed axis over the `seeds` devices, batch rows over
`data`; host-bound outputs are replicated, so every process of a multi-host run can read
them. The model is split once (`nnx.split(model, nnx.Param, ...)`): gradients and the
optimiser see only `nnx.Param`; `Fixed`/`Frozen` state rides along in `rest`, never updated.
Per-step randomness is `fold_in(key, step)`, so a resumed run sees the same batches.

An encoder-decoder experiment (`Seq2SeqConfig`, a seq2seq task) runs through the same
functions: `Definition.forward` feeds the source beside the decoder's inputs, and the eval
adds the cross-attention metrics per decoder layer and head (`CROSS_PER_HEAD`, against the
task's `cross_deps`), with what uniform attention over the real source positions gives.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ablate.ablation import edited
from ablate.checkpoint import abstract_like
from ablate.distributed import Placement
from ablate.experiment import Experiment, OptimConfig
from ablate.metrics import (
    attention_metrics,
    descent_direction,
    gradient_alignment,
    token_metrics,
    uniform_alignment,
    uniform_entropy,
)
from ablate.model import ModelConfig, Transformer, visibility
from ablate.seq2seq import EncoderDecoder, Seq2SeqConfig, cross_visibility
from ablate.tasks import Batch, Task
from ablate.tasks.base import outside

# Counted on the device every step, checked on the host, never logged.
INVALID_TOKENS = "invalid_tokens"
# Per-head eval metrics (N, H): NaN where a head has no pattern.
PER_HEAD = (
    "alignment",
    "entropy",
    "distance",
    "gradient_alignment",
    "alignment_cheap",
    "gradient_alignment_cheap",
    "conflict_alignment",
    "conflict_alignment_cheap",
    "conflict_gradient_alignment",
)
# Per-head eval metrics of cross-attention (N decoder layers, H): NaN where a head has no pattern.
CROSS_PER_HEAD = ("cross_alignment", "cross_entropy", "cross_distance", "cross_gradient_alignment")
# The conflict sequences' eval keys: fold_in(eval key, this), then the batch index (the
# ordinary eval batches fold the batch index into the eval key itself).
CONFLICT_STREAM = 2**31 - 1


class TrainState(NamedTuple):
    """Everything that changes during training; every leaf has a leading seed axis."""

    step: jax.Array
    params: nnx.State
    rest: nnx.State
    opt: optax.OptState


class Optimizer(NamedTuple):
    """The optimiser's update and its learning-rate schedule (logged per step)."""

    tx: optax.GradientTransformation
    schedule: Callable[[jax.Array], jax.Array]


def make_optimizer(cfg: OptimConfig, total_steps: int) -> Optimizer:
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
    return Optimizer(optax.chain(*parts, adamw), schedule)


def seed_keys(seeds) -> jax.Array:
    """One base PRNG key per seed (raw uint32 data, stacked on the seed axis)."""
    return jnp.stack([jax.random.PRNGKey(s) for s in seeds])


def build_model(cfg: ModelConfig | Seq2SeqConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The model a config describes: a Transformer, or an EncoderDecoder."""
    return (
        EncoderDecoder(cfg, rngs=rngs)
        if isinstance(cfg, Seq2SeqConfig)
        else Transformer(cfg, rngs=rngs)
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Definition:
    """The model definition of an experiment: its graph (split from params and rest) and
    which heads have a pattern and q-k scores (N, H); for an encoder-decoder the same of its
    cross-attention heads (None otherwise). `has_pattern_NH` is of the decoder's own heads."""

    exp: Experiment
    graphdef: Any
    has_pattern_NH: np.ndarray
    qk_scores_NH: np.ndarray
    cross_has_pattern_NH: np.ndarray | None = None
    cross_qk_scores_NH: np.ndarray | None = None

    @classmethod
    def of(cls, exp: Experiment) -> Definition:
        """Built from an abstract model: no weights are made."""
        abstract = nnx.eval_shape(lambda: build_model(exp.model, nnx.Rngs(0)))
        graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)

        def facts(heads):
            return (
                np.array([a.has_pattern_H for a in heads], dtype=bool),
                np.array([a.qk_scores_H for a in heads], dtype=bool),
            )

        cross = (None, None)
        if isinstance(exp.model, Seq2SeqConfig):
            cross = facts([block.cross_attention for block in abstract.blocks])
        return cls(exp, graphdef, *facts([block.attention for block in abstract.blocks]), *cross)

    @property
    def seq2seq(self) -> bool:
        return self.cross_has_pattern_NH is not None

    def merge(self, params: nnx.State, rest: nnx.State) -> nnx.Module:
        return nnx.merge(self.graphdef, params, rest)

    def forward(self, model, batch, valid_BL, **kwargs):
        """The model's output on a batch: the decoder's inputs, and the source if it has one."""
        if not self.seq2seq:
            return model(batch.inputs, valid_BL=valid_BL, **kwargs)
        source_valid_BS = self.exp.task.source_valid(batch.source)
        return model(
            batch.source, batch.inputs, source_valid_BS=source_valid_BS, valid_BL=valid_BL, **kwargs
        )

    def _pattern_gradients(
        self, model, batch, valid_BL, patterns, part: str = "attention"
    ) -> tuple[jax.Array, ...]:
        """dL/dp per layer: the eval loss's gradient with respect to each head's pattern, the
        other patterns held at their values (each pattern is fed back in through a mixer
        edit, so the forward values are unchanged). `part`: the blocks' attention whose
        patterns they are ("cross_attention" for an encoder-decoder's cross-attention)."""
        N, H = self.has_pattern_NH.shape
        if part == "cross_attention":
            mix_NH = jnp.asarray(self.cross_has_pattern_NH, jnp.float32)
        else:
            mix_NH = jnp.asarray(self.has_pattern_NH, jnp.float32)
        B, L = batch.inputs.shape
        no_output_NBLHK = jnp.zeros((N, B, L, H, self.exp.model.head_dim), patterns[0].dtype)

        def loss(deltas):
            fill_NBHLS = jnp.stack([jax.lax.stop_gradient(p) + d for p, d in zip(patterns, deltas)])
            ones_NH, zeros_NH = jnp.ones((N, H)), jnp.zeros((N, H))
            ablated = edited(
                model, ones_NH, mix_NH, fill_NBHLS, zeros_NH, no_output_NBLHK, part=part
            )
            out = self.forward(ablated, batch, valid_BL)
            return token_metrics(out.logits, batch.targets, batch.weights)["loss"]

        return jax.grad(loss)(tuple(jnp.zeros_like(p) for p in patterns))


class EvalBatch(NamedTuple):
    """A held-out batch and its validity mask (None for tasks that are never padded); a
    seq2seq task's also carries its source and cross-attention mask."""

    inputs: jax.Array
    targets: jax.Array
    weights: jax.Array
    deps: jax.Array
    valid: jax.Array | None
    source: jax.Array | None = None
    cross_deps: jax.Array | None = None


def eval_batch(task: Task, arrays: Any, stream: jax.Array, i: jax.Array, batch_size: int):
    """Held-out batch `i` of a stream of eval keys (the eval key, or one folded from it).

    Real-data tasks draw from their eval split, synthetic ones from keys training never uses.
    """
    batch = task.eval_sample(arrays, jax.random.fold_in(stream, i), batch_size)
    return EvalBatch(*batch[:4], task.valid_mask(batch.inputs), *batch[4:])


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """Where batches come from: the task, the batch size, the eval key, and `rows`, which
    places a batch's rows on the mesh (identity off a mesh)."""

    task: Task
    batch_size: int
    eval_key: jax.Array
    rows: Callable[[Any], Any] = lambda tree: tree

    def train(self, arrays: Any, key: jax.Array, step: jax.Array) -> Batch:
        """The training batch of `step` for the seed whose key is `key`.

        A function of (seed, step) and the task alone, never of the attention variant: the
        paired design (every variant of a seed sees the same batches in the same order).
        """
        return self.task.sample_at(arrays, jax.random.fold_in(key, 1), step, self.batch_size)

    def eval(self, arrays: Any, i: jax.Array) -> EvalBatch:
        """Held-out batch `i` of the eval stream."""
        return self.rows(eval_batch(self.task, arrays, self.eval_key, i, self.batch_size))

    def conflict(self, i: jax.Array) -> Batch:
        """Held-out batch `i` of a task's conflict sequences (a stream of its own)."""
        stream = jax.random.fold_in(self.eval_key, CONFLICT_STREAM)
        key = jax.random.fold_in(stream, i)
        return self.rows(self.task.conflict_sample(key, self.batch_size))


def bad_ids(inputs, targets, weights, model: ModelConfig):
    """(bad inputs, bad labels) masks, numpy or jax alike: token ids outside the embedding
    table, and labels outside the output head at scored positions (an id past the table
    gives NaN, -1 the last row: NOTES.md). The one check of a batch's ids, made on the host
    before compiling and counted on the device every step."""
    return outside(inputs, model.vocab_size), outside(targets, model.vocab_size) & (weights > 0)


def init_state(definition: Definition, optimizer: Optimizer, key: jax.Array) -> TrainState:
    """One seed's state: the model from `fold_in(key, 0)`, split, and its optimiser state."""
    rngs = nnx.Rngs(params=jax.random.fold_in(key, 0))
    _, params, rest = nnx.split(build_model(definition.exp.model, rngs), nnx.Param, ...)
    return TrainState(jnp.zeros((), jnp.int32), params, rest, optimizer.tx.init(params))


def train_step(
    definition: Definition,
    optimizer: Optimizer,
    sampler: Sampler,
    state: TrainState,
    key: jax.Array,
    arrays: Any,
) -> tuple[TrainState, dict]:
    """One training step of one seed: its batch of `state.step`, the update, the metrics."""
    step = state.step
    batch = sampler.rows(sampler.train(arrays, key, step))
    dropout_key = jax.random.fold_in(jax.random.fold_in(key, 2), step)

    def loss_fn(params):
        model = definition.merge(params, state.rest)
        valid_BL = sampler.task.valid_mask(batch.inputs)
        out = definition.forward(model, batch, valid_BL, dropout_key=dropout_key)
        metrics = token_metrics(out.logits, batch.targets, batch.weights)
        return metrics["loss"], metrics

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt = optimizer.tx.update(grads, state.opt, state.params)
    params = optax.apply_updates(state.params, updates)
    bad_inputs, bad_targets = bad_ids(*batch[:3], definition.exp.model)
    if definition.seq2seq:
        bad_inputs = (
            bad_inputs.sum() + outside(batch.source, definition.exp.model.source_vocab_size).sum()
        )
    metrics |= {
        "grad_norm": _global_norm(grads),
        "param_norm": _global_norm(params),
        "learning_rate": optimizer.schedule(step),
        # Counted so the host can name the cause instead of "diverged" (a NaN loss).
        INVALID_TOKENS: bad_inputs.sum() + bad_targets.sum(),
    }
    return TrainState(step + 1, params, state.rest, opt), metrics


def train_chunk(
    definition: Definition,
    optimizer: Optimizer,
    sampler: Sampler,
    state: TrainState,
    key: jax.Array,
    arrays: Any,
) -> tuple[TrainState, dict]:
    """`steps_per_dispatch` training steps of one seed in one scan; metrics (steps,)."""
    return jax.lax.scan(
        lambda s, _: train_step(definition, optimizer, sampler, s, key, arrays),
        state,
        length=definition.exp.train.steps_per_dispatch,
    )


def evaluate(
    definition: Definition, sampler: Sampler, params: nnx.State, rest: nnx.State, arrays: Any
) -> dict:
    """Held-out metrics of one seed, averaged over the eval batches; per-head ones (N, H)."""
    exp, task = definition.exp, sampler.task
    model = definition.merge(params, rest)

    def one(i):
        batch = sampler.eval(arrays, i)
        valid_BL = batch.valid
        out = definition.forward(model, batch, valid_BL, return_patterns=True)
        m = token_metrics(out.logits, batch.targets, batch.weights)
        heads = [attention_metrics(p, batch.deps, batch.weights, valid_BL) for p in out.patterns]
        for name in ("alignment", "entropy", "distance"):
            m[name] = jnp.stack([h[name] for h in heads])  # (N, H)
        B, L = batch.inputs.shape
        visible = visibility(L, exp.model.causal, valid_BL, B)
        m["uniform_alignment"] = uniform_alignment(batch.deps, visible, batch.weights)
        m["uniform_entropy"] = uniform_entropy(visible, valid_BL)
        # Real data has no mask to pull towards; or the pull was not asked for: NaN.
        measured = task.has_dependencies and exp.train.gradient_alignment
        pull = _pull(definition, model, batch, out.patterns, visible, measured)
        m["gradient_alignment"] = pull(batch.deps)
        if task.cheap_route is not None:
            m |= _routes(definition, sampler, model, batch, out.patterns, visible, i, pull)
        if definition.seq2seq:
            m |= _cross(definition, model, batch, out.cross_patterns, measured)
        return m

    per_batch = jax.lax.map(one, jnp.arange(exp.train.eval_batches))
    return jax.tree.map(lambda x: x.mean(0), per_batch)


def _pull(definition, model, batch, patterns, visible, measured: bool):
    """deps -> (N, H): the share of the loss's descent direction on each head's attention
    (this batch's loss) that falls on a mask; all NaN where the pull is not `measured`."""
    if not measured:
        return lambda deps: jnp.full(definition.has_pattern_NH.shape, jnp.nan)
    grads = definition._pattern_gradients(model, batch, batch.valid, patterns)
    directions = [
        descent_direction(g, p, visible, qk_H)
        for g, p, qk_H in zip(grads, patterns, definition.qk_scores_NH)
    ]
    return lambda deps: jnp.stack([gradient_alignment(d, deps, batch.weights) for d in directions])


def _routes(definition, sampler, model, batch, patterns, visible, i, pull) -> dict:
    """A task with a cheap route: alignment and the loss's pull (`pull`, of eval batch i)
    measured against the cheap route's mask too; on conflict sequences (where only the
    content route answers) the accuracy, both alignments, and the pull of their loss towards
    the content route."""
    task = sampler.task
    cheap = task.cheap_deps(batch.weights)
    m = {
        "alignment_cheap": _per_head(patterns, cheap, batch.weights, "alignment"),
        "uniform_alignment_cheap": uniform_alignment(cheap, visible, batch.weights),
        "gradient_alignment_cheap": pull(cheap),
    }
    conflict = sampler.conflict(i)
    conflict = EvalBatch(*conflict, None)
    out = model(conflict.inputs, return_patterns=True)
    m["conflict_accuracy"] = token_metrics(out.logits, conflict.targets, conflict.weights)[
        "accuracy"
    ]
    # How often the model gives the cheap route's (wrong) answer where the routes disagree.
    cheap_answer = out.logits.argmax(-1) == task.cheap_answer(conflict.inputs)
    scored = jnp.maximum(conflict.weights.sum(), 1.0)
    m["conflict_cheap_agreement"] = (cheap_answer * conflict.weights).sum() / scored
    m["conflict_alignment"] = _per_head(out.patterns, conflict.deps, conflict.weights, "alignment")
    m["conflict_alignment_cheap"] = _per_head(
        out.patterns, task.cheap_deps(conflict.weights), conflict.weights, "alignment"
    )
    m["conflict_uniform_alignment"] = uniform_alignment(conflict.deps, visible, conflict.weights)
    measured = definition.exp.train.gradient_alignment  # a synthetic task: it has deps
    conflict_pull = _pull(definition, model, conflict, out.patterns, visible, measured)
    m["conflict_gradient_alignment"] = conflict_pull(conflict.deps)
    return m


def _cross(definition, model, batch, patterns, measured: bool) -> dict:
    """An encoder-decoder's cross-attention, per decoder layer and head: alignment with the
    task's `cross_deps` (every marked source position counts: target i and source i are
    different sequences), entropy, mean distance |i - j|, and the loss's pull, beside what
    uniform attention over the real source positions gives."""
    B, L = batch.inputs.shape
    S = batch.source.shape[1]
    source_valid_BS = definition.exp.task.source_valid(batch.source)
    visible_BLS = cross_visibility(source_valid_BS, batch.valid, L, S, B)
    heads = [
        attention_metrics(p, batch.cross_deps, batch.weights, batch.valid, exclude_self=False)
        for p in patterns
    ]
    m = {f"cross_{name}": jnp.stack([h[name] for h in heads]) for name in heads[0]}
    m["cross_uniform_alignment"] = uniform_alignment(
        batch.cross_deps, visible_BLS, batch.weights, exclude_self=False
    )
    m["cross_uniform_entropy"] = uniform_entropy(visible_BLS, batch.valid)
    if not measured:
        m["cross_gradient_alignment"] = jnp.full(definition.cross_has_pattern_NH.shape, jnp.nan)
        return m
    grads = definition._pattern_gradients(model, batch, batch.valid, patterns, "cross_attention")
    m["cross_gradient_alignment"] = jnp.stack(
        [
            gradient_alignment(
                descent_direction(g, p, visible_BLS, qk_H),
                batch.cross_deps,
                batch.weights,
                exclude_self=False,
            )
            for g, p, qk_H in zip(grads, patterns, definition.cross_qk_scores_NH)
        ]
    )
    return m


def _per_head(patterns, deps, weights, name: str) -> jax.Array:
    """(N, H) of one per-head attention metric over the layers' patterns."""
    return jnp.stack([attention_metrics(p, deps, weights)[name] for p in patterns])


class Examples(NamedTuple):
    """The first few held-out sequences of eval batch 0 (axis E) and every layer's patterns on
    them: what the attention viewer and the heatmaps show. A seq2seq model's also carry the
    source and its cross-attention (None otherwise)."""

    inputs: jax.Array  # int32 (E, L)
    targets: jax.Array  # int32 (E, L)
    weights: jax.Array  # float32 (E, L)
    deps: jax.Array  # bool (E, L, S)
    probs: jax.Array  # (E, N, H, L, S)
    source: jax.Array | None = None  # int32 (E, S)
    cross_probs: jax.Array | None = None  # (E, N, H, L, S)
    cross_deps: jax.Array | None = None  # bool (E, L, S)


# Sequences kept per seed for the viewer (fewer when the batch is smaller).
EXAMPLES = 4


def example_patterns(
    definition: Definition, sampler: Sampler, params: nnx.State, rest: nnx.State, arrays: Any
) -> Examples:
    """The patterns of every layer and head on the first `EXAMPLES` eval sequences."""
    model = definition.merge(params, rest)
    batch = sampler.eval(arrays, 0)
    first = jax.tree.map(lambda x: x[: min(EXAMPLES, sampler.batch_size)], batch)
    out = definition.forward(model, first, first.valid, return_patterns=True)
    stack = lambda patterns: jnp.stack(patterns, axis=1)  # N x (E, H, L, S) -> (E, N, H, L, S)
    drawn = Examples(first.inputs, first.targets, first.weights, first.deps, stack(out.patterns))
    if definition.seq2seq:
        drawn = drawn._replace(
            source=first.source, cross_probs=stack(out.cross_patterns), cross_deps=first.cross_deps
        )
    return drawn


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _state_is_finite(state: TrainState) -> jax.Array:
    leaves = jax.tree.leaves(state.params)
    return jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in leaves]), 0
    )


class Programs:
    """The compiled programs of one experiment, for all its seeds at once (leading axis Z).

    Each is a pure function above with its definition, optimiser and sampler bound, vmapped
    over seeds (`spmd_axis_name="seeds"`) and jitted once with the run's shardings; the
    task's arrays are an argument of every program that samples.
    """

    def __init__(self, exp: Experiment, local: bool = False):
        """`local`: on one device of this process, ignoring the run's mesh (for probing)."""
        tc = exp.train
        self.exp = exp
        self.definition = definition = Definition.of(exp)
        self.optimizer = optimizer = make_optimizer(exp.optim, tc.steps)
        # Refuses a mesh that does not fit the devices, seeds or batch (before any compile).
        self.placement = place = Placement(tc.mesh, len(tc.seeds), tc.batch_size, local)
        self.sampler = sampler = Sampler(
            exp.task, tc.batch_size, jax.random.PRNGKey(tc.eval_seed), place.rows
        )
        self.keys_Z = place.put(seed_keys(tc.seeds), place.per_seed)
        seeds = lambda f, in_axes=0: jax.vmap(f, in_axes=in_axes, spmd_axis_name="seeds")
        init = seeds(functools.partial(init_state, definition, optimizer))
        self.state_sharding = state = place.state(jax.eval_shape(init, self.keys_Z))
        weights = (state.params, state.rest, place.replicated)
        self._init = jax.jit(init, in_shardings=place.per_seed, out_shardings=state)
        self._chunk = jax.jit(
            seeds(functools.partial(train_chunk, definition, optimizer, sampler), (0, 0, None)),
            in_shardings=(state, place.per_seed, place.replicated),
            out_shardings=(state, place.replicated),
            donate_argnums=0,
        )
        self._evaluate = jax.jit(
            seeds(functools.partial(evaluate, definition, sampler), (0, 0, None)),
            in_shardings=weights,
            out_shardings=place.replicated,
        )
        self._patterns = jax.jit(
            seeds(functools.partial(example_patterns, definition, sampler), (0, 0, None)),
            in_shardings=weights,
            out_shardings=place.replicated,
        )
        self._finite = jax.jit(
            _state_is_finite, in_shardings=(state,), out_shardings=place.replicated
        )
        self.compiled_chunk = None
        self.compile_seconds = float("nan")

    def init(self) -> TrainState:
        return self._init(self.keys_Z)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of `init()`'s state (the restore target)."""
        return abstract_like(jax.eval_shape(self.init), self.state_sharding)

    def place(self, arrays: Any) -> Any:
        """The task's arrays where the programs read them: whole on every device (in one
        process, the loaded arrays themselves when they already sit there)."""
        replicated = self.placement.replicated
        if jax.process_count() == 1:
            return jax.device_put(arrays, replicated)
        # A multi-process mesh takes global arrays, made from the values every process holds.
        return jax.tree.map(lambda x: self.placement.put(np.asarray(x), replicated), arrays)

    def compile(self, state: TrainState, arrays: Any) -> None:
        """Compile the chunk for `state` (done once; a no-op afterwards)."""
        if self.compiled_chunk is None:
            t0 = time.perf_counter()
            self.compiled_chunk = self._chunk.lower(state, self.keys_Z, arrays).compile()
            self.compile_seconds = time.perf_counter() - t0

    def train_chunk(self, state: TrainState, arrays: Any) -> tuple[TrainState, dict]:
        """`steps_per_dispatch` steps for every seed; metrics shaped (Z, steps)."""
        self.compile(state, arrays)
        return self.compiled_chunk(state, self.keys_Z, arrays)

    def evaluate(self, state: TrainState, arrays: Any) -> dict[str, np.ndarray]:
        """Held-out metrics per seed (leading axis Z); per-head arrays are (Z, N, H), NaN
        where a head has no pattern."""
        out = jax.device_get(self._evaluate(state.params, state.rest, arrays))
        for name in PER_HEAD:
            if name in out:
                out[name] = np.where(self.definition.has_pattern_NH[None], out[name], np.nan)
        for name in CROSS_PER_HEAD:
            if name in out:
                has_pattern_NH = self.definition.cross_has_pattern_NH
                out[name] = np.where(has_pattern_NH[None], out[name], np.nan)
        return out

    def patterns(self, state: TrainState, arrays: Any) -> Examples:
        """`Examples` of every seed (leading axis Z: probs (Z, E, N, H, L, S), ...)."""
        return jax.device_get(self._patterns(state.params, state.rest, arrays))

    def params_finite(self, state: TrainState) -> np.ndarray:
        """(Z,) bool: which seeds' parameters are all finite."""
        return np.asarray(self._finite(state))
