"""Make the tiny HF-format GPT-2 and BERT checkpoints in tests/fixtures/pretrained/, with reference outputs.

ablate loads pretrained GPT-2 and BERT checkpoints in the Hugging Face layout (config.json,
model.safetensors, tokenizer files) into its own JAX modules; its tests check those modules'
logits against HF transformers' PyTorch models, offline. This script made the two checkpoints
and their reference outputs once; the files are committed and the tests only read them.

It needs torch and transformers, which are NOT ablate dependencies (nor test dependencies):
run it in a separate virtual environment, from the repository root:

    python3 -m venv /tmp/fixture-venv && . /tmp/fixture-venv/bin/activate
    pip install torch==2.13.0 transformers==4.57.6 tokenizers==0.22.2 safetensors numpy
    #   (torch 2.13.0 from PyPI's CPU wheel here; pin it, a plain `torch` may pull CUDA wheels)
    python scripts/make_pretrained_fixtures.py           # (re)writes both folders, then checks them
    python scripts/make_pretrained_fixtures.py --check   # only checks the committed folders

Made with torch 2.13.0+cpu, transformers 4.57.6, tokenizers 0.22.2, safetensors 0.8.0,
numpy 2.4.6, Python 3.11.7 (each reference.json records the versions of its run). transformers
4.57.6 (the last 4.x) is used, not 5.x, because 5.x's tokenizer `save_pretrained` writes only
tokenizer.json and tokenizer_config.json, while the checkpoints on the hub (and what ablate must
read) carry the 4.x layout: vocab.json + merges.txt (GPT-2) or vocab.txt (BERT) and
special_tokens_map.json as well. `--check` also passes under transformers 5.24.0.

What it writes, for NAME in gpt2-tiny and bert-tiny, in tests/fixtures/pretrained/NAME/:
  * the model folder exactly as `save_pretrained(..., safe_serialization=True)` writes it
    (config.json, model.safetensors, and for GPT-2 generation_config.json), and the files of the
    fast tokenizer's `save_pretrained` (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, and vocab.json + merges.txt for GPT-2, vocab.txt for BERT);
  * reference.npz: the inputs and the float32 eval-mode outputs of the model;
  * reference.json: versions, the texts, the tokenizer's ids of a fixed sentence, and notes.

Tokenizers are trained here with the `tokenizers` library on TRAINING_TEXT below (embedded, so a
rerun does not depend on the Python version's files): GPT-2 a byte-level BPE (vocabulary 400,
"<|endoftext|>" last, as in GPT-2, and bos = eos = unk = it), BERT a lowercasing WordPiece
(vocabulary 400, [PAD] [UNK] [CLS] [SEP] [MASK] = ids 0-4). Each is written in its slow form
(vocab.json + merges.txt, vocab.txt) and loaded as GPT2TokenizerFast / BertTokenizerFast from
those files, so tokenizer.json is what transformers' own converter makes of them, as on the hub.

Models: GPT2LMHeadModel (n_embd 32, n_layer 2, n_head 4, n_positions 64, n_inner 4*32, gelu_new,
lm_head tied to wte) and BertForMaskedLM (hidden 32, 2 layers, 4 heads, intermediate 64,
max_position_embeddings 64, type_vocab_size 2, gelu, decoder tied to the word embeddings, no
pooler), eager attention. After HF's initialisation EVERY parameter is overwritten from a seeded
generator (see `randomize` and SCALES: embeddings N(0, 0.3), Linear/Conv1D weights N(0, 0.25),
their biases and cls.predictions.bias N(0, 0.1), LayerNorm weights 1 + N(0, 0.1), LayerNorm biases
N(0, 0.1)): HF's own init (zero biases, unit LayerNorms, std 0.02 weights) would hide bias and
LayerNorm bugs and make attention almost uniform. The script prints each head's mean largest
attention weight against the uniform level (GPT-2 0.38-0.64 against 0.16, BERT 0.21-0.38 against
0.06 at the committed fixtures), to show the patterns are not uniform.

A rerun with the versions above rewrites byte-identical files (checked: two runs, same sha256).
The safetensors files keep what save_pretrained keeps: tied weights are NOT stored (no
lm_head.weight, no cls.predictions.decoder.weight/.bias), GPT-2 keys carry the "transformer."
prefix and BERT's "bert.", LayerNorm parameters are weight/bias; the hub's checkpoints differ
(no "transformer." prefix on openai-community/gpt2, LayerNorm gamma/beta in old BERTs, extra
buffers such as attn.bias / attn.masked_bias / embeddings.position_ids), so a loader's tests
should also feed it renamed copies of these files.

reference.npz, GPT-2 (B=3 rows of L=24 tokens, no padding; V=400, H=4 heads, 2 layers):
  input_ids int32 (B, L), attention_mask int32 (B, L) all ones, token_type_ids int32 zeros
  (GPT-2 is called without them), logits float32 (B, L, V), attentions float32 (2, B, H, L, L).
reference.npz, BERT (B=3 rows "[CLS] text [SEP]" right-padded with [PAD] to the longest, L=23):
  input_ids, attention_mask (0 on padding), token_type_ids (zeros), logits, attentions as above
  (padded rows' logits are included: a padded query position still attends to every real token);
  token_type_ids_types int32 (B, L): 1 from position L//2 on, where attention_mask is 1, and
  logits_types float32 (B, L, V): the logits of the call with those token types.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "pretrained"
GPT2_DIR = OUT / "gpt2-tiny"
BERT_DIR = OUT / "bert-tiny"

SEED = 1234
VOCAB = 400
MAX_POSITIONS = 64
GPT2_LEN = 24
BERT_MAX_LEN = 24

# Scales of the random parameters (normal, mean 0 unless said).
SCALES = {
    "embedding": 0.3,  # word, position and token-type embeddings
    "weight": 0.25,  # every Linear / Conv1D weight (0.15 gave attention close to uniform)
    "bias": 0.1,  # every Linear / Conv1D bias, cls.predictions.bias
    "ln_weight": 0.1,  # LayerNorm weight = 1 + N(0, 0.1)
    "ln_bias": 0.1,  # LayerNorm bias
}

TRAINING_TEXT = """\
Attention lets every position of a sequence look at every other position and decide how much of
each one to take. A transformer stacks a few such layers, each followed by a small feed-forward
network, with a residual path and a layer normalisation around both. The model reads tokens,
turns them into vectors, adds the vectors of their positions, and passes the sum through the
stack. At the end a linear map gives one score per word of the vocabulary: the logits.
An ablation removes or freezes one part of a model and measures what is lost. If a task can be
solved without learning where to look, an ablated attention that only averages its context does
as well as a learned one; if the task needs the model to find one token among many, it does not.
Copying a sequence, reversing it, sorting a list of numbers, counting the letters of a word,
recalling the value stored under a key: each of these tasks asks for a different kind of lookup.
The quick brown fox jumps over the lazy dog, and the lazy dog does not mind at all. She sells sea
shells by the sea shore; the shells she sells are surely sea shells. Peter Piper picked a peck of
pickled peppers. How much wood would a woodchuck chuck if a woodchuck could chuck wood?
In 1998 the team measured 42 runs of 7 models; 3 of them failed, 12 were slow, and the rest were
fine. Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100 and 1000 appear in text too, as do
dates like 2024-05-17, times like 10:30, prices like $19.99 and shares like 45%.
def attention(query, key, value):
    scores = query @ key.T / math.sqrt(key.shape[-1])
    weights = softmax(scores, axis=-1)
    return weights @ value
