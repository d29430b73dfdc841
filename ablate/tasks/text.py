"""Real data as tasks: language modelling on a text column or the stdlib, text classification.

Built from its knobs a text task is a spec: it knows its vocabulary (the tokenizer's, plus
the labels), its sequence length and its knobs, and reads nothing (a tokenizer other than
`bytes` is read to learn its vocabulary). `load()` reads the data (`ablate.data`), tokenises
it on the host, validates it there (the device never sees an id outside the vocabulary) and
puts it on the device as token arrays, with the chance level measured on the training split.
Batches are then gathered on the device inside the compiled step, from the arrays it is
given: training walks the data in epochs (`ablate.tasks.order`), held-out batches are drawn
at random from the eval split with the fixed eval key. The limit of this design: the
tokenised training split must fit in device memory (a few GB of int32 ids), which covers the
corpora this toolkit is for; streaming larger corpora is not supported.

Tasks: `text_lm` (a text column chunked into windows; next-token prediction), `stdlib_lm`
(the embedded corpus: the Python standard library's own source files found on this machine,
in sorted order, split by file), their masked-LM versions `text_mlm` and `stdlib_mlm` (the
same data and windows, masked by `ablate.tasks.masked` instead of shifted: for a
bidirectional model), `text_classification` (a text and a label column; the label is
predicted at a final CLS position). Real text has no ground-truth dependency mask, so
attention alignment is not reported for these tasks (`has_dependencies = False`).
"""

from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ablate import data as sources
from ablate.data import BYTES, CLS, LOCAL_SUFFIXES, PAD, SEP, DataError, column, make_tokenizer
from ablate.tasks.base import Batch, Knobs, Task, TaskData, bounds, outside, register
from ablate.tasks.masked import MaskKnobs, mask_tokens, ungrouped
from ablate.tasks.order import epoch_order

MASK_STREAM = 2**31 - 1  # fold_in index of the masking stream: past any epoch index


class Splits(NamedTuple):
    """The loaded arrays of a text task: its training and its eval split."""

    train: Any
    eval: Any


class Examples(NamedTuple):
    """A classification split on the device: padded token ids, label ids, CLS positions."""

    ids_NL: jax.Array
    label_N: jax.Array
    cls_N: jax.Array


