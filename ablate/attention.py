"""Attention mixers: every way ablate forms the mixing matrix A_h, in one registry.

A multi-head attention layer (model.py) owns the value and output projections, which every
variant keeps and trains. What differs between variants is only how the mixing matrix is
formed, and that is a *mixer*: a small NNX module that, for its group of heads, turns the
layer input and the visibility mask into patterns `probs_BHLS` (each row a distribution over
the visible positions), or mixes the values directly (`mix`). Adding a variant is one class
and one line in `MIXERS` (from any module: the registry is read when a config is checked).

A variant owns its facts. Its settings are its own small frozen dataclass `Config` (what
`[model.attention_settings.NAME]` holds, validated with dotted paths); its training FLOPs per
token are `flops_per_token`; what it keeps at init is `kept_at_init`, read from its variable
types. Freezing is by variable type, never by a flag checked at update time: `Fixed` holds a
constant drawn at init (a random pattern), `Frozen` a weight kept at its random init. Neither
is an `nnx.Param`, so the optimiser (built over `nnx.Param`) never sees them, while
checkpoints still carry them.

Cross-attention (ablate/seq2seq.py) calls a mixer with `source_BSD`, the sequence its keys
come from (queries from the decoder, keys from the encoder output), so S may differ from L.
Only variants with `supports_cross` serve it; `variant_problem(..., cross=True)` says why the
others cannot. Without `source_BSD` a mixer is called exactly as before (self-attention).

Axis letters: the table in `ablate.model` (here H counts the heads of this mixer's group;
S == L in self-attention).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from ablate.config import ConfigError, check, dotted, from_dict, in_range


class Fixed(nnx.Variable):
    """A constant drawn once at init (e.g. a random pattern): saved, never trained."""


class Frozen(nnx.Variable):
    """A weight kept at its random init: saved, never trained."""


@dataclasses.dataclass(frozen=True)
class MixerSettings:
    """What a mixer needs to know about the model it serves (`first_head`: its first head's
    index in the layer, for variants whose heads differ by index; `max_source_len`: the most
    key positions, 0 for self-attention where it is `max_len`; `cross`: whether the mixer
    serves cross-attention, keys from another sequence; `bias`: whether projections have
    biases, as in pretrained GPT-2 and BERT)."""

    d_model: int
    head_dim: int
    max_len: int
    causal: bool
    first_head: int = 0
    max_source_len: int = 0
    cross: bool = False
    bias: bool = False

    @property
    def max_keys(self) -> int:
        """The most key positions S the mixer may be asked to attend over."""
        return self.max_source_len or self.max_len


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """The settings of a variant that has none; a variant's own `Config` subclasses this."""

    def problems(self) -> list[tuple[str, str]]:
        return []

    def __post_init__(self):
        check(self)


def _weight_flops(weight: nnx.Variable) -> float:
    """Training FLOPs per token of a matmul weight: 2 forward, 2 for the input gradient and,
    if it trains, 2 for its own gradient."""
    return (6 if isinstance(weight, nnx.Param) else 4) * math.prod(weight.shape)


@jax.custom_jvp
def masked_softmax(scores_BHLS: jax.Array, visible_BLS: jax.Array) -> jax.Array:
    """Softmax over visible key positions; invisible positions get exactly zero.

    Its derivative is written out (dp = p * (ds - sum(p * ds)), the softmax rule; the mask
    needs no term since p is zero where it hides): with XLA's own derivative of the select,
    softmax and mask multiply, the attention core took 1.05-1.45x longer forward + backward
    on a CPU (B 8 and 32, H 4, L 256, K 64; jax 0.10.2).
    """
    visible_B1LS = visible_BLS[:, None]
    scores_BHLS = jnp.where(visible_B1LS, scores_BHLS, -1e30)
    return jax.nn.softmax(scores_BHLS, axis=-1) * visible_B1LS


@masked_softmax.defjvp
def _masked_softmax_jvp(primals, tangents):
    scores_BHLS, visible_BLS = primals
    probs_BHLS = masked_softmax(scores_BHLS, visible_BLS)
    weighted_BHLS = probs_BHLS * tangents[0]
    return probs_BHLS, weighted_BHLS - probs_BHLS * weighted_BHLS.sum(-1, keepdims=True)


