"""`ablate probe --pretrained NAME`: how much a pretrained GPT-2 or BERT relies on its heads'
input-dependent attention, measured on held-out text.

The text (the embedded standard-library corpus by default, or a local file / hub dataset)
is tokenised with the model's own tokenizer and cut into windows: documents in a seeded
order, joined by the end-of-text (GPT-2) or [SEP] (BERT) token, cut into consecutive windows
of `seq_len` positions (a window never exceeds the model's context: a longer `seq_len` is
refused, never truncated silently). Windows are dealt, in a seeded order, into three sets of
`batches` x `batch_size`: eval (every number measured), reference (the mean outputs and
mean patterns, and the inputs of `resample`) and ranking (Michel importance, so the pruning
order is not chosen on the windows it is measured on). The loss is next-token cross-entropy
(GPT-2) or masked-token cross-entropy (BERT: `mask_rate` of each window's tokens, [CLS] and
[SEP] excepted, replaced by [MASK], at positions drawn from `seed`).

The measurements are the trained-run probe's (`ablate.probe.Prober`, one compiled call for
every row, `chunk` rows side by side: by default as many as `default_chunk` estimates to fit
in about 2 GB of activations): every head alone under every kind; Michel importance and the
pruning curves; and the whole-model PAPA measurement (Hassid et al. 2022): every head's
pattern replaced at once by its mean over the reference windows (`mean_pattern`), and by
uniform, then the same layer by layer. The whole-model and per-layer rows carry paired 95%
intervals over the eval batches (each batch's loss difference from the unablated model on
the same windows; Student t), and the summary's sentences are chosen from those bounds.

Real text has no ground-truth dependency mask, so attention alignment is not measured;
importance and the mean gate gradient per head (probe.json) are what the probe offers there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats

from ablate import data as sources
from ablate.attention import MixerSettings
from ablate.config import ConfigError
from ablate.data import DataError
from ablate.heads import Part, group_name, head_name, parse_heads
from ablate.logging import TensorBoardWriter
from ablate.metrics import nan_to_none
from ablate.plots import drop_heatmap_png, pruning_png
from ablate.pretrained import Pretrained, load
from ablate.probe import (
    PATTERN_KINDS,
    ProbeBatches,
    ProbedModel,
    Prober,
    _masks,
    _prefix_masks,
    parse_kinds,
    start_outputs,
)
from ablate.runfolder import DROP_PNG, PROBE_FILE, PROBE_RECORD, write_atomic

SUMMARY_FILE = "SUMMARY.md"
#: The whole-model and per-layer replacements: PAPA's mean patterns, uniform patterns, and
#: every head's output by its mean (attention then carries nothing about the input).
PAPA_KINDS = ("mean_pattern", "uniform", "mean")
LEVEL = 0.95
#: Two costs closer than this share of the mean patterns' cost read as practically equal.
PRACTICAL_SHARE = 0.05
DEFAULT_SEQ_LEN = 128
DEFAULT_MASK_RATE = 0.15
#: The most tokens read of the text (its documents in order); windows are drawn from them.
MAX_TOKENS = 4_000_000
#: Local files read as whole documents (others go through `datasets`, a row a document).
TEXT_SUFFIXES = (".txt", ".text")
#: What the edit rows evaluated side by side may hold in activations, by default (bytes).
CHUNK_BYTES = 2e9


class Windows(NamedTuple):
    """The probe's token windows and what of the text they were drawn from."""

    tokens: np.ndarray
    used: dict[str, Any]


