"""Pretrained GPT-2 and BERT: exact against HF transformers, the hub path, bad checkpoints,
head swaps at load, and `ablate probe --pretrained` end to end.

The fixtures (tests/fixtures/pretrained) are tiny HF-format checkpoints with every weight
drawn at a non-trivial scale, and the float32 outputs of transformers' PyTorch models on
fixed inputs (scripts/make_pretrained_fixtures.py made them; torch is not a dependency).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ablate import pretrained
from ablate.config import ConfigError
from ablate.data import DataError
from ablate.pretrained import load
from ablate.pretrained_probe import _interval

FIXTURES = Path(__file__).parent / "fixtures" / "pretrained"
FAMILIES = ("gpt2-tiny", "bert-tiny")
#: Every fixture: the random tiny ones, and the small ones trained on the stdlib's subpackages.
CHECKPOINTS = (*FAMILIES, "gpt2-stdlib", "bert-stdlib")


def _reference(name: str):
    return np.load(FIXTURES / name / "reference.npz")


def _outputs(pre, ref, **kwargs):
    valid = ref["attention_mask"].astype(bool)
    run = jax.jit(lambda x, v, kw: pre.model(x, valid_BL=v, return_patterns=True, **kw))
    out = run(jnp.asarray(ref["input_ids"]), jnp.asarray(valid), kwargs)
    return np.asarray(out.logits), np.stack([np.asarray(p) for p in out.patterns]), valid


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_logits_and_patterns_equal_the_reference_implementation(name):
    pre = load(str(FIXTURES / name))
    ref = _reference(name)
    logits, patterns, valid = _outputs(pre, ref)
    # Padded positions (BERT's shorter rows) are not compared: ablate gives a padded query
    # no pattern, where HF attends from it anyway; both ignore them in every loss.
    np.testing.assert_allclose(logits[valid], ref["logits"][valid], atol=1e-4, rtol=0)
    seen = valid[None, :, None, :, None] & valid[None, :, None, None, :]
    seen = np.broadcast_to(seen, patterns.shape)
    np.testing.assert_allclose(patterns[seen], ref["attentions"][seen], atol=1e-5, rtol=0)
    # The fixture is not degenerate: its logits vary, its patterns are far from uniform.
    assert ref["logits"].std() > 0.5
    assert patterns.max(-1).mean() > 1.5 / patterns.shape[-1]


def test_bert_token_types_equal_the_reference():
    pre = load(str(FIXTURES / "bert-tiny"))
    ref = _reference("bert-tiny")
    types = jnp.asarray(ref["token_type_ids_types"])
    logits, _, valid = _outputs(pre, ref, token_types_BL=types)
    np.testing.assert_allclose(logits[valid], ref["logits_types"][valid], atol=1e-4, rtol=0)
    # The types move the logits: the comparison above is not the types-0 one again.
    assert np.abs(ref["logits_types"] - ref["logits"])[valid].max() > 1e-2


@pytest.mark.parametrize("name", FAMILIES)
def test_tokenizer_gives_the_reference_ids(name):
    pre = load(str(FIXTURES / name))
    sentence = json.loads((FIXTURES / name / "reference.json").read_text())["encoded_sentence"]
    wanted = sentence.get("ids_without_special_tokens", sentence.get("ids"))
    assert pre.tokenizer.encode(sentence["text"]).tolist() == wanted


def _renamed_copy(src: Path, dst: Path, rename) -> Path:
    """A copy of a fixture folder whose tensors are renamed (or changed) by `rename`."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    save_file(dict(rename(tensors)), str(dst / "model.safetensors"))
    return dst


