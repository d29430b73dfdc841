"""A small pre-norm transformer whose attention variant is chosen per layer and per head.

A causal (or bidirectional) language model: logits per position. The attention layer owns
the value and output projections; its heads are served by one or more mixers from
`ablate.attention` (consecutive heads sharing a variant form one group). What stays at init
is decided by variable type when each part is built (`freeze`, and what each variant holds),
and `frozen_parts` reads it back from those types. Post-hoc edits (ablation.py) wrap the
mixers of a built model; the model itself has no ablation hooks.

Axis letters: the one table for tensor names throughout ablate (each letter one meaning).
  model   B batch, L length (query positions), S key positions, D model width, H heads,
          K head dim, F MLP width, V vocabulary, N layers
  runs    Z seeds (the leading axis of every per-seed array: states, metrics, probe results)
  probe   A ablation rows, R replacement sources, G head groups, E eval (or ranking)
          batches, X pruning prefixes
  tasks   P key-value pairs (masked LM: groups of candidate positions), Q query slots,
          I data items, J source positions of a target, C context tokens (or slots),
          M symbols, T repeated-block length, U region length, W random-bit widths,
          Y counts 0..n (multinomial and binomial sums)
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from ablate.attention import (
    Frozen,
    Mixer,
    MixerSettings,
    make_mixer,
    variant_problem,
    variant_settings,
)
from ablate.config import check, in_range

LayerSpec = str | tuple[str, ...]

FREEZABLE = ("token_embed", "pos_embed")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the transformer and the attention variant of every layer and head.

    `attention` is one variant name for every head of every layer, or a list with one entry
    per layer, each entry a name or a list of one name per head. `attention_settings` holds,
    per variant name, a table of that variant's own settings (its `Config`; defaults filled
    in for the variants the model uses). `freeze` lists parts whose weights stay at init
    besides what the variants freeze: "token_embed", "pos_embed", "layer.N" (a whole block).
    """

    vocab_size: int
    seq_len: int
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_mlp: int = 0
    causal: bool = True
    attention: LayerSpec | tuple[LayerSpec, ...] = "learned"
    attention_settings: dict[str, Any] = FrozenDict()
    freeze: tuple[str, ...] = ()
    dropout: float = 0.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    fused_attention: bool = True
    remat: bool = False
    bias: bool = False
    activation: Literal["gelu_tanh", "gelu"] = "gelu_tanh"
    norm_position: Literal["pre", "post"] = "pre"
    norm_eps: float = 1e-6
    tie_embeddings: bool = False

    def __post_init__(self):
        # Lists given directly (not via from_dict) become tuples, so the config stays hashable.
        spec = self.attention
        if not isinstance(spec, str):
            spec = tuple(e if isinstance(e, str) else tuple(e) for e in spec)
            object.__setattr__(self, "attention", spec)
        object.__setattr__(self, "freeze", tuple(self.freeze))
        check(self)
        # The names the spec uses, read from it directly: expanding it per head first would
        # build n_layers x n_heads names before their ranges are checked.
        spec = self.attention
        entries = [spec] if isinstance(spec, str) else spec
        used = tuple(dict.fromkeys(n for e in entries for n in ([e] if isinstance(e, str) else e)))
        settings, _ = variant_settings(self.attention_settings, used)
        object.__setattr__(self, "attention_settings", settings)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.d_mlp or 4 * self.d_model

    def head_variants(self) -> tuple[tuple[str, ...], ...]:
        """The variant of every head, per layer: `[layer][head] -> name`."""
        return expand_spec(self.attention, self.n_layers, self.n_heads)

    def settings_of(self, name: str) -> Any:
        """The settings of variant `name` (its `Config`), or None for its defaults."""
        return self.attention_settings.get(name)

    def problems(self):
        found = []
        for name in ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers"):
            msg = in_range(getattr(self, name), low=1)
            if msg:
                found.append((name, msg))
        msg = in_range(self.d_mlp, low=0)
        if msg:
            found.append(("d_mlp", msg))
        if self.n_heads >= 1 and self.d_model % self.n_heads:
            found.append(("n_heads", f"must divide d_model={self.d_model}, got {self.n_heads}"))
        if not self.norm_eps > 0:
            found.append(("norm_eps", f"must be > 0, got {self.norm_eps}"))
        if self.dropout < 0 or self.dropout >= 1:
            found.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        for i, part in enumerate(self.freeze):
            if part in FREEZABLE:
                continue
            layer = part.removeprefix("layer.")
            if part.startswith("layer.") and layer.isdecimal() and int(layer) < self.n_layers:
                continue
            allowed = ", ".join([*FREEZABLE, f"layer.0 .. layer.{self.n_layers - 1}"])
            found.append((f"freeze[{i}]", f"{part!r} is not allowed; choose from {allowed}"))
        found.extend(self._attention_problems())
        found.extend(variant_settings(self.attention_settings)[1])
        return found

    def _attention_problems(self):
        return spec_problems(
            self.attention,
            self.n_layers,
            self.n_heads,
            "attention",
            lambda name: variant_problem(name, self.causal),
        )


