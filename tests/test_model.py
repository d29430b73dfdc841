"""The Transformer: every variant end to end, causality, padding, freezing, configs.

Most properties are read off one forward pass per variant over a "probe batch" whose rows are
edits of two base sequences (a token changed, padding added, padded tokens changed), so each
variant costs one eager call (and one compile for the jit test).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ablate import attention
from ablate.ablation import recorded
from ablate.attention import MIXERS, Fixed, Frozen, default_gaussian_offsets
from ablate.config import ConfigError, from_dict, to_dict
from ablate.model import (
    Embed,
    ModelConfig,
    Output,
    Transformer,
    frozen_parts,
    mixers_of,
    visibility,
)

B, L, D, H, V = 2, 8, 16, 4, 11
K = D // H
N_VALID = 5
CAUSAL_VARIANTS = [name for name, cls in MIXERS.items() if cls.supports_causal]
ALL_CAUSAL_HEADS = (
    ("learned", "uniform", "random_fixed", "frozen"),
    ("synthesizer", "gaussian", "none", "none"),
)
MIXED = (("learned", "learned", "uniform", "frozen"), "gaussian")

# Probe batch rows: edits of two base sequences s0 and s1.
CHANGED_AT = {2: 2, 3: 5, 4: L - 1}  # row -> position whose token differs from row 0
S0, S1_PADDED, S1_PADDING_EDITED, S1, S1_EDITED = 0, 1, 5, 6, 7


def config(attention="learned", causal=True, **kwargs) -> ModelConfig:
    return ModelConfig(
        vocab_size=V,
        seq_len=L,
        d_model=D,
        n_heads=H,
        n_layers=2,
        causal=causal,
        attention=attention,
        **kwargs,
    )


@functools.cache
def model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A shared model per config; tests must not modify it (train on a fresh one)."""
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def tokens(seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, L), 0, V)


def valid_BL() -> jax.Array:
    return jnp.asarray([[True] * L, [True] * N_VALID + [False] * (L - N_VALID)])


def probe_batch() -> tuple[jax.Array, jax.Array]:
    """tokens_RL, valid_RL for the probe rows (see the constants above)."""
    s0, s1 = np.asarray(tokens(0))
    s1_edited = s1.copy()
    s1_edited[N_VALID:] = (s1[N_VALID:] + 3) % V
    rows = [s0, s1]
    for j in CHANGED_AT.values():
        row = s0.copy()
        row[j] = (row[j] + 1) % V
        rows.append(row)
    rows += [s1_edited, s1, s1_edited]
    valid = np.ones((len(rows), L), bool)
    valid[[S1_PADDED, S1_PADDING_EDITED], N_VALID:] = False
    return jnp.asarray(np.stack(rows), jnp.int32), jnp.asarray(valid)


@functools.cache
def probe(name, causal: bool) -> Output:
    """The eager forward of a model of one variant over the probe batch."""
    tokens_RL, valid_RL = probe_batch()
    net = model(config(name, causal=causal))
    return net(tokens_RL, valid_BL=valid_RL, return_patterns=True)


def as_np(tree):
    return jax.tree.map(np.asarray, tree)


def test_strict_rank_promotion_is_on():
    # Every model test relies on conftest.py making implicit broadcasting an error.
    with pytest.raises(ValueError, match="rank_promotion"):
        jnp.ones((B, L, D)) + jnp.ones((L, D))


@pytest.mark.parametrize("name", list(MIXERS))
def test_every_variant_forward_shapes_finite_and_jit_equals_eager(name):
    causal = MIXERS[name].supports_causal
    eager = probe(name, causal)
    R = probe_batch()[0].shape[0]
    assert eager.logits.shape == (R, L, V) and eager.logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(eager.logits)).all()
    assert [p.shape for p in eager.patterns] == [(R, H, L, L)] * 2

    graphdef, state = nnx.split(model(config(name, causal=causal)))

    @jax.jit
    def forward(state, tokens_BL, valid_BL):
        out = nnx.merge(graphdef, state)(tokens_BL, valid_BL=valid_BL, return_patterns=True)
        return out.logits, out.patterns

    logits_jit, patterns_jit = forward(state, *probe_batch())
    np.testing.assert_allclose(logits_jit, eager.logits, atol=1e-5)
    for p_jit, p_eager in zip(patterns_jit, eager.patterns, strict=True):
        np.testing.assert_allclose(p_jit, p_eager, atol=1e-6)
    if name != "none":
        # The padding mask matters (so the padding tests below can fail).
        assert np.abs(eager.logits[S1] - eager.logits[S1_PADDED]).max() > 1e-4


