"""Reading real data: local files or the Hugging Face hub through `datasets`, and tokenisers.

The I/O the data-backed tasks (`ablate.tasks.text`) do when they are loaded, and nothing
else: this module knows no task. `DataError` is the one error for data that cannot be used
(exit code 3), raised here, by the tasks, and by training for batches the model cannot take.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

BYTES = 256
PAD, BOS, SEP, CLS = 256, 257, 258, 259
SPECIAL_NAMES = {PAD: "PAD", BOS: "BOS", SEP: "SEP", CLS: "CLS"}
VISIBLE_WHITESPACE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}
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


# --- tokenisers ------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus PAD, BOS, SEP and CLS: nothing to download."""

    vocab_size = BYTE_VOCAB
    specials = BYTES

    def label(self, token: int) -> str:
        """A readable label of one id: the byte's character (space, newline and tab as
        symbols, other unprintable bytes as \\xNN), or the special's name."""
        if token >= BYTES:
            return SPECIAL_NAMES.get(token, str(token))
        char = chr(token)
        if char in VISIBLE_WHITESPACE:
            return VISIBLE_WHITESPACE[char]
        return char if 32 < token < 127 else f"\\x{token:02x}"

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

    def label(self, token: int) -> str:
        """The tokenizer's own string of an id, or our special's name."""
        if token >= self.specials:
            return SPECIAL_NAMES.get(token - self.specials + PAD, str(token))
        return self._tok.id_to_token(token) or str(token)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)


def make_tokenizer(name: str):
    return ByteTokenizer() if name == "bytes" else HubTokenizer(name)


def stdlib_files() -> list[Path]:
    """The top-level *.py files of the standard library, sorted (deterministic per Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())