def expand_spec(spec, n_layers: int, n_heads: int) -> tuple[tuple[str, ...], ...]:
    """An attention spec (one name, or one entry per layer, each a name or one per head) as
    the variant of every head, per layer: `[layer][head] -> name`."""
    layers = [spec] * n_layers if isinstance(spec, str) else list(spec)
    return tuple((entry,) * n_heads if isinstance(entry, str) else tuple(entry) for entry in layers)


def spec_problems(
    spec, n_layers: int, n_heads: int, path: str, problem_of, layers_name: str = "n_layers"
) -> list:
    """(dotted path, message) for each misshapen entry of an attention spec and each name
    `problem_of(name)` refuses (it returns the reason, or None); `layers_name` is the field
    that counts the spec's layers."""
    if not isinstance(spec, str) and len(spec) != n_layers:
        return [
            (
                path,
                f"has {len(spec)} entries but {layers_name} = {n_layers}: give "
                "one variant name for all layers or one entry per layer",
            )
        ]
    found = []
    for layer, entry in enumerate([spec] if isinstance(spec, str) else spec):
        where = path if isinstance(spec, str) else f"{path}[{layer}]"
        names = [entry] if isinstance(entry, str) else list(entry)
        if not isinstance(entry, str) and len(names) != n_heads:
            found.append(
                (
                    where,
                    f"has {len(names)} head entries but n_heads = {n_heads}: give "
                    "one name for the whole layer or one per head",
                )
            )
            continue
        for head, name in enumerate(names):
            problem = problem_of(name)
            if problem:
                found.append((where if isinstance(entry, str) else f"{where}[{head}]", problem))
    return found


class Output(NamedTuple):
    """Model output: logits, and per layer the patterns (B, H, L, S) when asked for."""

    logits: jax.Array
    patterns: tuple[jax.Array, ...] | None


