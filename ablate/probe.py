"""Post-hoc head ablation: does a trained model rely on learned context, and in which heads?

`probe_run` loads a run's latest checkpoint and evaluates it on training's held-out batches
(drawn by `ablate.core.eval_batch`, validity mask included), with heads ablated by wrapping
each trained mixer (`ablate.ablation.edited`), i.e. before the output projection, where heads
are still separate. Kinds of ablation:

  zero          the head's output is zeroed (a gate of 0; no bias or other weight is touched)
  mean          the head's output is replaced by its per-position mean over reference batches
  uniform       the head's pattern is uniform over the visible positions (the `uniform` mixer)
  random        the head's pattern is a fixed random one (the `random_fixed` mixer, scale 1)
  mean_pattern  the head's pattern is its mean over reference batches (Hassid et al. 2022)
  resample      the head's pattern is the one it forms on a different input

Pattern kinds do not apply to heads without a pattern (`fourier`): their results are NaN.
Every ablation of every kind, and the pruning prefixes, is one row of stacked edit arrays;
one compiled call evaluates all rows (vmapped) for all seeds (vmapped). Head importance is
Michel et al. (2019): E_x |d loss(x) / d gate| at gate = 1, the absolute value taken per
example x (one sequence), on ranking batches held out from the eval batches; the pruning curve,
measured on the eval batches, removes heads (gate 0) from the least important up, and in a
random order.

An encoder-decoder run is probed per kind of attention (`ablate.heads.Part`): encoder
self-attention (source x source, bidirectional), decoder self-attention (target x target,
causal) and cross-attention (target x source), every head of each a target, named
PART:LAYER:HEAD ("encoder:0:1", "cross:1:0"; a decoder-only model's heads are LAYER:HEAD).
The source is fed as `ablate.core.Definition.forward` feeds it, with its padding mask. A
replacement pattern keeps to the positions the head may see (in cross-attention the real
source positions), renormalised; mean outputs, mean patterns and resampled patterns are
each part's own. Importance and pruning rank the heads of all parts in one order: a choice
(every gate scales one head's output before its output projection, whatever its part), not
a claim that heads of different parts compare fairly.

Axis letters: the table in `ablate.model` (here A ablation rows, R replacement sources
`SOURCES`, G head groups, E eval or ranking batches, X pruning prefixes, and a leading Z, the
seed axis, on host-side arrays such as `gate_ZANH` and `importance_ZNH`). For an
encoder-decoder, N runs over the layers of every part in turn: the encoder's, the decoder's
self-attention's, then cross-attention's (`Part.layers` says where each sits).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ablate.ablation import attentions_of, edited, recorded
from ablate.attention import MIXERS
from ablate.checkpoint import Checkpointer
from ablate.config import ConfigError, upgrade_saved
from ablate.core import Programs, TrainState, build_model, eval_batch
from ablate.distributed import is_primary
from ablate.experiment import Experiment, build_experiment
from ablate.heads import (
    PART_TITLES,
    Group,
    Part,
    group_name,
    head_name,
    parse_heads,
    part_at,
    parts_of,
)
from ablate.logging import TensorBoardWriter
from ablate.metrics import nan_to_none, token_metrics
from ablate.plots import drop_heatmap_png, pruning_png
from ablate.runfolder import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    DROP_PNG,
    PROBE_DIR,
    PROBE_FILE,
    PROBE_RECORD,
    PRUNING_PNG,
    seed_dir,
    write_atomic,
)
from ablate.tasks import TaskData

KINDS = ("zero", "mean", "uniform", "random", "mean_pattern", "resample")
PATTERN_KINDS = frozenset({"uniform", "random", "mean_pattern", "resample"})
#: What the non-zero kinds mix in: "mean" replaces a head's output, the others its pattern.
SOURCES = ("mean", "uniform", "random", "mean_pattern", "resample")
METRICS = ("accuracy", "loss", "sequence_accuracy")
# Folded into the eval key: the reference batches are a stream the eval batches never use.
REFERENCE_STREAM = 0x52454600
# Likewise for the batches that rank heads: a pruning curve measured on the batches its
# order was chosen on would flatter the order.
RANKING_STREAM = 0x52414E4B
RANDOM_SEED = 0


def read_experiment(run_dir: str | Path) -> Experiment:
    """The resolved experiment of a run folder, refusing a folder that holds no checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        what = "does not exist" if not run_dir.exists() else f"has no {CONFIG_FILE}"
        raise ConfigError([("run_dir", f"{run_dir} {what}: not a run folder of `ablate train`")])
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        raise ConfigError([("run_dir", f"{ckpt_dir} holds no checkpoint: train the run first")])
    return build_experiment(upgrade_saved(json.loads((run_dir / CONFIG_FILE).read_text())))