for i in range(10):
    print(i, i * i, "done" if i > 5 else "not yet")
The weather today is cold and wet, with rain in the morning and wind in the afternoon. Tomorrow
will be warmer, and the day after that should be sunny. People walk their dogs in the park, read
books on the train, and cook dinner at home in the evening. Children learn to read and write, to
add and subtract, and later to think about what they have learned.
A language model predicts the next token from the tokens before it; a masked language model
predicts a hidden token from the tokens on both sides. The first is trained on text read from
left to right, the second on text in which some words have been replaced by a mask.
"""

GPT2_TEXTS = [
    "The model reads tokens, turns them into vectors, and passes the sum through the stack of layers.",
    "Copying a sequence, reversing it, sorting a list of numbers: each task asks for a lookup.",
    "def attention(query, key, value):\n    return softmax(query @ key.T) @ value  # 42 heads",
]
BERT_TEXTS = [
    "An ablation removes one part of a model and measures what is lost.",
    "The lazy dog does not mind.",
    "A masked language model predicts a hidden token from both sides of the text.",
]
# Checks the JAX side's `tokenizers`-based tokenisation: accents, capitals, digits, a double
# space, an em dash and a character outside the training text.
ENCODED_SENTENCE = (
    "Héllo, WORLD!  The naïve model's 3 tests\u2014 passed 100% of 7 runs: ok? \u6f22"
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only check the existing folders")
    return p.parse_args()


def versions():
    import safetensors
    import tokenizers
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def training_lines():
    return [line for line in TRAINING_TEXT.split("\n") if line.strip()]


# --------------------------------------------------------------------------- tokenizers


def make_gpt2_tokenizer(tmp: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 1,  # + <|endoftext|>, appended last as in GPT-2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(training_lines(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    assert sorted(vocab.values()) == list(range(len(vocab))) and len(vocab) == VOCAB - 1, len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    t = GPT2TokenizerFast(
        vocab_file=str(tmp / "vocab.json"),
        merges_file=str(tmp / "merges.txt"),
        model_max_length=MAX_POSITIONS,
    )
    assert len(t) == VOCAB and t.eos_token_id == VOCAB - 1 == t.bos_token_id, (
        len(t),
        t.eos_token_id,
    )
    return t


def make_bert_tokenizer(tmp: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The WordPiece trainer numbers its "##x" alphabet in hash-map order, so the learnt vocabulary
    # (merge ties break by id) changes from run to run. Handing it the whole alphabet, sorted, as
    # leading "special" tokens fixes every id; only vocab.txt is kept from this Tokenizer.
    words = [
        w
        for line in training_lines()
        for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line))
    ]
    alphabet = sorted({w[0] for w in words}) + sorted({"##" + c for w in words for c in w[1:]})
    trainer = trainers.WordPieceTrainer(
        vocab_size=VOCAB,
        special_tokens=specials + alphabet,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tok.train_from_iterator(training_lines(), trainer)
    vocab = tok.get_vocab()
    assert sorted(vocab.values()) == list(range(len(vocab))) and len(vocab) == VOCAB, len(vocab)
    words = sorted(vocab, key=vocab.__getitem__)
    assert words[:5] == specials, words[:5]
    (tmp / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    t = BertTokenizerFast(
        vocab_file=str(tmp / "vocab.txt"), do_lower_case=True, model_max_length=MAX_POSITIONS
    )
    assert len(t) == VOCAB and t.pad_token_id == 0 and t.cls_token_id == 2, (len(t), t.pad_token_id)
    return t


# --------------------------------------------------------------------------- models


def randomize(model, generator):
    """Overwrite every parameter in place (ties kept) with seeded values of a non-trivial scale."""
    import torch

    seen = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(param), (name, param))
    done = []
    with torch.no_grad():
        for name, param in sorted(seen.values(), key=lambda np_: np_[0]):
            leaf = name.split(".")[-1]
            is_ln = "LayerNorm" in name or ".ln_" in name or name.startswith("transformer.ln_f")
            if is_ln and leaf == "weight":
                kind = "ln_weight"
            elif is_ln and leaf == "bias":
                kind = "ln_bias"
            elif name.endswith(("wte.weight", "wpe.weight")) or "embeddings." in name:
                kind = "embedding"
            elif leaf == "bias":
                kind = "bias"
            elif leaf == "weight":
                kind = "weight"
            else:
                raise ValueError(f"unclassified parameter {name}")
            values = (
                torch.randn(param.shape, generator=generator, dtype=torch.float32) * SCALES[kind]
            )
            if kind == "ln_weight":
                values += 1.0
            param.copy_(values)
            done.append((name, kind, tuple(param.shape)))
    return done


def attention_report(attentions, mask):
    """Per layer and head: mean over real query positions of the largest weight, and of 1/#keys."""
    lines = []
    n_layers, _, n_heads, _, _ = attentions.shape
    valid = mask.astype(bool)
    for layer in range(n_layers):
        row = []
        for h in range(n_heads):
            a = attentions[layer, :, h]  # (B, L, L)
            keys = (a > 0).sum(-1)  # keys a query can see (causal / unpadded)
            mx = a.max(-1)[valid].mean()
            uni = (1.0 / keys[valid]).mean()
            row.append(f"h{h} max {mx:.2f} (uniform {uni:.2f})")
        lines.append(f"  layer {layer}: " + ", ".join(row))
    return "\n".join(lines)