@pytest.mark.parametrize(
    "name, causal",
    [(n, c) for n, cls in MIXERS.items() for c in (True, False) if cls.supports_causal or not c],
)
def test_model_patterns_are_distributions_over_visible_positions(name, causal):
    patterns = as_np(probe(name, causal).patterns)
    tokens_RL, valid_RL = probe_batch()
    visible_RLS = np.asarray(visibility(L, causal, valid_RL, tokens_RL.shape[0]))
    hidden_RHLS = np.broadcast_to(~visible_RLS[:, None], patterns[0].shape)
    assert hidden_RHLS[S1_PADDED].any()
    # Every valid query sees something; a padded one may see nothing (an all-zero row).
    scored_RL = visible_RLS.any(-1)
    assert scored_RL[np.asarray(valid_RL)].all()
    for probs_RHLS in patterns:
        assert np.isfinite(probs_RHLS).all()
        if not MIXERS[name].has_pattern:
            np.testing.assert_array_equal(probs_RHLS, 0)
            continue
        assert (probs_RHLS >= 0).all()
        row_sums_RHL = np.broadcast_to(scored_RL[:, None], probs_RHLS.shape[:3])
        np.testing.assert_allclose(probs_RHLS.sum(-1), row_sums_RHL, atol=1e-5)
        assert (probs_RHLS[hidden_RHLS] == 0).all()


@pytest.mark.parametrize("name", CAUSAL_VARIANTS)
def test_changing_token_j_never_moves_logits_before_j(name):
    logits_RLV = np.asarray(probe(name, True).logits)
    for row, j in CHANGED_AT.items():
        np.testing.assert_array_equal(logits_RLV[row, :j], logits_RLV[S0, :j])
        assert np.abs(logits_RLV[row, j] - logits_RLV[S0, j]).max() > 1e-4


@pytest.mark.parametrize("name", list(MIXERS))
def test_padded_tokens_never_reach_valid_positions(name):
    logits_RLV = np.asarray(probe(name, False).logits)
    np.testing.assert_allclose(
        logits_RLV[S1_PADDING_EDITED, :N_VALID], logits_RLV[S1_PADDED, :N_VALID], atol=1e-6
    )
    if name == "none":
        return
    # The same edit without the padding mask is seen, and so is a later token's edit.
    assert np.abs(logits_RLV[S1_EDITED, :N_VALID] - logits_RLV[S1, :N_VALID]).max() > 1e-4
    assert np.abs(logits_RLV[4, : L - 1] - logits_RLV[S0, : L - 1]).max() > 1e-4


def logit_sensitivity(cfg: ModelConfig) -> np.ndarray:
    """|d logits[b, i, :] / d (embedding added at position j)| summed: (B, L, L)."""
    graphdef, pos, rest = nnx.split(model(cfg), nnx.PathContains("pos_embed"), ...)

    def logits(pos):
        return nnx.merge(graphdef, pos, rest)(tokens()).logits

    jacobian_BLVJD = jax.tree.leaves(jax.jit(jax.jacrev(logits))(pos))[0]
    assert jacobian_BLVJD.shape == (B, L, V, L, D)
    return np.abs(np.asarray(jacobian_BLVJD)).sum(axis=(2, 4))


def test_causality_through_gradients_for_every_causal_variant():
    # One model whose heads cover every causal variant, learned included.
    covered = {name for layer in config(ALL_CAUSAL_HEADS).head_variants() for name in layer}
    assert covered == set(CAUSAL_VARIANTS)
    sensitivity_BLJ = logit_sensitivity(config(ALL_CAUSAL_HEADS))
    later_LJ = np.triu(np.ones((L, L), bool), k=1)
    assert (sensitivity_BLJ[:, later_LJ] == 0).all()
    assert (sensitivity_BLJ[:, ~later_LJ] > 1e-6).all()


