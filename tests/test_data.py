"""Data-backed tasks: local files and in-memory datasets to batches; clear errors; no network."""

import json
import os
import subprocess
import sys

import datasets
import jax
import numpy as np
import pytest

from ablate.config import ConfigError
from ablate.data import CLS, PAD, SEP, DataError
from ablate.experiment import build_experiment
from ablate.tasks.text import (
    StdlibLM,
    StdlibLMConfig,
    TextClassification,
    TextClassificationConfig,
    TextLM,
    TextLMConfig,
)

TEXTS = ["the cat sat on the mat", "a dog ran", "birds fly south", "fish swim", "owls hoot"]
LABELS = [0, 1, 1, 0, 1]


def write_files(tmp_path):
    """The same five examples as jsonl, csv, parquet and txt files."""
    ds = datasets.Dataset.from_dict({"text": TEXTS, "label": LABELS})
    paths = {
        "jsonl": tmp_path / "d.jsonl",
        "csv": tmp_path / "d.csv",
        "parquet": tmp_path / "d.parquet",
        "txt": tmp_path / "d.txt",
    }
    paths["jsonl"].write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(TEXTS, LABELS))
    )
    ds.to_csv(str(paths["csv"]), index=False)
    ds.to_parquet(str(paths["parquet"]))
    paths["txt"].write_text("\n".join(TEXTS) + "\n")
    return paths


def decode(ids):
    return bytes(int(i) for i in ids if i < 256).decode()


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "txt"])
def test_local_files_to_lm_windows(tmp_path, kind):
    path = write_files(tmp_path)[kind]
    task = TextLM(TextLMConfig(source=str(path), seq_len=8, eval_fraction=0.2))
    data = task.load()
    batch = jax.jit(task.sample_at, static_argnums=3)(data.arrays, jax.random.PRNGKey(0), 0, 4)
    assert batch.inputs.shape == batch.targets.shape == (4, 8)
    # Targets are the inputs shifted by one: next-token prediction inside one window.
    np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert float(batch.weights.sum()) == 32 and not bool(batch.deps.any())
    # Documents are joined with SEP; train windows come from the first 4 documents only.
    train_text = "".join(t + chr(0) for t in TEXTS[:4])
    for row in np.asarray(batch.inputs):
        text = "".join(chr(0) if i == SEP else chr(i) for i in row)
        assert text in train_text
    eval_batch = task.eval_sample(data.arrays, jax.random.PRNGKey(0), 4)
    for row in np.asarray(eval_batch.inputs):
        assert "".join(chr(0) if i == SEP else chr(i) for i in row) in TEXTS[4] + chr(0) + TEXTS[4]
    assert 0 < data.chance < 1


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_local_files_to_classification_batches(tmp_path, kind):
    path = write_files(tmp_path)[kind]
    cfg = TextClassificationConfig(
        source=str(path), train_split="all", eval_split="all", seq_len=12, n_classes=2
    )
    task = TextClassification(cfg)
    check_classification(task, seq_len=12)


def check_classification(task, seq_len):
    data = task.load()
    batch = task.sample_at(data.arrays, jax.random.PRNGKey(1), 0, 16)
    inputs, targets, weights = map(np.asarray, (batch.inputs, batch.targets, batch.weights))
    assert inputs.shape == (16, seq_len)
    for x, t, w in zip(inputs, targets, weights):
        (cls_pos,) = np.nonzero(x == CLS)[0]
        assert w.sum() == 1 and w[cls_pos] == 1  # only the CLS position is scored
        text = decode(x[:cls_pos])
        match = [i for i, s in enumerate(TEXTS) if s.startswith(text)]
        assert match, text
        assert t[cls_pos] == task.text_vocab + LABELS[match[0]]
        assert (x[cls_pos + 1 :] == PAD).all()
    assert task.pad_id == PAD and task.vocab_size == task.text_vocab + 2
    assert data.chance == pytest.approx(3 / 5)


