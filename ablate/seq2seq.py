"""An encoder-decoder transformer whose three kinds of attention are chosen from one registry.

The encoder reads the source bidirectionally (its self-attention: `attention`); the decoder
reads the target prefix causally (`decoder_attention`) and the encoder's output through
cross-attention (`cross_attention`: queries from the decoder, keys and values from the
encoder output). Each is a spec as in `ModelConfig.attention` (one name, or per layer a name
or one per head) and every head is a mixer of `ablate.attention`, so any variant that can
serve the masking is one config line. The pieces are model.py's: `Embed`, `Block` (each
encoder layer), `Attention` and `MLP` (each decoder layer: self-attention, cross-attention,
MLP, each pre-norm with a residual).

Refused with their reasons before anything is built: `fourier` outside the encoder (it
needs a bidirectional square mixing), and in cross-attention every variant without
`supports_cross` (`none`: the decoder would never see the source). `gaussian` there follows
the monotonic alignment (target i centres on source position i). Source padding (`source_valid`)
hides padded source positions from every encoder query and every cross-attention query;
target padding (`valid`) does the same in the decoder.

Axis letters: the table in `ablate.model` (here S counts source positions).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from ablate.attention import Frozen, MixerSettings, variant_problem, variant_settings
from ablate.config import check, in_range
from ablate.model import (
    MLP,
    Attention,
    Block,
    Embed,
    LayerSpec,
    ModelConfig,
    _block_runner,
    _dropout,
    expand_spec,
    spec_problems,
    visibility,
)

FREEZABLE = ("token_embed", "pos_embed", "source_embed", "source_pos_embed")
KIND = "encoder_decoder"


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    """Shape of the encoder-decoder and the attention variant of every layer and head.

    `vocab_size` and `seq_len` are the target's (decoder's), `source_vocab_size` and
    `source_len` the source's; `n_layers` counts encoder layers, `n_decoder_layers` decoder
    layers. `attention` (encoder self-attention), `decoder_attention` and `cross_attention`
    are specs as in `ModelConfig.attention`; `attention_settings` holds, per variant, its
    settings for all three. `freeze` lists embeddings kept at init.
    """

    vocab_size: int
    seq_len: int
    source_vocab_size: int
    source_len: int
    kind: Literal["encoder_decoder"] = KIND
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    n_decoder_layers: int = 2
    d_mlp: int = 0
    attention: LayerSpec | tuple[LayerSpec, ...] = "learned"
    decoder_attention: LayerSpec | tuple[LayerSpec, ...] = "learned"
    cross_attention: LayerSpec | tuple[LayerSpec, ...] = "learned"
    attention_settings: dict[str, Any] = FrozenDict()
    freeze: tuple[str, ...] = ()
    dropout: float = 0.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    fused_attention: bool = True
    remat: bool = False

    SPECS = ("attention", "decoder_attention", "cross_attention")

    def __post_init__(self):
        for name in self.SPECS:
            spec = getattr(self, name)
            if not isinstance(spec, str):
                spec = tuple(e if isinstance(e, str) else tuple(e) for e in spec)
                object.__setattr__(self, name, spec)
        object.__setattr__(self, "freeze", tuple(self.freeze))
        check(self)
        # The names the specs use, read from them directly (as ModelConfig does): expanding
        # them per layer and head first would build n_layers x n_heads names.
        entries = [e for name in self.SPECS for e in _entries(getattr(self, name))]
        used = tuple(dict.fromkeys(n for e in entries for n in ([e] if isinstance(e, str) else e)))
        settings, _ = variant_settings(self.attention_settings, used)
        object.__setattr__(self, "attention_settings", settings)

    # The decoder-only facts Block and the training core read, under their usual names.
    causal = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.d_mlp or 4 * self.d_model

    def _heads(self, name: str) -> tuple[tuple[str, ...], ...]:
        layers = self.n_layers if name == "attention" else self.n_decoder_layers
        return expand_spec(getattr(self, name), layers, self.n_heads)

    def encoder_variants(self) -> tuple[tuple[str, ...], ...]:
        """The variant of every encoder self-attention head: `[layer][head] -> name`."""
        return self._heads("attention")

    def head_variants(self) -> tuple[tuple[str, ...], ...]:
        """The variant of every decoder self-attention head (the decoder's own patterns)."""
        return self._heads("decoder_attention")

    def cross_variants(self) -> tuple[tuple[str, ...], ...]:
        """The variant of every cross-attention head."""
        return self._heads("cross_attention")

    def encoder_config(self) -> ModelConfig:
        """The encoder as a bidirectional `ModelConfig` (what its `Block`s are built from)."""
        return ModelConfig(
            vocab_size=self.source_vocab_size,
            seq_len=self.source_len,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_layers=self.n_layers,
            d_mlp=self.d_mlp,
            causal=False,
            attention=self.attention,
            attention_settings=self.attention_settings,
            dropout=self.dropout,
            dtype=self.dtype,
            fused_attention=self.fused_attention,
        )

    def settings_of(self, name: str) -> Any:
        return self.attention_settings.get(name)

    def problems(self):
        found = []
        for name in ("vocab_size", "seq_len", "source_vocab_size", "source_len", "d_model"):
            if msg := in_range(getattr(self, name), low=1):
                found.append((name, msg))
        for name in ("n_heads", "n_layers", "n_decoder_layers"):
            if msg := in_range(getattr(self, name), low=1):
                found.append((name, msg))
        if msg := in_range(self.d_mlp, low=0):
            found.append(("d_mlp", msg))
        if self.n_heads >= 1 and self.d_model % self.n_heads:
            found.append(("n_heads", f"must divide d_model={self.d_model}, got {self.n_heads}"))
        if self.dropout < 0 or self.dropout >= 1:
            found.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        for i, part in enumerate(self.freeze):
            if part not in FREEZABLE:
                allowed = ", ".join(FREEZABLE)
                found.append((f"freeze[{i}]", f"{part!r} is not allowed; choose from {allowed}"))
        if self.n_heads < 1 or self.n_layers < 1 or self.n_decoder_layers < 1:
            return found
        found += spec_problems(
            self.attention,
            self.n_layers,
            self.n_heads,
            "attention",
            lambda n: variant_problem(n, causal=False),
        )
        found += spec_problems(
            self.decoder_attention,
            self.n_decoder_layers,
            self.n_heads,
            "decoder_attention",
            _decoder_problem,
            "n_decoder_layers",
        )
        found += spec_problems(
            self.cross_attention,
            self.n_decoder_layers,
            self.n_heads,
            "cross_attention",
            lambda n: variant_problem(n, causal=False, cross=True),
            "n_decoder_layers",
        )
        found.extend(variant_settings(self.attention_settings)[1])
        return found


def _decoder_problem(name: str) -> str | None:
    problem = variant_problem(name, causal=False)
    if problem is None and variant_problem(name, causal=True):
        return (
            f"{name!r} mixes every position and cannot serve the decoder's causal "
            "self-attention (it serves only the encoder's `attention`)"
        )
    return problem


def _entries(spec) -> list:
    """The entries of an attention spec: the one name, or its per-layer entries."""
    return [spec] if isinstance(spec, str) else list(spec)


class Seq2SeqOutput(NamedTuple):
    """Logits (B, L, V) of the target, and when asked for, per layer the patterns of the
    decoder's self-attention (B, H, L, L: `patterns`, read against the task's `deps`), of
    the encoder (B, H, S, S) and of cross-attention (B, H, L, S: read against `cross_deps`)."""

    logits: jax.Array
    patterns: tuple[jax.Array, ...] | None
    encoder_patterns: tuple[jax.Array, ...] | None = None
    cross_patterns: tuple[jax.Array, ...] | None = None


class DecoderBlock(nnx.Module):
    """Pre-norm decoder block: x + self(norm(x)), x + cross(norm(x), memory), x + mlp(norm(x))."""

    def __init__(
        self,
        self_variants: tuple[str, ...],
        cross_variants: tuple[str, ...],
        cfg: Seq2SeqConfig,
        rngs: nnx.Rngs,
        mixer_rngs: nnx.Rngs,
    ):
        dtype = jnp.dtype(cfg.dtype)
        own = MixerSettings(
            d_model=cfg.d_model, head_dim=cfg.head_dim, max_len=cfg.seq_len, causal=True
        )
        cross = dataclasses.replace(own, causal=False, max_source_len=cfg.source_len, cross=True)
        settings = cfg.attention_settings
        self.norm_attn = nnx.LayerNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.attention = Attention(self_variants, own, rngs, mixer_rngs, settings)
        self.norm_cross = nnx.LayerNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.cross_attention = Attention(cross_variants, cross, rngs, mixer_rngs, settings)
        self.norm_mlp = nnx.LayerNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg.d_model, cfg.mlp_width, rngs, dtype=dtype)
        self.dropout = cfg.dropout

    def __call__(self, x_BLD, memory_BSD, visible_BLL, cross_BLS, *, dropout_key=None, **kw):
        """Returns (x_BLD, self probs_BHLL or None, cross probs_BHLS or None)."""
        keys = [None] * 3
        if dropout_key is not None and self.dropout > 0:
            keys = list(jax.random.split(dropout_key, 3))
        own_BLD, own_BHLL, _ = self.attention(self.norm_attn(x_BLD), visible_BLL, **kw)
        x_BLD = x_BLD + _maybe_dropout(own_BLD, self.dropout, keys[0])
        cross_BLD, cross_BHLS, _ = self.cross_attention(
            self.norm_cross(x_BLD), cross_BLS, source_BSD=memory_BSD, **kw
        )
        x_BLD = x_BLD + _maybe_dropout(cross_BLD, self.dropout, keys[1])
        mlp_BLD = self.mlp(self.norm_mlp(x_BLD))
        return x_BLD + _maybe_dropout(mlp_BLD, self.dropout, keys[2]), own_BHLL, cross_BHLS


