"""An experiment: one task, one model, one optimiser, one training plan, read from TOML.

An experiment file is data, never code. Its tables are `[task]` (a registered task `name`
and its knobs, built into a task spec that reads no data), `[model]` (ModelConfig;
vocab_size and seq_len default to the task's), `[optim]`, `[train]`, and for sweeps
`[sweep]` (read by sweep.py). The model's `kind` follows the task: "decoder" (ModelConfig,
the default) or, for a seq2seq task, "encoder_decoder" (Seq2SeqConfig, ablate/seq2seq.py;
source_vocab_size and source_len default to the task's); a kind that cannot read the task
is refused. Every problem in every
table is reported at once, each with its dotted path, before anything compiles or any
data is read (validation reads only the task's vocabulary, length and knobs).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from ablate.config import (
    ConfigError,
    apply_overrides,
    check,
    dotted,
    from_dict,
    load_toml,
    one_of,
    to_dict,
)
from ablate.distributed import MeshConfig
from ablate.model import ModelConfig
from ablate.seq2seq import KIND as ENCODER_DECODER
from ablate.seq2seq import Seq2SeqConfig
from ablate.tasks import Task, make_task

MODEL_KINDS = ("decoder", ENCODER_DECODER)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
EvalSchedule = Literal["every", "log"]
# Past this many, a log schedule is no longer sparse; the bound also keeps eval_steps() cheap.
MAX_EVAL_POINTS = 1000


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, then a constant or cosine schedule, and global-norm clipping."""

    learning_rate: float = 3e-3
    warmup_steps: int = 100
    schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.98

    def __post_init__(self):
        check(self)

    def problems(self):
        found = []
        if not self.learning_rate > 0:
            found.append(("learning_rate", f"must be > 0, got {self.learning_rate}"))
        if self.warmup_steps < 0:
            found.append(("warmup_steps", f"must be >= 0, got {self.warmup_steps}"))
        if self.weight_decay < 0:
            found.append(("weight_decay", f"must be >= 0, got {self.weight_decay}"))
        if self.grad_clip < 0:
            found.append(("grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}"))
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                found.append((name, f"must be in [0, 1), got {getattr(self, name)}"))
        return found


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long and how to train; `seeds` are trained together in one compiled program."""

    steps: int = 1000
    batch_size: int = 64
    seeds: tuple[int, ...] = (0,)
    steps_per_dispatch: int = 50
    log_every: int = 50
    eval_every: int = 250
    # When to evaluate (always at step 0 and at the last step): "every" every `eval_every`
    # steps (0: only then); "log" at `eval_points` steps spaced geometrically from the first
    # chunk to the last step (eval_every unused), dense early where attention changes
    # fastest. See eval_steps().
    eval_schedule: EvalSchedule = "every"
    eval_points: int = 24
    eval_batches: int = 4
    eval_seed: int = 12345
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    heatmap_every: int = 0
    compile_cache: bool = True
    # Measure the loss's pull on each head (gradient alignment) at every eval: one backward
    # pass per eval batch, and a larger eval program to compile; false leaves it NaN.
    gradient_alignment: bool = True
    # Devices per mesh axis (placement only: a run may resume on another mesh).
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        check(self)

    def problems(self):
        found = []
        for name in ("steps", "batch_size", "steps_per_dispatch", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                found.append((name, f"must be >= 1, got {getattr(self, name)}"))
        for name in ("eval_every", "checkpoint_every", "heatmap_every"):
            if getattr(self, name) < 0:
                found.append(
                    (name, f"must be >= 0 (0 = only at the end), got {getattr(self, name)}")
                )
        if message := one_of(self.eval_schedule, get_args(EvalSchedule)):
            found.append(("eval_schedule", message))
        if not 2 <= self.eval_points <= MAX_EVAL_POINTS:
            found.append(
                ("eval_points", f"must be in [2, {MAX_EVAL_POINTS}], got {self.eval_points}")
            )
        if self.keep_checkpoints < 1:
            found.append(("keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}"))
        if not self.seeds:
            found.append(("seeds", "needs at least one seed"))
        if len(set(self.seeds)) != len(self.seeds):
            found.append(("seeds", f"has duplicates: {list(self.seeds)}"))
        spd = self.steps_per_dispatch
        for name in ("log_every", "eval_every", "checkpoint_every", "heatmap_every"):
            every = getattr(self, name)
            if spd >= 1 and every > 0 and every % spd:
                found.append((name, f"must be a multiple of steps_per_dispatch={spd}, got {every}"))
        if spd >= 1 and self.steps % spd:
            found.append(
                ("steps", f"must be a multiple of steps_per_dispatch={spd}, got {self.steps}")
            )
        return found

    def eval_steps(self) -> tuple[int, ...]:
        """The steps the host loop evaluates at, sorted; always 0 and `steps`.

        The host sees the state only between chunks of `steps_per_dispatch` steps, so a log
        point is rounded to the nearest chunk boundary: with C = steps / steps_per_dispatch
        chunks, the points are steps_per_dispatch * round(C ** (i / (eval_points - 1))) for
        i = 0 .. eval_points - 1 (geomspace(steps_per_dispatch, steps, eval_points) in whole
        chunks). Points that round to the same chunk are merged, so a run of few chunks gets
        fewer evals than eval_points. The points depend on `steps`: extending a run moves them.
        """
        spd, n = self.steps_per_dispatch, self.eval_points
        if self.eval_schedule == "log":
            chunks = self.steps // spd
            inner = {spd * round(chunks ** (i / (n - 1))) for i in range(n)}
        elif self.eval_every:
            inner = set(range(self.eval_every, self.steps, self.eval_every))
        else:
            inner = set()
        return tuple(sorted({0, *inner, self.steps}))


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A fully resolved experiment: what `ablate train` runs and writes into the run folder."""

    name: str
    task: Task
    model: ModelConfig | Seq2SeqConfig
    optim: OptimConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        """Plain data of the resolved config (what config.toml/json in the run folder holds)."""
        return {
            "name": self.name,
            "task": {"name": self.task.name, **to_dict(self.task.config)},
            "model": to_dict(self.model),
            "optim": to_dict(self.optim),
            "train": to_dict(self.train),
        }


