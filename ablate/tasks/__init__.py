"""The task registry: every task, synthetic or data-backed, by name.

Layout: `base` (the batch, the task spec and its loaded data, the registry, helpers shared by
the tasks), the synthetic tasks (`recall`, `sequences`, `controls`, and the masked-LM ones
with the masking scheme they share, `masked`), the data-backed ones (`text`, reading through
`ablate.data`) and their epoch order (`order`), and the sequence-to-sequence tasks read by
the encoder-decoder (`translation`). Importing the
package registers them all. A new task is a `Task` subclass with a `Config` of knobs,
decorated with `register`, in one of these modules (or any module imported before the
task is named).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ablate.config import ConfigError, from_dict
from ablate.tasks.base import TASKS, Batch, Task, TaskData, mode_share, register
from ablate.tasks.controls import Majority, Memorize, balanced_counts
from ablate.tasks.masked import MaskedCopy, MaskedRecall, MaskedTask, MaskKnobs
from ablate.tasks.recall import MQAR, AssocRecall, CompetingRecall, Induction
from ablate.tasks.sequences import Copy, Reverse, SelectiveCopy, Sort
from ablate.tasks.text import StdlibLM, StdlibMLM, TextClassification, TextLM, TextMLM
from ablate.tasks.translation import (
    PhraseTranslate,
    ReverseCopy,
    Seq2SeqBatch,
    Seq2SeqTask,
    Translate,
    TranslateReorder,
)

__all__ = [
    "MQAR",
    "TASKS",
    "AssocRecall",
    "Batch",
    "CompetingRecall",
    "Copy",
    "Induction",
    "MaskKnobs",
    "MaskedCopy",
    "MaskedRecall",
    "MaskedTask",
    "Majority",
    "Memorize",
    "PhraseTranslate",
    "Reverse",
    "ReverseCopy",
    "SelectiveCopy",
    "Seq2SeqBatch",
    "Seq2SeqTask",
    "Sort",
    "StdlibLM",
    "StdlibMLM",
    "Task",
    "TaskData",
    "TextClassification",
    "TextLM",
    "TextMLM",
    "Translate",
    "TranslateReorder",
    "balanced_counts",
    "make_task",
    "mode_share",
    "register",
    "task_names",
]


def task_names() -> list[str]:
    """Names of the registered tasks, sorted (the data-backed ones included)."""
    return sorted(TASKS)


def make_task(name: str, params: Mapping[str, Any] | None = None, path: str = "task") -> Task:
    """Build the spec of task `name` from plain-data knobs (reads no data); problems are
    reported under `path`."""
    dot = f"{path}." if path else ""
    if name not in task_names():  # a list, so an unhashable name is refused, not a crash
        choices = ", ".join(task_names())
        raise ConfigError([(f"{dot}name", f"unknown task {name!r}; choose one of {choices}")])
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError([(path, f"expected a table of task knobs, got {params!r}")])
    cls = TASKS[name]
    return cls(from_dict(cls.Config, params or {}, path))
