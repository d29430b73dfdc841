"""Make the small HF-format GPT-2 and BERT checkpoints in tests/fixtures/pretrained/, with reference outputs.

ablate loads pretrained GPT-2 and BERT checkpoints in the Hugging Face layout (config.json,
model.safetensors, tokenizer files) into its own JAX modules; its tests check those modules'
logits against HF transformers' PyTorch models, offline. This script made the four checkpoints
(two tiny random ones, two small trained ones) and their reference outputs once; the files are
committed and the tests only read them.

It needs torch and transformers, which are NOT ablate dependencies (nor test dependencies):
run it in a separate virtual environment, from the repository root:

    python3 -m venv /tmp/fixture-venv && . /tmp/fixture-venv/bin/activate
    pip install torch==2.13.0 transformers==4.57.6 tokenizers==0.22.2 safetensors numpy
    #   (torch 2.13.0 from PyPI's CPU wheel here; pin it, a plain `torch` may pull CUDA wheels)
    python scripts/make_pretrained_fixtures.py            # (re)writes gpt2-tiny, bert-tiny
    python scripts/make_pretrained_fixtures.py --trained  # (re)writes gpt2-stdlib, bert-stdlib
    #   (trains both on CPU: about 4 + 4 minutes on one busy core); either then checks all four
    python scripts/make_pretrained_fixtures.py --check    # only checks the committed folders

Made with torch 2.13.0+cpu, transformers 4.57.6, tokenizers 0.22.2, safetensors 0.8.0,
numpy 2.4.6, Python 3.11.7 (each reference.json records the versions of its run). transformers
4.57.6 (the last 4.x) is used, not 5.x, because 5.x's tokenizer `save_pretrained` writes only
tokenizer.json and tokenizer_config.json, while the checkpoints on the hub (and what ablate must
read) carry the 4.x layout: vocab.json + merges.txt (GPT-2) or vocab.txt (BERT) and
special_tokens_map.json as well. `--check` also passes under transformers 5.24.0.

What it writes, for NAME in gpt2-tiny and bert-tiny (and, --trained, gpt2-stdlib and
bert-stdlib), in tests/fixtures/pretrained/NAME/:
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

TRAINED CHECKPOINTS (--trained): gpt2-stdlib and bert-stdlib, the same layout and files
(reference.npz as described below, with other sizes), but TRAINED (HF's default init, no
`randomize`), so that `ablate probe --pretrained` has something real, if small, to measure.
  * Training text: the standard library's SUBPACKAGE sources, disjoint from the probe's default
    text (the top-level stdlib *.py files): see TRAINING_RULE (stdlib/*/*.py whose folder is an
    identifier, not starting with "__", not test/tests/idlelib/lib2to3/turtledemo; read as utf-8,
    errors "replace"): 333 files, 5.6 M characters under Python 3.11.7. Unlike the tiny ones this
    text is this Python's own files, so a rerun is identical only with the same Python version.
  * Tokenizers trained on it (same code as the tiny ones, STDLIB_VOCAB = 512): GPT-2 byte-level
    BPE (<|endoftext|> = 511, last); BERT lowercasing WordPiece ([PAD] [UNK] [CLS] [SEP] [MASK]
    = 0-4), whose alphabet keeps the characters seen at least MIN_CHAR_COUNT = 50 times (71
    kept; the 49 rarer ones, Greek and Cyrillic letters, dashes, ligatures, each seen at most 32
    times, would otherwise take 54 of the 512 entries; words with them become [UNK], 0.01% of
    the training stream).
  * Models: GPT2LMHeadModel n_embd 64, n_layer 2, n_head 4, n_positions 128 (lm_head tied);
    BertForMaskedLM hidden 64, 2 layers, 4 heads, intermediate 256, max_position_embeddings 128,
    type_vocab_size 2 (decoder tied; token type 1 never seen in training). Dropout 0.0 everywhere
    (simpler: the forward pass has no randomness; the configs say so).
  * Training: each file's ids joined by <|endoftext|> / [SEP] into one stream; each step draws 32
    window starts uniformly from a seeded torch.Generator: GPT-2 129 consecutive tokens (128
    inputs, next-token loss on all 128), BERT [CLS] + 126 tokens + [SEP] with dynamic 15% masking
    (80% [MASK], 10% random non-special id, 10% unchanged; special ids never chosen). AdamW lr
    1e-3 (weight decay 0.01 on matrices), 50 warmup steps then cosine to 0, gradient clip 1.0,
    STEPS = 600 each. torch.manual_seed(SEED), torch.use_deterministic_algorithms(True,
    warn_only=True) and ONE thread (THREADS): on the shared 2-core machine these were made on,
    2 threads ran a step 4.5x slower than 1 (1.7 s against 0.37 s), which is also why the step
    count is 600 and not the 1500-3000 first planned. Training uses sdpa attention; everything
    after it (held-out loss, attention statistics, reference.npz) is computed from the SAVED
    folder reloaded with eager attention.
  * reference.json also records the training text (rule, files, characters, tokens), the
    optimiser, step count, loss every 50 steps, final loss (last step and mean of the last 50),
    wall time, the held-out loss on the probe's default text (top-level stdlib files, the first
    64 windows of its stream in sorted-file order: GPT-2 next-token loss over 64 x 128 targets,
    BERT 15% of the non-special tokens all set to [MASK], seeded) and each head's mean largest
    attention weight on those 64 windows (BERT: unmasked) against the uniform level.
  * At the committed fixtures (nats; vocabulary 512, so ln 512 = 6.24 at the start):
      gpt2-stdlib: train loss 3.28 (mean of the last 50 steps; 3.35 at the last), held-out 4.02;
        heads' mean largest weight 0.10-0.18 (mean 0.137) against the causal uniform 0.042;
      bert-stdlib: train loss 4.78 (4.82 at the last), held-out 5.25 (all-[MASK], 1251 tokens);
        heads' mean largest weight 0.016-0.35 (mean 0.116) against the uniform 0.0078.
    Small models, short training: the held-out losses are sanity numbers, not good models.
  * Rerun: every file is byte-identical except reference.json's "wall_seconds" (checked: two
    runs). reference.npz: GPT-2 B=3 rows of L=32 tokens (STDLIB_GPT2_TEXTS); BERT B=3 rows of
    STDLIB_BERT_TEXTS, padded to L=19.

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
    p.add_argument(
        "--trained",
        action="store_true",
        help="(re)write the trained gpt2-stdlib and bert-stdlib instead of the tiny ones",
    )
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


def make_gpt2_tokenizer(tmp: Path, texts=None, vocab_size=VOCAB, max_len=MAX_POSITIONS):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    texts = training_lines() if texts is None else texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # + <|endoftext|>, appended last as in GPT-2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    assert sorted(vocab.values()) == list(range(len(vocab))) and len(vocab) == vocab_size - 1, len(
        vocab
    )
    vocab["<|endoftext|>"] = len(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    t = GPT2TokenizerFast(
        vocab_file=str(tmp / "vocab.json"),
        merges_file=str(tmp / "merges.txt"),
        model_max_length=max_len,
    )
    assert len(t) == vocab_size and t.eos_token_id == vocab_size - 1 == t.bos_token_id, (
        len(t),
        t.eos_token_id,
    )
    return t


def make_bert_tokenizer(
    tmp: Path, texts=None, vocab_size=VOCAB, max_len=MAX_POSITIONS, min_char_count=None
):
    """min_char_count: if set, characters seen fewer times (in the normalised, pre-tokenized
    words) are left out of the alphabet (words with them become [UNK]), through the trainer's
    limit_alphabet; the cut is strict (every kept count exceeds every dropped one), so the
    trainer's own frequency sort cannot break a tie differently from run to run."""
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    texts = training_lines() if texts is None else texts

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The WordPiece trainer numbers its "##x" alphabet in hash-map order, so the learnt vocabulary
    # (merge ties break by id) changes from run to run. Handing it the whole alphabet, sorted, as
    # leading "special" tokens fixes every id; only vocab.txt is kept from this Tokenizer.
    words = [
        w
        for line in texts
        for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line))
    ]
    limit = {}
    if min_char_count is None:
        alphabet = sorted({w[0] for w in words}) + sorted({"##" + c for w in words for c in w[1:]})
    else:
        counts = Counter(c for w in words for c in w)
        keep = {c for c, n in counts.items() if n >= min_char_count}
        alphabet = sorted(keep) + sorted({"##" + c for w in words for c in w[1:] if c in keep})
        limit = {"limit_alphabet": len(keep)}
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=specials + alphabet,
        continuing_subword_prefix="##",
        show_progress=False,
        **limit,
    )
    tok.train_from_iterator(texts, trainer)
    vocab = tok.get_vocab()
    assert sorted(vocab.values()) == list(range(len(vocab))) and len(vocab) == vocab_size, len(
        vocab
    )
    words = sorted(vocab, key=vocab.__getitem__)
    assert words[:5] == specials, words[:5]
    (tmp / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    t = BertTokenizerFast(
        vocab_file=str(tmp / "vocab.txt"), do_lower_case=True, model_max_length=max_len
    )
    assert len(t) == vocab_size and t.pad_token_id == 0 and t.cls_token_id == 2, (
        len(t),
        t.pad_token_id,
    )
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


# --------------------------------------------------------------------------- trained checkpoints

GPT2_STDLIB_DIR = OUT / "gpt2-stdlib"
BERT_STDLIB_DIR = OUT / "bert-stdlib"
STDLIB_VOCAB = 512
STDLIB_POSITIONS = 128
WINDOW = 128  # GPT-2: 128 inputs + the next token; BERT: [CLS] + 126 tokens + [SEP]
BATCH = 32
STEPS = {"gpt2": 600, "bert": 600}
LR = 1e-3
WARMUP = 50  # linear warmup steps, then cosine decay to 0 at the last step
WEIGHT_DECAY = 0.01  # AdamW, on the >= 2-d parameters only
GRAD_CLIP = 1.0
MASK_RATE = 0.15
THREADS = 1
MIN_CHAR_COUNT = 50  # WordPiece alphabet: characters seen fewer times become [UNK] words
EVAL_WINDOWS = 64
EXCLUDED_DIRS = ("test", "tests", "idlelib", "lib2to3", "turtledemo")
TRAINING_RULE = (
    'sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*/*.py") if '
    "p.parent.name.isidentifier() and not p.parent.name.startswith('__') and p.parent.name not "
    f"in {EXCLUDED_DIRS})"
)
HELD_OUT_RULE = (
    'sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.is_file())'
)

STDLIB_GPT2_TEXTS = [
    "def read_config(path, encoding='utf-8'):\n    with open(path, encoding=encoding) as f:\n"
    "        return json.load(f)\n",
    'class Queue:\n    """A first-in, first-out queue of items."""\n\n'
    "    def __init__(self, maxsize=0):\n        self.maxsize = maxsize\n",
    "    for i, line in enumerate(lines):\n        if not line.strip():\n            continue\n"
    "        raise ValueError(f'bad line {i}: {line!r}')\n",
]
STDLIB_GPT2_LEN = 32
STDLIB_BERT_TEXTS = [
    "def close(self): return self._sock.close()",
    "import os",
    "with open(path) as f:",
]


def stdlib_training_files():
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p
        for p in root.glob("*/*.py")
        if p.parent.name.isidentifier()
        and not p.parent.name.startswith("__")
        and p.parent.name not in EXCLUDED_DIRS
    )