def test_hub_checkpoint_layouts_load_the_same(tmp_path):
    """openai-community/gpt2 has no "transformer." prefix and holds the attn.bias buffers;
    old BERTs name LayerNorm gamma/beta and store the tied decoder: all read the same."""
    gpt2 = _renamed_copy(
        FIXTURES / "gpt2-tiny",
        tmp_path / "gpt2",
        lambda t: [
            *((k.removeprefix("transformer."), v) for k, v in t.items()),
            ("h.0.attn.bias", np.tril(np.ones((1, 1, 64, 64), np.float32))),
            ("h.0.attn.masked_bias", np.array(-1e4, np.float32)),
        ],
    )
    bert = _renamed_copy(
        FIXTURES / "bert-tiny",
        tmp_path / "bert",
        lambda t: [
            *(
                (k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
                    "LayerNorm.bias", "LayerNorm.beta"
                ), v)
                for k, v in t.items()
            ),
            ("cls.predictions.decoder.weight", t["bert.embeddings.word_embeddings.weight"]),
            ("bert.embeddings.position_ids", np.arange(64, dtype=np.int64)[None]),
        ],
    )  # fmt: skip
    for folder, name in ((gpt2, "gpt2-tiny"), (bert, "bert-tiny")):
        ref = _reference(name)
        logits, _, valid = _outputs(load(str(folder)), ref)
        np.testing.assert_allclose(logits[valid], ref["logits"][valid], atol=1e-4, rtol=0)


def _hub_cache(tmp_path: Path, repo: str, name: str) -> Path:
    """A Hugging Face hub cache holding fixture `name` as repository `repo`, as the hub
    library lays it out (models--OWNER--NAME/snapshots/COMMIT, refs/main)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(FIXTURES / name, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return tmp_path / "hub"


def test_hub_name_loads_from_the_hub_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    # Offline as the hub library reads it; no request leaves this process.
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = _hub_cache(tmp_path, "ablate-test/gpt2-tiny", "gpt2-tiny")
    pre = load("ablate-test/gpt2-tiny", cache_dir=cache)
    assert pre.folder.parent.parent.name == "models--ablate-test--gpt2-tiny"
    ref = _reference("gpt2-tiny")
    logits, _, _ = _outputs(pre, ref)
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
    with pytest.raises(DataError, match="local folder"):
        load("ablate-test/not-cached", cache_dir=cache)


def test_unknown_names_and_folders_are_refused():
    with pytest.raises(ConfigError, match="unknown model 'gpt3'.*gpt2-medium"):
        pretrained.locate("gpt3")
    with pytest.raises(ConfigError, match="not a folder"):
        pretrained.locate("./no/such/folder")


def test_a_mismatched_checkpoint_names_the_tensor(tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(FIXTURES / "gpt2-tiny", folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_inner"] = 96  # the checkpoint's MLP is 128 wide
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        DataError, match=r"tensor 'transformer\.h\.0\.mlp\.c_(fc|proj)\.weight' has shape"
    ):
        load(str(folder))
    missing = _renamed_copy(
        FIXTURES / "bert-tiny",
        tmp_path / "missing",
        lambda t: [(k, v) for k, v in t.items() if not k.startswith("cls.")],
    )
    with pytest.raises(DataError, match="cls.predictions"):
        load(str(missing))
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(DataError, match="model_type 'llama'.*gpt2, bert"):
        load(str(folder))


def test_heads_swapped_at_load_keep_the_rest_of_the_checkpoint():
    """Layer 0 uniform at load equals the loaded model with layer 0's patterns replaced by
    uniform ones through the probe's own edit; the learned layer keeps its W_q/W_k."""
    from ablate.ablation import edited
    from ablate.model import visibility

    folder = str(FIXTURES / "gpt2-tiny")
    whole, swapped = load(folder), load(folder, attention=("uniform", "learned"))
    ref = _reference("gpt2-tiny")
    tokens = jnp.asarray(ref["input_ids"])
    B, L = tokens.shape
    N, H = 2, 4
    visible_1LS = visibility(L, True, None, 1)[0]
    uniform_LS = visible_1LS / visible_1LS.sum(-1, keepdims=True)
    fill = [jnp.broadcast_to(uniform_LS, (1, H, L, L))] * N
    mix = jnp.asarray([[1.0] * H, [0.0] * H])
    outputs = [jnp.zeros((1, L, H, 8))] * N
    by_edit = edited(whole.model, jnp.ones((N, H)), mix, fill, jnp.zeros((N, H)), outputs)
    np.testing.assert_allclose(
        np.asarray(swapped.model(tokens).logits), np.asarray(by_edit(tokens).logits), atol=1e-5
    )
    assert np.abs(np.asarray(swapped.model(tokens).logits) - ref["logits"]).max() > 1e-2
    learned = swapped.model.blocks[1].attention.mixers[0]
    np.testing.assert_array_equal(
        np.asarray(learned.w_q[...]), np.asarray(whole.model.blocks[1].attention.mixers[0].w_q[...])
    )


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """`ablate probe --pretrained` on both fixtures, every kind, the embedded corpus."""
    from ablate.pretrained_probe import probe_pretrained

    out = {}
    for name in FAMILIES:
        folder = tmp_path_factory.mktemp(name)
        out[name] = probe_pretrained(
            str(FIXTURES / name), seq_len=32, batch_size=4, batches=3, out_dir=folder / "probe"
        )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_probe_writes_every_output_and_the_summary(probed, name):
    result = probed[name]
    files = [Path(f) for f in result["files"]]
    assert all(f.is_file() for f in files)
    names = {f.name for f in files}
    kinds = ("zero", "mean", "uniform", "random", "mean_pattern", "resample")
    assert {"probe.json", "probe.csv", "pruning.png", "SUMMARY.md"} <= names
    assert {f"drop_{k}.png" for k in kinds} <= names
    assert len(result["rows"]) == len(kinds) * 2 * 4
    assert any((files[0].parent / "tensorboard").glob("events.out.tfevents.*"))
    summary = (files[0].parent / "SUMMARY.md").read_text()
    assert "no ground-truth dependency mask" in summary
    whole = next(
        p for p in result["papa"] if p["kind"] == "mean_pattern" and p["scope"] == "all layers"
    )
    assert _interval(whole) in summary
    assert len(result["papa"]) == 3 * (1 + 2)  # mean_pattern and uniform: all, then per layer
    # The no-attention level is the last pruning row (every head removed), read per batch.
    none = result["no_attention"]
    assert none["loss"] == pytest.approx(result["pruning"]["loss_random_order"][-1], rel=1e-6)
    outputs = next(p for p in result["papa"] if p["kind"] == "mean" and p["scope"] == "all layers")
    assert "carries nothing about the input" in summary and _interval(outputs) in summary
    assert result["unigram_level"] > 0 and f"scores {result['unigram_level']:.3f}" in summary
    assert result["windows"]["documents_in_windows"] > 1
    saved = json.loads(files[0].read_text())
    assert saved["baseline"]["loss"] == pytest.approx(result["baseline"]["loss"])