def test_bfloat16_config_computes_the_blocks_in_bfloat16():
    out, heads = recorded(
        model(config("learned", dtype="bfloat16")), tokens(), return_patterns=True
    )
    assert out.logits.dtype == jnp.float32 and np.isfinite(np.asarray(out.logits)).all()
    assert heads[0].dtype == jnp.bfloat16
    assert out.patterns[0].dtype == jnp.bfloat16
    # Same weights as the float32 model, so only rounding separates the logits.
    full = np.asarray(probe("learned", True).logits)[[S0, S1]]
    rounded = np.asarray(out.logits)
    assert 1e-4 < np.abs(rounded - full).max() < 0.1 * np.abs(full).max()


@pytest.mark.parametrize("kernel", [True, False], ids=["dot_product_attention", "pattern_path"])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_attention_equals_unfused(padded, kernel, monkeypatch):
    monkeypatch.setattr(attention, "uses_attention_kernel", lambda: kernel)
    valid = valid_BL() if padded else None
    fused = model(config("learned", fused_attention=True))
    plain = model(config("learned", fused_attention=False))
    np.testing.assert_array_equal(
        fused.blocks[0].attention.mixers[0].w_q[...], plain.blocks[0].attention.mixers[0].w_q[...]
    )
    logits_fused = np.asarray(fused(tokens(), valid_BL=valid).logits)
    logits_plain = np.asarray(plain(tokens(), valid_BL=valid).logits)
    assert np.isfinite(logits_fused).all() and np.isfinite(logits_plain).all()
    # Padded positions are never scored (test_attention.py checks them separately).
    real_BL = np.asarray(valid_BL())
    np.testing.assert_allclose(logits_fused[real_BL], logits_plain[real_BL], atol=1e-5)
    other = model(config("uniform", fused_attention=False))
    assert np.abs(other(tokens()).logits - logits_plain).max() > 1e-2


def leaves(tree) -> dict[str, tuple[type, np.ndarray]]:
    """keystr(path) -> (variable type, a copy of the value) for every variable in `tree`."""
    found = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {jax.tree_util.keystr(p): (type(v), np.array(v[...])) for p, v in found}


def adamw_steps(net: Transformer, n_steps: int) -> tuple[Transformer, list[float]]:
    """Train on next-token prediction with AdamW (weight decay on) over nnx.Param only."""
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    tx = optax.adamw(1e-2, weight_decay=0.5)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, tokens_BL):
        def loss_fn(params):
            logits_BLV = nnx.merge(graphdef, params, rest)(tokens_BL).logits
            return optax.softmax_cross_entropy_with_integer_labels(
                logits_BLV[:, :-1], tokens_BL[:, 1:]
            ).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in range(n_steps):
        params, opt_state, loss = step(params, opt_state, tokens(i))
        losses.append(float(loss))
    return nnx.merge(graphdef, params, rest), losses


def test_frozen_and_fixed_state_stays_bit_identical_while_params_train():
    cfg = config(
        (
            ("random_fixed", "frozen", "learned", "synthesizer"),
            ("learned", "learned", "synthesizer", "synthesizer"),
        ),
        freeze=("token_embed", "layer.1"),
    )
    net = Transformer(cfg, rngs=nnx.Rngs(0))
    before = leaves(nnx.state(net))
    trained, losses = adamw_steps(net, n_steps=4)
    after = leaves(nnx.state(trained))
    assert after.keys() == before.keys()
    assert np.isfinite(losses).all()

    fixed_or_frozen = {p for p, (t, _) in before.items() if not issubclass(t, nnx.Param)}
    for path, (kind, value) in before.items():
        assert after[path][0] is kind, path
        if path in fixed_or_frozen:
            np.testing.assert_array_equal(after[path][1], value, err_msg=path)
        else:
            assert np.abs(after[path][1] - value).max() > 1e-4, path

    mixers = "['blocks'][0]['attention']['mixers']"
    block_1 = {p for p in before if p.startswith("['blocks'][1]")}
    # Two mixers (3 weights), w_v, w_o, two norms and the MLP (4 each).
    assert len(block_1) == 13
    assert fixed_or_frozen == {
        f"{mixers}[0]['logits']",
        f"{mixers}[1]['w_q']",
        f"{mixers}[1]['w_k']",
        "['token_embed']['embedding']",
        *block_1,
    }
    assert before[f"{mixers}[0]['logits']"][0] is Fixed
    assert before[f"{mixers}[1]['w_q']"][0] is Frozen
    assert before["['token_embed']['embedding']"][0] is Frozen
    assert all(before[p][0] is Frozen for p in block_1)
    # What must train did (checked in the loop above): learned W_q, synthesizer logits.
    assert before[f"{mixers}[2]['w_q']"][0] is nnx.Param
    assert before[f"{mixers}[3]['logits']"][0] is nnx.Param