def stdlib_held_out_files():
    import sysconfig

    return sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.is_file())


def read_docs(files):
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def token_stream(raw, docs, joint):
    """Each non-empty document's ids (no special tokens), followed by `joint`, concatenated."""
    parts = []
    for enc in raw.encode_batch([d for d in docs if d], add_special_tokens=False):
        parts.append(np.asarray([*enc.ids, joint], np.int64))
    return np.concatenate(parts)


def lr_factor(steps):
    import math

    def f(step):
        if step < WARMUP:
            return (step + 1) / WARMUP
        return 0.5 * (1.0 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))

    return f


def train(model, batch_loss, steps, gen, name):
    """AdamW with warmup + cosine; returns (losses per step, wall seconds)."""
    import time

    import torch

    decay = [p for _, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for _, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
        lr=LR,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(steps))
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        loss = batch_loss(model, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        sched.step()
        losses.append(float(loss.item()))
        if step % 50 == 0 or step == steps - 1:
            el = time.perf_counter() - t0
            print(f"  {name} step {step:4d} loss {losses[-1]:.4f} ({el:.0f} s)", flush=True)
    model.eval()
    return losses, time.perf_counter() - t0


def head_means(attentions, valid):
    """attentions (layers, B, H, L, L), valid (B, L) query mask: per layer and head the mean over
    valid queries of the largest weight, and per layer the mean uniform level 1/#visible keys."""
    n_layers, _, n_heads, _, _ = attentions.shape
    keys = (attentions[0, :, 0] > 0).sum(-1)  # (B, L) keys each query sees
    out = [
        [round(float(attentions[layer, :, h].max(-1)[valid].mean()), 4) for h in range(n_heads)]
        for layer in range(n_layers)
    ]
    return out, round(float((1.0 / keys[valid]).mean()), 4)


def training_record(files, stream, losses, wall, steps, extra):
    dirs = sorted({p.parent.name for p in files})
    return {
        "text": {
            "rule": TRAINING_RULE,
            "read": "read_text(encoding='utf-8', errors='replace')",
            "files": len(files),
            "subpackages": dirs,
            "characters": int(sum(len(d) for d in read_docs(files))),
            "tokens": int(len(stream)),
            "stream": extra["stream"],
        },
        "steps": steps,
        "batch": BATCH,
        "window": extra["window"],
        "optimizer": f"AdamW lr {LR}, betas (0.9, 0.999), eps 1e-8, weight decay {WEIGHT_DECAY} "
        "on >= 2-d parameters (0 on biases and LayerNorms), gradient norm clipped to "
        f"{GRAD_CLIP}; lr: linear warmup over {WARMUP} steps then cosine decay to 0",
        "init": "HF's default initialisation after torch.manual_seed(SEED); dropout 0.0 "
        "everywhere (simpler; no randomness in the forward pass)",
        "batches": "window starts uniform over the stream, from torch.Generator().manual_seed("
        f"SEED + 2) (GPT-2) / (SEED + 3) (BERT); {extra['batches']}",
        "threads": THREADS,
        "final_loss_last_step": round(losses[-1], 4),
        "final_loss_mean_last_50": round(float(np.mean(losses[-50:])), 4),
        "loss_every_50_steps": [round(x, 4) for x in losses[::50]],
        "wall_seconds": round(wall, 1),
        "wall_seconds_note": "the only value in these folders that changes from run to run",
    }


def gpt2_stdlib(tmp: Path, vers):
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = GPT2_STDLIB_DIR
    files = stdlib_training_files()
    docs = read_docs(files)
    tokenizer = make_gpt2_tokenizer(tmp, docs, STDLIB_VOCAB, STDLIB_POSITIONS)
    tokenizer.save_pretrained(folder)  # before any call (see make_gpt2)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eot = tokenizer.eos_token_id
    stream = torch.from_numpy(token_stream(raw, docs, eot))
    print(f"gpt2-stdlib: {len(files)} files, {len(stream)} tokens", flush=True)
    config = GPT2Config(
        vocab_size=STDLIB_VOCAB,
        n_positions=STDLIB_POSITIONS,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight, "lm_head untied"
    offsets = torch.arange(WINDOW + 1)

    def batch_loss(m, gen):
        starts = torch.randint(0, len(stream) - WINDOW, (BATCH,), generator=gen)
        x = stream[starts[:, None] + offsets]
        logits = m(x[:, :-1]).logits
        return F.cross_entropy(logits.reshape(-1, STDLIB_VOCAB), x[:, 1:].reshape(-1))

    gen = torch.Generator().manual_seed(SEED + 2)
    losses, wall = train(model, batch_loss, STEPS["gpt2"], gen, "gpt2-stdlib")
    model.save_pretrained(folder, safe_serialization=True)

    # Everything below from the saved folder, eager attention (as the tiny references).
    model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    held_files = stdlib_held_out_files()
    held = token_stream(raw, read_docs(held_files), eot)[: EVAL_WINDOWS * (WINDOW + 1)]
    held = torch.from_numpy(held.reshape(EVAL_WINDOWS, WINDOW + 1))
    nll, atts = [], []
    with torch.no_grad():
        for chunk in held.split(16):
            out = model(chunk[:, :-1], output_attentions=True)
            nll.append(
                F.cross_entropy(
                    out.logits.reshape(-1, STDLIB_VOCAB), chunk[:, 1:].reshape(-1), reduction="sum"
                )
            )
            atts.append(torch.stack(out.attentions).numpy())
    held_loss = float(sum(nll) / (EVAL_WINDOWS * WINDOW))
    heads, uniform = head_means(np.concatenate(atts, 1), np.ones((EVAL_WINDOWS, WINDOW), bool))
    print(f"  held-out loss {held_loss:.4f}; mean max weight per head {heads} (uniform {uniform})")

    ids = []
    for text in STDLIB_GPT2_TEXTS:
        row = tokenizer(text)["input_ids"]
        assert len(row) >= STDLIB_GPT2_LEN, (len(row), text)
        ids.append(row[:STDLIB_GPT2_LEN])
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
    np.savez_compressed(folder / "reference.npz", **ref)
    enc = tokenizer(ENCODED_SENTENCE)["input_ids"]
    info = {
        "versions": vers,
        "seed": SEED,
        "model": "GPT2LMHeadModel n_embd 64, n_layer 2, n_head 4, n_positions 128, vocab 512 "
        "(byte-level BPE trained on the training text, <|endoftext|> = 511 last), lm_head tied",
        "training": training_record(
            files,
            stream,
            losses,
            wall,
            STEPS["gpt2"],
            {
                "stream": "each file's ids (no special tokens) followed by <|endoftext|>, "
                "concatenated in sorted-file order",
                "window": f"{WINDOW + 1} consecutive stream tokens: {WINDOW} inputs, next-token "
                f"targets (loss over all {WINDOW} positions)",
                "batches": f"{BATCH} windows a step",
            },
        ),
        "held_out": {
            "text": "the probe's default text: " + HELD_OUT_RULE,
            "files": len(held_files),
            "windows": f"the first {EVAL_WINDOWS} consecutive windows of {WINDOW + 1} tokens of "
            "that text's stream (made as the training stream), in sorted-file order",
            "loss": round(held_loss, 4),
            "loss_note": "mean next-token cross-entropy (nats) over the 64 x 128 targets",
        },
        "attention_on_held_out": {
            "mean_max_weight": heads,
            "mean_max_weight_all_heads": round(float(np.mean(heads)), 4),
            "uniform_level": uniform,
            "note": "per layer, per head: mean over the held-out windows' query positions of the "
            "head's largest weight (eager attention, causal); uniform_level: mean 1/(i+1)",
        },
        "texts": STDLIB_GPT2_TEXTS,
        "notes": f"input_ids[i] = tokenizer(texts[i]).input_ids[:{STDLIB_GPT2_LEN}]; logits/"
        "attentions from the saved GPT2LMHeadModel in float32 eval mode, eager attention, "
        "attention_mask all ones, no token_type_ids passed.",
        "encoded_sentence": {
            "text": ENCODED_SENTENCE,
            "ids": enc,
            "tokens": tokenizer.convert_ids_to_tokens(enc),
        },
    }
    (folder / "reference.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def bert_stdlib(tmp: Path, vers):
    import torch
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertForMaskedLM

    folder = BERT_STDLIB_DIR
    files = stdlib_training_files()
    docs = read_docs(files)
    tokenizer = make_bert_tokenizer(
        tmp, docs, STDLIB_VOCAB, STDLIB_POSITIONS, min_char_count=MIN_CHAR_COUNT
    )
    tokenizer.save_pretrained(folder)  # before any call (see make_gpt2)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    cls, sep, mask_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id
    assert (cls, sep, mask_id) == (2, 3, 4), (cls, sep, mask_id)
    stream = torch.from_numpy(token_stream(raw, docs, sep))
    unk_share = float((stream == tokenizer.unk_token_id).float().mean())
    print(
        f"bert-stdlib: {len(files)} files, {len(stream)} tokens, [UNK] {unk_share:.4f}", flush=True
    )
    config = BertConfig(
        vocab_size=STDLIB_VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=STDLIB_POSITIONS,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    model = BertForMaskedLM(config)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    width = WINDOW - 2
    offsets = torch.arange(width)
    n_special = 5  # [PAD] [UNK] [CLS] [SEP] [MASK]: never masked (as HF's collator)

    def windows(content):
        n = content.shape[0]
        return torch.cat([torch.full((n, 1), cls), content, torch.full((n, 1), sep)], dim=1)

    def batch_loss(m, gen):
        starts = torch.randint(0, len(stream) - width + 1, (BATCH,), generator=gen)
        content = stream[starts[:, None] + offsets]
        chosen = (torch.rand(content.shape, generator=gen) < MASK_RATE) & (content >= n_special)
        r = torch.rand(content.shape, generator=gen)
        rand_ids = torch.randint(n_special, STDLIB_VOCAB, content.shape, generator=gen)
        inputs = torch.where(chosen & (r < 0.8), mask_id, content)
        inputs = torch.where(chosen & (r >= 0.8) & (r < 0.9), rand_ids, inputs)
        labels = torch.where(chosen, content, -100)
        pad = torch.full((BATCH, 1), -100)
        return m(
            windows(inputs),
            attention_mask=torch.ones(BATCH, WINDOW, dtype=torch.long),
            token_type_ids=torch.zeros(BATCH, WINDOW, dtype=torch.long),
            labels=torch.cat([pad, labels, pad], dim=1),
        ).loss

    gen = torch.Generator().manual_seed(SEED + 3)
    losses, wall = train(model, batch_loss, STEPS["bert"], gen, "bert-stdlib")
    model.save_pretrained(folder, safe_serialization=True)

    model = BertForMaskedLM.from_pretrained(folder, attn_implementation="eager").eval()
    held_files = stdlib_held_out_files()
    held = token_stream(raw, read_docs(held_files), sep)[: EVAL_WINDOWS * width]
    content = torch.from_numpy(held.reshape(EVAL_WINDOWS, width))
    eval_gen = torch.Generator().manual_seed(SEED + 4)
    chosen = (torch.rand(content.shape, generator=eval_gen) < MASK_RATE) & (content >= n_special)
    masked = windows(torch.where(chosen, mask_id, content))
    plain = windows(content)
    chosen = torch.cat(
        [
            torch.zeros(EVAL_WINDOWS, 1, dtype=torch.bool),
            chosen,
            torch.zeros(EVAL_WINDOWS, 1, dtype=torch.bool),
        ],
        dim=1,
    )
    nll, atts = 0.0, []
    with torch.no_grad():
        for xm, xp, ch in zip(masked.split(16), plain.split(16), chosen.split(16)):
            logits = model(xm).logits
            nll += float(torch.nn.functional.cross_entropy(logits[ch], xp[ch], reduction="sum"))
            atts.append(torch.stack(model(xp, output_attentions=True).attentions).numpy())
    n_masked = int(chosen.sum())
    held_loss = nll / n_masked
    heads, uniform = head_means(np.concatenate(atts, 1), np.ones((EVAL_WINDOWS, WINDOW), bool))
    print(f"  held-out loss {held_loss:.4f}; mean max weight per head {heads} (uniform {uniform})")

    batch = tokenizer(STDLIB_BERT_TEXTS, padding=True, truncation=True, max_length=BERT_MAX_LEN)
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
    diff = float(np.abs(ref["logits_types"] - ref["logits"]).max())
    print(f"  reference: L={length}, token types move logits by up to {diff:.3f}")
    np.savez_compressed(folder / "reference.npz", **ref)
    with_special = tokenizer(ENCODED_SENTENCE)["input_ids"]
    without = tokenizer(ENCODED_SENTENCE, add_special_tokens=False)["input_ids"]
    info = {
        "versions": vers,
        "seed": SEED,
        "model": "BertForMaskedLM hidden 64, 2 layers, 4 heads, intermediate 256, "
        "max_position_embeddings 128, type_vocab_size 2, vocab 512 (lowercasing WordPiece "
        "trained on the training text, [PAD] [UNK] [CLS] [SEP] [MASK] = 0-4; characters seen "
        f"fewer than {MIN_CHAR_COUNT} times left out of its alphabet), decoder tied, no pooler",
        "training": training_record(
            files,
            stream,
            losses,
            wall,
            STEPS["bert"],
            {
                "stream": "each file's ids (no special tokens) followed by [SEP], concatenated "
                f"in sorted-file order; [UNK] share {unk_share:.4f}",
                "window": f"[CLS] + {width} consecutive stream tokens + [SEP] ({WINDOW}), "
                "attention_mask ones, token_type_ids zeros",
                "batches": f"{BATCH} windows a step; masking dynamic per batch (same generator): "
                f"each non-special token chosen with probability {MASK_RATE}; of those 80% "
                "[MASK], 10% a uniform random non-special id, 10% unchanged; loss on the chosen",
            },
        ),
        "held_out": {
            "text": "the probe's default text: " + HELD_OUT_RULE,
            "files": len(held_files),
            "windows": f"the first {EVAL_WINDOWS} consecutive runs of {width} tokens of that "
            f"text's stream (made as the training stream), in sorted-file order, as [CLS] run "
            "[SEP]",
            "loss": round(held_loss, 4),
            "masked_tokens": n_masked,
            "loss_note": f"mean cross-entropy (nats) at {MASK_RATE:.0%} of the non-special "
            "tokens, all replaced by [MASK] (torch.Generator().manual_seed(SEED + 4))",
        },
        "attention_on_held_out": {
            "mean_max_weight": heads,
            "mean_max_weight_all_heads": round(float(np.mean(heads)), 4),
            "uniform_level": uniform,
            "note": "per layer, per head: mean over the held-out windows' (unmasked) query "
            "positions of the head's largest weight (eager attention); uniform_level: 1/128",
        },
        "texts": STDLIB_BERT_TEXTS,
        "notes": "input_ids = tokenizer(texts, padding=True, truncation=True, max_length=24): "
        "[CLS] text [SEP], right-padded with [PAD] (id 0), attention_mask 0 there. logits and "
        "attentions from the saved BertForMaskedLM in float32 eval mode, eager attention, with "
        "token_type_ids (all zeros); logits_types from the same call with token_type_ids_types "
        "(1 from position L//2 on where attention_mask is 1, else 0); token type 1 was never "
        "seen in training (its embedding is HF's init).",
        "encoded_sentence": {
            "text": ENCODED_SENTENCE,
            "ids_with_special_tokens": with_special,
            "ids_without_special_tokens": without,
            "tokens": tokenizer.convert_ids_to_tokens(with_special),
        },
    }
    (folder / "reference.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- checks


def check(folders):
    """Reload the folders with transformers and `tokenizers`; compare with the stored references."""
    import torch
    from safetensors import safe_open
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    worst = 0.0
    for folder in folders:
        auto = AutoModelForMaskedLM if folder.name.startswith("bert") else AutoModelForCausalLM
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
        made = (GPT2_STDLIB_DIR, BERT_STDLIB_DIR) if args.trained else (GPT2_DIR, BERT_DIR)
        for folder in made:
            if folder.exists():
                for p in folder.iterdir():
                    p.unlink()
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "gpt2").mkdir()
            (Path(tmp) / "bert").mkdir()
            if args.trained:
                import torch

                torch.set_num_threads(THREADS)
                torch.use_deterministic_algorithms(True, warn_only=True)
                gpt2_stdlib(Path(tmp) / "gpt2", vers)
                bert_stdlib(Path(tmp) / "bert", vers)
            else:
                make_gpt2(Path(tmp) / "gpt2", vers)
                make_bert(Path(tmp) / "bert", vers)
    check([f for f in (GPT2_DIR, BERT_DIR, GPT2_STDLIB_DIR, BERT_STDLIB_DIR) if f.exists()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
