"""A small pre-norm transformer whose attention variant is chosen per layer and per head.

Usable as a causal language model (`n_classes = 0`: logits per position) or as a
bidirectional encoder with a classification head (`n_classes > 0`: mean-pooled logits).
The attention layer owns the value and output projections; its heads are served by one or
more mixers from `ablate.attention` (consecutive heads sharing a variant form one group).

Axis letters, used in tensor names throughout ablate: B batch, L length (query positions),
S key positions, D model width, H heads, K head dim, F MLP width, V vocabulary, C classes,
N layers.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ablate.attention import (
    Frozen,
    Mixer,
    MixerSettings,
    apply_pattern,
    default_gaussian_offsets,
    make_mixer,
    variant_problem,
)
from ablate.config import check, in_range

LayerSpec = str | tuple[str, ...]

FREEZABLE = ("token_embed", "pos_embed")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the transformer and the attention variant of every layer and head.

    `attention` is one variant name for every head of every layer, or a list with one entry
    per layer, each entry a name or a list of one name per head. `freeze` lists parts whose
    weights stay at init besides what the variants freeze: "token_embed", "pos_embed",
    "layer.N" (a whole block).
    """

    vocab_size: int
    seq_len: int
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_mlp: int = 0
    causal: bool = True
    n_classes: int = 0
    attention: LayerSpec | tuple[LayerSpec, ...] = "learned"
    random_scale: float = 1.0
    gaussian_sigma: float = 1.0
    gaussian_offsets: tuple[int, ...] = ()
    freeze: tuple[str, ...] = ()
    dropout: float = 0.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    fused_attention: bool = True
    remat: bool = False

    def __post_init__(self):
        # Lists given directly (not via from_dict) become tuples, so the config stays hashable.
        spec = self.attention
        if not isinstance(spec, str):
            spec = tuple(e if isinstance(e, str) else tuple(e) for e in spec)
            object.__setattr__(self, "attention", spec)
        for name in ("gaussian_offsets", "freeze"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        check(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.d_mlp or 4 * self.d_model

    def head_variants(self) -> tuple[tuple[str, ...], ...]:
        """The variant of every head, per layer: `[layer][head] -> name`."""
        spec = self.attention
        layers = [spec] * self.n_layers if isinstance(spec, str) else list(spec)
        return tuple(
            (entry,) * self.n_heads if isinstance(entry, str) else tuple(entry) for entry in layers
        )

    def problems(self):
        found = []
        for name in ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers"):
            msg = in_range(getattr(self, name), low=1)
            if msg:
                found.append((name, msg))
        for name in ("d_mlp", "n_classes"):
            msg = in_range(getattr(self, name), low=0)
            if msg:
                found.append((name, msg))
        if self.n_heads >= 1 and self.d_model % self.n_heads:
            found.append(("n_heads", f"must divide d_model={self.d_model}, got {self.n_heads}"))
        if self.dropout < 0 or self.dropout >= 1:
            found.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if self.gaussian_sigma <= 0:
            found.append(("gaussian_sigma", f"must be > 0, got {self.gaussian_sigma}"))
        if self.random_scale < 0:
            found.append(("random_scale", f"must be >= 0, got {self.random_scale}"))
        if self.n_classes and self.causal:
            found.append(("n_classes", "a classification head needs causal = false"))
        for i, part in enumerate(self.freeze):
            if part in FREEZABLE:
                continue
            layer = part.removeprefix("layer.")
            if part.startswith("layer.") and layer.isdecimal() and int(layer) < self.n_layers:
                continue
            allowed = ", ".join([*FREEZABLE, f"layer.0 .. layer.{self.n_layers - 1}"])
            found.append((f"freeze[{i}]", f"{part!r} is not allowed; choose from {allowed}"))
        found.extend(self._attention_problems())
        return found

    def _attention_problems(self):
        spec = self.attention
        if not isinstance(spec, str) and len(spec) != self.n_layers:
            return [
                (
                    "attention",
                    f"has {len(spec)} entries but n_layers = {self.n_layers}: give "
                    "one variant name for all layers or one entry per layer",
                )
            ]
        found = []
        for layer, entry in enumerate([spec] if isinstance(spec, str) else spec):
            path = "attention" if isinstance(spec, str) else f"attention[{layer}]"
            names = [entry] if isinstance(entry, str) else list(entry)
            if not isinstance(entry, str) and len(names) != self.n_heads:
                found.append(
                    (
                        path,
                        f"has {len(names)} head entries but n_heads = {self.n_heads}: give "
                        "one name for the whole layer or one per head",
                    )
                )
                continue
            for head, name in enumerate(names):
                problem = variant_problem(name, self.causal)
                if problem:
                    found.append((path if isinstance(entry, str) else f"{path}[{head}]", problem))
        return found


class HeadAblation(NamedTuple):
    """Per-head edits to one attention layer, as arrays so that many can be vmapped.

    Per head h: the pattern becomes (1 - pattern_mix[h]) * own + pattern_mix[h] * pattern,
    then the head output becomes gate[h] * ((1 - output_mix[h]) * own + output_mix[h] * output),
    all before the output projection (where heads are still separate).
    """

    gate_H: jax.Array
    pattern_mix_H: jax.Array
    pattern_BHLS: jax.Array
    output_mix_H: jax.Array
    output_BLHK: jax.Array


class Output(NamedTuple):
    """Model output: logits, and per layer the patterns (B, H, L, S) when asked for."""

    logits: jax.Array
    patterns: tuple[jax.Array, ...] | None
    head_outputs: tuple[jax.Array, ...] | None


class Attention(nnx.Module):
    """Multi-head attention whose heads are mixed by one or more registered mixers."""

    def __init__(
        self,
        head_variants: tuple[str, ...],
        settings: MixerSettings,
        rngs: nnx.Rngs,
        mixer_rngs: nnx.Rngs | None = None,
    ):
        """`mixer_rngs` (default: `rngs`) draws the mixers' own state, so that the shared
        weights drawn from `rngs` do not depend on which variants the heads are."""
        D, H, K = settings.d_model, len(head_variants), settings.head_dim
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        self.w_v = nnx.Param(init(rngs.params(), (D, H, K)))
        self.w_o = nnx.Param(
            nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)(rngs.params(), (H, K, D))
        )
        groups, start = [], 0
        for _, run in itertools.groupby(head_variants):
            n = len(list(run))
            groups.append((start, n))
            start += n
        self.head_groups = tuple(groups)
        offsets = settings.gaussian_offsets or default_gaussian_offsets(H, settings.causal)
        offsets_H = tuple(offsets[h % len(offsets)] for h in range(H))
        self.mixers = nnx.List(
            [
                make_mixer(
                    head_variants[s],
                    n,
                    dataclasses.replace(settings, gaussian_offsets=offsets_H[s : s + n]),
                    rngs if mixer_rngs is None else mixer_rngs,
                )
                for s, n in self.head_groups
            ]
        )

    @property
    def has_pattern_H(self) -> tuple[bool, ...]:
        return tuple(
            m.has_pattern for m, (_, n) in zip(self.mixers, self.head_groups) for _ in range(n)
        )

    @property
    def qk_scores_H(self) -> tuple[bool, ...]:
        return tuple(
            m.qk_scores for m, (_, n) in zip(self.mixers, self.head_groups) for _ in range(n)
        )

    def __call__(
        self,
        x_BLD: jax.Array,
        visible_BLS: jax.Array,
        *,
        return_pattern: bool = False,
        fused: bool = True,
        ablation: HeadAblation | None = None,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """Returns (y_BLD, probs_BHLS or None, per-head outputs heads_BLHK)."""
        v_BLHK = jnp.einsum("BLD,DHK->BLHK", x_BLD, self.w_v[...].astype(x_BLD.dtype))
        want_pattern = return_pattern or ablation is not None or not fused
        outs, probs = [], []
        for mixer, (start, n) in zip(self.mixers, self.head_groups):
            v_group = v_BLHK[:, :, start : start + n]
            if want_pattern and mixer.has_pattern:
                p_BHLS = mixer.pattern(x_BLD, visible_BLS)
                if ablation is not None:
                    mix_1H11 = ablation.pattern_mix_H[start : start + n][None, :, None, None]
                    other_BHLS = ablation.pattern_BHLS[:, start : start + n].astype(p_BHLS.dtype)
                    p_BHLS = (1 - mix_1H11) * p_BHLS + mix_1H11 * other_BHLS
                probs.append(p_BHLS)
                outs.append(apply_pattern(p_BHLS, v_group))
            else:
                outs.append(mixer.mix(x_BLD, v_group, visible_BLS))
                if want_pattern:
                    B, L = x_BLD.shape[:2]
                    probs.append(jnp.zeros((B, n, L, L), x_BLD.dtype))
        heads_BLHK = jnp.concatenate(outs, axis=2).astype(x_BLD.dtype)
        if ablation is not None:
            mix_11H1 = ablation.output_mix_H[None, None, :, None].astype(heads_BLHK.dtype)
            fill_BLHK = ablation.output_BLHK.astype(heads_BLHK.dtype)
            heads_BLHK = (1 - mix_11H1) * heads_BLHK + mix_11H1 * fill_BLHK
            heads_BLHK = heads_BLHK * ablation.gate_H[None, None, :, None].astype(heads_BLHK.dtype)
        y_BLD = jnp.einsum("BLHK,HKD->BLD", heads_BLHK, self.w_o[...].astype(x_BLD.dtype))
        probs_BHLS = jnp.concatenate(probs, axis=1) if return_pattern else None
        return y_BLD, probs_BHLS, heads_BLHK


class MLP(nnx.Module):
    """Two-layer GELU MLP computing in `dtype` (its parameters stay float32)."""

    def __init__(self, d_model: int, d_mlp: int, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.up = nnx.Linear(d_model, d_mlp, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(d_mlp, d_model, dtype=dtype, rngs=rngs)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x_BLD)))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        head_variants: tuple[str, ...],
        cfg: ModelConfig,
        rngs: nnx.Rngs,
        mixer_rngs: nnx.Rngs | None = None,
    ):
        settings = MixerSettings(
            d_model=cfg.d_model,
            head_dim=cfg.head_dim,
            max_len=cfg.seq_len,
            causal=cfg.causal,
            random_scale=cfg.random_scale,
            gaussian_sigma=cfg.gaussian_sigma,
            gaussian_offsets=cfg.gaussian_offsets,
        )
        # Compute in cfg.dtype, parameters in float32 (flax keeps the norm statistics in f32).
        dtype = jnp.dtype(cfg.dtype)
        self.norm_attn = nnx.LayerNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.attention = Attention(head_variants, settings, rngs, mixer_rngs)
        self.norm_mlp = nnx.LayerNorm(cfg.d_model, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg.d_model, cfg.mlp_width, rngs, dtype=dtype)
        self.dropout = cfg.dropout

    def __call__(self, x_BLD, visible_BLS, *, dropout_key=None, **attention_kwargs):
        attn_BLD, probs_BHLS, heads_BLHK = self.attention(
            self.norm_attn(x_BLD), visible_BLS, **attention_kwargs
        )
        mlp_key = None
        if dropout_key is not None and self.dropout > 0:
            attn_key, mlp_key = jax.random.split(dropout_key)
            attn_BLD = _dropout(attn_BLD, self.dropout, attn_key)
        x_BLD = x_BLD + attn_BLD
        mlp_BLD = self.mlp(self.norm_mlp(x_BLD))
        if mlp_key is not None:
            mlp_BLD = _dropout(mlp_BLD, self.dropout, mlp_key)
        return x_BLD + mlp_BLD, probs_BHLS, heads_BLHK


