"""Pretrained GPT-2 and BERT, from the Hugging Face hub or a local folder, as ablate models.

A checkpoint in Hugging Face's format (config.json, model.safetensors and the tokenizer's
files) is read into ablate's own modules: GPT-2 is a `Transformer` (pre-norm, biased
projections, tanh GELU, tied embeddings: the `ModelConfig` knobs), BERT a `BertLM`, the same
`Transformer` with post-norm blocks plus what only BERT has (token-type embeddings and its
masked-LM head). Every head is a mixer from the one registry (`ablate.attention`), so the
probe reads, replaces and zeroes a pretrained head as it does a trained one, and `attention`
swaps heads for another variant at load time (their W_q/W_k are dropped; the variant's own
state is drawn from `seed`), e.g. to fine-tune a model whose heads cannot learn context.

Where a checkpoint comes from: a folder holding the files, or a hub name (`gpt2` ...
`gpt2-xl`, `bert-base-uncased` ..., or any `owner/name` of a GPT-2 or BERT model), fetched
by `huggingface_hub` into its own cache (HF_HOME, HF_HUB_OFFLINE as that library reads
them). Nothing is converted or written elsewhere.

Axis letters: the table in `ablate.model` (T token types).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ablate.attention import Learned, MixerSettings, make_mixer
from ablate.config import ConfigError
from ablate.data import DataError
from ablate.model import LayerSpec, ModelConfig, Output, Transformer, gelu, layer_norm

#: Short names of the checkpoints this toolkit is for, and their hub repositories.
HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "bert-base-uncased": "google-bert/bert-base-uncased",
    "bert-base-cased": "google-bert/bert-base-cased",
    "bert-large-uncased": "google-bert/bert-large-uncased",
    "bert-large-cased": "google-bert/bert-large-cased",
}
#: What is fetched of a hub repository (the other weight formats are never downloaded).
FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
FAMILIES = ("gpt2", "bert")
#: A learned mixer's variables -> their entries in the layouts below.
QK_NAMES = {"w_q": "q", "w_k": "k", "b_q": "bq", "b_k": "bk"}
#: Hugging Face activation names -> `ModelConfig.activation`.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


class BertLM(Transformer):
    """BERT for masked-LM: a post-norm `Transformer` (embeddings normed, no final norm) with
    token-type embeddings and BERT's head (dense, GELU, LayerNorm, then the transposed token
    embedding plus a bias). Token types default to 0 (one segment)."""

    def __init__(self, cfg: ModelConfig, type_vocab_size: int, *, rngs: nnx.Rngs):
        if cfg.norm_position != "post" or not cfg.tie_embeddings:
            raise ConfigError([("model", "BertLM is post-norm with tied embeddings")])
        super().__init__(cfg, rngs=rngs)
        self.type_embed = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (type_vocab_size, cfg.d_model))
        )
        self.transform = nnx.Linear(cfg.d_model, cfg.d_model, dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.transform_norm = layer_norm(cfg, rngs)
        self.decoder_bias = nnx.Param(jnp.zeros((cfg.vocab_size,)))

    def __call__(
        self, tokens_BL: jax.Array, *, token_types_BL: jax.Array | None = None, **kwargs: Any
    ) -> Output:
        """As `Transformer.__call__`, with each token's segment (default: all 0)."""
        return self.run(self.embed(tokens_BL, token_types_BL), **kwargs)

    def embed(self, tokens_BL: jax.Array, token_types_BL: jax.Array | None = None) -> jax.Array:
        types_BL = jnp.zeros_like(tokens_BL) if token_types_BL is None else token_types_BL
        L = tokens_BL.shape[1]
        x_BLD = (
            self.token_embed(tokens_BL)
            + self.pos_embed[...][None, :L]
            + jnp.take(self.type_embed[...], types_BL, axis=0)
        )
        return self.norm(x_BLD).astype(jnp.dtype(self.cfg.dtype))

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        x_BLD = x_BLD.astype(jnp.float32)
        h_BLD = self.transform_norm(gelu(self.transform(x_BLD), self.cfg.activation))
        table_VD = self.token_embed.embedding[...]
        return h_BLD @ table_VD.T + self.decoder_bias[...][None, None]


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """A checkpoint's tokenizer (HF `tokenizers`) and the special ids the probe uses."""

    inner: Any
    special: Mapping[str, int]

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, without special tokens."""
        return np.asarray(self.inner.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Any) -> str:
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Pretrained:
    """A loaded checkpoint: the model, its config, its tokenizer and where it came from."""

    name: str
    folder: Path
    family: str
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    type_vocab_size: int = 0

    @property
    def context(self) -> int:
        """The most positions the model has embeddings for."""
        return self.config.seq_len


def locate(name: str, cache_dir: str | Path | None = None) -> Path:
    """The folder of checkpoint `name`: a local folder as given, else the hub's snapshot
    (fetched into the hub cache, or found there when offline)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")):
        raise ConfigError(
            [
                (
                    "model",
                    f"{name}: not a folder (a checkpoint folder holds {FILES[0]}, {FILES[1]} and the tokenizer's files)",
                )
            ]
        )
    repo = HUB_NAMES.get(name, name if name.count("/") == 1 else None)
    if repo is None:
        raise ConfigError(
            [
                (
                    "model",
                    f"unknown model {name!r}: give one of {', '.join(HUB_NAMES)}, a hub "
                    "repository owner/name of a GPT-2 or BERT model, or a local folder",
                )
            ]
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=list(FILES), cache_dir=cache_dir))
    except Exception as e:  # the hub library raises its own, httpx's and OS errors
        detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"
        folder = (
            "pass a local folder holding config.json, model.safetensors and tokenizer.json "
            f"(made on a machine with network, e.g. `hf download {repo} "
            f"{' '.join(FILES[:3])} --local-dir PATH`)"
        )
        if isinstance(e, LocalEntryNotFoundError):  # no network (or offline), not cached
            raise DataError(
                f"cannot reach the Hugging Face hub for {repo!r} and it is not in the hub "
                f"cache ({detail}). Without network, {folder}, or fill the hub cache on "
                "such a machine and copy it"
            ) from None
        raise DataError(
            f"the Hugging Face hub refused {repo!r} ({detail}): check the name (and a token "
            f"for a gated or private model), or {folder}"
        ) from None