class _TextTask(Task):
    """Base of the data-backed tasks: token arrays on the device, no dependency mask.

    `data` (an in-memory `datasets.Dataset`, or a dict of splits) stands in for
    `config.source` when given.
    """

    has_dependencies = False
    context_need = "unknown"  # real data: how much it needs context is what gets measured

    def __init__(self, config: Any = None, *, data=None):
        super().__init__(config)
        self._data = data
        self.tokenizer = make_tokenizer(self.config.tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        self.seq_len = self.config.seq_len

    def _special(self, token: int) -> int:
        """The id of special token PAD/BOS/SEP/CLS under this task's tokenizer."""
        return self.tokenizer.specials + (token - BYTES)

    def token_labels(self, ids) -> list[str]:
        """The tokenizer's label of each id; ids past its vocabulary are the task's own (a
        masked LM's MASK, a classifier's labels)."""
        tok, labels = self.tokenizer, []
        for i in (int(i) for i in np.asarray(ids).ravel()):
            labels.append(tok.label(i) if i < tok.vocab_size else self._extra_label(i))
        return labels

    def _extra_label(self, token: int) -> str:
        return str(token)

    def _split(self, split: str):
        """One split of the configured source (or of the in-memory data)."""
        cfg = self.config
        return sources.load_dataset(
            cfg.source, split, config=cfg.config, revision=cfg.revision, data=self._data
        )

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        raise TypeError(
            f"{self.name} samples from its loaded data: use sample_at / eval_sample with "
            "task.load().arrays"
        )

    def reference(self, inputs):
        raise TypeError(f"{self.name} has no reference solver: real data has no known rule")

    def is_valid(self, inputs) -> bool:
        x = np.asarray(inputs)
        return x.ndim == 1 and len(x) <= self.seq_len and not outside(x, self.vocab_size).any()


@dataclasses.dataclass(frozen=True)
class TextLMConfig(Knobs):
    """Language modelling on a text column: windows of seq_len tokens, next-token targets."""

    source: str = ""
    split: str = "train"
    config: str = ""
    revision: str = ""
    text_column: str = "text"
    tokenizer: str = "bytes"
    seq_len: int = 128
    eval_fraction: float = 0.1
    max_tokens: int = 8_000_000

    def problems(self):
        found = bounds(self, seq_len=(2, 8192), max_tokens=(1000, 2_000_000_000))
        if not 0 < self.eval_fraction < 1:
            found.append(("eval_fraction", f"must be in (0, 1), got {self.eval_fraction}"))
        return found


class _LanguageModel(_TextTask):
    """Shared loader and sampler of the LM tasks: windows of a train and an eval token array."""

    leaks_future = True  # next-token targets are the next inputs: causal models only

    def _documents(self) -> list[str]:
        raise TypeError("subclasses return the documents")

    def load(self) -> TaskData:
        """Splits(train ids (T,), eval ids (T',)) on the device, and the unigram chance level."""
        docs = self._documents()
        if not docs or not any(d.strip() for d in docs):
            raise DataError(f"task {self.name}: every text is empty; nothing to train on")
        # Split by document (never inside one), deterministically: the last documents are eval.
        n_eval = max(1, round(len(docs) * self.config.eval_fraction)) if len(docs) > 1 else 0
        parts = [docs[: len(docs) - n_eval], docs[len(docs) - n_eval :]] if n_eval else [docs, docs]
        arrays = []
        sep = self._special(SEP)
        for part in parts:
            ids = [np.concatenate([self.tokenizer.encode(d), [sep]]) for d in part if d]
            arrays.append(np.concatenate(ids)[: self.config.max_tokens].astype(np.int32))
        for name, arr in zip(("train", "eval"), arrays):
            if len(arr) < self.seq_len + 1:
                raise DataError(
                    f"task {self.name}: the {name} split has {len(arr)} tokens, fewer than "
                    f"seq_len + 1 = {self.seq_len + 1}; lower task.seq_len or add text"
                )
            if outside(arr, self.vocab_size).any():
                raise DataError(f"task {self.name}: token id {arr.max()} outside the vocabulary")
        counts = np.bincount(arrays[0], minlength=self.vocab_size)
        # Chance: always predicting the most frequent token (a unigram model ignoring context).
        chance = float(counts.max() / counts.sum())
        return TaskData(Splits(*(jnp.asarray(a) for a in arrays)), chance)

    def _windows(self, ids: jax.Array, key: jax.Array, batch_size: int, starts_B=None) -> Batch:
        L = self.seq_len
        if starts_B is None:
            starts_B = jax.random.randint(key, (batch_size,), 0, ids.shape[0] - L)
        idx_BL = starts_B[:, None] + jnp.arange(L + 1)[None, :]
        window_BL = ids[idx_BL]
        deps_BLL = jnp.zeros((batch_size, L, L), bool)
        weights_BL = jnp.ones((batch_size, L), jnp.float32)
        return Batch(window_BL[:, :-1], window_BL[:, 1:], weights_BL, deps_BLL)

    def sample_at(self, arrays: Splits, key: jax.Array, step: jax.Array, batch_size: int) -> Batch:
        starts_B = self.epoch_starts(arrays.train.shape[0], key, step, batch_size)
        return self._windows(arrays.train, key, batch_size, starts_B)

    def epoch_starts(self, n_tokens: int, key: jax.Array, step: jax.Array, batch_size: int):
        """Where the training windows of `step` start in a stream of `n_tokens` tokens.

        Each epoch tiles the stream with windows from a random offset below L (so window
        boundaries move between epochs) and visits every window of that tiling once.
        """
        T, L = n_tokens, self.seq_len
        max_shift = min(L, T - L)
        n = (T - L - max_shift) // L + 1
        index_B, epoch_B = epoch_order(key, step, batch_size, n)
        shift_B = jax.vmap(
            lambda e: jax.random.randint(
                jax.random.fold_in(jax.random.fold_in(key, e), 1), (), 0, max_shift
            )
        )(epoch_B)
        return shift_B + index_B * L

    def eval_sample(self, arrays: Splits, key: jax.Array, batch_size: int) -> Batch:
        return self._windows(arrays.eval, key, batch_size)


@register
class TextLM(_LanguageModel):
    """Next-token prediction on a text column of local files or a hub dataset."""

    name = "text_lm"
    Config = TextLMConfig

    def _documents(self) -> list[str]:
        if not self.config.source and self._data is None:
            raise DataError("task.source: give local files (txt/jsonl/csv/parquet) or a hub name")
        texts = column(self._split(self.config.split), self.config.text_column, "task.text_column")
        return [t for t in texts if isinstance(t, str)]


@dataclasses.dataclass(frozen=True)
class StdlibLMConfig(Knobs):
    """Byte-level LM on this machine's Python standard library sources (no download)."""

    seq_len: int = 128
    eval_fraction: float = 0.1
    max_tokens: int = 8_000_000
    tokenizer: str = "bytes"

    problems = TextLMConfig.problems


@register
class StdlibLM(_LanguageModel):
    """The embedded corpus: byte-level LM over the Python standard library's own source."""

    name = "stdlib_lm"
    Config = StdlibLMConfig

    def _documents(self) -> list[str]:
        files = sources.stdlib_files()
        if not files:
            raise DataError(f"no *.py files found in {sysconfig.get_paths()['stdlib']}")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]