def _maybe_dropout(x, rate, key):
    return x if key is None else _dropout(x, rate, key)


def cross_visibility(
    source_valid_BS: jax.Array | None, valid_BL: jax.Array | None, L: int, S: int, B: int
) -> jax.Array:
    """cross_BLS[b, i, j]: may target position i see source position j (no causal mask: the
    whole source is known; padded source positions are hidden, padded queries see nothing)."""
    visible_BLS = jnp.ones((B, L, S), bool)
    if source_valid_BS is not None:
        visible_BLS = visible_BLS & source_valid_BS[:, None, :]
    if valid_BL is not None:
        visible_BLS = visible_BLS & valid_BL[:, :, None]
    return visible_BLS


class EncoderDecoder(nnx.Module):
    """Source and target embeddings (token + learned position), encoder blocks with a final
    norm, decoder blocks, final norm and an LM head over the target vocabulary."""

    def __init__(self, cfg: Seq2SeqConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # As in Transformer: the mixers draw from a stream of their own (the paired design).
        mixer_rngs = nnx.Rngs(params=rngs.params())

        def kind(part: str) -> type:
            return Frozen if part in cfg.freeze else nnx.Param

        def positions(n: int, part: str):
            return kind(part)(0.02 * jax.random.normal(rngs.params(), (n, cfg.d_model)))

        self.token_embed = Embed(cfg.vocab_size, cfg.d_model, rngs, kind("token_embed"))
        self.pos_embed = positions(cfg.seq_len, "pos_embed")
        self.source_embed = Embed(cfg.source_vocab_size, cfg.d_model, rngs, kind("source_embed"))
        self.source_pos_embed = positions(cfg.source_len, "source_pos_embed")
        encoder = cfg.encoder_config()
        self.encoder = nnx.List(
            [Block(v, encoder, rngs, mixer_rngs) for v in cfg.encoder_variants()]
        )
        self.encoder_norm = nnx.LayerNorm(cfg.d_model, dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.blocks = nnx.List(
            [
                DecoderBlock(own, cross, cfg, rngs, mixer_rngs)
                for own, cross in zip(cfg.head_variants(), cfg.cross_variants(), strict=True)
            ]
        )
        self.norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, dtype=jnp.dtype(cfg.dtype), rngs=rngs)

    def encode(
        self,
        source_BS: jax.Array,
        source_valid_BS: jax.Array | None = None,
        *,
        return_patterns: bool = False,
        dropout_keys=None,
    ) -> tuple[jax.Array, list]:
        """The encoder output memory_BSD and its patterns per layer (None unless asked for)."""
        cfg = self.cfg
        B, S = source_BS.shape
        x_BSD = self.source_embed(source_BS) + self.source_pos_embed[...][None, :S]
        x_BSD = x_BSD.astype(jnp.dtype(cfg.dtype))
        visible_BSS = visibility(S, False, source_valid_BS, B)
        kw = dict(return_pattern=return_patterns, fused=cfg.fused_attention)
        run = _block_runner(kw, cfg.remat)
        keys = dropout_keys or [None] * len(self.encoder)
        patterns = []
        for block, key in zip(self.encoder, keys):
            x_BSD, probs_BHSS, _ = run(block, x_BSD, visible_BSS, key)
            patterns.append(probs_BHSS)
        return self.encoder_norm(x_BSD), patterns

    def __call__(
        self,
        source_BS: jax.Array,
        tokens_BL: jax.Array,
        *,
        source_valid_BS: jax.Array | None = None,
        valid_BL: jax.Array | None = None,
        return_patterns: bool = False,
        dropout_key: jax.Array | None = None,
    ) -> Seq2SeqOutput:
        """Logits (B, L, V) of the target given the source, and the patterns when asked for."""
        cfg = self.cfg
        B, L = tokens_BL.shape
        S = source_BS.shape[1]
        n_enc, n_dec = len(self.encoder), len(self.blocks)
        keys = [None] * (n_enc + n_dec)
        if dropout_key is not None and cfg.dropout > 0:
            keys = list(jax.random.split(dropout_key, n_enc + n_dec))
        memory_BSD, encoder_patterns = self.encode(
            source_BS, source_valid_BS, return_patterns=return_patterns, dropout_keys=keys[:n_enc]
        )
        dtype = jnp.dtype(cfg.dtype)
        x_BLD = (self.token_embed(tokens_BL) + self.pos_embed[...][None, :L]).astype(dtype)
        visible_BLL = visibility(L, True, valid_BL, B)
        cross_BLS = cross_visibility(source_valid_BS, valid_BL, L, S, B)
        kw = dict(return_pattern=return_patterns, fused=cfg.fused_attention)

        def run(block, x_BLD, key):
            return block(x_BLD, memory_BSD, visible_BLL, cross_BLS, dropout_key=key, **kw)

        run = nnx.remat(run) if cfg.remat else run
        own, cross = [], []
        for block, key in zip(self.blocks, keys[n_enc:]):
            x_BLD, own_BHLL, cross_BHLS = run(block, x_BLD, key)
            own.append(own_BHLL)
            cross.append(cross_BHLS)
        logits = self.head(self.norm(x_BLD.astype(jnp.float32)))
        if not return_patterns:
            return Seq2SeqOutput(logits.astype(jnp.float32), None)
        return Seq2SeqOutput(
            logits.astype(jnp.float32), tuple(own), tuple(encoder_patterns), tuple(cross)
        )


def mixers_of(model: EncoderDecoder, part: str = "decoder") -> list[list[tuple]]:
    """Per layer, the (first head, n heads, mixer) groups of one kind of attention:
    "encoder", "decoder" (self-attention) or "cross"."""
    attentions = {
        "encoder": [b.attention for b in model.encoder],
        "decoder": [b.attention for b in model.blocks],
        "cross": [b.cross_attention for b in model.blocks],
    }[part]
    return [[(s, n, m) for (s, n), m in zip(a.head_groups, a.mixers)] for a in attentions]


def frozen_parts(cfg: Seq2SeqConfig) -> list[dict[str, Any]]:
    """Everything that stays at init in this encoder-decoder, as `model.frozen_parts` says it
    (heads named by their attention: "encoder layer N head H", "decoder ...", "cross ...")."""
    model = nnx.eval_shape(lambda: EncoderDecoder(cfg, rngs=nnx.Rngs(0)))
    found = []
    for part, what in (
        ("token_embed", "target token embeddings"),
        ("pos_embed", "target position embeddings"),
        ("source_embed", "source token embeddings"),
        ("source_pos_embed", "source position embeddings"),
    ):
        if part in cfg.freeze:
            found.append(
                {"part": part, "kind": "embedding", "what": what, "content_routing": False}
            )
    for kind in ("encoder", "decoder", "cross"):
        for n, groups in enumerate(mixers_of(model, kind)):
            for start, count, mixer in groups:
                if kept := mixer.kept_at_init():
                    for head in range(start, start + count):
                        found.append(
                            {
                                "part": f"{kind} layer {n} head {head}",
                                "kind": "head",
                                "what": ", ".join(kept),
                                "content_routing": mixer.qk_scores,
                            }
                        )
    return found