def test_fixed_and_frozen_are_state_but_not_params():
    net = model(config(("random_fixed", "frozen"), freeze=("pos_embed",)))
    everything = leaves(nnx.state(net))
    params = leaves(nnx.state(net, nnx.Param))
    others = {p: t for p, (t, _) in everything.items() if p not in params}
    assert others == {
        "['blocks'][0]['attention']['mixers'][0]['logits']": Fixed,
        "['blocks'][1]['attention']['mixers'][0]['w_q']": Frozen,
        "['blocks'][1]['attention']['mixers'][0]['w_k']": Frozen,
        "['pos_embed']": Frozen,
    }
    assert all(t is nnx.Param for t, _ in params.values())
    optimizer = nnx.Optimizer(net, optax.adamw(1e-3), wrt=nnx.Param)
    n_moments = sum(x.size for x in jax.tree.leaves(optimizer.opt_state))
    n_params = sum(v.size for _, v in params.values())
    assert n_params < n_moments <= 2 * n_params + 8

    def head(n, h, what, content_routing):
        return {"part": f"layer {n} head {h}", "kind": "head", "what": what,
                "content_routing": content_routing}  # fmt: skip

    assert frozen_parts(net.cfg) == [
        {"part": "pos_embed", "kind": "embedding", "what": "position embeddings",
         "content_routing": False},
        *(head(0, h, "random pattern", False) for h in range(H)),
        *(head(1, h, "W_q, W_k", True) for h in range(H)),
    ]  # fmt: skip


def test_frozen_parts_are_read_from_variable_types():
    # A frozen layer is one entry (its heads' own facts are implied); frozen token embeddings
    # are named; a trained synthesizer keeps nothing at init.
    cfg = config([["frozen", "synthesizer", "learned", "learned"], "frozen"],
                 freeze=("layer.1", "token_embed"))  # fmt: skip
    parts = frozen_parts(cfg)
    assert [p["part"] for p in parts] == [
        "token_embed", "layer 0 head 0", "layer.1"
    ]  # fmt: skip
    assert [p["kind"] for p in parts] == ["embedding", "head", "layer"]
    assert frozen_parts(config("learned")) == []


def test_mixed_per_layer_and_per_head_spec_builds_and_runs():
    cfg = config([["learned", "learned", "uniform", "frozen"], "gaussian"])
    assert cfg.head_variants() == (MIXED[0], ("gaussian",) * H)
    net = Transformer(cfg, rngs=nnx.Rngs(0))
    groups = [[(s, n, type(m).__name__) for s, n, m in layer] for layer in mixers_of(net)]
    assert groups == [
        [(0, 2, "Learned"), (2, 1, "Uniform"), (3, 1, "FrozenQK")],
        [(0, 4, "Gaussian")],
    ]
    out = net(tokens(), valid_BL=valid_BL(), return_patterns=True)
    assert out.logits.shape == (B, L, V) and np.isfinite(np.asarray(out.logits)).all()
    visible_BLS = np.asarray(visibility(L, True, valid_BL(), B))
    uniform_BLS = visible_BLS / np.maximum(visible_BLS.sum(-1, keepdims=True), 1)
    layer0_BHLS, layer1_BHLS = map(np.asarray, out.patterns)
    np.testing.assert_allclose(layer0_BHLS[:, 2], uniform_BLS, atol=1e-6)
    row_sums_BHL = np.broadcast_to(visible_BLS.any(-1)[:, None], (B, H, L))
    np.testing.assert_allclose(layer0_BHLS.sum(-1), row_sums_BHL, atol=1e-5)
    assert np.abs(layer0_BHLS[:, 0] - uniform_BLS).max() > 0.05

    # The probe batch starts with the same two rows (tokens(), valid_BL()).
    gaussian_patterns = probe("gaussian", True).patterns
    np.testing.assert_allclose(layer1_BHLS, gaussian_patterns[1][:B], atol=1e-6)
    offsets = mixers_of(model(config("gaussian")))[1][0][2].offsets
    assert offsets == default_gaussian_offsets(H, True)
    uniform_patterns = probe("uniform", True).patterns
    np.testing.assert_allclose(layer0_BHLS[:, 2], uniform_patterns[0][:B, 2], atol=1e-6)