def load_run(run_dir: str | Path) -> tuple[Experiment, TrainState, int]:
    """(experiment, latest good training state of every seed, its step) of a run folder."""
    exp = read_experiment(run_dir)
    ckpt = Checkpointer(Path(run_dir) / CHECKPOINT_DIR, keep=exp.train.keep_checkpoints)
    # Probing runs on one device of each process: every seed's state is restored there
    # (whatever mesh wrote it); in a multi-process run each process computes the same
    # numbers and process 0 writes them.
    try:
        restored = ckpt.restore_latest(Programs(exp, local=True).abstract_state())
    finally:
        ckpt.close()
    if restored is None:
        msg = f"{ckpt.directory} holds no readable checkpoint (bad steps were set aside)"
        raise ConfigError([("run_dir", msg)])
    step, state, _ = restored
    return exp, state, step


def parse_kinds(kinds: str | Sequence[str]) -> tuple[str, ...]:
    """Validated kind names from "zero,mean" or a sequence."""
    names = [k.strip() for k in kinds.split(",")] if isinstance(kinds, str) else list(kinds)
    bad = [k for k in names if k not in KINDS]
    if bad or not names:
        msg = f"{bad or names!r} not allowed; choose from {', '.join(KINDS)}"
        raise ConfigError([("kinds", msg)])
    return tuple(dict.fromkeys(names))


class ProbedModel(NamedTuple):
    """What the probe knows of a model besides its weights: its graph (split from params and
    rest), its kinds of attention, which heads have a pattern (N, H), and its head shape."""

    graphdef: Any
    parts: tuple[Part, ...]
    has_pattern_NH: np.ndarray
    n_heads: int
    head_dim: int
    dtype: Any

    @classmethod
    def of(cls, model: nnx.Module, parts: tuple[Part, ...], head_dim: int, dtype: Any):
        """Read off a model (an abstract one will do: no weight is read)."""
        graphdef, _, _ = nnx.split(model, nnx.Param, ...)
        heads = [a.has_pattern_H for p in parts for a in attentions_of(model, p.attention)]
        has_pattern_NH = np.array(heads, dtype=bool)
        return cls(graphdef, parts, has_pattern_NH, has_pattern_NH.shape[1], head_dim, dtype)


class ProbeBatches(NamedTuple):
    """The probe's data, each (E, B, ...): `eval` (inputs, targets, weights, valid[, source,
    source_valid]) measures every edit; `reference` (inputs, valid[, source, source_valid])
    gives the mean outputs and patterns, and the resampled patterns; `ranking` (as eval)
    ranks the heads by importance, held out from `eval`."""

    eval: tuple
    reference: tuple
    ranking: tuple