@dataclasses.dataclass(frozen=True)
class TextMLMConfig(MaskKnobs, TextLMConfig):
    """Masked LM on a text column: `text_lm`'s windows, a share mask_rate of tokens masked."""

    def problems(self):
        return TextLMConfig.problems(self) + MaskKnobs.problems(self)


@dataclasses.dataclass(frozen=True)
class StdlibMLMConfig(MaskKnobs, StdlibLMConfig):
    """Byte-level masked LM on this machine's Python standard library sources."""

    problems = TextMLMConfig.problems


class _MaskedLanguageModel(_LanguageModel):
    """Masked LM (BERT) on an LM task's data: windows of seq_len tokens, masked on the device.

    Every position is a candidate; a random replacement is an ordinary token of the
    tokenizer (not a special); MASK is one id after the tokenizer's vocabulary. Accuracy,
    loss and perplexity are over the selected tokens only (the others have weight 0), and
    chance is the training split's unigram share, as for LM (the selected positions are
    uniformly placed). Reference levels are not computable, as for all real text.
    """

    bidirectional = True
    leaks_future = False  # a masked target is not shown by any input

    def __init__(self, config: Any = None, *, data=None):
        super().__init__(config, data=data)
        self.mask_id = self.tokenizer.vocab_size
        self.vocab_size = self.mask_id + 1

    def _extra_label(self, token: int) -> str:
        return "MASK" if token == self.mask_id else str(token)

    def _windows(self, ids: jax.Array, key: jax.Array, batch_size: int, starts_B=None) -> Batch:
        L = self.seq_len
        if starts_B is None:
            starts_B = jax.random.randint(key, (batch_size,), 0, ids.shape[0] - L)
            key = jax.random.fold_in(key, MASK_STREAM)
        clean_BL = ids[starts_B[:, None] + jnp.arange(L)[None, :]]
        fill = (0, self.tokenizer.specials)
        m = mask_tokens(key, clean_BL, jnp.asarray(ungrouped(L)), self.config, self.mask_id, fill)
        deps_BLL = jnp.zeros((batch_size, L, L), bool)
        return Batch(m.inputs, m.targets, m.weights, deps_BLL)

    def sample_at(self, arrays: Splits, key: jax.Array, step: jax.Array, batch_size: int) -> Batch:
        starts_B = self.epoch_starts(arrays.train.shape[0], key, step, batch_size)
        masks = jax.random.fold_in(jax.random.fold_in(key, MASK_STREAM), step)
        return self._windows(arrays.train, masks, batch_size, starts_B)


@register
class TextMLM(_MaskedLanguageModel, TextLM):
    """Masked LM (BERT's masking) on a text column of local files or a hub dataset."""

    name = "text_mlm"
    Config = TextMLMConfig


@register
class StdlibMLM(_MaskedLanguageModel, StdlibLM):
    """The embedded corpus, masked: byte-level masked LM over the standard library's source."""

    name = "stdlib_mlm"
    Config = StdlibMLMConfig


@dataclasses.dataclass(frozen=True)
class TextClassificationConfig(Knobs):
    """Classify a text column into n_classes; the label is predicted at a final CLS token."""

    source: str = ""
    config: str = ""
    revision: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    text_column: str = "text"
    label_column: str = "label"
    n_classes: int = 2
    tokenizer: str = "bytes"
    seq_len: int = 256
    max_examples: int = 200_000

    def problems(self):
        return bounds(self, n_classes=(2, 10_000), seq_len=(2, 8192), max_examples=(1, 100_000_000))