def text_documents(
    text: str | None, split: str = "train", text_column: str = "text", config: str = ""
) -> tuple[list[str], str]:
    """(documents in their order, what they are in words): the stdlib corpus (one document
    per file), local .txt files (one per file), or a dataset (one per row, rows in order:
    a dataset of lines stays in its order, so windows keep the lines' context)."""
    if not text:
        files = sources.stdlib_files()
        if not files:
            raise DataError("no *.py files found in this Python's standard library")
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        return docs, f"the standard library's top-level sources ({len(files)} files)"
    path = Path(text).expanduser()
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    if path.exists() and files and all(p.suffix in TEXT_SUFFIXES for p in files if p.is_file()):
        files = [p for p in files if p.is_file()]
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        return docs, f"{text} ({len(files)} text file{'s' * (len(files) != 1)}, one document each)"
    ds = sources.load_dataset(text, split, config=config)
    docs = [t for t in sources.column(ds, text_column, "--text-column") if isinstance(t, str)]
    if not any(d.strip() for d in docs):
        raise DataError(f"{text}: every text in column {text_column!r} is empty")
    where = f"split {split!r}, column {text_column!r}" + (f", config {config!r}" if config else "")
    return docs, f"{text} ({where}, {len(docs)} rows, one document each, in order)"


def cut_windows(pre: Pretrained, docs: Sequence[str], seq_len: int, n: int, seed: int) -> Windows:
    """n windows drawn without overlap from the whole text: (n, seq_len + 1) tokens (GPT-2:
    inputs and the next token), or (n, seq_len) [CLS] ... [SEP] windows (BERT).

    The documents, in their order and each ended by end-of-text (GPT-2) or [SEP] (BERT),
    form one token stream (its first `MAX_TOKENS`), tiled into windows; n tiles are drawn
    at random (seeded), so the windows spread over all of the text."""
    if not 2 < seq_len <= pre.context:
        raise ConfigError(
            [
                (
                    "seq_len",
                    f"must be in 3..{pre.context} (the model's context: {pre.name} has "
                    f"position embeddings for {pre.context} positions; text is cut into "
                    f"windows of seq_len tokens), got {seq_len}",
                )
            ]
        )
    bert = pre.family == "bert"
    special = pre.tokenizer.special
    width = seq_len - 2 if bert else seq_len + 1
    joint = special["sep"] if bert else special["eos"]
    stream, have, read = [], 0, 0
    for start in range(0, len(docs), 64):
        chunk = list(docs[start : start + 64])
        for enc in pre.tokenizer.inner.encode_batch(chunk, add_special_tokens=False):
            stream.append(np.asarray([*enc.ids, joint], np.int32))
            have += len(stream[-1])
        read = min(start + 64, len(docs))
        if have >= MAX_TOKENS:
            break
    ids = np.concatenate(stream)[:MAX_TOKENS] if stream else np.zeros((0,), np.int32)
    tiles = len(ids) // width
    if tiles < n:
        raise DataError(
            f"the text gives {tiles} windows of {width} tokens; the probe needs {n} (3 sets "
            "of batches x batch_size): give more text, or fewer or smaller batches"
        )
    pick = np.random.default_rng(seed).choice(tiles, n, replace=False)
    windows = ids[: tiles * width].reshape(tiles, width)[pick]
    # Which documents the drawn windows touch (a window may span a document boundary).
    ends = np.cumsum([len(x) for x in stream])
    first = np.searchsorted(ends, pick * width, side="right")
    last = np.searchsorted(ends, (pick + 1) * width - 1, side="right")
    touched = set()
    for a, b in zip(first, last):
        touched.update(range(a, b + 1))
    if bert:
        cls = np.full((n, 1), special["cls"], np.int32)
        windows = np.concatenate([cls, windows, np.full((n, 1), special["sep"], np.int32)], 1)
    used = {
        "documents": len(docs),
        "documents_read": read,
        "tokens": int(len(ids)),
        "capped": bool(have > MAX_TOKENS or read < len(docs)),
        "documents_in_windows": len(touched),
    }
    return Windows(windows, used)


