"""Real data through Hugging Face `datasets`, as tasks in the one task registry.

Text is tokenised once on the host (byte-level by default: nothing to download), validated
there (the device never sees an id outside the vocabulary), and kept on the device as one
token array; batches are then gathered on the device inside the compiled step. Training
walks the data in epochs: each epoch takes the examples (classification) or the windows of
a fresh tiling of the token stream (language modelling: windows start at a random per-epoch
offset) in an order shuffled per seed and epoch by a keyed Feistel permutation, none twice,
dropping the n mod batch_size left over (`epoch_order`). The batch of step s is a function of (seed, s) alone: no host
pipeline to prefetch or starve the device, and a resumed run continues on exactly the
batches it would have seen (the data position is the step, which checkpoints hold). Held-out
batches are drawn at random from the eval split with the fixed eval key. The limit of this
design: the tokenised training split must fit in device memory (a few GB of int32 ids),
which covers the corpora this toolkit is for; streaming larger corpora is not supported.

Tasks: `text_lm` (a text column chunked into windows; next-byte prediction), `stdlib_lm`
(the embedded corpus: the Python standard library's own source files found on this machine,
in sorted order, split by file), `text_classification` (a text and a label column; the label
is predicted at a final CLS position). Real text has no ground-truth dependency mask, so
attention alignment is not reported for these tasks (`has_dependencies = False`).
"""

from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ablate.tasks import Batch, Task, _bounds, _Knobs, _register

BYTES = 256
PAD, BOS, SEP, CLS = 256, 257, 258, 259
BYTE_VOCAB = 260
LOCAL_SUFFIXES = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


class DataError(ValueError):
    """The data cannot be used as configured (exit code 3): says what and what exists."""


# --- loading ---------------------------------------------------------------------------------


def load_dataset(source: str, split: str, *, config: str = "", revision: str = "", data=None):
    """A `datasets.Dataset` from local files (txt/jsonl/json/csv/parquet), or a hub name.

    `data` may be an in-memory `datasets.Dataset` (or a dict of splits), used as is.
    """
    import datasets

    if data is not None:
        if isinstance(data, dict | datasets.DatasetDict):
            if split not in data:
                raise DataError(f"split {split!r} not found; available: {sorted(data)}")
            return data[split]
        return data
    path = Path(source.replace("{split}", split)).expanduser()
    if path.exists():
        files = (
            sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
            if path.is_dir()
            else [path]
        )
        kinds = {LOCAL_SUFFIXES.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) != 1:
            raise DataError(
                f"{path}: expected files ending in one of {sorted(LOCAL_SUFFIXES)} "
                f"(all of one kind), found {[p.name for p in files[:10]]}"
            )
        # Local files are one split; `{split}` in the source path names a file per split.
        files_arg = {"train": [str(p) for p in files]}
        return datasets.load_dataset(kinds.pop(), data_files=files_arg)["train"]
    if "{split}" in source or Path(source).suffix in LOCAL_SUFFIXES:
        raise DataError(f"local data {str(path)!r} not found (task.source = {source!r})")
    try:
        return datasets.load_dataset(source, config or None, split=split, revision=revision or None)
    except (ConnectionError, OSError) as e:
        raise DataError(
            f"could not load {source!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Without network, point "
            "task.source at local files instead (a .txt/.jsonl/.csv/.parquet file or a "
            "folder of them), or set HF_DATASETS_OFFLINE=1 to fail fast."
        ) from None


def column(ds, name: str, field: str) -> list:
    """The values of column `name`, or a DataError listing the columns that exist."""
    if name not in ds.column_names:
        raise DataError(f"{field}: column {name!r} not found; available: {ds.column_names}")
    return ds[name]


# --- epoch order --------------------------------------------------------------------------

FEISTEL_ROUNDS = 4