def normalize_rows(weights_BHLS: jax.Array, visible_BLS: jax.Array) -> jax.Array:
    """Non-negative weights restricted to visible positions, scaled so each row sums to one."""
    weights_BHLS = weights_BHLS * visible_BLS[:, None]
    total_BHL1 = weights_BHLS.sum(-1, keepdims=True)
    return weights_BHLS / jnp.maximum(total_BHL1, 1e-30)


def uses_attention_kernel() -> bool:
    """Whether `learned` heads call `jax.nn.dot_product_attention` when no pattern is needed.

    On accelerators, yes: it is where JAX will select fused kernels (jax 0.10.2 still uses
    XLA's path unless `implementation="cudnn"` is passed, untested here). On a CPU it is XLA's
    einsums, the same math as the pattern path, but it ran 1.15-1.7x slower forward +
    backward there (`ablate bench`, its attention core line; 2-core CPU, jax 0.10.2), so
    `learned` uses the pattern path (`softmax_attention`, then `apply_pattern`).
    """
    return jax.default_backend() != "cpu"


def _heads_first(t_BLHK: jax.Array) -> jax.Array:
    return t_BLHK.transpose(0, 2, 1, 3)


def apply_pattern(probs_BHLS: jax.Array, v_BLHK: jax.Array) -> jax.Array:
    """Mix the values by the patterns: out_BLHK[b, l, h] = sum_s probs[b, h, l, s] v[b, s, h]."""
    # Heads-first batched matmuls (explicit transposes) ran up to 1.3x faster on a CPU than
    # the same einsum on positions-first operands at batch 32 (about even at batch 8).
    v_BHSK = _heads_first(v_BLHK.astype(probs_BHLS.dtype))
    return _heads_first(probs_BHLS @ v_BHSK)


def softmax_attention(q_BLHK: jax.Array, k_BSHK: jax.Array, visible_BLS: jax.Array) -> jax.Array:
    """softmax(Q K^T / sqrt(K) + mask) as float32 patterns `probs_BHLS`."""
    q_BHLK, k_BHSK = _heads_first(q_BLHK), _heads_first(k_BSHK)
    scores_BHLS = (q_BHLK @ k_BHSK.swapaxes(-1, -2)) / math.sqrt(q_BLHK.shape[-1])
    return masked_softmax(scores_BHLS.astype(jnp.float32), visible_BLS)


def _projection(rngs: nnx.Rngs, settings: MixerSettings, n_heads: int) -> jax.Array:
    init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    return init(rngs.params(), (settings.d_model, n_heads, settings.head_dim))