def text_batches(
    pre: Pretrained, windows: np.ndarray, batches: int, batch_size: int, mask_rate: float, seed: int
) -> ProbeBatches:
    """The probe's three sets of batches (each E x B windows) and what is scored in them."""
    E, B = batches, batch_size
    sets = windows.reshape(3, E, B, -1)
    if pre.family == "gpt2":
        inputs, targets = sets[..., :-1], sets[..., 1:]
        weights = np.ones(inputs.shape, np.float32)
    else:
        targets = sets
        rng = np.random.default_rng(seed + 2)
        # Special tokens ([SEP] between documents, [UNK], ...) are never masked or scored.
        inner = ~np.isin(sets, list(pre.tokenizer.special.values()))
        inner[..., 0] = inner[..., -1] = False
        masked = inner & (rng.random(sets.shape) < mask_rate)
        # Every window scores at least one token: its first maskable one if none was drawn.
        first = np.argmax(inner, -1)[..., None]
        none = ~masked.any(-1, keepdims=True)
        np.put_along_axis(masked, first, np.take_along_axis(masked, first, -1) | none, -1)
        inputs = np.where(masked, pre.tokenizer.special["mask"], sets).astype(np.int32)
        weights = masked.astype(np.float32)
    drawn = [
        tuple(jnp.asarray(x[k]) for x in (inputs, targets, weights)) + (None,) for k in range(3)
    ]
    return ProbeBatches(drawn[0], (drawn[1][0], None), drawn[2])