SECTIONS = ("name", "task", "model", "optim", "train", "sweep")


def build_experiment(data: Mapping[str, Any], *, default_name: str = "run") -> Experiment:
    """Validate plain data into an Experiment; every problem is raised together."""
    problems: list[tuple[str, str]] = []
    for key in data:
        if key not in SECTIONS:
            problems.append((dotted("", key), f"unknown section; allowed: {', '.join(SECTIONS)}"))

    name = data.get("name", default_name)
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        problems.append(
            ("name", f"{name!r} must be letters, digits, '_', '-', '.' (no path separators)")
        )

    def section(key: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, Mapping):
            problems.append((key, f"must be a table, got {value!r}"))
            return {}
        return dict(value)

    task = None
    task_data = section("task")
    task_name = task_data.pop("name", None)
    if task_name is None:
        problems.append(("task.name", "required: the name of a registered task"))
    else:
        try:
            task = make_task(task_name, task_data, path="task")
        except ConfigError as e:
            problems.extend(e.problems)

    model_data = section("model")
    seq2seq = task is not None and getattr(task, "seq2seq", False)
    kind = model_data.get("kind", ENCODER_DECODER if seq2seq else "decoder")
    if kind not in MODEL_KINDS:
        problems.append(("model.kind", one_of(kind, MODEL_KINDS)))
        kind = ENCODER_DECODER if seq2seq else "decoder"
    elif task is not None and (kind == ENCODER_DECODER) != seq2seq:
        problems.append(("model.kind", _kind_mismatch(task, kind)))
        kind = ENCODER_DECODER if seq2seq else "decoder"
    if kind == "decoder":
        model_data.pop("kind", None)  # not a ModelConfig field: decoder configs stay as they were
    if task is not None:
        model_data.setdefault("vocab_size", task.vocab_size)
        model_data.setdefault("seq_len", task.seq_len)
        if kind == ENCODER_DECODER:
            model_data.setdefault("source_vocab_size", task.source_vocab_size)
            model_data.setdefault("source_len", task.source_len)
            model_data["kind"] = kind
    else:
        # Stand-ins, so the model's own problems are reported now, not after the task's.
        model_data.setdefault("vocab_size", 1)
        model_data.setdefault("seq_len", 1)
        if kind == ENCODER_DECODER:
            model_data.setdefault("source_vocab_size", 1)
            model_data.setdefault("source_len", 1)
    model_class = Seq2SeqConfig if kind == ENCODER_DECODER else ModelConfig
    model = _build(model_class, model_data, "model", problems)
    optim = _build(OptimConfig, section("optim"), "optim", problems)
    train = _build(TrainConfig, section("train"), "train", problems)

    if task is not None and model is not None:
        problems.extend(_compatibility_problems(task, model))
    if problems:
        raise ConfigError(problems)
    return Experiment(name=name, task=task, model=model, optim=optim, train=train)