def _direct_losses(pre, batches, valid=None) -> float:
    from ablate.metrics import token_metrics

    inputs, targets, weights, _ = batches
    loss = jax.jit(lambda x, t, w: token_metrics(pre.model(x).logits, t, w)["loss"])
    losses = [float(loss(x, t, w)) for x, t, w in zip(inputs, targets, weights)]
    return float(np.mean(losses))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_probe_baseline_and_whole_model_uniform_equal_direct_evaluation(probed, name):
    """The probe's unablated loss is the model's own on the eval windows; its whole-model
    uniform row is the loss of the model loaded with every head uniform."""
    from ablate.pretrained_probe import cut_windows, text_batches, text_documents

    folder = str(FIXTURES / name)
    pre = load(folder)
    windows = cut_windows(pre, text_documents(None)[0], 32, 3 * 3 * 4, 0).tokens
    data = text_batches(pre, windows, 3, 4, 0.15, 0)
    result = probed[name]
    assert result["baseline"]["loss"] == pytest.approx(_direct_losses(pre, data.eval), rel=1e-5)
    uniform = next(
        p for p in result["papa"] if p["kind"] == "uniform" and p["scope"] == "all layers"
    )
    everywhere = load(folder, attention="uniform")
    assert uniform["loss"] == pytest.approx(_direct_losses(everywhere, data.eval), rel=1e-5)
    assert abs(uniform["increase"]) > 1e-3  # the ablation moved the loss