def probe_pretrained(
    name: str,
    text: str | None = None,
    *,
    split: str | None = None,
    text_column: str | None = None,
    text_config: str | None = None,
    kinds: str | Sequence[str] = ("zero", "mean", "uniform", "random", "mean_pattern", "resample"),
    heads: str | Sequence | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    batches: int = 8,
    mask_rate: float | None = None,
    seed: int = 0,
    chunk: int | None = None,
    out_dir: str | Path | None = None,
    tensorboard: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Probe a pretrained model on text; write probe.json/csv, plots, TensorBoard images and
    SUMMARY.md to `out_dir` (default ./probe-NAME); return the results. `seq_len` defaults
    to the model's context or 128, whichever is less; `split`, `text_column` and
    `text_config` (default train, text, none) apply to a dataset given as `text`;
    `mask_rate` (default 0.15) to BERT."""
    kinds = parse_kinds(kinds)
    if not text:
        for field, value in (
            ("split", split),
            ("text_column", text_column),
            ("text_config", text_config),
        ):
            if value is not None:
                raise ConfigError([(field, "applies only to a dataset given with --text")])
    split, text_column, text_config = split or "train", text_column or "text", text_config or ""
    for field, value, low in (("batch_size", batch_size, 1), ("batches", batches, 2)):
        if value < low:
            raise ConfigError([(field, f"must be >= {low}, got {value}")])
    if mask_rate is not None and not 0 < mask_rate < 1:
        raise ConfigError([("mask_rate", f"must be in (0, 1), got {mask_rate}")])
    out_dir = Path(out_dir or f"probe-{Path(name).name or 'model'}")
    settings = {
        "model": name,
        "text": text or "stdlib",
        "split": split,
        "text_column": text_column,
        "text_config": text_config,
        "kinds": list(kinds),
        "heads": heads if heads is None or isinstance(heads, str) else str(heads),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "batches": batches,
        "mask_rate": mask_rate,
        "seed": seed,
    }
    pre = load(name, cache_dir=cache_dir)
    if pre.family != "bert" and mask_rate is not None:
        raise ConfigError([("mask_rate", f"applies only to BERT; {name} is {pre.family}")])
    mask_rate = DEFAULT_MASK_RATE if mask_rate is None else mask_rate
    seq_len = min(DEFAULT_SEQ_LEN, pre.context) if seq_len is None else seq_len
    settings["seq_len"], settings["mask_rate"] = seq_len, mask_rate
    _refuse_other_probe(out_dir, settings)
    docs, described = text_documents(text, split, text_column, text_config)
    windows = cut_windows(pre, docs, seq_len, 3 * batches * batch_size, seed)
    data = text_batches(pre, windows.tokens, batches, batch_size, mask_rate, seed)

    cfg = pre.config
    N, H = cfg.n_layers, cfg.n_heads
    part = Part(
        "", "attention", "patterns", 0, N, seq_len, seq_len,
        MixerSettings(cfg.d_model, cfg.head_dim, seq_len, cfg.causal),
    )  # fmt: skip
    graphdef, params, rest = nnx.split(pre.model, nnx.Param, ...)
    params, rest = (jax.tree.map(lambda x: x[None], s) for s in (params, rest))
    probed = ProbedModel.of(pre.model, (part,), cfg.head_dim, cfg.dtype)._replace(graphdef=graphdef)
    if chunk is None:
        chunk = default_chunk(cfg, batch_size, seq_len)
    prober = Prober(probed, params, rest, data, chunk=chunk)

    groups = (
        [((n, h),) for n in range(N) for h in range(H)]
        if heads is None
        else parse_heads(heads, (part,), H)
    )
    everything = (tuple((n, h) for n in range(N) for h in range(H)),)
    layers = [tuple((n, h) for h in range(H)) for n in range(N)]
    gradient_ZNH, importance_ZNH = prober.gate_gradients()
    mean_from_uniform_NH, input_from_mean_NH = pattern_spread(
        pre.model, data.reference[0], cfg.causal
    )
    orders = {
        "importance": np.argsort(importance_ZNH[0].ravel(), kind="stable"),
        "random": np.random.default_rng(seed).permutation(N * H),
    }
    X = N * H + 1
    papa_groups = [*everything, *layers]
    rows_kinds = (
        ["zero"]
        + [k for k in kinds for _ in groups]
        + [k for k in PAPA_KINDS for _ in papa_groups]
        + ["zero"] * 2 * X
    )
    masks_ANH = np.concatenate(
        [np.zeros((1, N, H), np.float32)]
        + [_masks(groups, N, H)] * len(kinds)
        + [_masks(papa_groups, N, H)] * len(PAPA_KINDS)
        + [_prefix_masks(o, N, H) for o in orders.values()]
    )
    measured = prober.evaluate(*prober.edits(rows_kinds, masks_ANH), per_batch=True)
    loss_EA = measured["loss"][0]
    accuracy_A = measured["accuracy"][0].mean(0)
    loss_A = loss_EA.mean(0)

    rows, drop = [], {}
    G, P = len(groups), len(papa_groups)
    for i, kind in enumerate(kinds):
        drop[kind] = np.full((1, N, H), np.nan)
        for g, group in enumerate(groups):
            a = 1 + i * G + g
            applies = kind not in PATTERN_KINDS or all(prober.has_pattern_NH[x] for x in group)
            row = _row(loss_A[a], accuracy_A[a], loss_A[0], accuracy_A[0], applies)
            rows.append({"kind": kind, "heads": group_name(group, (part,)), **row})
            if len(group) == 1:
                drop[kind][0][group[0]] = row["loss_increase"]
    papa = []
    for j, kind in enumerate(PAPA_KINDS):
        for g in range(len(papa_groups)):
            a = 1 + len(kinds) * G + j * P + g
            scope = "all layers" if g == 0 else f"layer {g - 1}"
            papa.append(
                {"kind": kind, "scope": scope, **_paired(loss_EA[:, a], loss_EA[:, 0], loss_A[0])}
            )
    # The difference between the two replacements, paired on the same batches.
    a_mean, a_uniform = 1 + len(kinds) * G, 1 + len(kinds) * G + P
    uniform_minus_mean = _paired(loss_EA[:, a_uniform], loss_EA[:, a_mean], loss_A[0])
    unigram = unigram_level(data, cfg.vocab_size, pre.tokenizer.special.values())
    # The last pruning row zeroes every head: the model without attention's mixing.
    no_attention = _paired(loss_EA[:, -1], loss_EA[:, 0], loss_A[0])
    pruning_2X = loss_EA[:, -2 * X :].mean(0).reshape(2, X)
    names = np.asarray([head_name((part,), n, h) for n in range(N) for h in range(H)])

    result = {
        "model": name,
        "family": pre.family,
        "folder": str(pre.folder),
        "settings": settings,
        "text": described,
        "loss": "next-token cross-entropy"
        if pre.family == "gpt2"
        else (f"masked-token cross-entropy ({mask_rate:.0%} of inner tokens masked)"),
        "windows": {
            **windows.used,
            "seq_len": seq_len,
            "context": pre.context,
            "per_set": batches * batch_size,
            "sets": "eval (measured), reference (means, resample), ranking (importance)",
            "scored_tokens_per_set": int(np.asarray(data.eval[2]).sum()),
        },
        "n_layers": N,
        "n_heads": H,
        "kinds": list(kinds),
        "baseline": {
            "loss": float(loss_A[0]),
            "perplexity": float(np.exp(loss_A[0])),
            "accuracy": float(accuracy_A[0]),
        },
        "drop": {k: v.tolist() for k, v in drop.items()},
        "drop_measure": "loss increase (nats per scored token) over the unablated model",
        "gradient": gradient_ZNH.tolist(),
        "importance": importance_ZNH.tolist(),
        "importance_definition": "mean over windows of |d loss(x) / d gate| at gate 1",
        "papa": papa,
        "uniform_minus_mean_pattern": uniform_minus_mean,
        "no_attention": no_attention,
        "pattern_spread": {
            "mean_from_uniform": mean_from_uniform_NH.tolist(),
            "input_from_mean": input_from_mean_NH.tolist(),
            "definition": (
                "total variation distance, averaged over query rows and reference windows: "
                "of each head's mean pattern from uniform attention, and of each window's "
                "pattern from the mean"
            ),
        },
        "no_attention_definition": (
            "every head's output zeroed (gate 0; its value bias goes with it, the output "
            "projection's bias b_o stays): each position sees only its own token and position"
        ),
        "unigram_level": unigram,
        "unigram_definition": (
            "cross-entropy on the eval set's scored tokens of their frequencies among every "
            "token of the reference and ranking windows (special tokens left out), add-one "
            "smoothed: a model of no context"
        ),
        "interval": f"paired {LEVEL:.0%} Student t over the {batches} eval batches",
        "pruning": {
            "importance_order": names[orders["importance"]].tolist(),
            "loss_importance_order": pruning_2X[0].tolist(),
            "random_order": names[orders["random"]].tolist(),
            "loss_random_order": pruning_2X[1].tolist(),
        },
        "alignment": (
            "not measured: real text has no ground-truth dependency mask; see importance "
            "and gradient per head"
        ),
        "rows": rows,
    }
    result["files"] = _write(result, drop, pruning_2X, out_dir, tensorboard)
    return result


def pattern_spread(model, inputs_EBL: jax.Array, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per head (N, H), over the reference windows: how far the mean pattern is from uniform
    attention, and how far each window's pattern is from the mean, as total variation
    distances averaged over query rows. The mean-pattern ablation replaces the second with
    nothing; where the first is small, it is close to replacing by uniform attention."""

    def patterns(x_BL):
        return jnp.stack(model(x_BL, return_patterns=True).patterns)  # (N, B, H, L, S)

    L = inputs_EBL.shape[-1]
    visible_LS = jnp.tril(jnp.ones((L, L))) if causal else jnp.ones((L, L))
    uniform_LS = visible_LS / visible_LS.sum(-1, keepdims=True)

    @jax.jit
    def spread(inputs_EBL):
        mean_NHLS = jax.lax.map(lambda x: patterns(x).mean(1), inputs_EBL).mean(0)
        from_mean = jax.lax.map(
            lambda x: 0.5 * jnp.abs(patterns(x) - mean_NHLS[:, None]).sum(-1).mean((1, 3)),
            inputs_EBL,
        ).mean(0)
        from_uniform = 0.5 * jnp.abs(mean_NHLS - uniform_LS[None, None]).sum(-1).mean(-1)
        return from_uniform, from_mean

    return tuple(np.asarray(x) for x in spread(inputs_EBL))


def unigram_level(data: ProbeBatches, vocab_size: int, special: Sequence[int]) -> float:
    """The loss of a model of no context on the eval set's scored tokens: each token's
    frequency among every token of the reference and ranking windows (held out from eval;
    special tokens and [MASK] left out), add-one smoothed."""
    _, targets, weights, _ = data.eval
    seen = np.concatenate([np.ravel(data.ranking[1]), np.ravel(data.reference[0])])
    seen = seen[~np.isin(seen, list(special))]
    counts = np.bincount(seen, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    scored = np.asarray(weights) > 0
    return float(-log_p[np.asarray(targets)[scored]].mean())


def default_chunk(cfg, batch_size: int, seq_len: int, budget: float = CHUNK_BYTES) -> int:
    """How many edit rows to evaluate side by side so that their activations stay near
    `budget` bytes: per row, every layer's residual stream, MLP and patterns for one batch,
    and the logits (a rough float32 count, not a measurement)."""
    B, L, D, H, N = batch_size, seq_len, cfg.d_model, cfg.n_heads, cfg.n_layers
    per_row = 4 * B * L * (N * (4 * D + cfg.mlp_width + 2 * H * L) + cfg.vocab_size)
    return max(1, int(budget // per_row))


def _row(loss, accuracy, base_loss, base_accuracy, applies: bool) -> dict[str, float]:
    if not applies:
        nan = math.nan
        return dict(loss=nan, perplexity=nan, accuracy=nan, loss_increase=nan, accuracy_drop=nan)
    return {
        "loss": float(loss),
        "perplexity": float(np.exp(loss)),
        "accuracy": float(accuracy),
        "loss_increase": float(loss - base_loss),
        "accuracy_drop": float(base_accuracy - accuracy),
    }


def _paired(loss_E: np.ndarray, base_E: np.ndarray, base_loss: float) -> dict[str, float]:
    """Mean loss difference over the eval batches, its paired t interval, and the same as a
    perplexity ratio and a share of the unablated loss."""
    diff_E = np.asarray(loss_E, np.float64) - np.asarray(base_E, np.float64)
    mean = float(diff_E.mean())
    half = float(
        stats.t.ppf(0.5 + LEVEL / 2, len(diff_E) - 1) * diff_E.std(ddof=1) / math.sqrt(len(diff_E))
    )
    low, high = mean - half, mean + half
    return {
        "loss": float(np.mean(loss_E)),
        "increase": mean,
        "low": low,
        "high": high,
        "perplexity_ratio": math.exp(mean),
        "perplexity_ratio_low": math.exp(low),
        "perplexity_ratio_high": math.exp(high),
        "relative": mean / base_loss,
    }


def _refuse_other_probe(out_dir: Path, settings: dict) -> None:
    """A folder holding another probe's results is never overwritten."""
    file = out_dir / PROBE_FILE
    if file.is_file():
        try:
            before = json.loads(file.read_text()).get("settings")
        except (ValueError, OSError):
            before = None
        if before != settings:
            raise ConfigError(
                [
                    (
                        "out",
                        f"{out_dir} holds the results of another probe ({file}); give another "
                        "--out, or remove that folder",
                    )
                ]
            )


def _write(result: dict, drop: dict, pruning_2X: np.ndarray, out_dir: Path, tensorboard: bool):
    files = start_outputs(out_dir, result["rows"])
    short = Path(result["model"]).name or result["model"]
    pruning = pruning_png(pruning_2X.reshape(1, -1), [short], None, "loss")
    write_atomic(files[2], pruning[0])
    images = {"pruning": pruning}
    for kind, drop_1NH in drop.items():
        files.append(out_dir / DROP_PNG.format(kind=kind))
        images[kind] = drop_heatmap_png(drop_1NH, [short], kind, "loss increase")
        write_atomic(files[-1], images[kind][0])
    files.append(out_dir / SUMMARY_FILE)
    write_atomic(files[-1], summary_markdown(result))
    if tensorboard:
        _tensorboard(out_dir / "tensorboard", images)
    result["files"] = [str(f) for f in files]
    write_atomic(files[0], json.dumps(nan_to_none(result), indent=1))
    return result["files"]


def _tensorboard(logdir: Path, images: dict) -> None:
    """The images at step 0, each tag once (a rerun of the same probe adds nothing)."""
    record = logdir / PROBE_RECORD
    written = json.loads(record.read_text()) if record.is_file() else []
    todo = [tag for tag in images if [0, f"probe/{tag}"] not in written]
    if not todo:
        return
    writer = TensorBoardWriter(logdir)
    for tag in todo:
        writer.image(f"probe/{tag}", *images[tag], 0)
        written.append([0, f"probe/{tag}"])
    writer.close()
    write_atomic(record, json.dumps(written))


def _interval(p: dict, key: str = "increase") -> str:
    return f"{p[key]:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]"


def _effect(p: dict) -> str:
    """A loss difference in words, chosen by its interval's bounds."""
    if p["low"] > 0:
        return (
            f"raises the loss by {_interval(p)} nats per token (perplexity x"
            f"{p['perplexity_ratio']:.3f} [{p['perplexity_ratio_low']:.3f}, "
            f"{p['perplexity_ratio_high']:.3f}])"
        )
    if p["high"] < 0:
        return f"lowers the loss by {_interval(p)} nats per token"
    return f"changes the loss by {_interval(p)} nats per token: no change is shown"


def summary_markdown(result: dict) -> str:
    """The probe's findings in sentences chosen from the interval bounds, then the tables."""
    base = result["baseline"]
    papa = {(p["kind"], p["scope"]): p for p in result["papa"]}
    mean_all, uniform_all = papa[("mean_pattern", "all layers")], papa[("uniform", "all layers")]
    outputs_all, zero_all = papa[("mean", "all layers")], result["no_attention"]
    d = result["uniform_minus_mean_pattern"]
    w = result["windows"]
    capped = " (the first of them, capped)" if w["capped"] else ""
    unigram = result["unigram_level"]
    out = [
        f"# Probe of {result['model']} ({result['family']})",
        "",
        f"Text: {result['text']}; {w['tokens']} tokens read{capped}, cut into windows of "
        f"{w['seq_len']} tokens (the model's context is {w['context']}); {w['per_set']} "
        f"windows per set, drawn at random from {w['documents_in_windows']} documents, "
        f"{w['scored_tokens_per_set']} scored tokens in the eval set. Loss: {result['loss']}. "
        f"Intervals: {result['interval']}, given the reference windows (the mean patterns' own "
        "sampling is not in them); the per-layer rows are not corrected for multiplicity.",
        "",
        f"Unablated: loss {base['loss']:.3f} (perplexity {base['perplexity']:.2f}), token "
        f"accuracy {base['accuracy']:.3f}. A model of no context (token frequencies in the "
        f"reference and ranking windows, add-one smoothed) scores {unigram:.3f}: the model is "
        f"{abs(unigram - base['loss']):.3f} nats {'below' if base['loss'] < unigram else 'above'} it.",
        "",
        "## How much the model depends on input-dependent attention",
        "",
        "Replacing every head's output by its mean over the reference windows (attention then "
        f"carries nothing about the input) {_effect(outputs_all)}: what attention's input "
        "dependence is worth here, through patterns and values together. Zeroing every head "
        f"instead (the constant part goes too) {_effect(zero_all)}.",
        "Replacing every head's pattern at once by its mean over the reference windows (a "
        "PAPA-style replacement, Hassid et al. 2022, here without retraining: the values still "
        f"depend on the input) {_effect(mean_all)}; {mean_all['relative']:+.1%} of the "
        "unablated loss.",
        f"Replacing every pattern by uniform attention {_effect(uniform_all)}.",
    ]
    margin = PRACTICAL_SHARE * abs(mean_all["increase"])
    if max(abs(d["low"]), abs(d["high"])) < margin:
        out.append(
            f"Mean patterns and uniform attention cost practically the same: they differ by "
            f"{_interval(d)} nats, within {PRACTICAL_SHARE:.0%} of the mean patterns' cost."
        )
    elif d["low"] > 0:
        out.append(
            "The mean patterns keep part of what attention does: uniform costs more, by "
            f"{_interval(d)} nats per token."
        )
    elif d["high"] < 0:
        out.append(f"Uniform attention costs less than the mean patterns, by {_interval(d)} nats.")
    else:
        out.append(f"Mean patterns and uniform differ by {_interval(d)} nats: no difference shown.")
    if outputs_all["low"] > 0:
        out.append(
            "As shares of what mean outputs lose (ratios of means, no interval): the mean "
            f"patterns lose {mean_all['increase'] / outputs_all['increase']:.0%}, uniform "
            f"attention {uniform_all['increase'] / outputs_all['increase']:.0%}."
        )
    spread = result["pattern_spread"]
    far = np.asarray(spread["mean_from_uniform"])
    each = np.asarray(spread["input_from_mean"])
    out.append(
        f"To read the two: the heads' mean patterns lie {far.min():.2f}-{far.max():.2f} from "
        "uniform attention (total variation, averaged over query rows), and each window's "
        f"pattern {each.min():.2f}-{each.max():.2f} from its head's mean: what a mean pattern "
        "keeps beyond uniform is the first, what it removes the second."
    )
    out += [
        "",
        "For comparison, not as a target: Hassid et al. (2022) report that constant mean "
        "patterns cost about 8% relative on average in pretrained encoders, measured on "
        "downstream tasks with a classifier trained on the replaced model; this probe retrains "
        "nothing and measures the language-modelling loss.",
        "",
        "| replaced | scope | loss increase [95% CI] | perplexity ratio |",
        "| --- | --- | --- | --- |",
    ]
    for p in result["papa"]:
        out.append(
            f"| {p['kind']} | {p['scope']} | {_interval(p)} | x{p['perplexity_ratio']:.3f} |"
        )
    out += ["", "## Single heads", ""]
    for kind in result["kinds"]:
        rows = [r for r in result["rows"] if r["kind"] == kind and math.isfinite(r["loss"])]
        top = sorted(rows, key=lambda r: -r["loss_increase"])[:3]
        shown = ", ".join(f"{r['heads']} {r['loss_increase']:+.3f}" for r in top) or "n/a"
        out.append(f"- {kind}: largest loss increases {shown}")
    imp = np.asarray(result["importance"][0]).ravel()
    names = result["pruning"]["importance_order"]
    out.append(f"- Michel importance, highest first: {', '.join(names[::-1][:5])}")
    prune = result["pruning"]
    X = len(prune["loss_importance_order"])
    marks = sorted({(X - 1) // 4, (X - 1) // 2, 3 * (X - 1) // 4})
    out += [
        "",
        "## Pruning (Michel et al. 2019)",
        "",
        "| heads removed | loss, least important first | loss, random order |",
        "| --- | --- | --- |",
    ]
    for k in [0, *marks, X - 1]:
        out.append(
            f"| {k} of {X - 1} | {prune['loss_importance_order'][k]:.3f} | "
            f"{prune['loss_random_order'][k]:.3f} |"
        )
    out += [
        "",
        "## Alignment",
        "",
        "Real text has no ground-truth dependency mask, so whether a head attends where the "
        "text's dependencies are is not measured. Per head, probe.json has Michel importance "
        f"(E|dL/dgate|, total {imp.sum():.3f}) and the mean gate gradient instead.",
        "",
    ]
    return "\n".join(out)