def test_mixed_spec_from_lists_is_hashable_like_one_from_dict():
    from_data = from_dict(
        ModelConfig, {"vocab_size": V, "seq_len": L, "attention": [list(MIXED[0]), "gaussian"]}
    )
    assert from_data.attention == MIXED
    assert hash(from_data) == hash(dataclasses.replace(from_data))


def test_mixed_spec_given_as_python_lists_is_normalised_to_tuples():
    cfg = config([["learned", "learned", "uniform", "frozen"], "gaussian"])
    assert cfg.attention == MIXED  # as from_dict gives it
    assert hash(cfg) == hash(config(MIXED))
    # So a graphdef holding it can be a jit static argument.
    graphdef, state = nnx.split(model(config(MIXED)))
    forward = jax.jit(lambda g, s, t: nnx.merge(g, s)(t).logits, static_argnums=0)
    np.testing.assert_allclose(
        forward(graphdef, state, tokens()), model(config(MIXED))(tokens()).logits, atol=1e-5
    )


def problems_of(**kwargs) -> list[tuple[str, str]]:
    fields = dict(vocab_size=V, seq_len=L, d_model=D, n_heads=H, n_layers=2) | kwargs
    with pytest.raises(ConfigError) as info:
        ModelConfig(**fields)
    return info.value.problems


def test_unknown_variant_is_refused_with_valid_names():
    [(path, message)] = problems_of(attention="lerned")
    assert path == "attention" and "'lerned'" in message
    assert all(name in message for name in MIXERS)
    [(path, message)] = problems_of(attention=("learned", ("uniform", "lerned", "none", "none")))
    assert path == "attention[1][1]" and "'lerned'" in message


def test_per_layer_list_of_wrong_length_is_refused():
    [(path, message)] = problems_of(attention=("learned", "uniform", "none"))
    assert path == "attention"
    assert "3 entries" in message and "n_layers = 2" in message


def test_per_head_list_of_wrong_length_is_refused():
    [(path, message)] = problems_of(attention=("learned", ("uniform", "none")))
    assert path == "attention[1]"
    assert "2 head entries" in message and "n_heads = 4" in message


def test_n_heads_must_divide_d_model():
    [(path, message)] = problems_of(n_heads=3)
    assert path == "n_heads" and "d_model=16" in message


@pytest.mark.parametrize(
    "attention, path",
    [
        ("fourier", "attention"),
        (("learned", "fourier"), "attention[1]"),
        (("learned", ("none", "none", "fourier", "none")), "attention[1][2]"),
    ],
)
def test_fourier_is_refused_for_causal_models(attention, path):
    [(found_path, message)] = problems_of(attention=attention, causal=True)
    assert found_path == path
    assert "'fourier'" in message and "causal" in message
    built = config(attention, causal=False)
    assert "fourier" in {name for layer in built.head_variants() for name in layer}


def test_freeze_entries_must_exist():
    [(path, message)] = problems_of(freeze=("token_embed", "layer.2"))
    assert path == "freeze[1]" and "'layer.2'" in message and "layer.0 .. layer.1" in message
    [(path, _)] = problems_of(freeze=("mlp",))
    assert path == "freeze[0]"


def test_several_problems_are_reported_at_once():
    problems = problems_of(
        n_heads=3,
        attention=(("learned", "x", "uniform"), "fourier"),
        freeze=("layer.7",),
        dropout=1.5,
    )
    paths = [p for p, _ in problems]
    assert sorted(paths) == sorted(
        ["n_heads", "dropout", "freeze[0]", "attention[0][1]", "attention[1]"]
    )