def test_bert_windows_mask_only_inner_tokens():
    from ablate.pretrained_probe import cut_windows, text_batches, text_documents

    pre = load(str(FIXTURES / "bert-tiny"))
    windows = cut_windows(pre, text_documents(None)[0], 32, 3 * 2 * 4, 0).tokens
    data = text_batches(pre, windows, 2, 4, 0.15, 0)
    inputs, targets, weights, _ = (np.asarray(x) if x is not None else None for x in data.eval)
    special = pre.tokenizer.special
    assert (targets[..., 0] == special["cls"]).all() and (targets[..., -1] == special["sep"]).all()
    assert (weights[..., 0] == 0).all() and (weights[..., -1] == 0).all()
    assert (inputs[weights > 0] == special["mask"]).all()
    assert (inputs[weights == 0] == targets[weights == 0]).all()
    assert not np.isin(targets[weights > 0], list(special.values())).any()
    assert 0.05 < weights.mean() < 0.3


def test_probe_refuses_a_window_longer_than_the_context_and_another_probes_folder(tmp_path):
    from ablate.pretrained_probe import probe_pretrained

    with pytest.raises(ConfigError, match="must be in 3..64 .*context"):
        probe_pretrained(str(FIXTURES / "gpt2-tiny"), seq_len=65, out_dir=tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "probe.json").write_text(json.dumps({"settings": {"model": "other"}}))
    with pytest.raises(ConfigError, match="another probe"):
        probe_pretrained(str(FIXTURES / "gpt2-tiny"), out_dir=tmp_path / "b")


def test_cli_without_network_exits_3_and_says_how_to_use_a_folder(tmp_path):
    env = {
        **os.environ,
        # A closed local port stands in for the hub: the request is refused at once, as
        # without network; the hub cache is empty.
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_ETAG_TIMEOUT": "2",
    }
    done = subprocess.run(
        [sys.executable, "-m", "ablate.cli", "probe", "--pretrained", "gpt2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert "openai-community/gpt2" in done.stderr and "local folder" in done.stderr
    assert not list(tmp_path.glob("probe-*"))  # nothing written


def test_cli_refuses_run_folder_flags_mixed_with_pretrained(tmp_path):
    from ablate.cli import main

    assert main(["probe"]) == 2
    assert main(["probe", str(tmp_path), "--pretrained", "gpt2"]) == 2
    assert main(["probe", str(tmp_path), "--text", "x.txt"]) == 2


def test_text_from_a_local_file_is_windowed_with_the_models_tokenizer(tmp_path):
    from ablate.pretrained_probe import cut_windows, text_documents

    lines = [f"def f{i}(x):\n    return x * {i} + len('{'ab' * i}')\n" for i in range(200)]
    file = tmp_path / "code.jsonl"
    file.write_text("".join(json.dumps({"body": t}) + "\n" for t in lines))
    docs, described = text_documents(str(file), text_column="body")
    assert docs == lines and "column 'body'" in described
    pre = load(str(FIXTURES / "gpt2-tiny"))
    drawn = cut_windows(pre, docs, 16, 12, seed=0)
    windows = drawn.tokens
    assert windows.shape == (12, 17)
    # The windows are 12 of the tiles of 17 tokens of the documents' stream, in their order,
    # each document ended by end-of-text; drawn at random, so they spread over the text.
    eos = pre.tokenizer.special["eos"]
    stream = np.concatenate([np.r_[pre.tokenizer.encode(d), eos] for d in docs])
    tiles = stream[: len(stream) // 17 * 17].reshape(-1, 17)
    assert all((tiles == w).all(1).any() for w in windows)
    assert drawn.used["documents_in_windows"] >= 12 and drawn.used["documents"] == 200
    with pytest.raises(DataError, match="column 'text' not found"):
        text_documents(str(file))
    with pytest.raises(DataError, match="windows"):
        cut_windows(pre, docs[:2], 16, 12, seed=0)


def test_pattern_spread_is_zero_for_uniform_heads_and_not_for_learned_ones():
    from ablate.pretrained_probe import pattern_spread

    folder = str(FIXTURES / "gpt2-tiny")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 399, (2, 3, 16)), jnp.int32)
    far, each = pattern_spread(load(folder, attention="uniform").model, tokens, causal=True)
    np.testing.assert_allclose(far, 0, atol=1e-6)
    np.testing.assert_allclose(each, 0, atol=1e-6)
    far, each = pattern_spread(load(folder).model, tokens, causal=True)
    assert far.shape == each.shape == (2, 4)
    assert (far > 0.01).all() and (each > 0.01).all()


def test_a_text_file_is_one_document_and_its_lines_stay_in_order(tmp_path):
    from ablate.pretrained_probe import text_documents

    file = tmp_path / "a.txt"
    file.write_text("first line\nsecond line\n")
    (tmp_path / "b.txt").write_text("other file\n")
    assert text_documents(str(file))[0] == ["first line\nsecond line\n"]
    docs, described = text_documents(str(tmp_path))
    assert docs == ["first line\nsecond line\n", "other file\n"] and "2 text files" in described


def test_paired_interval_is_students_t_on_the_batch_differences():
    from scipy import stats

    from ablate.pretrained_probe import _paired

    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.2, 8)
    ablated = base + rng.normal(0.1, 0.05, 8)
    got = _paired(ablated, base, float(base.mean()))
    want = stats.ttest_rel(ablated, base).confidence_interval(0.95)
    assert got["low"] == pytest.approx(want.low) and got["high"] == pytest.approx(want.high)
    assert got["increase"] == pytest.approx(float((ablated - base).mean()))