def permute(key: jax.Array, x: jax.Array, n: int) -> jax.Array:
    """A pseudo-random permutation of range(n), keyed by `key`, applied to the ids `x`.

    A balanced Feistel network on the smallest even bit width holding n (round function:
    threefry bits of `fold_in(round_key, half)`), with cycle walking for ids that land at or
    past n. Costs O(len(x)), not O(n): no table of n entries per step.
    """
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = jnp.uint32((1 << half) - 1)
    round_keys = jax.random.split(key, FEISTEL_ROUNDS)

    def rounds(v):
        left, right = v >> half, v & mask
        for k in round_keys:
            f = jax.vmap(lambda r, k=k: jax.random.bits(jax.random.fold_in(k, r), (), jnp.uint32))
            left, right = right, left ^ (f(right) & mask)
        return (left << half) | right

    n32 = jnp.uint32(n)
    v = rounds(x.astype(jnp.uint32))
    v = jax.lax.while_loop(
        lambda v: jnp.any(v >= n32), lambda v: jnp.where(v >= n32, rounds(v), v), v
    )
    return v.astype(jnp.int32)


def epoch_order(key: jax.Array, step: jax.Array, batch_size: int, n: int):
    """(indices (B,), epochs (B,)): the examples of training step `step` out of n.

    With n >= batch_size an epoch is n // batch_size steps of distinct examples (the rest of
    that epoch's order is dropped, a different rest each epoch); with fewer examples than a
    batch, one step holds ceil(batch_size / n) epochs, the last of them cut short. Each epoch's order is `permute` under
    `fold_in(key, epoch)`.
    """
    j = jnp.arange(batch_size)
    if n >= batch_size:
        per_epoch = n // batch_size
        epoch_B = jnp.broadcast_to(step // per_epoch, (batch_size,))
        slot_B = (step % per_epoch) * batch_size + j
    else:
        epochs_per_step = -(-batch_size // n)
        epoch_B = step * epochs_per_step + j // n
        slot_B = j % n
    index_B = jax.vmap(lambda e, s: permute(jax.random.fold_in(key, e), s[None], n)[0])(
        epoch_B, slot_B
    )
    return index_B, epoch_B


# --- tokenisers ------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus PAD, BOS, SEP and CLS: nothing to download."""

    vocab_size = BYTE_VOCAB
    specials = BYTES

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(
            np.int32
        )


class HubTokenizer:
    """A Hugging Face `tokenizers` tokenizer (a local tokenizer.json or a hub name)."""

    def __init__(self, name: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(
                f"tokenizer {name!r} needs the `tokenizers` package (pip install tokenizers); "
                "the default tokenizer = 'bytes' needs nothing"
            ) from None
        path = Path(name).expanduser()
        try:
            self._tok = (
                Tokenizer.from_file(str(path))
                if path.is_file()
                else Tokenizer.from_pretrained(name)
            )
        except Exception as e:  # noqa: BLE001 - report any loading failure the same way
            raise DataError(f"could not load tokenizer {name!r}: {e}") from None
        base = self._tok.get_vocab_size()
        # Our four specials go after the tokenizer's own ids.
        self.specials = base
        self.vocab_size = base + 4

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)


def make_tokenizer(name: str):
    return ByteTokenizer() if name == "bytes" else HubTokenizer(name)


# --- tasks -----------------------------------------------------------------------------------


class _TextTask(Task):
    """Base of the data-backed tasks: token arrays on the device, no dependency mask."""

    has_dependencies = False
    context_need = "unknown"  # real data: how much it needs context is what gets measured

    def __init__(self, config: Any = None, *, data=None):
        super().__init__(config)
        self._data = data
        self.tokenizer = make_tokenizer(self.config.tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        self._load()

    def _special(self, token: int) -> int:
        """The id of special token PAD/BOS/SEP/CLS under this task's tokenizer."""
        return self.tokenizer.specials + (token - BYTES)

    def reference(self, inputs):
        raise TypeError(f"{self.name} has no reference solver: real data has no known rule")

    def is_valid(self, inputs) -> bool:
        x = np.asarray(inputs)
        return (
            x.ndim == 1
            and len(x) <= self.seq_len
            and bool(((0 <= x) & (x < self.vocab_size)).all())
        )


@dataclasses.dataclass(frozen=True)
class TextLMConfig(_Knobs):
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
        found = _bounds(self, seq_len=(2, 8192), max_tokens=(1000, 2_000_000_000))
        if not 0 < self.eval_fraction < 1:
            found.append(("eval_fraction", f"must be in (0, 1), got {self.eval_fraction}"))
        return found


class _LanguageModel(_TextTask):
    """Shared sampler of the LM tasks: random windows from a train and an eval token array."""

    def _documents(self) -> list[str]:
        raise TypeError("subclasses return the documents")

    def _load(self) -> None:
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
        self.seq_len = self.config.seq_len
        for name, arr in zip(("train", "eval"), arrays):
            if len(arr) < self.seq_len + 1:
                raise DataError(
                    f"task {self.name}: the {name} split has {len(arr)} tokens, fewer than "
                    f"seq_len + 1 = {self.seq_len + 1}; lower task.seq_len or add text"
                )
            if arr.min() < 0 or arr.max() >= self.vocab_size:
                raise DataError(f"task {self.name}: token id {arr.max()} outside the vocabulary")
        self.n_tokens = {"train": len(arrays[0]), "eval": len(arrays[1])}
        self._train_ids, self._eval_ids = (jnp.asarray(a) for a in arrays)
        counts = np.bincount(arrays[0], minlength=self.vocab_size)
        # Chance: always predicting the most frequent token (a unigram model ignoring context).
        self.chance = float(counts.max() / counts.sum())

    def _windows(self, ids: jax.Array, key: jax.Array, batch_size: int, starts_B=None) -> Batch:
        L = self.seq_len
        if starts_B is None:
            starts_B = jax.random.randint(key, (batch_size,), 0, ids.shape[0] - L)
        idx_BL = starts_B[:, None] + jnp.arange(L + 1)[None, :]
        window_BL = ids[idx_BL]
        deps_BLL = jnp.zeros((batch_size, L, L), bool)
        weights_BL = jnp.ones((batch_size, L), jnp.float32)
        return Batch(window_BL[:, :-1], window_BL[:, 1:], weights_BL, deps_BLL)

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        return self._windows(self._train_ids, key, batch_size)

    def sample_at(self, key: jax.Array, step: jax.Array, batch_size: int) -> Batch:
        starts_B = self.epoch_starts(key, step, batch_size)
        return self._windows(self._train_ids, key, batch_size, starts_B)

    def epoch_starts(self, key: jax.Array, step: jax.Array, batch_size: int) -> jax.Array:
        """Where the training windows of `step` start in the token stream.

        Each epoch tiles the stream with windows from a random offset below L (so window
        boundaries move between epochs) and visits every window of that tiling once.
        """
        T, L = self.n_tokens["train"], self.seq_len
        max_shift = min(L, T - L)
        n = (T - L - max_shift) // L + 1
        index_B, epoch_B = epoch_order(key, step, batch_size, n)
        shift_B = jax.vmap(
            lambda e: jax.random.randint(
                jax.random.fold_in(jax.random.fold_in(key, e), 1), (), 0, max_shift
            )
        )(epoch_B)
        return shift_B + index_B * L

    def eval_sample(self, key: jax.Array, batch_size: int) -> Batch:
        return self._windows(self._eval_ids, key, batch_size)


@_register
class TextLM(_LanguageModel):
    """Next-token prediction on a text column of local files or a hub dataset."""

    name = "text_lm"
    Config = TextLMConfig

    def _documents(self) -> list[str]:
        if not self.config.source and self._data is None:
            raise DataError("task.source: give local files (txt/jsonl/csv/parquet) or a hub name")
        ds = load_dataset(
            self.config.source,
            self.config.split,
            config=self.config.config,
            revision=self.config.revision,
            data=self._data,
        )
        texts = column(ds, self.config.text_column, "task.text_column")
        return [t for t in texts if isinstance(t, str)]


@dataclasses.dataclass(frozen=True)
class StdlibLMConfig(_Knobs):
    """Byte-level LM on this machine's Python standard library sources (no download)."""

    seq_len: int = 128
    eval_fraction: float = 0.1
    max_tokens: int = 8_000_000
    tokenizer: str = "bytes"

    problems = TextLMConfig.problems


def stdlib_files() -> list[Path]:
    """The top-level *.py files of the standard library, sorted (deterministic per Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


@_register
class StdlibLM(_LanguageModel):
    """The embedded corpus: byte-level LM over the Python standard library's own source."""

    name = "stdlib_lm"
    Config = StdlibLMConfig

    def _documents(self) -> list[str]:
        files = stdlib_files()
        if not files:
            raise DataError(f"no *.py files found in {sysconfig.get_paths()['stdlib']}")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]


@dataclasses.dataclass(frozen=True)
class TextClassificationConfig(_Knobs):
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
        return _bounds(
            self, n_classes=(2, 10_000), seq_len=(2, 8192), max_examples=(1, 100_000_000)
        )


@_register
class TextClassification(_TextTask):
    """Text classification read by a causal model: the label is the target at the CLS token.

    Texts are truncated to seq_len - 1 tokens (keeping the start), then CLS, then padding.
    Label k is the token id vocab_size_of_text + k, so predictions are over the whole vocab.
    """

    name = "text_classification"
    Config = TextClassificationConfig

    def _load(self) -> None:
        cfg = self.config
        if not cfg.source and self._data is None:
            raise DataError("task.source: give local files (jsonl/csv/parquet) or a hub name")
        self.text_vocab = self.tokenizer.vocab_size
        self.vocab_size = self.text_vocab + cfg.n_classes
        self.pad_id = self._special(PAD)
        self.seq_len = cfg.seq_len
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
            ds = load_dataset(
                cfg.source, split, config=cfg.config, revision=cfg.revision, data=self._data
            )
            texts = column(ds, cfg.text_column, "task.text_column")[: cfg.max_examples]
            labels = column(ds, cfg.label_column, "task.label_column")[: cfg.max_examples]
            splits[which] = self._encode(texts, labels, which)
        self._train, self._eval = splits["train"], splits["eval"]
        counts = np.bincount(
            np.asarray(splits["train"][1]) - self.text_vocab, minlength=cfg.n_classes
        )
        self.chance = float(counts.max() / counts.sum())

    def _encode(self, texts, labels, which: str):
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
        return jnp.asarray(ids_NL), jnp.asarray(label_N), jnp.asarray(cls_N)

    def _examples(self, data, key: jax.Array, batch_size: int, pick_B=None) -> Batch:
        ids_NL, label_N, cls_N = data
        if pick_B is None:
            pick_B = jax.random.randint(key, (batch_size,), 0, ids_NL.shape[0])
        inputs_BL, cls_B = ids_NL[pick_B], cls_N[pick_B]
        at_cls_BL = jnp.arange(self.seq_len)[None, :] == cls_B[:, None]
        targets_BL = jnp.where(at_cls_BL, label_N[pick_B][:, None], 0)
        deps_BLL = jnp.zeros((batch_size, self.seq_len, self.seq_len), bool)
        return Batch(
            inputs_BL, targets_BL.astype(jnp.int32), at_cls_BL.astype(jnp.float32), deps_BLL
        )

    def sample(self, key: jax.Array, batch_size: int) -> Batch:
        return self._examples(self._train, key, batch_size)

    def sample_at(self, key: jax.Array, step: jax.Array, batch_size: int) -> Batch:
        index_B, _ = epoch_order(key, step, batch_size, int(self._train[0].shape[0]))
        return self._examples(self._train, key, batch_size, index_B)

    def eval_sample(self, key: jax.Array, batch_size: int) -> Batch:
        return self._examples(self._eval, key, batch_size)