def test_from_dict_names_the_dotted_path():
    with pytest.raises(ConfigError) as info:
        from_dict(
            ModelConfig,
            {"vocab_size": V, "seq_len": L, "d_model": "wide", "n_head": 4, "causal": "yes"},
            path="model",
        )
    problems = dict(info.value.problems)
    assert set(problems) == {"model.d_model", "model.n_head", "model.causal"}
    assert "expected int" in problems["model.d_model"]
    assert "unknown field" in problems["model.n_head"] and "n_heads" in problems["model.n_head"]
    assert "expected bool" in problems["model.causal"]

    with pytest.raises(ConfigError) as info:
        from_dict(ModelConfig, {"vocab_size": V, "seq_len": L, "n_heads": 5}, path="model")
    assert [p for p, _ in info.value.problems] == ["model.n_heads"]

    with pytest.raises(ConfigError) as info:
        from_dict(ModelConfig, {"vocab_size": V, "seq_len": L, "attention": "lerned"}, "model")
    assert [p for p, _ in info.value.problems] == ["model.attention"]

    built = from_dict(ModelConfig, {"vocab_size": V, "seq_len": L, "d_model": 32}, path="model")
    assert built.d_model == 32 and built.head_dim == 8


def test_gaussian_offsets_follow_the_head_index_across_groups():
    cfg = ModelConfig(
        vocab_size=V,
        seq_len=L,
        d_model=16,
        n_heads=4,
        n_layers=1,
        attention=[["gaussian", "learned", "gaussian", "learned"]],
    )
    net = Transformer(cfg, rngs=nnx.Rngs(0))
    gaussians = [m for m in net.blocks[0].attention.mixers if type(m).__name__ == "Gaussian"]
    # Causal defaults are 0, -1, -2, -3 by head: heads 0 and 2 get 0 and -2.
    assert [g.offsets for g in gaussians] == [(0,), (-2,)]


def test_token_embeddings_are_flax_embed_with_a_chosen_variable_type():
    ours = Embed(V, D, nnx.Rngs(3))
    theirs = nnx.Embed(V, D, rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(ours.embedding[...], theirs.embedding[...])
    np.testing.assert_array_equal(ours(tokens()), theirs(tokens()))
    assert type(Embed(V, D, nnx.Rngs(3), Frozen).embedding) is Frozen
    net = Transformer(config(freeze=("token_embed", "pos_embed")), rngs=nnx.Rngs(0))
    assert type(net.token_embed.embedding) is Frozen and type(net.pos_embed) is Frozen


def test_variant_settings_are_validated_with_dotted_paths_and_reach_the_mixers():
    data = {
        "vocab_size": V,
        "seq_len": L,
        "attention": ["gaussian", "random_fixed"],
        "attention_settings": {"gaussian": {"sigma": 2.5, "offsets": [-1]}},
    }
    cfg = from_dict(ModelConfig, data, path="model")
    # Defaults are filled in for every used variant with settings, and the config round-trips.
    assert cfg.settings_of("random_fixed") == attention.RandomTableConfig()
    assert to_dict(cfg)["attention_settings"] == {
        "gaussian": {"sigma": 2.5, "offsets": [-1]},
        "random_fixed": {"scale": 1.0},
    }
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg and hash(cfg) == hash(
        from_dict(ModelConfig, to_dict(cfg))
    )
    gaussian = mixers_of(Transformer(cfg, rngs=nnx.Rngs(0)))[0][0][2]
    assert gaussian.sigma == 2.5 and gaussian.offsets == (-1,) * H

    bad = {
        "gaussian": {"sigma": 0, "width": 3},
        "lerned": {},
        "learned": {"x": 1},
        "random_fixed": {"scale": "big"},
    }
    with pytest.raises(ConfigError) as info:
        from_dict(ModelConfig, {**data, "attention_settings": bad}, path="model")
    problems = dict(info.value.problems)
    assert set(problems) == {
        "model.attention_settings.gaussian.sigma",
        "model.attention_settings.gaussian.width",
        "model.attention_settings.lerned",
        "model.attention_settings.learned",
        "model.attention_settings.random_fixed.scale",
    }
    assert "'learned' has no settings" in problems["model.attention_settings.learned"]


def test_validation_does_not_expand_the_attention_spec_per_head(monkeypatch):
    """A huge n_layers (as a fuzzed file gives) is validated without building n_layers x
    n_heads names first: the settings of the used variants are read from the spec itself."""

    def expanded(self):
        raise AssertionError("head_variants called during validation")

    monkeypatch.setattr(ModelConfig, "head_variants", expanded)
    cfg = ModelConfig(vocab_size=8, seq_len=4, n_layers=2**31, attention="random_fixed")
    assert list(cfg.attention_settings) == ["random_fixed"]