def make_gpt2(tmp: Path, vers):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_gpt2_tokenizer(tmp)
    # Saved before any call: a call with truncation/padding sets the backend's state, which
    # tokenizer.json would then carry.
    tokenizer.save_pretrained(GPT2_DIR)
    eot = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=MAX_POSITIONS,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(SEED)
    done = randomize(model, gen)
    assert model.lm_head.weight is model.transformer.wte.weight, "lm_head untied"

    ids = []
    for text in GPT2_TEXTS:
        row = tokenizer(text)["input_ids"]
        assert len(row) >= GPT2_LEN, (len(row), text)
        ids.append(row[:GPT2_LEN])
    input_ids = np.array(ids, dtype=np.int32)
    mask = np.ones_like(input_ids)
    with torch.no_grad():
        out = model(
            torch.from_numpy(input_ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            output_attentions=True,
        )
    ref = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(input_ids),
        "logits": out.logits.numpy().astype(np.float32),
        "attentions": torch.stack(out.attentions).numpy().astype(np.float32),
    }
    print("gpt2-tiny attention (mean largest weight per head):")
    print(attention_report(ref["attentions"], mask))
    print(f"  logits std {ref['logits'].std():.3f}, max |logit| {np.abs(ref['logits']).max():.3f}")

    model.save_pretrained(GPT2_DIR, safe_serialization=True)
    np.savez_compressed(GPT2_DIR / "reference.npz", **ref)
    enc = tokenizer(ENCODED_SENTENCE)["input_ids"]
    info = {
        "versions": vers,
        "seed": SEED,
        "parameter_scales": SCALES,
        "parameters": [{"name": n, "kind": k, "shape": list(s)} for n, k, s in done],
        "texts": GPT2_TEXTS,
        "notes": "input_ids[i] = tokenizer(texts[i]).input_ids[:24] (GPT-2's tokenizer adds no "
        "special tokens); logits/attentions from GPT2LMHeadModel in float32 eval mode, eager "
        "attention, attention_mask all ones, no token_type_ids passed.",
        "encoded_sentence": {
            "text": ENCODED_SENTENCE,
            "ids": enc,
            "tokens": tokenizer.convert_ids_to_tokens(enc),
        },
    }
    (GPT2_DIR / "reference.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def make_bert(tmp: Path, vers):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = make_bert_tokenizer(tmp)
    tokenizer.save_pretrained(BERT_DIR)  # before any call (see make_gpt2)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        type_vocab_size=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = BertForMaskedLM(config).eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    done = randomize(model, gen)
    emb = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is emb, "decoder untied"
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias, "decoder bias untied"

    batch = tokenizer(BERT_TEXTS, padding=True, truncation=True, max_length=BERT_MAX_LEN)
    input_ids = np.array(batch["input_ids"], dtype=np.int32)
    mask = np.array(batch["attention_mask"], dtype=np.int32)
    types = np.array(batch["token_type_ids"], dtype=np.int32)
    assert (types == 0).all() and (mask == 0).any(), "expected zero types and some padding"
    length = input_ids.shape[1]
    types_1 = ((np.arange(length)[None, :] >= length // 2) & (mask == 1)).astype(np.int32)

    def run(token_types):
        with torch.no_grad():
            return model(
                torch.from_numpy(input_ids).long(),
                attention_mask=torch.from_numpy(mask).long(),
                token_type_ids=torch.from_numpy(token_types).long(),
                output_attentions=True,
            )

    out, out_types = run(types), run(types_1)
    ref = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "token_type_ids": types,
        "logits": out.logits.numpy().astype(np.float32),
        "attentions": torch.stack(out.attentions).numpy().astype(np.float32),
        "token_type_ids_types": types_1,
        "logits_types": out_types.logits.numpy().astype(np.float32),
    }
    diff = np.abs(ref["logits_types"] - ref["logits"]).max()
    assert diff > 0.1, f"token types barely change the logits ({diff})"
    pad_cols = ref["attentions"].transpose(0, 2, 3, 1, 4)[..., ~mask.astype(bool)]
    print("bert-tiny attention (mean largest weight per head, real query positions):")
    print(attention_report(ref["attentions"], mask))
    print(
        f"  weight on padded keys: max {pad_cols.max():.3g}; token types move logits by up to {diff:.3f}"
    )
    print(f"  logits std {ref['logits'].std():.3f}, max |logit| {np.abs(ref['logits']).max():.3f}")

    model.save_pretrained(BERT_DIR, safe_serialization=True)
    np.savez_compressed(BERT_DIR / "reference.npz", **ref)
    with_special = tokenizer(ENCODED_SENTENCE)["input_ids"]
    without = tokenizer(ENCODED_SENTENCE, add_special_tokens=False)["input_ids"]
    info = {
        "versions": vers,
        "seed": SEED,
        "parameter_scales": SCALES,
        "parameters": [{"name": n, "kind": k, "shape": list(s)} for n, k, s in done],
        "texts": BERT_TEXTS,
        "notes": "input_ids = tokenizer(texts, padding=True, truncation=True, max_length=24): "
        "[CLS] text [SEP], right-padded with [PAD] (id 0), attention_mask 0 there. logits and "
        "attentions from BertForMaskedLM in float32 eval mode, eager attention, with "
        "token_type_ids (all zeros); logits_types from the same call with token_type_ids_types "
        "(1 from position L//2 on where attention_mask is 1, else 0). Logits at padded positions "
        "are HF's too (a padded query still attends to the real tokens).",
        "encoded_sentence": {
            "text": ENCODED_SENTENCE,
            "ids_with_special_tokens": with_special,
            "ids_without_special_tokens": without,
            "tokens": tokenizer.convert_ids_to_tokens(with_special),
        },
    }
    (BERT_DIR / "reference.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- checks


def check():
    """Reload both folders with transformers and `tokenizers`; compare with the stored references."""
    import torch
    from safetensors import safe_open
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    worst = 0.0
    for folder, auto in ((GPT2_DIR, AutoModelForCausalLM), (BERT_DIR, AutoModelForMaskedLM)):
        ref = dict(np.load(folder / "reference.npz"))
        info = json.loads((folder / "reference.json").read_text())
        print(f"{folder.relative_to(ROOT)}: {sorted(p.name for p in folder.iterdir())}")
        with safe_open(folder / "model.safetensors", framework="np") as f:
            print(f"  model.safetensors metadata {f.metadata()}")
            for key in sorted(f.keys()):
                t = f.get_slice(key)
                print(f"    {key} {t.get_dtype()} {list(t.get_shape())}")
        for impl in ("eager", "sdpa"):
            model = auto.from_pretrained(folder, attn_implementation=impl).eval()
            kwargs = {"attention_mask": torch.from_numpy(ref["attention_mask"]).long()}
            if "token_type_ids_types" in ref:
                kwargs["token_type_ids"] = torch.from_numpy(ref["token_type_ids"]).long()
            with torch.no_grad():
                out = model(
                    torch.from_numpy(ref["input_ids"]).long(),
                    output_attentions=impl == "eager",
                    **kwargs,
                )
            d = np.abs(out.logits.numpy() - ref["logits"]).max()
            print(f"  reloaded ({impl}): max |logits - reference| = {d:.2e}")
            worst = max(worst, d)
            if impl == "eager":
                da = np.abs(torch.stack(out.attentions).numpy() - ref["attentions"]).max()
                print(f"  reloaded ({impl}): max |attentions - reference| = {da:.2e}")
                worst = max(worst, da)
            if "token_type_ids_types" in ref:
                kwargs["token_type_ids"] = torch.from_numpy(ref["token_type_ids_types"]).long()
                with torch.no_grad():
                    out = model(torch.from_numpy(ref["input_ids"]).long(), **kwargs)
                d = np.abs(out.logits.numpy() - ref["logits_types"]).max()
                print(f"  reloaded ({impl}): max |logits_types - reference| = {d:.2e}")
                worst = max(worst, d)
        tok = AutoTokenizer.from_pretrained(folder)
        raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
        saved = json.loads((folder / "tokenizer.json").read_text())
        assert saved["truncation"] is None and saved["padding"] is None, "tokenizer.json state"
        enc = info["encoded_sentence"]
        if "ids" in enc:
            assert tok(enc["text"])["input_ids"] == enc["ids"] == raw.encode(enc["text"]).ids
            for text, row in zip(info["texts"], ref["input_ids"]):
                assert raw.encode(text).ids[: len(row)] == row.tolist()
        else:
            assert tok(enc["text"])["input_ids"] == enc["ids_with_special_tokens"]
            assert raw.encode(enc["text"]).ids == enc["ids_with_special_tokens"]
            assert (
                raw.encode(enc["text"], add_special_tokens=False).ids
                == enc["ids_without_special_tokens"]
            )
            for text, row, m in zip(info["texts"], ref["input_ids"], ref["attention_mask"]):
                assert raw.encode(text).ids == row[m == 1].tolist()
        print(
            f"  tokenizer ({type(tok).__name__} and tokenizers.Tokenizer) ids match reference.json"
        )
    assert worst < 1e-5, f"reloaded outputs differ from the references by {worst}"
    print(f"OK: worst difference {worst:.2e}")


def main():
    args = parse_args()
    if not args.check:
        vers = versions()
        print("versions:", vers)
        OUT.mkdir(parents=True, exist_ok=True)
        for folder in (GPT2_DIR, BERT_DIR):
            if folder.exists():
                for p in folder.iterdir():
                    p.unlink()
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "gpt2").mkdir()
            (Path(tmp) / "bert").mkdir()
            make_gpt2(Path(tmp) / "gpt2", vers)
            make_bert(Path(tmp) / "bert", vers)
    check()
    return 0


if __name__ == "__main__":
    sys.exit(main())