def read_config(folder: Path) -> tuple[str, dict[str, Any]]:
    """(family, config.json's fields) of a checkpoint folder, refusing what is not loadable."""
    file = folder / "config.json"
    if not file.is_file():
        raise DataError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    hf = json.loads(file.read_text())
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise DataError(
            f"{file}: model_type {family!r} is not supported; ablate loads {', '.join(FAMILIES)}"
        )
    return family, hf


def model_config(
    family: str, hf: Mapping[str, Any], attention: LayerSpec | tuple = "learned", **overrides
) -> tuple[ModelConfig, int]:
    """(the ModelConfig of a checkpoint's config.json, its number of token types).

    Settings the modules do not implement are refused by name, never silently ignored."""

    def refuse(field: str, value: Any, allowed: str) -> DataError:
        return DataError(f"config.json: {field} = {value!r} is not supported ({allowed})")

    if family == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        for flag in (
            "scale_attn_by_inverse_layer_idx",
            "reorder_and_upcast_attn",
            "add_cross_attention",
        ):
            if hf.get(flag):
                raise refuse(flag, hf[flag], "only false")
        if not hf.get("scale_attn_weights", True):
            raise refuse("scale_attn_weights", False, "only true")
        shape = dict(
            vocab_size=hf["vocab_size"],
            seq_len=hf["n_positions"],
            d_model=hf["n_embd"],
            n_heads=hf["n_head"],
            n_layers=hf["n_layer"],
            d_mlp=hf.get("n_inner") or 0,
            causal=True,
            norm_position="pre",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
        types = 0
    else:
        act = hf.get("hidden_act", "gelu")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise refuse("position_embedding_type", hf["position_embedding_type"], "only absolute")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise refuse("is_decoder", True, "only an encoder")
        shape = dict(
            vocab_size=hf["vocab_size"],
            seq_len=hf["max_position_embeddings"],
            d_model=hf["hidden_size"],
            n_heads=hf["num_attention_heads"],
            n_layers=hf["num_hidden_layers"],
            d_mlp=hf["intermediate_size"],
            causal=False,
            norm_position="post",
            norm_eps=hf.get("layer_norm_eps", 1e-12),
        )
        types = hf.get("type_vocab_size", 2)
    if act not in ACTIVATIONS:
        raise refuse("activation", act, f"one of {', '.join(ACTIVATIONS)}")
    cfg = ModelConfig(
        **shape,
        bias=True,
        activation=ACTIVATIONS[act],
        tie_embeddings=True,
        attention=attention,
        **overrides,
    )
    return cfg, types


def load(
    name: str,
    *,
    attention: LayerSpec | tuple = "learned",
    dtype: str = "float32",
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> Pretrained:
    """Checkpoint `name` (a folder or hub name, as `locate` reads it) as an ablate model.

    `attention` is a `ModelConfig.attention` spec: heads that are not `learned` (or
    `frozen`, which keeps the checkpoint's W_q/W_k) get the variant's own state from `seed`.
    """
    folder = locate(name, cache_dir)
    family, hf = read_config(folder)
    cfg, types = model_config(family, hf, attention, dtype=dtype)
    tokenizer = read_tokenizer(folder, family)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise DataError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {cfg.vocab_size}"
        )
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise DataError(
            f"{folder} has no model.safetensors (ablate reads safetensors only, never pickled "
            "weights: convert pytorch_model.bin with transformers' save_pretrained)"
        )
    model = _build(cfg, family, types, seed)
    tensors = _read_tensors(weights, family)
    _check_tied(tensors, hf)
    _fill(model, tensors, family, weights)
    return Pretrained(name, folder, family, cfg, model, tokenizer, types)


def _build(cfg: ModelConfig, family: str, types: int, seed: int) -> Transformer:
    """The model with shapes only, except the state of heads that are not learned: no
    weight is drawn that the checkpoint replaces."""

    def make():
        rngs = nnx.Rngs(seed)
        return BertLM(cfg, types, rngs=rngs) if family == "bert" else Transformer(cfg, rngs=rngs)

    model = nnx.eval_shape(make)
    for n, block in enumerate(model.blocks):
        attention, variants = block.attention, cfg.head_variants()[n]
        for i, (start, count) in enumerate(attention.head_groups):
            if isinstance(attention.mixers[i], Learned):
                continue  # its W_q/W_k come from the checkpoint
            settings = MixerSettings(
                cfg.d_model, cfg.head_dim, cfg.seq_len, cfg.causal, first_head=start, bias=True
            )
            rngs = nnx.Rngs(jax.random.fold_in(jax.random.key(seed), n))
            name = variants[start]
            attention.mixers[i] = make_mixer(name, count, settings, rngs, cfg.settings_of(name))
    return model


# --- checkpoint tensors -------------------------------------------------------------------


def _read_tensors(path: Path, family: str) -> _Tensors:
    """The checkpoint's tensors by their name without the model prefix ("transformer.",
    "bert."), LayerNorm's old gamma/beta read as weight/bias; buffers dropped."""
    from safetensors import safe_open

    tensors, names = {}, {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                name = key.removeprefix("transformer.").removeprefix("bert.")
                if family == "gpt2" and name.endswith((".attn.bias", ".attn.masked_bias")):
                    continue  # the causal mask, a buffer in older checkpoints
                name = name.replace("LayerNorm.gamma", "LayerNorm.weight")
                name = name.replace("LayerNorm.beta", "LayerNorm.bias")
                tensors[name], names[name] = f.get_tensor(key), key
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise DataError(f"{path}: not a readable safetensors file ({e})") from None
    return _Tensors({k: np.asarray(v, np.float32) for k, v in tensors.items()}, path, names)


def _gpt2_layout(cfg: ModelConfig) -> dict[str, Callable]:
    """Our parameter path -> how to read it from GPT-2's tensors (Conv1D weights: in x out)."""
    D, H, K = cfg.d_model, cfg.n_heads, cfg.head_dim
    layout: dict[str, Callable] = {
        "token_embed.embedding": lambda t: t["wte.weight"],
        "pos_embed": lambda t: t["wpe.weight"],
        "norm.scale": lambda t: t["ln_f.weight"],
        "norm.bias": lambda t: t["ln_f.bias"],
    }
    for n in range(cfg.n_layers):
        h = f"h.{n}."

        def qkv(t, which, h=h):
            return t[h + "attn.c_attn.weight"][:, which * D : (which + 1) * D].reshape(D, H, K)

        def qkv_bias(t, which, h=h):
            return t[h + "attn.c_attn.bias"][which * D : (which + 1) * D].reshape(H, K)

        b = f"blocks.{n}."
        layout |= {
            b + "norm_attn.scale": lambda t, h=h: t[h + "ln_1.weight"],
            b + "norm_attn.bias": lambda t, h=h: t[h + "ln_1.bias"],
            b + "norm_mlp.scale": lambda t, h=h: t[h + "ln_2.weight"],
            b + "norm_mlp.bias": lambda t, h=h: t[h + "ln_2.bias"],
            b + "attention.q": lambda t, qkv=qkv: qkv(t, 0),
            b + "attention.k": lambda t, qkv=qkv: qkv(t, 1),
            b + "attention.w_v": lambda t, qkv=qkv: qkv(t, 2),
            b + "attention.bq": lambda t, f=qkv_bias: f(t, 0),
            b + "attention.bk": lambda t, f=qkv_bias: f(t, 1),
            b + "attention.b_v": lambda t, f=qkv_bias: f(t, 2),
            b + "attention.w_o": lambda t, h=h: t[h + "attn.c_proj.weight"].reshape(H, K, D),
            b + "attention.b_o": lambda t, h=h: t[h + "attn.c_proj.bias"],
            b + "mlp.up.kernel": lambda t, h=h: t[h + "mlp.c_fc.weight"],
            b + "mlp.up.bias": lambda t, h=h: t[h + "mlp.c_fc.bias"],
            b + "mlp.down.kernel": lambda t, h=h: t[h + "mlp.c_proj.weight"],
            b + "mlp.down.bias": lambda t, h=h: t[h + "mlp.c_proj.bias"],
        }
    return layout


def _bert_layout(cfg: ModelConfig) -> dict[str, Callable]:
    """Our parameter path -> how to read it from BERT's tensors (Linear weights: out x in)."""
    D, H, K = cfg.d_model, cfg.n_heads, cfg.head_dim
    e, p = "embeddings.", "cls.predictions."
    layout: dict[str, Callable] = {
        "token_embed.embedding": lambda t: t[e + "word_embeddings.weight"],
        "pos_embed": lambda t: t[e + "position_embeddings.weight"],
        "type_embed": lambda t: t[e + "token_type_embeddings.weight"],
        "norm.scale": lambda t: t[e + "LayerNorm.weight"],
        "norm.bias": lambda t: t[e + "LayerNorm.bias"],
        "transform.kernel": lambda t: t[p + "transform.dense.weight"].T,
        "transform.bias": lambda t: t[p + "transform.dense.bias"],
        "transform_norm.scale": lambda t: t[p + "transform.LayerNorm.weight"],
        "transform_norm.bias": lambda t: t[p + "transform.LayerNorm.bias"],
        "decoder_bias": lambda t: t[p + "bias"],
    }
    for n in range(cfg.n_layers):
        a, b = f"encoder.layer.{n}.", f"blocks.{n}."
        s = a + "attention.self."
        layout |= {
            b + "attention.q": lambda t, s=s: t[s + "query.weight"].T.reshape(D, H, K),
            b + "attention.k": lambda t, s=s: t[s + "key.weight"].T.reshape(D, H, K),
            b + "attention.w_v": lambda t, s=s: t[s + "value.weight"].T.reshape(D, H, K),
            b + "attention.bq": lambda t, s=s: t[s + "query.bias"].reshape(H, K),
            b + "attention.bk": lambda t, s=s: t[s + "key.bias"].reshape(H, K),
            b + "attention.b_v": lambda t, s=s: t[s + "value.bias"].reshape(H, K),
            b + "attention.w_o": lambda t, a=a: t[a + "attention.output.dense.weight"].T.reshape(
                H, K, D
            ),
            b + "attention.b_o": lambda t, a=a: t[a + "attention.output.dense.bias"],
            b + "norm_attn.scale": lambda t, a=a: t[a + "attention.output.LayerNorm.weight"],
            b + "norm_attn.bias": lambda t, a=a: t[a + "attention.output.LayerNorm.bias"],
            b + "mlp.up.kernel": lambda t, a=a: t[a + "intermediate.dense.weight"].T,
            b + "mlp.up.bias": lambda t, a=a: t[a + "intermediate.dense.bias"],
            b + "mlp.down.kernel": lambda t, a=a: t[a + "output.dense.weight"].T,
            b + "mlp.down.bias": lambda t, a=a: t[a + "output.dense.bias"],
            b + "norm_mlp.scale": lambda t, a=a: t[a + "output.LayerNorm.weight"],
            b + "norm_mlp.bias": lambda t, a=a: t[a + "output.LayerNorm.bias"],
        }
    return layout


class _Tensors(dict):
    """The checkpoint's tensors by normalised name (`names`: each one's name in the file);
    a missing one is named in the error."""

    def __init__(self, tensors: Mapping[str, np.ndarray], path: Path, names: Mapping[str, str]):
        super().__init__(tensors)
        self.path, self.names, self.read = path, names, set()

    def __getitem__(self, key: str) -> np.ndarray:
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def __missing__(self, key: str):
        if key.startswith("cls."):
            raise DataError(
                f"{self.path}: tensor {key!r} is missing: ablate needs BERT's masked-LM head, "
                "as a BertForMaskedLM or BertForPreTraining checkpoint holds it"
            )
        raise DataError(
            f"{self.path}: tensor {key!r} is missing (is this a checkpoint of the model its "
            "config.json describes?)"
        )


#: Tensors a checkpoint may hold that no ablate module reads: BERT's pooler and
#: next-sentence head, position-id buffers, and heads tied to the token embedding (checked
#: equal to it by `_check_tied`).
UNUSED = (
    "pooler.",
    "cls.seq_relationship.",
    "embeddings.position_ids",
    "lm_head.",
    "cls.predictions.decoder.",
)
#: Tied heads as checkpoints may store them: name -> the tensor it must equal.
TIED = {
    "lm_head.weight": "wte.weight",
    "cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}


def _check_tied(source: _Tensors, hf: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose LM head is not its token embedding: ablate ties them."""
    if hf.get("tie_word_embeddings", True) is False:
        raise DataError(
            f"{source.path}: config.json sets tie_word_embeddings = false; ablate's GPT-2 and "
            "BERT tie the LM head to the token embedding"
        )
    for head, table in TIED.items():
        if (
            head in source
            and table in source
            and not np.array_equal(dict.__getitem__(source, head), dict.__getitem__(source, table))
        ):
            raise DataError(
                f"{source.path}: tensor {source.names[head]!r} differs from "
                f"{source.names[table]!r}; ablate ties the LM head to the token embedding"
            )


def _fill(model: Transformer, source: _Tensors, family: str, path: Path) -> None:
    """Set every weight of `model` from the checkpoint, checking each tensor's shape."""
    cfg = model.cfg
    layout = (_gpt2_layout if family == "gpt2" else _bert_layout)(cfg)

    def read(ours: str, variable: nnx.Variable, rows: slice | None = None) -> None:
        value = layout[ours](source)
        if rows is not None:
            value = value[:, rows] if value.ndim == 3 else value[rows]
        if tuple(value.shape) != tuple(variable.shape):
            raise DataError(
                f"{path}: {_hf_name(layout[ours], source)} has shape {tuple(value.shape)} "
                f"where this architecture ({cfg.n_layers} layers, {cfg.n_heads} heads, "
                f"d_model {cfg.d_model}, vocab {cfg.vocab_size}, {cfg.seq_len} positions) "
                f"needs {tuple(variable.shape)} for {ours}"
            )
        variable.set_value(jnp.asarray(value, jnp.float32))

    for ours, variable in _named_variables(model):
        *where, last = ours.split(".")
        if "mixers" in where and last in QK_NAMES:  # a learned group's: its heads' slice
            n, i = int(where[1]), int(where[-1])
            start, count = model.blocks[n].attention.head_groups[i]
            heads = slice(start, start + count)
            read(f"blocks.{n}.attention.{QK_NAMES[last]}", variable, heads)
        elif ours in layout:
            read(ours, variable)
        elif isinstance(variable.get_value(), jax.ShapeDtypeStruct):
            raise DataError(f"{path}: nothing in the checkpoint fills {ours}")
    swapped = any(not isinstance(m, Learned) for b in model.blocks for m in b.attention.mixers)
    # Query/key weights of heads swapped for another variant are dropped by design.
    dropped = ("attention.self.query.", "attention.self.key.") if swapped else ()
    unread = [
        source.names[k]
        for k in source
        if k not in source.read and not k.startswith(UNUSED) and not any(d in k for d in dropped)
    ]
    if unread:
        raise DataError(
            f"{path}: {len(unread)} tensors fit nothing of the architecture config.json "
            f"describes ({cfg.n_layers} layers), e.g. {', '.join(sorted(unread)[:4])}"
        )


def _named_variables(model: nnx.Module):
    """(dotted path, variable) of every variable of `model`, a head group's by its mixer."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            yield ".".join(str(p) for p in path), node


def _hf_name(reader: Callable, tensors: _Tensors) -> str:
    """The checkpoint tensor a layout entry reads, by its name in the file (found by
    watching which key the entry asks for)."""
    asked = []

    class Spy(dict):
        def __getitem__(self, key):
            asked.append(key)
            return tensors[key]

    try:
        reader(Spy())
    except Exception:
        pass
    return f"tensor {tensors.names.get(asked[0], asked[0])!r}" if asked else "a tensor"


# --- tokenizer -------------------------------------------------------------------------------


def read_tokenizer(folder: Path, family: str) -> Tokenizer:
    """The checkpoint's tokenizer (tokenizer.json, else the vocabulary files) and its ids of
    the special tokens: GPT-2's end of text; BERT's [CLS], [SEP], [MASK], [PAD]."""
    from tokenizers import Tokenizer as HFTokenizer

    file = folder / "tokenizer.json"
    if file.is_file():
        inner = HFTokenizer.from_file(str(file))
    elif family == "bert" and (folder / "vocab.txt").is_file():
        from tokenizers.implementations import BertWordPieceTokenizer

        lower = _tokenizer_setting(folder, "do_lower_case", True)
        inner = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lower)
    elif family == "gpt2" and (folder / "vocab.json").is_file():
        from tokenizers.implementations import ByteLevelBPETokenizer

        inner = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    else:
        wanted = "vocab.txt" if family == "bert" else "vocab.json and merges.txt"
        raise DataError(f"{folder} has no tokenizer.json (nor {wanted})")
    names = (
        {"eos": _tokenizer_setting(folder, "eos_token", "<|endoftext|>")}
        if family == "gpt2"
        else {
            k: _tokenizer_setting(folder, f"{k}_token", f"[{k.upper()}]")
            for k in ("cls", "sep", "mask", "pad")
        }
    )
    special = {}
    for key, token in names.items():
        token = token.get("content") if isinstance(token, dict) else token
        token_id = inner.token_to_id(token)
        if token_id is None:
            raise DataError(f"{folder}: the tokenizer has no {key} token {token!r}")
        special[key] = int(token_id)
    return Tokenizer(inner, special)


def _tokenizer_setting(folder: Path, key: str, default: Any) -> Any:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if file.is_file():
            value = json.loads(file.read_text()).get(key)
            if value is not None:
                return value
    return default
