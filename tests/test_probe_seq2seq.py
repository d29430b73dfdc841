"""Post-hoc head ablation of an encoder-decoder: every head of its three kinds of attention
is probed, zero ablations equal silenced sublayers built by hand, a replacement pattern in
cross-attention keeps off padded source positions, and bad head names are refused early.

One tiny reverse_copy run (one encoder and one decoder layer of 2 heads) is trained once
(module fixture) and probed by every test.
"""

import csv
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ablate import heads, probe
from ablate.ablation import edited
from ablate.attention import normalize_rows
from ablate.cli import main
from ablate.config import ConfigError
from ablate.core import Definition, eval_batch
from ablate.metrics import token_metrics
from ablate.runfolder import FINAL_FILE, PROBE_RECORD
from ablate.seq2seq import cross_visibility
from ablate.train import train
from tests.test_seq2seq_train import tiny

TRAINED = {
    "task": {"name": "reverse_copy", "n_items": 4, "min_items": 2, "n_symbols": 5},
    "train.seeds": [0],
    "train.steps": 60,
    "train.steps_per_dispatch": 60,
    "train.log_every": 60,
    "train.eval_every": 0,
    "train.checkpoint_every": 60,
    "train.heatmap_every": 0,
    "train.eval_batches": 2,
    "train.gradient_alignment": False,
}
H = 2
PARTS = ("encoder", "decoder", "cross")
HEADS = [f"{part}:0:{h}" for part in PARTS for h in range(H)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe_s2s") / "run"
    train(tiny(**TRAINED), path, progress=False)
    return path


@pytest.fixture(scope="module")
def probed(run_dir):
    """Every kind on every single head of every part, importance and pruning."""
    return probe.probe_run(run_dir)


@pytest.fixture(scope="module")
def prober(run_dir):
    exp, state, _ = probe.load_run(run_dir)
    return probe.Prober.of_run(exp, state.params, state.rest)


def masks(prober, *names):
    """One mask row (A, N, H) per named set of heads, read by the probe's own parser."""
    return probe._masks(heads.parse_heads(",".join(names), prober.parts, H), prober.N, H)


# The rows of the `probed` fixture's one call: the baseline, every head under every kind,
# both pruning curves. Edits padded to this many rows run the program compiled there (the
# persistent compilation cache), not a second compile of their own.
PROBE_ROWS = 1 + len(HEADS) * len(probe.KINDS) + 2 * (len(HEADS) + 1)


def edits(prober, kind, masks_ANH):
    """(gate_ZANH, mix_ZARNH) ablating the heads of each mask row by `kind`, then rows that
    ablate nothing up to `PROBE_ROWS`."""
    padded_ANH = np.zeros((PROBE_ROWS, *masks_ANH.shape[1:]), np.float32)
    padded_ANH[: len(masks_ANH)] = masks_ANH
    return (jnp.asarray(x) for x in prober.edits([kind] * PROBE_ROWS, padded_ANH))


@pytest.fixture(scope="module")
def by_hand(run_dir):
    """Eval metrics of the plain model (no ablation hook) with some heads' W_o rows zeroed,
    on training's eval batches, fed as training feeds them (`Definition.forward`)."""
    exp, state, _ = probe.load_run(run_dir)
    definition = Definition.of(exp)
    first = [jax.tree.map(lambda x: x[0], s) for s in (state.params, state.rest)]
    eval_key, arrays = jax.random.PRNGKey(exp.train.eval_seed), exp.task.load().arrays

    @jax.jit
    def evaluate(params):
        model = definition.merge(params, first[1])

        def one(i):
            batch = eval_batch(exp.task, arrays, eval_key, i, exp.train.batch_size)
            out = definition.forward(model, batch, batch.valid)
            return token_metrics(out.logits, batch.targets, batch.weights)

        per_batch = jax.lax.map(one, jnp.arange(exp.train.eval_batches))
        return jax.tree.map(lambda x: x.mean(0), per_batch)

    def silenced(where):
        """`where(model)` lists (attention sublayer, heads) whose output projection is zeroed."""
        # A merged model shares its variables with the state it was merged from: edit a copy.
        model = definition.merge(*jax.tree.map(jnp.copy, first))
        for attention, chosen in where(model):
            w_o = np.array(attention.w_o[...])
            w_o[chosen] = 0.0
            attention.w_o[...] = w_o
        return {k: float(v) for k, v in evaluate(nnx.state(model, nnx.Param)).items()}

    return silenced


def test_every_head_of_every_kind_of_attention_is_a_row_of_the_table(run_dir, probed):
    final = json.loads((run_dir / FINAL_FILE).read_text())["final"]
    # Training's own held-out evaluation is the reference: the same batches, the same source.
    assert probed["baseline"]["accuracy"][0] == final["accuracy"][0]
    assert probed["baseline"]["loss"][0] == pytest.approx(final["loss"][0], rel=1e-6)

    out = run_dir / "probe"
    with (out / "probe.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:4] == ["kind", "seed", "part", "heads"]
    for kind in probe.KINDS:
        rows = [r for r in table if r["kind"] == kind]
        assert [r["heads"] for r in rows] == HEADS, kind
        assert [r["part"] for r in rows] == [h.split(":")[0] for h in HEADS]
        assert all(np.isfinite(float(r["loss"])) for r in rows), kind  # every head has a pattern
    zero = [float(r["loss"]) for r in table if r["kind"] == "zero"]
    assert np.ptp(zero) > 1e-3  # the heads differ: a mix-up of rows would show

    saved = json.loads((out / "probe.json").read_text())
    assert saved["parts"] == {
        "encoder": "encoder self-attention",
        "decoder": "decoder self-attention",
        "cross": "cross-attention",
    }
    for field in ("importance", "gradient"):
        assert {p: np.shape(v) for p, v in saved[field].items()} == {p: (1, 1, H) for p in PARTS}
    assert {p: np.shape(v) for p, v in saved["drop"]["uniform"].items()} == {
        p: (1, 1, H) for p in PARTS
    }
    # One ranking over the heads of all parts; the curve has a point per head removed.
    assert sorted(saved["pruning"]["importance_order"][0]) == sorted(HEADS)
    assert len(saved["pruning"]["accuracy_importance_order"][0]) == len(HEADS) + 1
    for name in ["pruning.png"] + [f"drop_{k}.png" for k in probe.KINDS]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    written = json.loads((run_dir / "seed_0" / PROBE_RECORD).read_text())
    assert sorted(tag for _, tag in written) == sorted(
        f"probe/{t}" for t in (*probe.KINDS, "pruning")
    )


def test_zero_on_all_cross_attention_heads_equals_a_silent_cross_attention(probed, prober, by_hand):
    rows = ["cross:0:*", "decoder:0:*", "encoder:0:*"]
    ablated = prober.evaluate(*edits(prober, "zero", masks(prober, *rows)))
    found = {}
    for a, (name, where) in enumerate(
        [
            (rows[0], lambda m: [(b.cross_attention, slice(None)) for b in m.blocks]),
            (rows[1], lambda m: [(b.attention, slice(None)) for b in m.blocks]),
            (rows[2], lambda m: [(b.attention, slice(None)) for b in m.encoder]),
        ]
    ):
        expected = by_hand(where)
        assert ablated["loss"][0, a] == pytest.approx(expected["loss"], rel=1e-5), name
        assert ablated["accuracy"][0, a] == pytest.approx(expected["accuracy"], abs=1e-6), name
        found[name] = expected["loss"]
    # Not vacuous: silencing cross-attention moves the loss, and differently from silencing
    # another part (rows of the wrong part would not match).
    baseline = probed["baseline"]["loss"][0]
    assert abs(found["cross:0:*"] - baseline) > 1e-2
    assert abs(found["cross:0:*"] - found["decoder:0:*"]) > 1e-2

    # Single heads through the table: its names point at the heads they say.
    table = {r["heads"]: r for r in probed["rows"] if r["kind"] == "zero"}
    for name, where in [
        ("cross:0:1", lambda m: [(m.blocks[0].cross_attention, 1)]),
        ("encoder:0:0", lambda m: [(m.encoder[0].attention, 0)]),
    ]:
        assert table[name]["loss"] == pytest.approx(by_hand(where)["loss"], rel=1e-5), name


def test_uniform_cross_attention_ignores_padded_source_positions(prober):
    batches = prober.eval_batches
    inputs, targets, weights, valid, source, source_valid = (np.asarray(x) for x in batches)
    assert not source_valid.all()  # some sources are padded
    # Other ids at the padded positions, the padding mask kept: the encoder's outputs there
    # change, which only a pattern that attends to padding could read.
    other_ids = np.random.default_rng(0).integers(1, 6, source.shape)
    noisy = jnp.asarray(np.where(source_valid, source, other_ids), batches[4].dtype)
    assert (np.asarray(noisy) != source).sum() > 5
    noisy_batches = (*batches[:4], noisy, batches[5])
    gate, mix = edits(prober, "uniform", masks(prober, "cross:0:0", "cross:0:1", "cross:0:*"))

    def probed_loss(batches):
        data = (batches, prober.reference_batches, prober.fixed_patterns)
        per_batch = prober._evaluate(prober.params, prober.rest, gate, mix, *data)["loss"][0]
        return np.asarray(per_batch).mean(0)  # (E, A): the mean over the eval batches

    clean = probed_loss(batches)
    np.testing.assert_allclose(probed_loss(noisy_batches), clean, rtol=1e-6)

    # Independently: every cross head averaging the real source positions, built through the
    # mixer edit, gives the probe's number; averaging every source position (padding too)
    # does read the padded ids, so the comparison above could fail.
    model = nnx.merge(
        prober.graphdef, *(jax.tree.map(lambda x: x[0], s) for s in (prober.params, prober.rest))
    )
    E, B, L = inputs.shape
    S, K = source.shape[-1], prober.head_dim
    ones_1H, zeros_1H = jnp.ones((1, H)), jnp.zeros((1, H))

    @jax.jit
    def uniform_loss(source_EBS, visible_EBLS):
        def one(batch):
            source_BS, inputs_BL, targets_BL, weights_BL, valid_BL, source_valid_BS, visible_BLS = (
                batch
            )
            fill_1BHLS = normalize_rows(jnp.ones((B, H, L, S)), visible_BLS)[None]
            output_11LHK = jnp.zeros((1, 1, L, H, K))
            averaged = edited(
                model, ones_1H, ones_1H, fill_1BHLS, zeros_1H, output_11LHK, part="cross_attention"
            )
            logits = averaged(
                source_BS, inputs_BL, source_valid_BS=source_valid_BS, valid_BL=valid_BL
            ).logits
            return token_metrics(logits, targets_BL, weights_BL)["loss"]

        batches = (source_EBS, inputs, targets, weights, valid, source_valid, visible_EBLS)
        return jax.lax.map(one, batches).mean()

    real_EBLS = jax.vmap(lambda s, v: cross_visibility(s, v, L, S, B))(source_valid, valid)
    every_EBLS = jnp.ones((E, B, L, S), bool)
    assert clean[2] == pytest.approx(float(uniform_loss(source, real_EBLS)), rel=1e-5)
    unmasked = float(uniform_loss(source, every_EBLS)), float(uniform_loss(noisy, every_EBLS))
    assert abs(unmasked[0] - unmasked[1]) > 1e-4


def test_bad_heads_of_an_encoder_decoder_name_the_allowed_form(run_dir, monkeypatch, capsys):
    def nothing_before_refusing(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded or a program built before refusing")

    monkeypatch.setattr(probe, "load_run", nothing_before_refusing)
    monkeypatch.setattr(probe, "Prober", nothing_before_refusing)
    form = "PART:LAYER:HEAD with PART one of encoder, decoder, cross (e.g. cross:0:1"
    cases = {
        "0:1": f"'0:1' is not {form}",  # the decoder-only form
        "cross:0": f"'cross:0' is not {form}",
        "decoder:x:0": f"'decoder:x:0' is not {form}",
        "attn:0:1": f"part 'attn' does not exist; {form}",
        "cross:1:0": "cross layer 1 does not exist; cross has layers 0..0",
        "encoder:0:2": "head 2 of encoder layer 0 does not exist; layers have heads 0..1",
    }
    for spec, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            probe.probe_run(run_dir, heads=spec)
    # Through the real CLI: the same error, exit code 2.
    assert main(["probe", str(run_dir), "--heads", "1:0"]) == 2
    assert f"'1:0' is not {form}" in capsys.readouterr().err

    # What is allowed parses to rows of the layer axis, and its names read back the same.
    parts = heads.parts_of(probe.read_experiment(run_dir))
    groups = heads.parse_heads("encoder:0:1,cross:0:*+decoder:0:0", parts, H)
    assert groups == [((0, 1),), ((2, 0), (2, 1), (1, 0))]
    assert [heads.group_name(g, parts) for g in groups] == [
        "encoder:0:1",
        "cross:0:0+cross:0:1+decoder:0:0",
    ]