class Prober:
    """Compiled ablated evaluation and gate gradients of one trained model, all seeds at once.

    An edit (one row) is `gate_NH`, which scales each head's output, and `mix_RNH`, how much
    of each replacement source in `SOURCES` a head takes instead of its own output/pattern;
    N is the layer axis of all `parts`. `params`/`rest` carry the seed axis Z, as in a
    `TrainState`. `Prober.of_run` probes a run of `ablate train` on its task's batches;
    ablate/pretrained_probe.py probes a pretrained model on text windows.
    """

    def __init__(
        self,
        probed: ProbedModel,
        params: Any,
        rest: Any,
        batches: ProbeBatches,
        chunk: int | None = None,
    ):
        self.params, self.rest, self.chunk = params, rest, chunk
        self.graphdef, self.parts, self.has_pattern_NH = probed[:3]
        self.N, self.H = self.has_pattern_NH.shape
        self.head_dim, self.dtype = probed.head_dim, jnp.dtype(probed.dtype)
        self.n_seeds = jax.tree.leaves(params)[0].shape[0]
        self.eval_batches, self.reference_batches, self.ranking_batches = batches
        # Made once by a small program of its own and passed in: inside the big programs
        # the random pattern would be compiled again (seconds on a CPU).
        self.fixed_patterns = jax.jit(self._fixed_patterns)()
        self._evaluate = jax.jit(jax.vmap(self._evaluate_one, in_axes=(0,) * 4 + (None,) * 3))
        self._gradients = jax.jit(jax.vmap(self._gradients_one, in_axes=(0, 0, None)))

    @classmethod
    def of_run(
        cls,
        exp: Experiment,
        params: Any,
        rest: Any,
        data: TaskData | None = None,
        chunk: int | None = None,
    ) -> Prober:
        """The prober of a trained run. `data` is the task's loaded data (read here when not
        given). Batches are drawn as training's eval draws them (`ablate.core.eval_batch`),
        with their validity masks (and, for an encoder-decoder, the source and its mask): a
        padded model is probed with its padding masked, as it was trained and evaluated."""
        parts = parts_of(exp)
        abstract = nnx.eval_shape(lambda: build_model(exp.model, nnx.Rngs(0)))
        probed = ProbedModel.of(abstract, parts, exp.model.head_dim, exp.model.dtype)
        arrays = (exp.task.load() if data is None else data).arrays
        eval_key = jax.random.PRNGKey(exp.train.eval_seed)
        reference_key = jax.random.fold_in(eval_key, REFERENCE_STREAM)
        ranking_key = jax.random.fold_in(eval_key, RANKING_STREAM)
        E = exp.train.eval_batches
        batches = jax.jit(
            lambda arrays: ProbeBatches(
                _batches(exp, arrays, eval_key, E),
                _model_inputs(_batches(exp, arrays, reference_key, E)),
                _batches(exp, arrays, ranking_key, E),
            )
        )(arrays)
        return cls(probed, params, rest, batches, chunk)

    def _fixed_patterns(self) -> tuple[jax.Array, ...]:
        """Per part, uniform and random patterns (2, N, 1, H, L, S), from the variant registry."""
        fixed = []
        for part in self.parts:
            # Both mixers ignore x's values, and without padding every sequence sees the same.
            x_1LD = jnp.zeros((1, part.queries, part.settings.d_model), self.dtype)
            visible_1LS = part.visible(None, None, 1)
            uniform = MIXERS["uniform"](self.H, part.settings, nnx.Rngs(0))
            randoms = [
                MIXERS["random_fixed"](self.H, part.settings, nnx.Rngs(RANDOM_SEED + n))
                for n in range(part.first, part.first + part.n_layers)
            ]
            random_N1HLS = jnp.stack([m.pattern(x_1LD, visible_1LS) for m in randoms])
            uniform_N1HLS = jnp.broadcast_to(
                uniform.pattern(x_1LD, visible_1LS), random_N1HLS.shape
            )
            fixed.append(jnp.stack([uniform_N1HLS, random_N1HLS]))
        return tuple(fixed)

    def _edited(self, model, gate_NH, mix_RNH, patterns_RNBHLS, outputs_NBLHK):
        """`model` with every head edited by one row; a source given as None is never mixed in.

        `patterns_RNBHLS` and `outputs_NBLHK` hold one array per part (N: its layers)."""
        H, K = self.H, self.head_dim
        pattern_mix_NH = mix_RNH[1:].sum(0)
        share_RNH = mix_RNH[1:] / jnp.maximum(pattern_mix_NH, 1e-30)[None]
        fills, outputs = [], []
        for i, part in enumerate(self.parts):
            N, L, S = part.n_layers, part.queries, part.keys
            if patterns_RNBHLS is None:
                fill_NBHLS = jnp.zeros((N, 1, H, L, S), self.dtype)
            else:
                share = share_RNH[:, part.layers]
                fill_NBHLS = jnp.einsum("RNH,RNBHLS->NBHLS", share, patterns_RNBHLS[i])
            if outputs_NBLHK is None:
                output_NBLHK = jnp.zeros((N, 1, L, H, K), self.dtype)
            else:
                output_NBLHK = outputs_NBLHK[i]
            fills += list(fill_NBHLS)
            outputs += list(output_NBLHK)
        # A zero mix adds 0 * fill to 1 * own: an edit that ablates nothing changes no bit.
        part = tuple(p.attention for p in self.parts)
        return edited(model, gate_NH, pattern_mix_NH, fills, mix_RNH[0], outputs, part=part)

    def _patterns(self, out) -> tuple[jax.Array, ...]:
        """Per part, the patterns (N, B, H, L, S) of a model output."""
        return tuple(jnp.stack(getattr(out, p.patterns)) for p in self.parts)

    def _evaluate_one(self, params, rest, gate_ANH, mix_ARNH, batches, references, fixed):
        model = nnx.merge(self.graphdef, params, rest)
        part = tuple(p.attention for p in self.parts)

        def reference(inputs):
            args, kwargs = _model_args(*inputs)
            out, heads = recorded(model, *args, part=part, return_patterns=True, **kwargs)
            patterns = [x for p in self.parts for x in getattr(out, p.patterns)]
            # Per part, the batch means stacked over its layers: (N, H, L, S), (N, L, H, K).
            return tuple(
                tuple(jnp.stack([x.mean(0) for x in xs[p.layers]]) for p in self.parts)
                for xs in (patterns, heads)
            )

        mean_pattern_NHLS, mean_output_NLHK = jax.tree.map(
            lambda x: x.mean(0), jax.lax.map(reference, references)
        )
        B = references[0].shape[1]
        shapes = [(p.n_layers, B, self.H, p.queries, p.keys) for p in self.parts]
        mean_pattern = [jnp.broadcast_to(x[:, None], s) for x, s in zip(mean_pattern_NHLS, shapes)]
        mean_output = [
            jnp.broadcast_to(x[:, None], (p.n_layers, B, p.queries, self.H, self.head_dim))
            for x, p in zip(mean_output_NLHK, self.parts)
        ]
        uniform, random = (
            [jnp.broadcast_to(x[k], s) for x, s in zip(fixed, shapes)] for k in range(2)
        )

        def one(batch_and_reference):
            batch, reference = batch_and_reference
            inputs, targets, weights, valid, *source = batch
            resampled = self._patterns(_forward(model, *reference, return_patterns=True))
            patterns = []
            for i, part in enumerate(self.parts):
                stacked = jnp.stack([uniform[i], random[i], mean_pattern[i], resampled[i]])
                if valid is not None or source:
                    # Padded sequences: a replacement pattern attends only where this batch's
                    # own heads may (its visible, unpadded positions), renormalised, as a
                    # variant would.
                    visible_11B1LS = part.visible(valid, source[1] if source else None, B)[
                        None, None, :, None
                    ]
                    stacked = stacked * visible_11B1LS
                    stacked = stacked / jnp.maximum(stacked.sum(-1, keepdims=True), 1e-30)
                patterns.append(stacked)

            def edited(edit):
                ablated = self._edited(model, *edit, patterns, mean_output)
                logits = _forward(ablated, inputs, valid, *source).logits
                return token_metrics(logits, targets, weights)

            if self.chunk:
                return jax.lax.map(edited, (gate_ANH, mix_ARNH), batch_size=self.chunk)
            return jax.vmap(edited)((gate_ANH, mix_ARNH))

        return jax.lax.map(one, (batches, references))  # per batch: (E, A)

    def _gradients_one(self, params, rest, batches) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(self.graphdef, params, rest)
        no_mix_RNH = jnp.zeros((len(SOURCES), self.N, self.H))

        def loss(gate_NH, example):
            inputs_1L, targets_1L, weights_1L, *masks = jax.tree.map(lambda x: x[None], example)
            ablated = self._edited(model, gate_NH, no_mix_RNH, None, None)
            logits = _forward(ablated, inputs_1L, *masks).logits
            return token_metrics(logits, targets_1L, weights_1L)["loss"]

        # A sequence with nothing scored has no loss to explain; it would only dilute the mean.
        counted_EB = batches[2].sum(-1) > 0
        return per_example_gate_importance(loss, jnp.ones((self.N, self.H)), batches, counted_EB)

    def evaluate(self, gate_ZANH, mix_ZARNH, per_batch: bool = False) -> dict[str, np.ndarray]:
        """Metrics (Z, A) of every edit row, in one compiled call: the mean over the eval
        batches, or with `per_batch` each batch's (Z, E, A), for paired intervals."""
        gate, mix = (jnp.asarray(x, jnp.float32) for x in (gate_ZANH, mix_ZARNH))
        data = (self.eval_batches, self.reference_batches, self.fixed_patterns)
        measured = self._evaluate(self.params, self.rest, gate, mix, *data)
        return jax.device_get(
            measured if per_batch else {k: v.mean(1) for k, v in measured.items()}
        )

    def edits(self, kinds: Sequence[str], masks_ANH) -> tuple[np.ndarray, np.ndarray]:
        """(gate_ZANH, mix_ZARNH) ablating the heads of row a (masks ANH or ZANH) by kinds[a]."""
        masks = np.asarray(masks_ANH, np.float32)
        masks = np.broadcast_to(masks, (self.n_seeds, *masks.shape[-3:]))
        gate = np.where(np.asarray(kinds)[None, :, None, None] == "zero", 1.0 - masks, 1.0)
        mix = np.zeros((*masks.shape[:2], len(SOURCES), *masks.shape[2:]), np.float32)
        for a, kind in enumerate(kinds):
            if kind != "zero":
                mix[:, a, SOURCES.index(kind)] = masks[:, a]
        return gate, mix

    def ablate(self, kind: str, masks_ANH) -> dict[str, np.ndarray]:
        """Metrics (Z, A) with the heads of each mask row (ANH, or ZANH per seed) ablated."""
        return self.evaluate(*self.edits([kind] * np.shape(masks_ANH)[-3], masks_ANH))

    def gate_gradients(self) -> tuple[np.ndarray, np.ndarray]:
        """(E_x d loss(x) / d gate, Michel importance E_x |d loss(x) / d gate|), both (Z, N, H).

        On the ranking batches, never on the eval batches that `evaluate` measures.
        """
        return jax.device_get(self._gradients(self.params, self.rest, self.ranking_batches))