def _build(cls, data, path, problems):
    try:
        return from_dict(cls, data, path)
    except ConfigError as e:
        problems.extend(e.problems)
        return None


def _kind_mismatch(task: Task, kind: str) -> str:
    if kind == ENCODER_DECODER:
        return (
            f"task {task.name!r} is one sequence (no source): an encoder-decoder cannot read "
            'it; use kind = "decoder" (or leave kind out)'
        )
    return (
        f"task {task.name!r} maps a source to a target: it needs kind = "
        f'"{ENCODER_DECODER}" (or leave kind out)'
    )


def _compatibility_problems(task: Task, model) -> list[tuple[str, str]]:
    found = []
    if isinstance(model, Seq2SeqConfig):
        for field, size, what in (
            ("source_vocab_size", task.source_vocab_size, "source vocabulary"),
            ("source_len", task.source_len, "source length"),
        ):
            if getattr(model, field) < size:
                found.append(
                    (
                        f"model.{field}",
                        f"{getattr(model, field)} is smaller than the task's {what} ({size})",
                    )
                )
    if model.vocab_size < task.vocab_size:
        found.append(
            (
                "model.vocab_size",
                f"{model.vocab_size} is smaller than the task's vocabulary "
                f"({task.vocab_size}): token ids would fall outside the embedding table",
            )
        )
    if model.seq_len < task.seq_len:
        found.append(
            (
                "model.seq_len",
                f"{model.seq_len} is shorter than the task's sequences ({task.seq_len})",
            )
        )
    if model.causal and task.bidirectional:
        found.append(
            (
                "model.causal",
                f"task {task.name!r} is masked language modelling: a masked token depends on "
                "positions on both sides, which a causal model cannot see: use causal = false",
            )
        )
    if not model.causal and task.leaks_future:
        found.append(
            (
                "model.causal",
                f"task {task.name!r} reveals each target in later inputs, so a "
                "bidirectional model would read the answer: use causal = true",
            )
        )
    return found


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Experiment, dict]:
    """Read, override and validate an experiment file; returns (experiment, raw data)."""
    data = apply_overrides(load_toml(path), overrides)
    return build_experiment(data, default_name=Path(path).stem), data


def safe_join(root: str | Path, name: str) -> Path:
    """root/name, refusing names that would leave root (absolute paths, '..')."""
    root_path = Path(root).resolve()
    candidate = (root_path / name).resolve()
    if Path(name).is_absolute() or root_path not in candidate.parents:
        raise ConfigError([("name", f"{name!r} would leave the run root {root_path}")])
    return candidate