class Attention(nnx.Module):
    """Multi-head attention whose heads are mixed by one or more registered mixers."""

    def __init__(
        self,
        head_variants: tuple[str, ...],
        settings: MixerSettings,
        rngs: nnx.Rngs,
        mixer_rngs: nnx.Rngs | None = None,
        variant_settings: Mapping[str, Any] = FrozenDict(),
    ):
        """`mixer_rngs` (default: `rngs`) draws the mixers' own state, so that the shared
        weights drawn from `rngs` do not depend on which variants the heads are;
        `variant_settings` maps a variant name to its settings (absent: its defaults)."""
        D, H, K = settings.d_model, len(head_variants), settings.head_dim
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
        self.w_v = nnx.Param(init(rngs.params(), (D, H, K)))
        self.w_o = nnx.Param(
            nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)(rngs.params(), (H, K, D))
        )
        # Biases (settings.bias) start at zero and are drawn from no stream, so a model with
        # them starts where the same seed's model without them does.
        self.b_v = nnx.Param(jnp.zeros((H, K))) if settings.bias else None
        self.b_o = nnx.Param(jnp.zeros((D,))) if settings.bias else None
        groups, start = [], 0
        for _, run in itertools.groupby(head_variants):
            n = len(list(run))
            groups.append((start, n))
            start += n
        self.head_groups = tuple(groups)
        self.mixers = nnx.List(
            [
                make_mixer(
                    head_variants[s],
                    n,
                    dataclasses.replace(settings, first_head=s),
                    rngs if mixer_rngs is None else mixer_rngs,
                    variant_settings.get(head_variants[s]),
                )
                for s, n in self.head_groups
            ]
        )

    def _per_head(self, fact: str) -> tuple[bool, ...]:
        return tuple(
            getattr(m, fact) for m, (_, n) in zip(self.mixers, self.head_groups) for _ in range(n)
        )

    @property
    def has_pattern_H(self) -> tuple[bool, ...]:
        return self._per_head("has_pattern")

    @property
    def qk_scores_H(self) -> tuple[bool, ...]:
        return self._per_head("qk_scores")

    def __call__(
        self,
        x_BLD: jax.Array,
        visible_BLS: jax.Array,
        *,
        return_pattern: bool = False,
        fused: bool = True,
        source_BSD: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """Returns (y_BLD, probs_BHLS or None, per-head outputs heads_BLHK).

        With `source_BSD` this is cross-attention: queries from x, keys and values from the
        source (`visible_BLS` then says which source positions each query may see).
        """
        kv_BSD = x_BLD if source_BSD is None else source_BSD
        v_BSHK = jnp.einsum("BSD,DHK->BSHK", kv_BSD, self.w_v[...].astype(x_BLD.dtype))
        if self.b_v is not None:
            v_BSHK = v_BSHK + self.b_v[...].astype(x_BLD.dtype)[None, None]
        source = {} if source_BSD is None else {"source_BSD": source_BSD}
        outs, probs = [], []
        for mixer, (start, n) in zip(self.mixers, self.head_groups):
            out_BLHK, probs_BHLS = mixer(
                x_BLD,
                v_BSHK[:, :, start : start + n],
                visible_BLS,
                want_pattern=return_pattern or not fused,
                **source,
            )
            outs.append(out_BLHK)
            probs.append(probs_BHLS)
        heads_BLHK = jnp.concatenate(outs, axis=2).astype(x_BLD.dtype)
        y_BLD = jnp.einsum("BLHK,HKD->BLD", heads_BLHK, self.w_o[...].astype(x_BLD.dtype))
        if self.b_o is not None:
            y_BLD = y_BLD + self.b_o[...].astype(x_BLD.dtype)[None, None]
        probs_BHLS = jnp.concatenate(probs, axis=1) if return_pattern else None
        return y_BLD, probs_BHLS, heads_BLHK


def gelu(x: jax.Array, activation: str = "gelu_tanh") -> jax.Array:
    """GELU by its `ModelConfig.activation` name: the tanh approximation or the exact (erf)."""
    return jax.nn.gelu(x, approximate=activation == "gelu_tanh")


class MLP(nnx.Module):
    """Two-layer GELU MLP computing in `dtype` (its parameters stay float32)."""

    def __init__(
        self,
        d_model: int,
        d_mlp: int,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        activation: str = "gelu_tanh",
    ):
        self.up = nnx.Linear(d_model, d_mlp, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(d_mlp, d_model, dtype=dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        return self.down(gelu(self.up(x_BLD), self.activation))

    def matmul_weights(self) -> tuple[nnx.Variable, ...]:
        return (self.up.kernel, self.down.kernel)


class Block(nnx.Module):
    """Transformer block: pre-norm x + attn(norm(x)), then x + mlp(norm(x)); or, with
    `cfg.norm_position` "post" (BERT), norm(x + attn(x)), then norm(x + mlp(x)).

    With `frozen`, every weight of the block (mixers included) stays at init.
    """

    def __init__(
        self,
        head_variants: tuple[str, ...],
        cfg: ModelConfig,
        rngs: nnx.Rngs,
        mixer_rngs: nnx.Rngs | None = None,
        *,
        frozen: bool = False,
    ):
        settings = MixerSettings(
            d_model=cfg.d_model,
            head_dim=cfg.head_dim,
            max_len=cfg.seq_len,
            causal=cfg.causal,
            bias=cfg.bias,
        )
        # Compute in cfg.dtype, parameters in float32 (flax keeps the norm statistics in f32).
        dtype = jnp.dtype(cfg.dtype)
        self.norm_attn = layer_norm(cfg, rngs, dtype)
        self.attention = Attention(
            head_variants, settings, rngs, mixer_rngs, cfg.attention_settings
        )
        self.norm_mlp = layer_norm(cfg, rngs, dtype)
        self.mlp = MLP(cfg.d_model, cfg.mlp_width, rngs, dtype=dtype, activation=cfg.activation)
        self.dropout = cfg.dropout
        self.post_norm = cfg.norm_position == "post"
        if frozen:
            # flax's layers (norms, MLP) make nnx.Param and take no variable type.
            _params_to_frozen(self)

    def __call__(self, x_BLD, visible_BLS, *, dropout_key=None, **attention_kwargs):
        """Returns (x_BLD, probs_BHLS or None, per-head attention outputs heads_BLHK)."""
        pre = (lambda norm, x: x) if self.post_norm else (lambda norm, x: norm(x))
        post = (lambda norm, x: norm(x)) if self.post_norm else (lambda norm, x: x)
        attn_BLD, probs_BHLS, heads_BLHK = self.attention(
            pre(self.norm_attn, x_BLD), visible_BLS, **attention_kwargs
        )
        mlp_key = None
        if dropout_key is not None and self.dropout > 0:
            attn_key, mlp_key = jax.random.split(dropout_key)
            attn_BLD = _dropout(attn_BLD, self.dropout, attn_key)
        x_BLD = post(self.norm_attn, x_BLD + attn_BLD)
        mlp_BLD = self.mlp(pre(self.norm_mlp, x_BLD))
        if mlp_key is not None:
            mlp_BLD = _dropout(mlp_BLD, self.dropout, mlp_key)
        return post(self.norm_mlp, x_BLD + mlp_BLD), probs_BHLS, heads_BLHK

    def matmul_weights(self) -> tuple[nnx.Variable, ...]:
        """The block's weights outside the mixers that multiply activations."""
        return (self.attention.w_v, self.attention.w_o, *self.mlp.matmul_weights())


def layer_norm(cfg: ModelConfig, rngs: nnx.Rngs, dtype: Any = None) -> nnx.LayerNorm:
    """A LayerNorm over d_model with the config's epsilon, computing in `dtype` (default f32)."""
    return nnx.LayerNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype, rngs=rngs)


def _params_to_frozen(root: nnx.Module) -> None:
    for _, node in nnx.iter_graph(root):
        if isinstance(node, nnx.Module):
            for name, value in list(vars(node).items()):
                if isinstance(value, nnx.Param):
                    setattr(node, name, Frozen(value[...]))


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


class Embed(nnx.Module):
    """Token embeddings as flax's `nnx.Embed` makes them (same init, same lookup), held in a
    variable type chosen at construction (`Frozen`: kept at init)."""

    def __init__(
        self, vocab_size: int, d_model: int, rngs: nnx.Rngs, variable_type: type = nnx.Param
    ):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        self.embedding = variable_type(init(rngs.params(), (vocab_size, d_model), jnp.float32))

    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens_BL, axis=0)


class Transformer(nnx.Module):
    """Token + learned position embeddings, pre-norm blocks, final norm and an LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # The paired design: the mixers draw from a stream of their own, so for one seed every
        # variant starts from the same embeddings, value/output projections, MLPs and head.
        mixer_rngs = nnx.Rngs(params=rngs.params())

        def kind(part: str) -> type:
            return Frozen if part in cfg.freeze else nnx.Param

        self.token_embed = Embed(cfg.vocab_size, cfg.d_model, rngs, kind("token_embed"))
        self.pos_embed = kind("pos_embed")(
            0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.d_model))
        )
        self.blocks = nnx.List(
            [
                Block(v, cfg, rngs, mixer_rngs, frozen=f"layer.{n}" in cfg.freeze)
                for n, v in enumerate(cfg.head_variants())
            ]
        )
        # Pre-norm: the final norm, before the head; post-norm (BERT): the embeddings' norm.
        self.norm = layer_norm(cfg, rngs)
        # The head multiplies in cfg.dtype (a float32 output would make its backward pass
        # multiply float32 cotangents); the logits are cast to float32 for the loss. Tied: the
        # transposed token embedding, no bias (GPT-2).
        self.head = (
            None
            if cfg.tie_embeddings
            else nnx.Linear(cfg.d_model, cfg.vocab_size, dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        )

    def __call__(
        self,
        tokens_BL: jax.Array,
        *,
        valid_BL: jax.Array | None = None,
        return_patterns: bool = False,
        dropout_key: jax.Array | None = None,
    ) -> Output:
        """Logits (B, L, V), and the patterns of every layer when asked for."""
        return self.run(
            self.embed(tokens_BL),
            valid_BL=valid_BL,
            return_patterns=return_patterns,
            dropout_key=dropout_key,
        )

    def run(
        self,
        x_BLD: jax.Array,
        *,
        valid_BL: jax.Array | None = None,
        return_patterns: bool = False,
        dropout_key: jax.Array | None = None,
    ) -> Output:
        """The blocks and the head on embedded input x_BLD (what `embed` makes)."""
        cfg = self.cfg
        B, L = x_BLD.shape[:2]
        visible_BLS = visibility(L, cfg.causal, valid_BL, B)
        keys = [None] * len(self.blocks)
        if dropout_key is not None and cfg.dropout > 0:
            keys = list(jax.random.split(dropout_key, len(self.blocks)))
        attention_kwargs = dict(return_pattern=return_patterns, fused=cfg.fused_attention)
        run = _block_runner(attention_kwargs, cfg.remat)
        patterns = []
        for block, key in zip(self.blocks, keys):
            x_BLD, probs_BHLS, _ = run(block, x_BLD, visible_BLS, key)
            patterns.append(probs_BHLS)
        return Output(
            logits=self.logits(x_BLD).astype(jnp.float32),
            patterns=tuple(patterns) if return_patterns else None,
        )

    def embed(self, tokens_BL: jax.Array) -> jax.Array:
        """The first block's input x_BLD: token + position embeddings (normed when post-norm)."""
        L = tokens_BL.shape[1]
        x_BLD = self.token_embed(tokens_BL) + self.pos_embed[...][None, :L]
        if self.cfg.norm_position == "post":
            x_BLD = self.norm(x_BLD)
        return x_BLD.astype(jnp.dtype(self.cfg.dtype))

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        """The LM head on the last block's output (after the final norm when pre-norm)."""
        x_BLD = x_BLD.astype(jnp.float32)
        if self.cfg.norm_position == "pre":
            x_BLD = self.norm(x_BLD)
        if self.head is None:
            table_VD = self.token_embed.embedding[...].astype(jnp.dtype(self.cfg.dtype))
            return x_BLD.astype(table_VD.dtype) @ table_VD.T
        return self.head(x_BLD)


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model of `cfg` with shapes and variable types but no values (nothing computed)."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def _trains(module: nnx.Module) -> bool:
    return bool(jax.tree.leaves(nnx.state(module, nnx.Param)))


def frozen_parts(cfg: ModelConfig) -> list[dict[str, Any]]:
    """Everything that stays at init in this model, read from its variable types (for reports).

    Each entry is plain data: `part` ("token_embed", "pos_embed", "layer.N", "layer N head
    H"), `kind` ("embedding"; "layer", a block with nothing to train; "head", what one head's
    mixer keeps), `what` (plain words) and `content_routing` (true where the frozen weights
    score queries against keys, so the head still routes by content).
    """
    model = abstract_model(cfg)
    found = []

    def add(part: str, kind: str, what: str, content_routing: bool = False) -> None:
        found.append({"part": part, "kind": kind, "what": what, "content_routing": content_routing})

    if not _trains(model.token_embed):
        add("token_embed", "embedding", "token embeddings")
    if not isinstance(model.pos_embed, nnx.Param):
        add("pos_embed", "embedding", "position embeddings")
    for n, (block, groups) in enumerate(zip(model.blocks, mixers_of(model))):
        if not _trains(block):
            add(f"layer.{n}", "layer", "every weight of the block")
            continue
        for start, count, mixer in groups:
            if kept := mixer.kept_at_init():
                for head in range(start, start + count):
                    add(f"layer {n} head {head}", "head", ", ".join(kept), mixer.qk_scores)
    return found


def mixers_of(model: Transformer) -> list[list[tuple[int, int, Mixer]]]:
    """Per layer, the (first head, n heads, mixer) groups."""
    return [
        [(s, n, m) for (s, n), m in zip(b.attention.head_groups, b.attention.mixers)]
        for b in model.blocks
    ]