def per_example_gate_importance(
    loss_fn: Callable[[jax.Array, Any], jax.Array],
    gate_NH: jax.Array,
    examples: Any,
    counted_EB: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(mean gradient, Michel importance: mean |gradient|) over the counted examples.

    `loss_fn(gate_NH, example)` is one example's loss; `examples` is a pytree with leading
    axes (E, B): batches go one at a time (lax.map), the B examples of one side by side
    (vmap). The absolute value is taken per example: of the batch-mean gradient, examples
    pulling a gate in opposite directions would cancel.
    """
    per_example = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))
    grads_EBNH = jax.lax.map(lambda batch: per_example(gate_NH, batch), examples)
    w_EB11 = counted_EB.astype(grads_EBNH.dtype)[:, :, None, None]
    n = jnp.maximum(w_EB11.sum(), 1.0)
    return (grads_EBNH * w_EB11).sum((0, 1)) / n, (jnp.abs(grads_EBNH) * w_EB11).sum((0, 1)) / n


def _batches(exp: Experiment, arrays: Any, stream: jax.Array, n: int) -> tuple:
    """(inputs, targets, weights, valid), each (n, B, ...), drawn by training's own eval-batch
    function from the eval stream `stream`; valid is None for tasks that are never padded.
    A seq2seq task's batches add (source, source_valid): the mask is drawn with the batch, as
    `ablate.core.Definition.forward` computes it, and carried beside it."""

    def one(i):
        batch = eval_batch(exp.task, arrays, stream, i, exp.train.batch_size)
        drawn = batch.inputs, batch.targets, batch.weights, batch.valid
        if batch.source is None:
            return drawn
        return *drawn, batch.source, exp.task.source_valid(batch.source)

    return jax.lax.map(one, jnp.arange(n))


def _model_inputs(batches: tuple) -> tuple:
    """What the model reads of batches: (inputs, valid), and (source, source_valid) if any."""
    return batches[:1] + batches[3:]


def _model_args(inputs_BL, valid_BL, *source) -> tuple[tuple, dict]:
    """(args, kwargs) of a model call on a batch's inputs, as `Definition.forward` makes them."""
    if not source:
        return (inputs_BL,), {"valid_BL": valid_BL}
    source_BS, source_valid_BS = source
    return (source_BS, inputs_BL), {"source_valid_BS": source_valid_BS, "valid_BL": valid_BL}


def _forward(model, inputs_BL, valid_BL, *source, **kwargs):
    """The model's output on a batch's inputs (and source, for an encoder-decoder)."""
    args, batch_kwargs = _model_args(inputs_BL, valid_BL, *source)
    return model(*args, **batch_kwargs, **kwargs)


def _masks(groups: Sequence[Group], N: int, H: int) -> np.ndarray:
    masks_ANH = np.zeros((len(groups), N, H), np.float32)
    for a, group in enumerate(groups):
        masks_ANH[a][tuple(zip(*group))] = 1.0
    return masks_ANH


def _prefix_masks(order: np.ndarray, N: int, H: int) -> np.ndarray:
    """(N*H + 1, N, H): row p ablates the first p heads of `order` (flat head indices)."""
    rank = np.argsort(order)
    return (rank[None, :] < np.arange(N * H + 1)[:, None]).astype(np.float32).reshape(-1, N, H)


def probe_run(
    run_dir: str | Path,
    kinds: str | Sequence[str] = KINDS,
    heads: str | Sequence | None = None,
    seeds: Sequence[int] | None = None,
    out_dir: str | Path | None = None,
    tensorboard: bool = True,
    chunk: int | None = None,
    data: TaskData | None = None,
) -> dict[str, Any]:
    """Ablate heads of a trained run; write the table, plots and images; return the results.

    `heads` as `parse_heads` reads it (default: every head alone, of every part). `chunk`
    caps how many rows run side by side (memory), still in one compiled call. `data` is the
    task's loaded data (read here when not given: a sweep passes the copy its runs trained
    on). Outputs go to `out_dir` (default RUN_DIR/probe) and, as images at the checkpoint's
    step, to TensorBoard. For an encoder-decoder, the per-head results (`drop`, `gradient`,
    `importance`) are split by part ({part: (Z, N, H)}) and the table has a `part` column;
    importance and pruning rank the heads of all parts together.
    """
    kinds = parse_kinds(kinds)
    exp = read_experiment(run_dir)
    parts = parts_of(exp)
    N, H = sum(p.n_layers for p in parts), exp.model.n_heads
    groups = [((n, h),) for n in range(N) for h in range(H)]
    groups = groups if heads is None else parse_heads(heads, parts, H)
    trained = list(exp.train.seeds)
    seeds = trained if seeds is None else [int(s) for s in seeds]
    if missing := [s for s in seeds if s not in trained]:
        raise ConfigError([("seeds", f"{missing} not trained in this run; it has seeds {trained}")])
    _, state, step = load_run(run_dir)
    idx = np.asarray([trained.index(s) for s in seeds])
    params, rest = (jax.tree.map(lambda x: x[idx], s) for s in (state.params, state.rest))
    data = exp.task.load() if data is None else data
    prober = Prober.of_run(exp, params, rest, data, chunk=chunk)

    gradient_ZNH, importance_ZNH = prober.gate_gradients()
    orders = {
        "importance": [np.argsort(imp.ravel(), kind="stable") for imp in importance_ZNH],
        "random": [np.random.default_rng(s).permutation(N * H) for s in seeds],
    }
    Z, G, X = len(seeds), len(groups), N * H + 1
    # One call: row 0 ablates nothing (the baseline), then each group under each kind, then
    # the pruning prefixes of both orders.
    rows_kinds = ["zero"] + [kind for kind in kinds for _ in groups] + ["zero"] * 2 * X
    shared_ANH = np.concatenate(
        [np.zeros((1, N, H), np.float32)] + [_masks(groups, N, H)] * len(kinds)
    )
    prune_ZANH = np.stack(
        [np.concatenate([_prefix_masks(o[k], N, H) for o in orders.values()]) for k in range(Z)]
    )
    masks_ZANH = np.concatenate(
        [np.broadcast_to(shared_ANH, (Z, *shared_ANH.shape)), prune_ZANH], 1
    )
    measured = prober.evaluate(*prober.edits(rows_kinds, masks_ZANH))
    baseline = {m: measured[m][:, 0].tolist() for m in METRICS}
    pruning_Z2X = measured["accuracy"][:, -2 * X :]

    seq2seq = bool(parts[0].name)
    rows, drop = [], {}
    for i, kind in enumerate(kinds):
        drop[kind] = np.full((Z, N, H), np.nan)
        for g, group in enumerate(groups):
            applies = kind not in PATTERN_KINDS or all(prober.has_pattern_NH[x] for x in group)
            where = {"heads": group_name(group, parts)}
            if seq2seq:
                names = dict.fromkeys(part_at(parts, n).name for n, _ in group)
                where = {"part": "+".join(names), **where}
            for k, seed in enumerate(seeds):
                value = {
                    m: float(measured[m][k, 1 + i * G + g]) if applies else math.nan
                    for m in METRICS
                }
                value["accuracy_drop"] = baseline["accuracy"][k] - value["accuracy"]
                value["loss_increase"] = value["loss"] - baseline["loss"][k]
                rows.append({"kind": kind, "seed": seed, **where, **value})
                if len(group) == 1:
                    drop[kind][k][group[0]] = value["accuracy_drop"]

    def per_part(x_ZNH: np.ndarray) -> Any:
        """(Z, N, H) as written: split by part for an encoder-decoder."""
        if not seq2seq:
            return x_ZNH
        return {p.name: x_ZNH[:, p.layers] for p in parts}

    drop = {kind: per_part(d) for kind, d in drop.items()}
    names = np.asarray([head_name(parts, n, h) for n in range(N) for h in range(H)])
    result = {
        "run_dir": str(run_dir),
        "step": int(step),
        "seeds": seeds,
        "chance": float(data.chance),
        "kinds": list(kinds),
        "baseline": baseline,
        "drop": _tolist(drop),
        "gradient": _tolist(per_part(gradient_ZNH)),
        "importance": _tolist(per_part(importance_ZNH)),
        "importance_definition": "mean over examples of |d loss(x) / d gate| at gate 1",
        "importance_batches": (
            f"ranking stream ({exp.train.eval_batches} batches of {exp.train.batch_size}), "
            "held out from the measured eval batches"
        ),
        "measured_batches": "eval batches: baseline, every ablation and both pruning curves",
        "pruning": {
            "importance_order": [names[o].tolist() for o in orders["importance"]],
            "accuracy_importance_order": pruning_Z2X[:, :X].tolist(),
            "random_order": [names[o].tolist() for o in orders["random"]],
            "accuracy_random_order": pruning_Z2X[:, X:].tolist(),
        },
        "rows": rows,
    }
    if seq2seq:
        result["parts"] = {p.name: PART_TITLES[p.name] for p in parts}
        result["ranking"] = "one ranking over the heads of all parts"
    out_dir = Path(run_dir) / PROBE_DIR if out_dir is None else Path(out_dir)
    if not is_primary():
        return result
    result["files"] = _write_outputs(result, drop, pruning_Z2X, out_dir)
    if tensorboard:
        _write_tensorboard(Path(run_dir), result, drop, pruning_Z2X)
    return result


def _tolist(x: Any) -> Any:
    """Arrays (also in a dict of them) as nested lists."""
    return {k: _tolist(v) for k, v in x.items()} if isinstance(x, dict) else x.tolist()


def _titled(drop: Any, f: Callable[[np.ndarray], np.ndarray] | None = None) -> Any:
    """f of a kind's drop (Z, N, H), or per part {its title: f of its (Z, N, H)} (what
    `drop_heatmap_png` draws)."""
    f = f or (lambda x: x)
    if isinstance(drop, dict):
        return {PART_TITLES[name]: f(x) for name, x in drop.items()}
    return f(drop)


def start_outputs(out_dir: Path, rows: list[dict]) -> list[Path]:
    """A probe's output folder made ready and its table written: the heatmaps of a previous
    probe's other kinds removed (they would contradict the table), probe.csv (one row per
    ablation) written; returns [probe.json, probe.csv, pruning.png], the files to fill."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(DROP_PNG.format(kind="*")):
        stale.unlink()
    files = [out_dir / PROBE_FILE, out_dir / "probe.csv", out_dir / PRUNING_PNG]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(files[1], table.getvalue())
    return files


def _write_outputs(result: dict, drop: dict, pruning_Z2X: np.ndarray, out_dir: Path) -> list[str]:
    """probe.json (NaN as null), probe.csv (one row per kind, seed, ablation) and the PNGs."""
    files = start_outputs(out_dir, result["rows"])
    write_atomic(files[0], json.dumps(nan_to_none(result), indent=1))
    write_atomic(files[2], pruning_png(pruning_Z2X, result["seeds"], result["chance"])[0])
    titles = [f"seed {s}" for s in result["seeds"]]
    with_mean = (
        (lambda x: np.concatenate([x, x.mean(0, keepdims=True)])) if len(titles) > 1 else None
    )
    for kind, drop_ZNH in drop.items():
        files.append(out_dir / DROP_PNG.format(kind=kind))
        png = drop_heatmap_png(
            _titled(drop_ZNH, with_mean), titles + ["mean"] * (len(titles) > 1), kind
        )[0]
        write_atomic(files[-1], png)
    return [str(f) for f in files]


def _write_tensorboard(run_dir: Path, result: dict, drop: dict, pruning_Z2X: np.ndarray) -> None:
    """Per seed, one image per tag at the checkpoint's step, never the same (step, tag) twice."""
    step = result["step"]
    for k, seed in enumerate(result["seeds"]):
        logdir = seed_dir(run_dir, seed)
        # Readers disagree on a step written twice (NOTES.md): a rerun skips what is there.
        record = logdir / PROBE_RECORD
        written = json.loads(record.read_text()) if record.is_file() else []
        todo = [t for t in [*drop, "pruning"] if [step, f"probe/{t}"] not in written]
        if not todo:
            continue
        writer = TensorBoardWriter(logdir)
        for tag in todo:
            if tag == "pruning":
                png = pruning_png(pruning_Z2X[k : k + 1], [seed], result["chance"])
            else:
                seed_drop = _titled(drop[tag], lambda x, k=k: x[k : k + 1])
                png = drop_heatmap_png(seed_drop, [f"seed {seed}"], tag)
            writer.image(f"probe/{tag}", *png, step)
            written.append([step, f"probe/{tag}"])
        writer.close()
        write_atomic(record, json.dumps(written))


def summary(result: dict[str, Any]) -> str:
    """What `ablate probe` prints: the baseline, the heads by importance, the largest drops."""
    out = [f"probe of {result['run_dir']} at step {result['step']} (chance {result['chance']:.3f})"]
    for k, seed in enumerate(result["seeds"]):
        order = result["pruning"]["importance_order"][k]
        accuracy = result["baseline"]["accuracy"][k]
        out.append(
            f"  seed {seed}: accuracy {accuracy:.3f}; heads by importance {', '.join(order[::-1])}"
        )
    for kind in result["kinds"]:
        rows = [r for r in result["rows"] if r["kind"] == kind and np.isfinite(r["accuracy_drop"])]
        top = sorted(rows, key=lambda r: -r["accuracy_drop"])[:3]
        shown = ", ".join(f"{r['heads']} {r['accuracy_drop']:+.3f}" for r in top) or "n/a"
        out.append(f"  {kind:12s} largest accuracy drops: {shown}")
    out.append(f"table and plots: {Path(result['files'][0]).parent}")
    return "\n".join(out)