def _block_runner(attention_kwargs: dict, remat: bool):
    """`block(x, visible, key)` with the static attention options bound (and rematerialised)."""

    def run(block, x_BLD, visible_BLS, key):
        return block(x_BLD, visible_BLS, dropout_key=key, **attention_kwargs)

    return nnx.remat(run) if remat else run


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def visibility(L: int, causal: bool, valid_BL: jax.Array | None, batch_size: int) -> jax.Array:
    """visible_BLS[b, i, j]: may position i attend to j (causal and padding masks)."""
    visible_LS = jnp.tril(jnp.ones((L, L), bool)) if causal else jnp.ones((L, L), bool)
    if valid_BL is None:
        return jnp.broadcast_to(visible_LS, (batch_size, L, L))
    # A padded query sees nothing: its row is empty (all-zero pattern, never scored), so
    # padding is exactly the set of positions no query sees.
    return visible_LS[None] & valid_BL[:, None, :] & valid_BL[:, :, None]


class Transformer(nnx.Module):
    """Token + learned position embeddings, pre-norm blocks, final norm and a head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # The paired design: the mixers draw from a stream of their own, so for one seed every
        # variant starts from the same embeddings, value/output projections, MLPs and head.
        mixer_rngs = nnx.Rngs(params=rngs.params())
        self.token_embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.pos_embed = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.d_model))
        )
        self.blocks = nnx.List([Block(v, cfg, rngs, mixer_rngs) for v in cfg.head_variants()])
        self.norm = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        # The head multiplies in cfg.dtype (a float32 output would make its backward pass
        # multiply float32 cotangents); the logits are cast to float32 for the loss.
        self.head = nnx.Linear(
            cfg.d_model, cfg.n_classes or cfg.vocab_size, dtype=jnp.dtype(cfg.dtype), rngs=rngs
        )
        for part in cfg.freeze:
            freeze(self, part)

    def __call__(
        self,
        tokens_BL: jax.Array,
        *,
        valid_BL: jax.Array | None = None,
        return_patterns: bool = False,
        return_head_outputs: bool = False,
        dropout_key: jax.Array | None = None,
        ablations: tuple[HeadAblation | None, ...] | None = None,
    ) -> Output:
        """Logits (B, L, V) for an LM or (B, C) for a classifier, plus what was asked for."""
        cfg = self.cfg
        B, L = tokens_BL.shape
        dtype = jnp.dtype(cfg.dtype)
        x_BLD = self.token_embed(tokens_BL) + self.pos_embed[...][None, :L]
        x_BLD = x_BLD.astype(dtype)
        visible_BLS = visibility(L, cfg.causal, valid_BL, B)
        keys = [None] * len(self.blocks)
        if dropout_key is not None and cfg.dropout > 0:
            keys = list(jax.random.split(dropout_key, len(self.blocks)))
        patterns, heads = [], []
        for i, block in enumerate(self.blocks):
            attention_kwargs = dict(
                return_pattern=return_patterns,
                fused=cfg.fused_attention,
                ablation=None if ablations is None else ablations[i],
            )

            run = _block_runner(attention_kwargs, cfg.remat)
            x_BLD, probs_BHLS, heads_BLHK = run(block, x_BLD, visible_BLS, keys[i])
            patterns.append(probs_BHLS)
            heads.append(heads_BLHK)
        x_BLD = self.norm(x_BLD.astype(jnp.float32))
        if cfg.n_classes:
            weight_BL1 = (
                jnp.ones((B, L, 1)) if valid_BL is None else valid_BL[..., None].astype(jnp.float32)
            )
            x_BD = (x_BLD * weight_BL1).sum(1) / jnp.maximum(weight_BL1.sum(1), 1.0)
            logits = self.head(x_BD)
        else:
            logits = self.head(x_BLD)
        return Output(
            logits=logits.astype(jnp.float32),
            patterns=tuple(patterns) if return_patterns else None,
            head_outputs=tuple(heads) if return_head_outputs else None,
        )


def freeze(model: Transformer, part: str) -> None:
    """Turn every `nnx.Param` under `part` into `Frozen` (kept at init, still saved)."""
    if part.startswith("layer."):
        root: nnx.Module = model.blocks[int(part.removeprefix("layer."))]
    elif part == "token_embed":
        root = model.token_embed
    else:
        model.pos_embed = Frozen(model.pos_embed[...])
        return
    for _, node in nnx.iter_graph(root):
        if isinstance(node, nnx.Module):
            for name, value in list(vars(node).items()):
                if isinstance(value, nnx.Param):
                    setattr(node, name, Frozen(value[...]))


def frozen_parts(cfg: ModelConfig) -> list[str]:
    """Plain-words list of everything that stays at init in this model (for reports)."""
    parts = list(cfg.freeze)
    for layer, names in enumerate(cfg.head_variants()):
        for head, name in enumerate(names):
            if name == "frozen":
                parts.append(f"layer {layer} head {head}: W_q, W_k")
            elif name == "random_fixed":
                parts.append(f"layer {layer} head {head}: random pattern")
    return parts


def mixers_of(model: Transformer) -> list[list[tuple[int, int, Mixer]]]:
    """Per layer, the (first head, n heads, mixer) groups."""
    return [
        [(s, n, m) for (s, n), m in zip(b.attention.head_groups, b.attention.mixers)]
        for b in model.blocks
    ]