def test_in_memory_dataset_and_truncation():
    ds = datasets.Dataset.from_dict({"text": TEXTS, "label": LABELS})
    task = TextClassification(
        TextClassificationConfig(train_split="x", eval_split="x", seq_len=6), data=ds
    )
    batch = task.eval_sample(task.load().arrays, jax.random.PRNGKey(0), 8)
    # Long texts keep their first seq_len - 1 tokens, then CLS.
    assert (np.asarray(batch.inputs)[:, 5] == CLS).all()
    splits = {"train": ds, "test": ds.select(range(2))}
    task = TextClassification(TextClassificationConfig(seq_len=32), data=splits)
    check_classification(task, seq_len=32)


def test_sampling_is_deterministic_per_key(tmp_path):
    task = TextLM(TextLMConfig(source=str(write_files(tmp_path)["txt"]), seq_len=6))
    sample = lambda seed: task.sample_at(task.load().arrays, jax.random.PRNGKey(seed), 0, 4)
    a, b, c = sample(3), sample(3), sample(4)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert not np.array_equal(a.inputs, c.inputs)


def test_stdlib_corpus_needs_no_download():
    task = StdlibLM(StdlibLMConfig(seq_len=32, max_tokens=200_000))
    data = task.load()
    assert len(data.arrays.train) > 100_000 and len(data.arrays.eval) > 1000
    batch = task.sample_at(data.arrays, jax.random.PRNGKey(0), 0, 2)
    assert decode(batch.inputs[0]).isprintable() or "\n" in decode(batch.inputs[0])
    exp = build_experiment({"task": {"name": "stdlib_lm", "seq_len": 32}})
    assert exp.model.vocab_size == 260 and exp.model.seq_len == 32


def test_missing_column_lists_available(tmp_path):
    path = write_files(tmp_path)["jsonl"]
    with pytest.raises(DataError, match=r"'body' not found; available: \['text', 'label'\]"):
        TextLM(TextLMConfig(source=str(path), text_column="body")).load()


def test_labels_out_of_range_and_empty_texts():
    ds = datasets.Dataset.from_dict({"text": TEXTS, "label": [0, 1, 2, 0, 1]})
    with pytest.raises(DataError, match=r"label 2 is outside 0..1"):
        TextClassification(
            TextClassificationConfig(train_split="a", eval_split="a"), data=ds
        ).load()
    ds = datasets.Dataset.from_dict({"text": ["ok", "  "], "label": [0, 1]})
    with pytest.raises(DataError, match="empty or missing text"):
        TextClassification(
            TextClassificationConfig(train_split="a", eval_split="a"), data=ds
        ).load()
    with pytest.raises(DataError, match="every text is empty"):
        TextLM(TextLMConfig(), data=datasets.Dataset.from_dict({"text": ["", " "]})).load()


def test_model_vocab_smaller_than_tokenizer_is_refused():
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_experiment(
            {"task": {"name": "stdlib_lm", "seq_len": 16}, "model": {"vocab_size": 128}}
        )