class Mixer(nnx.Module):
    """Base of all variants: forms the patterns of `n_heads` heads from x and the mask.

    Facts a subclass states where the defaults are wrong: `Config` (its settings),
    `mixing_flops` (or `flops_per_token` where weights or a trained pattern add to it),
    `describe` (plain words for its kept-at-init variables), `lacks` (what the report says it
    lacks against learned attention) and the flags below.
    """

    #: The variant's settings: a frozen dataclass subclassing NoSettings, with defaults.
    Config: ClassVar[type[NoSettings]] = NoSettings
    #: Training FLOPs per head, token, attended position and head-dim unit (times L * K):
    #: P V forward and the gradient of V; the pattern is a constant, so it gets no gradient.
    mixing_flops: ClassVar[int] = 4
    #: Plain words for the variables `kept_at_init` names (default: the attribute's name).
    describe: ClassVar[Mapping[str, str]] = {}
    #: What the variant lacks against learned attention, in the report's words: (the long
    #: form for its sentences, the short form for its tables); None for learned attention.
    lacks: ClassVar[tuple[str, str] | None] = (
        "learned attention (the variant does not say what it lacks)",
        "learned attention",
    )

    #: False for mixers whose token mixing is not a row-stochastic pattern (fourier).
    has_pattern: ClassVar[bool] = True
    #: False for mixers that cannot serve a causal model.
    supports_causal: ClassVar[bool] = True
    #: True for mixers that serve cross-attention: their pattern is formed for any L x S from
    #: the queries' input, the keys' input (`source_BSD`) and the mask, with no square or
    #: causal shape assumed. False (the default) for a variant that does not say so.
    supports_cross: ClassVar[bool] = False
    #: Why a variant without `supports_cross` cannot serve cross-attention, in plain words.
    cross_refusal: ClassVar[str] = (
        "it does not declare supports_cross (its pattern is formed for square self-attention)"
    )
    #: True where the pattern is softmax of query-key scores: the loss's pull on the head is
    #: then read on the scores (what W_q/W_k training follows), else on the pattern itself.
    qk_scores: ClassVar[bool] = False

    def __init__(self, n_heads: int, settings: MixerSettings, rngs: nnx.Rngs, config: Any = None):
        config = self.Config() if config is None else config
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {config!r}")
        self.n_heads, self.head_dim, self.config = n_heads, settings.head_dim, config

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token of these heads at length `seq_len`:
        its matmul weights (by type: a frozen one gets no gradient of its own) and the mixing.

        Only weights that multiply the input count (those in `matmul_weights`); the dense
        kernels compute the full L x L scores, so causal masking is not halved.
        """
        weights = sum(_weight_flops(w) for w in self.matmul_weights())
        return weights + self.mixing_flops * self.n_heads * seq_len * self.head_dim

    def matmul_weights(self) -> tuple[nnx.Variable, ...]:
        """The mixer's weights that multiply the layer input (none by default)."""
        return ()

    def kept_at_init(self) -> tuple[str, ...]:
        """Plain words for every variable of this mixer that is not an `nnx.Param`."""
        kept = [
            name
            for name, value in vars(self).items()
            if isinstance(value, nnx.Variable) and not isinstance(value, nnx.Param)
        ]
        order = list(self.describe)  # described ones in the class's order, then the rest
        kept.sort(key=lambda name: (order.index(name) if name in order else len(order), name))
        return tuple(self.describe.get(name, name) for name in kept)

    def __call__(
        self,
        x_BLD: jax.Array,
        v_BSHK: jax.Array,
        visible_BLS: jax.Array,
        *,
        want_pattern: bool,
        source_BSD: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """(out_BLHK, probs_BHLS or None): by the pattern when one is wanted, else by `mix`.

        A mixer without a pattern gives all-zero patterns when one is wanted. `source_BSD`
        (cross-attention only) is passed on to `pattern` and `mix` only when given, so a
        self-attention variant written without it is called as before.
        """
        source = {} if source_BSD is None else {"source_BSD": source_BSD}
        if want_pattern and self.has_pattern:
            probs_BHLS = self.pattern(x_BLD, visible_BLS, **source)
            return apply_pattern(probs_BHLS, v_BSHK), probs_BHLS
        out_BLHK = self.mix(x_BLD, v_BSHK, visible_BLS, **source)
        if not want_pattern:
            return out_BLHK, None
        B = x_BLD.shape[0]
        return out_BLHK, jnp.zeros((B, self.n_heads) + visible_BLS.shape[1:], x_BLD.dtype)

    def pattern(
        self, x_BLD: jax.Array, visible_BLS: jax.Array, source_BSD: jax.Array | None = None
    ) -> jax.Array:
        """Mixing probabilities `probs_BHLS` (rows sum to one over visible positions)."""
        raise TypeError(f"{type(self).__name__} mixes without a pattern (has_pattern is False)")

    def mix(
        self,
        x_BLD: jax.Array,
        v_BSHK: jax.Array,
        visible_BLS: jax.Array,
        source_BSD: jax.Array | None = None,
    ) -> jax.Array:
        """Mixed values `out_BLHK`; the default applies `pattern` to the values."""
        source = {} if source_BSD is None else {"source_BSD": source_BSD}
        return apply_pattern(self.pattern(x_BLD, visible_BLS, **source), v_BSHK)


class Learned(Mixer):
    """softmax(Q K^T / sqrt(K) + mask), with trainable W_q and W_k."""

    lacks = None

    weight_type: ClassVar[type[nnx.Variable]] = nnx.Param
    qk_scores = True
    supports_cross = True
    #: Q K^T and P V: 2 L K forward each, 4 L K backward each.
    mixing_flops = 12
    describe = {"w_q": "W_q", "w_k": "W_k", "b_q": "b_q", "b_k": "b_k"}

    def __init__(self, n_heads: int, settings: MixerSettings, rngs: nnx.Rngs, config=None):
        super().__init__(n_heads, settings, rngs, config)
        self.w_q = self.weight_type(_projection(rngs, settings, n_heads))
        self.w_k = self.weight_type(_projection(rngs, settings, n_heads))
        # Zero-initialised and drawn from no stream (as the value and output biases).
        bias = settings.bias
        self.b_q = self.weight_type(jnp.zeros((n_heads, settings.head_dim))) if bias else None
        self.b_k = self.weight_type(jnp.zeros((n_heads, settings.head_dim))) if bias else None

    def matmul_weights(self) -> tuple[nnx.Variable, ...]:
        return (self.w_q, self.w_k)

    def _qk(self, x_BLD: jax.Array, source_BSD: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        source_BSD = x_BLD if source_BSD is None else source_BSD
        q_BLHK = jnp.einsum("BLD,DHK->BLHK", x_BLD, self.w_q[...].astype(x_BLD.dtype))
        k_BSHK = jnp.einsum("BSD,DHK->BSHK", source_BSD, self.w_k[...].astype(x_BLD.dtype))
        if self.b_q is not None:
            q_BLHK = q_BLHK + self.b_q[...].astype(x_BLD.dtype)[None, None]
            k_BSHK = k_BSHK + self.b_k[...].astype(x_BLD.dtype)[None, None]
        return q_BLHK, k_BSHK

    def pattern(self, x_BLD, visible_BLS, source_BSD=None) -> jax.Array:
        q_BLHK, k_BSHK = self._qk(x_BLD, source_BSD)
        return softmax_attention(q_BLHK, k_BSHK, visible_BLS).astype(x_BLD.dtype)

    def mix(self, x_BLD, v_BSHK, visible_BLS, source_BSD=None) -> jax.Array:
        if not uses_attention_kernel():
            return super().mix(x_BLD, v_BSHK, visible_BLS, source_BSD)
        # JAX's attention kernel never materialises the pattern (where the backend has one);
        # `pattern` is used when patterns are asked for.
        q_BLHK, k_BSHK = self._qk(x_BLD, source_BSD)
        out_BLHK = jax.nn.dot_product_attention(
            q_BLHK, k_BSHK, v_BSHK.astype(q_BLHK.dtype), mask=visible_BLS[:, None]
        )
        # A row that sees nothing (a padded query) is zero, as in the pattern path; the
        # kernel would return the mean of all values there.
        sees_BL11 = visible_BLS.any(-1)[:, :, None, None]
        return out_BLHK * sees_BL11.astype(out_BLHK.dtype)


class FrozenQK(Learned):
    """As `learned`, but W_q and W_k stay at their random init (content routing, never learned)."""

    lacks = ("learned W_q/W_k: its routing still depends on content", "learned W_q/W_k")

    weight_type = Frozen


class Uniform(Mixer):
    """1/|V(i)| on the visible positions: the masked mean of the values."""

    lacks = ("learned routing: it averages every visible position", "learned routing")
    supports_cross = True

    def pattern(self, x_BLD, visible_BLS, source_BSD=None) -> jax.Array:
        ones_B1LS = jnp.ones(visible_BLS.shape, x_BLD.dtype)[:, None]
        probs_B1LS = normalize_rows(ones_B1LS, visible_BLS)
        return jnp.broadcast_to(probs_B1LS, (x_BLD.shape[0], self.n_heads) + visible_BLS.shape[1:])


@dataclasses.dataclass(frozen=True)
class RandomTableConfig(NoSettings):
    """Settings of `random_fixed` and `synthesizer`: R_h ~ scale * N(0, 1) at init."""

    scale: float = 1.0

    def problems(self) -> list[tuple[str, str]]:
        message = in_range(self.scale, low=0)
        return [("scale", message)] if message else []


class RandomFixed(Mixer):
    """softmax(R_h + mask) with R_h drawn once at init and never trained."""

    lacks = ("learned routing: a fixed random pattern", "learned routing")

    Config = RandomTableConfig
    table_type: ClassVar[type[nnx.Variable]] = Fixed
    describe = {"logits": "random pattern"}
    supports_cross = True

    def __init__(self, n_heads: int, settings: MixerSettings, rngs: nnx.Rngs, config=None):
        super().__init__(n_heads, settings, rngs, config)
        shape = (n_heads, settings.max_len, settings.max_keys)
        table_HLS = self.config.scale * jax.random.normal(rngs.params(), shape)
        self.logits = self.table_type(table_HLS)

    def flops_per_token(self, seq_len: int) -> float:
        # A trained table adds the gradient of the pattern: 2 L K per head.
        trained = isinstance(self.logits, nnx.Param)
        return (
            super().flops_per_token(seq_len) + trained * 2 * self.n_heads * seq_len * self.head_dim
        )

    def pattern(self, x_BLD, visible_BLS, source_BSD=None) -> jax.Array:
        L, S = visible_BLS.shape[1:]
        logits_1HLS = self.logits[...][None, :, :L, :S].astype(jnp.float32)
        probs_BHLS = masked_softmax(logits_1HLS, visible_BLS)
        return probs_BHLS.astype(x_BLD.dtype)


class Synthesizer(RandomFixed):
    """softmax(R_h + mask) with R_h a trainable, input-independent parameter (Tay et al. 2021)."""

    lacks = (
        "content-dependent routing: a learned pattern, the same for every input",
        "content-dependent routing",
    )

    table_type = nnx.Param


@dataclasses.dataclass(frozen=True)
class GaussianConfig(NoSettings):
    """Settings of `gaussian`: the width, and the offset of each head by its index in the
    layer, repeated cyclically (empty: `default_gaussian_offsets`)."""

    sigma: float = 1.0
    offsets: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "offsets", tuple(self.offsets))
        super().__post_init__()

    def problems(self) -> list[tuple[str, str]]:
        return [] if self.sigma > 0 else [("sigma", f"must be > 0, got {self.sigma}")]


class Gaussian(Mixer):
    """A hard-coded Gaussian around position i + offset_h (You et al. 2020).

    In cross-attention (target queries over source positions) the centre follows the
    monotonic alignment i -> i: target i centres on source position i + offset_h, clipped to
    the row's real source positions [0, n_source - 1], so targets past the source's end
    centre on its last position. The source's length is read from the visibility; the
    target's length is not used (it would tell the decoder about its own targets)."""

    lacks = ("learned routing: a fixed local pattern", "learned routing")
    supports_cross = True

    Config = GaussianConfig

    def __init__(self, n_heads: int, settings: MixerSettings, rngs: nnx.Rngs, config=None):
        super().__init__(n_heads, settings, rngs, config)
        heads = range(settings.first_head, settings.first_head + n_heads)
        offsets = self.config.offsets or default_gaussian_offsets(heads.stop, settings.causal)
        self.offsets = tuple(int(offsets[h % len(offsets)]) for h in heads)
        self.sigma = float(self.config.sigma)

    def pattern(self, x_BLD, visible_BLS, source_BSD=None) -> jax.Array:
        L, S = x_BLD.shape[1], visible_BLS.shape[-1]
        pos_L = jnp.arange(L, dtype=jnp.float32)
        centre_1HL = (pos_L[None] + jnp.asarray(self.offsets, jnp.float32)[:, None])[None]
        if source_BSD is not None:
            # A source position is real iff some query may see it (padding is invisible);
            # sources are padded at the end, so the real ones are [0, n_source).
            last_B11 = visible_BLS.any(axis=1).sum(axis=-1)[:, None, None] - 1.0
            centre_1HL = jnp.clip(centre_1HL, 0.0, jnp.maximum(last_B11, 0.0))
        dist_BHLS = jnp.arange(S, dtype=jnp.float32)[None, None, None, :] - centre_1HL[..., None]
        logits_BHLS = -0.5 * (dist_BHLS / self.sigma) ** 2
        return masked_softmax(logits_BHLS, visible_BLS).astype(x_BLD.dtype)


def default_gaussian_offsets(n_heads: int, causal: bool) -> tuple[int, ...]:
    """Offsets 0, -1, -2, ... (causal) or 0, -1, +1, -2, +2, ... (bidirectional)."""
    if causal:
        return tuple(-h for h in range(n_heads))
    return tuple((h + 1) // 2 * (-1 if h % 2 else 1) for h in range(n_heads))


class Identity(Mixer):
    """Each token sees only itself: no mixing at all (the lower bound)."""

    lacks = ("any mixing between positions", "any mixing")
    cross_refusal = (
        "each query would see only its own position, which is not a source position: "
        "the decoder would never see the source"
    )

    def pattern(self, x_BLD, visible_BLS, source_BSD=None) -> jax.Array:
        L = x_BLD.shape[1]
        eye_1LS = jnp.eye(L, dtype=x_BLD.dtype)[None]
        probs_B1LS = normalize_rows(eye_1LS[:, None], visible_BLS)
        return jnp.broadcast_to(probs_B1LS, (x_BLD.shape[0], self.n_heads, L, L))


class Fourier(Mixer):
    """FNet mixing (Lee-Thorp et al. 2021): Re(FFT over positions and head features).

    Padded positions are zeroed before the transform. The mixing is not a distribution over
    positions, so there is no pattern and no alignment for these heads; a causal model is
    refused because the transform sees every position.
    """

    lacks = ("learned routing: fixed Fourier mixing", "learned routing")

    has_pattern = False
    supports_causal = False
    cross_refusal = (
        "it transforms one sequence's own positions (no pattern over another sequence's): "
        "fourier serves only the encoder's self-attention"
    )
    mixing_flops = 0  # an FFT, O(L log L), not a matmul

    def mix(self, x_BLD, v_BLHK, visible_BLS, source_BSD=None) -> jax.Array:
        # A position is a real token iff some query may see it (padding is invisible to all).
        real_BS = visible_BLS.any(axis=1)
        v_BLHK = v_BLHK * real_BS[:, :, None, None].astype(v_BLHK.dtype)
        mixed = jnp.fft.fftn(v_BLHK.astype(jnp.float32), axes=(1, 3), norm="ortho")
        return mixed.real.astype(v_BLHK.dtype)


#: The one registry of attention variants: name -> mixer class.
MIXERS: dict[str, type[Mixer]] = {
    "learned": Learned,
    "uniform": Uniform,
    "random_fixed": RandomFixed,
    "frozen": FrozenQK,
    "synthesizer": Synthesizer,
    "gaussian": Gaussian,
    "none": Identity,
    "fourier": Fourier,
}


def variant_names() -> list[str]:
    """Names of every registered attention variant."""
    return list(MIXERS)


def variant_problem(name: str, causal: bool, cross: bool = False) -> str | None:
    """Why `name` cannot serve a model with this masking (`cross`: as cross-attention, keys
    from another sequence), or None if it can."""
    if name not in MIXERS:
        return f"unknown attention variant {name!r}; choose one of {', '.join(MIXERS)}"
    if cross and not MIXERS[name].supports_cross:
        cross_ok = [n for n, m in MIXERS.items() if m.supports_cross]
        return (
            f"{name!r} cannot serve cross-attention: {MIXERS[name].cross_refusal} "
            f"(choose one of {', '.join(cross_ok)})"
        )
    if causal and not MIXERS[name].supports_causal:
        causal_ok = [n for n, m in MIXERS.items() if m.supports_causal]
        return (
            f"{name!r} mixes every position and cannot serve a causal model "
            f"(set model.causal = false, or choose one of {', '.join(causal_ok)})"
        )
    return None


def variant_settings(
    given: Mapping[str, Any], used: tuple[str, ...] = (), path: str = "attention_settings"
) -> tuple[FrozenDict, list[tuple[str, str]]]:
    """(settings per variant name, problems): each table of `given` built into its variant's
    `Config`, plus the defaults of every variant in `used` that has settings.

    Problems are named by `path.NAME.field`.
    """
    found, resolved = [], {}
    if not isinstance(given, Mapping):
        return FrozenDict(), [(path, f"expected a table of settings per variant, got {given!r}")]
    for name, value in given.items():
        where = dotted(path, name)
        if name not in MIXERS:
            found.append((where, f"unknown attention variant; choose one of {', '.join(MIXERS)}"))
            continue
        cls = MIXERS[name].Config
        if isinstance(value, cls):
            resolved[name] = value
        elif not dataclasses.fields(cls):
            found.append((where, f"{name!r} has no settings"))
        elif not isinstance(value, Mapping):
            found.append((where, f"expected a table of {name} settings, got {value!r}"))
        else:
            try:
                resolved[name] = from_dict(cls, value, where)
            except ConfigError as e:
                found.extend(e.problems)
    for name in used:
        if name in MIXERS and name not in resolved and dataclasses.fields(MIXERS[name].Config):
            resolved[name] = MIXERS[name].Config()
    return FrozenDict(sorted(resolved.items())), found


def make_mixer(
    name: str, n_heads: int, settings: MixerSettings, rngs: nnx.Rngs, config: Any = None
) -> Mixer:
    """Build the registered mixer `name` for `n_heads` heads, refusing what cannot serve."""
    problem = variant_problem(name, settings.causal, settings.cross)
    if problem:
        raise ConfigError([("attention", problem)])
    return MIXERS[name](n_heads, settings, rngs, config)