@register
class TextClassification(_TextTask):
    """Text classification read by a causal model: the label is the target at the CLS token.

    Texts are truncated to seq_len - 1 tokens (keeping the start), then CLS, then padding.
    Label k is the token id vocab_size_of_text + k, so predictions are over the whole vocab.
    """

    name = "text_classification"
    Config = TextClassificationConfig

    def __init__(self, config: TextClassificationConfig | None = None, *, data=None):
        super().__init__(config, data=data)
        self.text_vocab = self.tokenizer.vocab_size
        self.vocab_size = self.text_vocab + self.config.n_classes
        self.pad_id = self._special(PAD)

    def _extra_label(self, token: int) -> str:
        return f"class {token - self.text_vocab}"

    def load(self) -> TaskData:
        """Splits(train, eval) as `Examples` on the device, and the majority-label chance."""
        cfg = self.config
        if not cfg.source and self._data is None:
            raise DataError("task.source: give local files (jsonl/csv/parquet) or a hub name")
        local = (
            self._data is None and Path(cfg.source.replace("{split}", "x")).suffix in LOCAL_SUFFIXES
        )
        if local and "{split}" not in cfg.source and cfg.train_split != cfg.eval_split:
            raise DataError(
                f"task.source {cfg.source!r} is one local file, so it has no {cfg.eval_split!r} "
                "split: name a file per split with {split} in the path (e.g. data/{split}.jsonl), "
                "or set task.eval_split = task.train_split to evaluate on the training data"
            )
        splits = {}
        for which, split in (("train", cfg.train_split), ("eval", cfg.eval_split)):
            ds = self._split(split)
            texts = column(ds, cfg.text_column, "task.text_column")[: cfg.max_examples]
            labels = column(ds, cfg.label_column, "task.label_column")[: cfg.max_examples]
            splits[which] = self._encode(texts, labels, which)
        counts = np.bincount(
            np.asarray(splits["train"].label_N) - self.text_vocab, minlength=cfg.n_classes
        )
        return TaskData(Splits(splits["train"], splits["eval"]), float(counts.max() / counts.sum()))

    def _encode(self, texts, labels, which: str) -> Examples:
        cfg, L = self.config, self.config.seq_len
        ids_NL = np.full((len(texts), L), self._special(PAD), np.int32)
        label_N = np.zeros(len(texts), np.int32)
        cls_N = np.zeros(len(texts), np.int32)
        for n, (text, label) in enumerate(zip(texts, labels)):
            if not isinstance(text, str) or not text.strip():
                raise DataError(
                    f"{which} example {n}: empty or missing text in column {cfg.text_column!r}"
                )
            if not isinstance(label, int | np.integer) or not 0 <= label < cfg.n_classes:
                raise DataError(
                    f"{which} example {n}: label {label!r} is outside 0..{cfg.n_classes - 1} "
                    f"(task.n_classes = {cfg.n_classes})"
                )
            tokens = self.tokenizer.encode(text)[: L - 1]
            ids_NL[n, : len(tokens)] = tokens
            ids_NL[n, len(tokens)] = self._special(CLS)
            cls_N[n], label_N[n] = len(tokens), self.text_vocab + int(label)
        if len(texts) == 0:
            raise DataError(f"the {which} split is empty")
        return Examples(jnp.asarray(ids_NL), jnp.asarray(label_N), jnp.asarray(cls_N))

    def _examples(self, examples: Examples, key: jax.Array, batch_size: int, pick_B=None) -> Batch:
        if pick_B is None:
            pick_B = jax.random.randint(key, (batch_size,), 0, examples.ids_NL.shape[0])
        inputs_BL, cls_B = examples.ids_NL[pick_B], examples.cls_N[pick_B]
        at_cls_BL = jnp.arange(self.seq_len)[None, :] == cls_B[:, None]
        targets_BL = jnp.where(at_cls_BL, examples.label_N[pick_B][:, None], 0)
        deps_BLL = jnp.zeros((batch_size, self.seq_len, self.seq_len), bool)
        return Batch(
            inputs_BL, targets_BL.astype(jnp.int32), at_cls_BL.astype(jnp.float32), deps_BLL
        )

    def sample_at(self, arrays: Splits, key: jax.Array, step: jax.Array, batch_size: int) -> Batch:
        index_B, _ = epoch_order(key, step, batch_size, int(arrays.train.ids_NL.shape[0]))
        return self._examples(arrays.train, key, batch_size, index_B)

    def eval_sample(self, arrays: Splits, key: jax.Array, batch_size: int) -> Batch:
        return self._examples(arrays.eval, key, batch_size)