def test_hub_name_without_network_says_how_to_use_local_files(tmp_path):
    code = (
        "from ablate.data import DataError\n"
        "from ablate.tasks.text import TextLM, TextLMConfig\n"
        "try:\n    TextLM(TextLMConfig(source='imdb')).load()\n"
        "except DataError as e:\n    print('DATAERROR', e)\n"
    )
    env = dict(
        os.environ,
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        JAX_PLATFORMS="cpu",
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "DATAERROR" in out.stdout, out.stderr[-2000:]
    assert "local files" in out.stdout and "imdb" in out.stdout


def test_resume_continues_on_the_exact_next_batch(tmp_path):
    # The data position is the step (batches are drawn from fold_in(key, step) on the
    # device), and the step is in the checkpoint: a run stopped and resumed sees the batches
    # an uninterrupted one sees, so its parameters come out bit-identical.
    from ablate.train import train

    source = tmp_path / "corpus.txt"
    source.write_text("".join(f"line {i}: {TEXTS[i % len(TEXTS)]}\n" for i in range(200)))
    exp = build_experiment(
        {
            "name": "lm",
            "task": {"name": "text_lm", "source": str(source), "seq_len": 16},
            "model": {"d_model": 32, "n_heads": 2, "n_layers": 1},
            "train": {
                "steps": 20,
                "batch_size": 8,
                "steps_per_dispatch": 5,
                "log_every": 5,
                "eval_every": 0,
                "eval_batches": 1,
                "gradient_alignment": False,
                "checkpoint_every": 5,
                "compile_cache": False,
            },
        }
    )
    train(exp, tmp_path / "resumed", progress=False, stop_after=10)
    resumed = train(exp, tmp_path / "resumed", progress=False)
    straight = train(exp, tmp_path / "straight", progress=False)
    assert resumed.final["loss"] == straight.final["loss"]
    rows = lambda d: [
        (r["step"], r["loss"])
        for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    ]
    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000, 4099])
def test_permute_is_a_permutation_of_range_n(n):
    from ablate.tasks.order import permute

    orders = [
        np.asarray(jax.jit(lambda x, s=s: permute(jax.random.PRNGKey(s), x, n))(np.arange(n)))
        for s in (0, 1)
    ]
    for order in orders:
        assert sorted(order.tolist()) == list(range(n))
    if n >= 64:
        assert not np.array_equal(orders[0], orders[1])  # the key shuffles
        assert not np.array_equal(orders[0], np.arange(n))


def test_epochs_visit_every_example_once_in_a_new_order():
    from ablate.tasks.order import epoch_order

    key, n, B = jax.random.PRNGKey(3), 50, 8  # 6 steps per epoch, 2 examples dropped each
    order = jax.jit(lambda s: epoch_order(key, s, B, n)[0])
    epochs = [
        np.concatenate([np.asarray(order(s)) for s in range(e * 6, e * 6 + 6)]) for e in range(3)
    ]
    for order in epochs:
        assert len(set(order.tolist())) == 48 and order.min() >= 0 and order.max() < n
    assert not np.array_equal(epochs[0], epochs[1])
    # Fewer examples than a batch: every step holds whole epochs.
    idx, epoch = (np.asarray(a) for a in epoch_order(key, 3, 12, 5))
    for e in np.unique(epoch)[:2]:
        assert sorted(idx[epoch == e].tolist()) == [0, 1, 2, 3, 4]


def test_lm_epoch_tiles_the_stream_with_distinct_windows(tmp_path):
    source = tmp_path / "c.txt"
    source.write_text("".join(f"{i:05d}\n" for i in range(2000)))
    task = TextLM(TextLMConfig(source=str(source), seq_len=16))
    key, B, L = jax.random.PRNGKey(0), 4, 16
    data = task.load()
    ids = np.asarray(data.arrays.train)
    T = len(ids)
    per_epoch = ((T - 2 * L) // L + 1) // B
    starts_of = jax.jit(lambda step: task.epoch_starts(T, key, step, B))
    shifts = []
    for epoch in range(3):
        starts = np.concatenate(
            [np.asarray(starts_of(s)) for s in range(epoch * per_epoch, (epoch + 1) * per_epoch)]
        )
        assert len(set(starts.tolist())) == len(starts)  # no window twice in an epoch
        assert len(set((starts % L).tolist())) == 1  # one tiling per epoch
        assert starts.min() >= 0 and starts.max() + L + 1 <= T
        shifts.append(int(starts[0] % L))
    assert len(set(shifts)) > 1  # the tiling moves between epochs
    batch = task.sample_at(data.arrays, key, 0, B)
    start = int(starts_of(0)[0])
    np.testing.assert_array_equal(batch.inputs[0], ids[start : start + L])
    np.testing.assert_array_equal(batch.targets[0], ids[start + 1 : start + L + 1])