def test_untied_heads_and_unread_tensors_are_refused(tmp_path):
    folder = tmp_path / "untied"
    shutil.copytree(FIXTURES / "gpt2-tiny", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(DataError, match="tie_word_embeddings = false"):
        load(str(folder))
    other_head = _renamed_copy(
        FIXTURES / "gpt2-tiny",
        tmp_path / "other",
        lambda t: [*t.items(), ("lm_head.weight", t["transformer.wte.weight"] + 1.0)],
    )
    with pytest.raises(DataError, match="'lm_head.weight' differs"):
        load(str(other_head))
    fewer = tmp_path / "fewer"
    shutil.copytree(FIXTURES / "gpt2-tiny", fewer)
    (fewer / "config.json").write_text(json.dumps({**config, "n_layer": 1}))
    with pytest.raises(DataError, match="fit nothing.*1 layers.*transformer.h.1."):
        load(str(fewer))


def test_text_flags_that_do_not_apply_are_refused(tmp_path):
    from ablate.pretrained_probe import probe_pretrained

    gpt2 = str(FIXTURES / "gpt2-tiny")
    with pytest.raises(ConfigError, match="mask_rate.*only to BERT"):
        probe_pretrained(gpt2, mask_rate=0.2, out_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="text_column.*only to a dataset"):
        probe_pretrained(gpt2, text_column="body", out_dir=tmp_path / "b")


@pytest.mark.slow
def test_chunked_rows_equal_rows_side_by_side(tmp_path):
    from ablate.pretrained_probe import probe_pretrained

    args = dict(kinds="zero,mean_pattern", seq_len=16, batch_size=2, batches=2)
    folder = str(FIXTURES / "gpt2-tiny")
    whole = probe_pretrained(folder, chunk=1000, out_dir=tmp_path / "a", **args)
    chunked = probe_pretrained(folder, chunk=3, out_dir=tmp_path / "b", **args)
    for a, b in zip(whole["rows"], chunked["rows"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert whole["papa"][0]["loss"] == pytest.approx(chunked["papa"][0]["loss"], rel=1e-6)
