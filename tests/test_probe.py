"""Post-hoc head ablation: exactness, equivalences, gate gradients, behaviour, outputs, errors.

One small assoc_recall model is trained once (module fixture) and probed by every test.
"""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ablate import probe
from ablate.cli import main
from ablate.config import ConfigError
from ablate.core import Definition
from ablate.metrics import token_metrics
from ablate.runfolder import CONFIG_FILE, FINAL_FILE
from ablate.train import train
from tests.test_train import tiny

# Measured: eval accuracy 0.95 at step 150 and 1.0 at step 200 (one-hop recall, 4 values).
TRAINED = {
    "task.n_pairs": 4,
    "task.n_keys": 16,
    "task.n_values": 4,
    "train.steps": 200,
    "train.batch_size": 32,
    "train.steps_per_dispatch": 50,
    "train.log_every": 50,
    "train.checkpoint_every": 200,
    "train.eval_batches": 2,
    "train.gradient_alignment": False,
}
N, H = 2, 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "run"
    train(tiny(**TRAINED), path, progress=False)
    return path


@pytest.fixture(scope="module")
def probed(run_dir):
    """Every kind on every single head, importance and pruning: one probe of the run."""
    return probe.probe_run(run_dir)


@pytest.fixture(scope="module")
def prober(run_dir):
    exp, state, _ = probe.load_run(run_dir)
    return probe.Prober.of_run(exp, state.params, state.rest)


def single(layer, head):
    mask_1NH = np.zeros((1, N, H), np.float32)
    mask_1NH[0, layer, head] = 1.0
    return mask_1NH


def rows_of(probed, kind):
    return {r["heads"]: r for r in probed["rows"] if r["kind"] == kind}


def test_ablating_nothing_reproduces_the_unablated_metric(run_dir, probed, prober):
    final = json.loads((run_dir / FINAL_FILE).read_text())["final"]
    # Training's own held-out evaluation is the reference.
    assert probed["baseline"]["accuracy"][0] == final["accuracy"][0]
    assert probed["baseline"]["loss"][0] == pytest.approx(final["loss"][0], rel=1e-6)
    nothing_1NH = np.zeros((1, N, H), np.float32)
    for kind in probe.KINDS:
        m = prober.ablate(kind, nothing_1NH)
        assert m["accuracy"][0, 0] == final["accuracy"][0], kind
        assert m["loss"][0, 0] == pytest.approx(final["loss"][0], rel=1e-6), kind
    # A real ablation does move the metric (the comparisons above are not vacuous).
    assert prober.ablate("zero", single(0, 0))["loss"][0, 0] > final["loss"][0] + 0.1


def silenced(run_dir, layers):
    """Per layer, eval loss/accuracy of the plain model (no ablation hook) with its W_o zeroed."""
    exp, state, _ = probe.load_run(run_dir)
    definition = Definition.of(exp)

    def trained():
        first = [jax.tree.map(lambda x: x[0], s) for s in (state.params, state.rest)]
        return definition.merge(*first)

    graphdef = nnx.graphdef(trained())

    @jax.jit
    def evaluate(weights, i):
        key = jax.random.fold_in(jax.random.PRNGKey(exp.train.eval_seed), i)
        batch = exp.task.sample(key, exp.train.batch_size)
        logits = nnx.merge(graphdef, weights)(batch.inputs).logits
        return token_metrics(logits, batch.targets, batch.weights)

    found = []
    for layer in layers:
        model = trained()
        w_o = model.blocks[layer].attention.w_o
        w_o[...] = np.zeros(w_o.shape, np.float32)
        per_batch = [evaluate(nnx.state(model), i) for i in range(exp.train.eval_batches)]
        found.append({k: float(np.mean([m[k] for m in per_batch])) for k in ("loss", "accuracy")})
    return found


def test_zero_on_every_head_of_a_layer_equals_a_silent_attention_sublayer(run_dir, probed, prober):
    drops = []
    for layer, expected in enumerate(silenced(run_dir, range(N))):
        layer_1NH = np.zeros((1, N, H), np.float32)
        layer_1NH[0, layer] = 1.0
        m = prober.ablate("zero", layer_1NH)
        assert m["loss"][0, 0] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-6)
        assert m["accuracy"][0, 0] == pytest.approx(expected["accuracy"], abs=1e-6)
        drops.append(probed["baseline"]["loss"][0] - expected["loss"])
    assert min(drops) < -0.5  # silencing layer 0 really breaks recall


def test_vmapped_single_head_ablations_equal_one_at_a_time(probed, prober):
    scored = 2 * 32  # eval_batches x batch_size scored tokens: one flipped argmax at most
    for kind in probe.KINDS:
        together = rows_of(probed, kind)
        losses = []
        for layer in range(N):
            for head in range(H):
                alone = prober.ablate(kind, single(layer, head))
                row = together[f"{layer}:{head}"]
                assert alone["loss"][0, 0] == pytest.approx(row["loss"], rel=1e-5), (kind, layer)
                assert abs(alone["accuracy"][0, 0] - row["accuracy"]) <= 1.0 / scored + 1e-7
                losses.append(row["loss"])
        # Heads differ, so a mix-up of rows would show.
        assert np.ptp(losses) > 1e-3, kind


def test_importance_is_per_example_where_the_batch_mean_gradient_cancels():
    # Two batches of five examples. Gate (0, 1): examples pull it with slope +c or -c in
    # pairs, so every batch-mean gradient is 0 there; gate (1, 0): all pull one way, slope c.
    # The fifth example of each batch scores nothing: it must not count, however large.
    sign_EB = np.array([[1, -1, 1, -1, 1], [-1, 1, -1, 1, 1]], np.float32)
    c_EB = np.array([[1.0, 1.0, 2.0, 2.0, 100.0], [3.0, 3.0, 0.5, 0.5, 100.0]], np.float32)
    counted_EB = np.array([[True] * 4 + [False]] * 2)

    def loss(gate_NH, example):
        sign, c = example
        return sign * c * gate_NH[0, 1] + 0.5 * c * gate_NH[1, 0] ** 2 + jnp.tanh(gate_NH[1, 1])

    gate_NH = jnp.ones((N, H))
    gradient_NH, importance_NH = jax.jit(
        lambda: probe.per_example_gate_importance(loss, gate_NH, (sign_EB, c_EB), counted_EB)
    )()
    # Independently: jax.grad example by example, in a Python loop.
    grads_XNH = np.stack(
        [
            jax.grad(loss)(gate_NH, (sign_EB[e, b], c_EB[e, b]))
            for e in range(2)
            for b in range(5)
            if counted_EB[e, b]
        ]
    )
    np.testing.assert_allclose(importance_NH, np.abs(grads_XNH).mean(0), rtol=1e-6)
    np.testing.assert_allclose(gradient_NH, grads_XNH.mean(0), rtol=1e-6, atol=1e-7)
    mean_c = c_EB[counted_EB].mean()
    assert importance_NH[0, 1] == pytest.approx(mean_c) and importance_NH[1, 0] == pytest.approx(
        mean_c
    )
    assert importance_NH[1, 1] == pytest.approx(1 - np.tanh(1.0) ** 2) and importance_NH[0, 0] == 0
    # |the batch-mean gradient| (the old importance) sees nothing on gate (0, 1).
    old_E = [
        jax.grad(
            lambda g, e=e: jnp.mean(jax.vmap(loss, (None, 0))(g, (sign_EB[e, :4], c_EB[e, :4])))
        )(gate_NH)[0, 1]
        for e in range(2)
    ]
    assert np.abs(old_E).max() < 1e-6 and gradient_NH[0, 1] == pytest.approx(0, abs=1e-6)


def ranking_losses(prober, gate_NH):
    """Every ranking-batch sequence's loss (E, B) under `gate_NH`: plain batched forwards."""
    params, rest = (jax.tree.map(lambda x: x[0], s) for s in (prober.params, prober.rest))
    model = nnx.merge(prober.graphdef, params, rest)
    no_mix_RNH = jnp.zeros((len(probe.SOURCES), N, H))

    @jax.jit
    def losses(gate_NH, batch):
        inputs_BL, targets_BL, weights_BL = batch
        ablated = prober._edited(model, gate_NH, no_mix_RNH, None, None)
        ce_BL = optax.softmax_cross_entropy_with_integer_labels(
            ablated(inputs_BL).logits, targets_BL
        )
        return (ce_BL * weights_BL).sum(-1) / jnp.maximum(weights_BL.sum(-1), 1.0)

    batches = zip(*(np.asarray(x) for x in prober.ranking_batches[:3]))  # valid: None
    return np.stack([losses(jnp.asarray(gate_NH, jnp.float32), b) for b in batches])


def test_gate_gradient_importance_matches_per_example_finite_differences(probed, prober):
    eps = 1e-2
    fd_EBNH = np.zeros((*prober.ranking_batches[0].shape[:2], N, H))
    for layer in range(N):
        for head in range(H):
            losses = []
            for sign in (1, -1):
                gate_NH = np.ones((N, H), np.float32)
                gate_NH[layer, head] += sign * eps
                losses.append(ranking_losses(prober, gate_NH))
            fd_EBNH[..., layer, head] = (losses[0] - losses[1]) / (2 * eps)
    fd_XNH = fd_EBNH[np.asarray(prober.ranking_batches[2]).sum(-1) > 0]
    gradient_NH = np.asarray(probed["gradient"][0])
    importance_NH = np.asarray(probed["importance"][0])
    np.testing.assert_allclose(gradient_NH, fd_XNH.mean(0), rtol=3e-2, atol=2e-4)
    np.testing.assert_allclose(importance_NH, np.abs(fd_XNH).mean(0), rtol=3e-2, atol=2e-4)
    assert np.abs(gradient_NH).max() > 1e-2
    # Per-example gradients of this trained model do disagree in sign: E|g| > |E g| clearly
    # on some head, so the two assertions above tell the two definitions apart.
    assert np.all(importance_NH >= np.abs(gradient_NH) - 1e-7)
    assert (importance_NH - np.abs(gradient_NH)).max() > 1e-3


def test_heads_are_ranked_on_batches_held_out_from_the_measured_ones(run_dir, probed, prober):
    ranking, measured = (np.asarray(b[0]) for b in (prober.ranking_batches, prober.eval_batches))
    assert ranking.shape == measured.shape
    for other in (measured, np.asarray(prober.reference_batches[0])):
        assert (ranking != other).any(-1).mean() > 0.9  # nearly every sequence differs
    # The published importance is the ranking batches', not the eval batches'.
    _, on_eval_ZNH = jax.device_get(
        prober._gradients(prober.params, prober.rest, prober.eval_batches)
    )
    np.testing.assert_allclose(probed["importance"], prober.gate_gradients()[1], rtol=1e-6)
    assert not np.allclose(probed["importance"], on_eval_ZNH, rtol=0.05)

    # The pruning curve is measured on the eval batches: it starts at training's unablated
    # eval accuracy, and every point is the eval-batch accuracy of that prefix removed.
    final = json.loads((run_dir / FINAL_FILE).read_text())["final"]
    curve = np.asarray(probed["pruning"]["accuracy_importance_order"][0])
    assert curve[0] == final["accuracy"][0]
    flat = [
        int(n) * H + int(h)
        for n, h in (x.split(":") for x in probed["pruning"]["importance_order"][0])
    ]
    prefix_XNH = probe._prefix_masks(np.asarray(flat), N, H)
    gate_1PNH, mix_1PRNH = prober.edits(["zero"] * len(prefix_XNH), prefix_XNH)
    on_eval = prober.evaluate(gate_1PNH, mix_1PRNH)["accuracy"][0]
    data = (prober.ranking_batches, prober.reference_batches, prober.fixed_patterns)
    on_ranking = jax.device_get(
        prober._evaluate(prober.params, prober.rest, gate_1PNH, mix_1PRNH, *data)
    )
    np.testing.assert_allclose(curve, on_eval, atol=1e-6)
    # The batch sets disagree (per batch (E, X): their mean over the ranking batches).
    assert np.abs(curve - on_ranking["accuracy"][0].mean(0)).max() > 1e-3

    saved = json.loads((run_dir / "probe" / "probe.json").read_text())
    assert (
        "ranking stream" in saved["importance_batches"]
        and "held out" in saved["importance_batches"]
    )
    assert "pruning" in saved["measured_batches"]


def test_most_important_head_hurts_more_than_the_least_important(probed):
    assert probed["baseline"]["accuracy"][0] > 0.9  # the model did learn the task
    importance_NH = np.asarray(probed["importance"][0])
    most = np.unravel_index(importance_NH.argmax(), importance_NH.shape)
    least = np.unravel_index(importance_NH.argmin(), importance_NH.shape)
    zero = rows_of(probed, "zero")
    drop_most = zero[f"{most[0]}:{most[1]}"]["accuracy_drop"]
    drop_least = zero[f"{least[0]}:{least[1]}"]["accuracy_drop"]
    assert drop_most > drop_least + 0.1
    # The pruning curve starts at the baseline, and removing the least important head is cheap.
    curve = probed["pruning"]["accuracy_importance_order"][0]
    assert len(curve) == N * H + 1 and curve[0] == probed["baseline"]["accuracy"][0]
    assert curve[1] >= curve[0] - 0.05
    assert probed["pruning"]["importance_order"][0][0] == f"{least[0]}:{least[1]}"


def test_outputs_table_plots_and_tensorboard_images(run_dir, probed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run_dir / "probe"
    saved = json.loads((out / "probe.json").read_text())
    assert saved["baseline"] == probed["baseline"]
    assert np.asarray(saved["drop"]["zero"]).shape == (1, N, H)
    with (out / "probe.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(probe.KINDS) * N * H
    assert {r["kind"] for r in table} == set(probe.KINDS)
    for name in ["pruning.png"] + [f"drop_{k}.png" for k in probe.KINDS]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name

    # Writing again (a rerun) must not put a second image at the same step.
    drop = {k: np.asarray(v, dtype=float) for k, v in probed["drop"].items()}
    pruning = np.concatenate(
        [
            np.asarray(probed["pruning"][k])
            for k in ("accuracy_importance_order", "accuracy_random_order")
        ],
        axis=1,
    )
    probe._write_tensorboard(run_dir, probed, drop, pruning)
    events = EventAccumulator(str(run_dir / "seed_0"), size_guidance={"tensors": 0})
    events.Reload()
    for tag in [f"probe/{k}" for k in probe.KINDS] + ["probe/pruning"]:
        assert [e.step for e in events.Tensors(tag)] == [probed["step"]], tag


def test_bad_heads_kinds_seeds_and_folders_get_clear_errors(run_dir, tmp_path, capsys):
    cases = {
        "5:0": "layer 5 does not exist; the model has layers 0..1",
        "0:7": "head 7 of layer 0 does not exist; layers have heads 0..1",
        "0-1": "is not LAYER:HEAD",
    }
    for heads, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            probe.probe_run(run_dir, heads=heads)
    with pytest.raises(ConfigError, match="'blur'.*choose from zero, mean"):
        probe.probe_run(run_dir, kinds="zero,blur")
    with pytest.raises(ConfigError, match=r"\[3\] not trained in this run; it has seeds \[0\]"):
        probe.probe_run(run_dir, seeds=[3])

    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / CONFIG_FILE).write_text((run_dir / CONFIG_FILE).read_text())
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        probe.load_run(empty)
    with pytest.raises(ConfigError, match="does not exist"):
        probe.load_run(tmp_path / "nowhere")

    # Through the real CLI: the same error, exit code 2, nothing compiled.
    assert main(["probe", str(run_dir), "--heads", "2:0"]) == 2
    assert "layer 2 does not exist" in capsys.readouterr().err


def test_the_probe_command_prints_the_baseline_and_the_largest_drops(
    run_dir, probed, tmp_path, capsys
):
    out = tmp_path / "cli"
    assert main(["probe", str(run_dir), "--kinds", "zero", "--seeds", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    accuracy = probed["baseline"]["accuracy"][0]
    assert printed[0] == f"probe of {run_dir} at step 200 (chance {probed['chance']:.3f})"
    assert printed[1].startswith(f"  seed 0: accuracy {accuracy:.3f}; heads by importance ")
    # The largest drop first (its head may differ among tied heads): as the full probe found.
    top = max(r["accuracy_drop"] for r in probed["rows"] if r["kind"] == "zero")
    prefix = "  zero         largest accuracy drops: "
    assert printed[2].startswith(prefix)
    first = printed[2].removeprefix(prefix).split(",")[0]
    assert first.split()[1] == f"{top:+.3f}"
    assert printed[3] == f"table and plots: {out}" and (out / "probe.json").is_file()

    assert main(["probe", str(run_dir), "--seeds", "0,a"]) == 2
    assert "'0,a' is not a comma-separated list of integers" in capsys.readouterr().err


@pytest.mark.slow
def test_heads_without_a_pattern_and_several_seeds(tmp_path):
    # A fourier head (no pattern) beside learned ones, two seeds trained together.
    over = {
        "model.causal": False,
        "model.attention": [["fourier", "learned"], "learned"],
        "train.seeds": [0, 1],
        "train.steps": 50,
        "train.steps_per_dispatch": 50,
        "train.log_every": 50,
        "train.checkpoint_every": 50,
    }
    train(tiny(**over), tmp_path / "run", progress=False)
    both = probe.probe_run(tmp_path / "run", kinds="zero,uniform,resample")
    drop = {k: np.asarray(v, dtype=float) for k, v in both["drop"].items()}
    assert drop["uniform"].shape == (2, N, H)
    assert np.isnan(drop["uniform"][:, 0, 0]).all() and np.isnan(drop["resample"][:, 0, 0]).all()
    assert np.isfinite(drop["uniform"][:, 0, 1]).all() and np.isfinite(drop["zero"]).all()
    saved = json.loads((tmp_path / "run" / "probe" / "probe.json").read_text())
    assert saved["drop"]["uniform"][0][0][0] is None  # NaN is written as null (valid JSON)

    # Seed 1 probed alone matches seed 1 probed beside seed 0.
    alone = probe.probe_run(tmp_path / "run", kinds="zero", seeds=[1], out_dir=tmp_path / "one")
    assert alone["baseline"]["loss"][0] == pytest.approx(both["baseline"]["loss"][1], rel=1e-5)
    np.testing.assert_allclose(alone["importance"][0], both["importance"][1], rtol=1e-4, atol=1e-7)
    assert not np.allclose(both["importance"][0], both["importance"][1])


def test_a_padded_bidirectional_model_is_probed_with_its_padding_masked(tmp_path):
    """The probe draws training's eval batches with their validity mask: ablating nothing on
    a padded, bidirectional classifier gives the training evaluation's numbers, which the
    same model read without the mask (what the probe used to do) does not."""
    from ablate.core import Programs
    from ablate.experiment import build_experiment

    texts = ["ok", "a longer text here", "mid size", "x", "another one of them", "tiny"] * 4
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"text": t, "label": len(t) % 2}) + "\n" for t in texts))
    exp = build_experiment(
        {
            "task": {
                "name": "text_classification",
                "source": str(source),
                "train_split": "train",
                "eval_split": "train",
                "seq_len": 24,
            },
            "model": {"d_model": 16, "n_heads": 2, "n_layers": 1, "causal": False},
            "train": {"steps": 10, "batch_size": 8, "steps_per_dispatch": 10, "eval_batches": 2,
                      "log_every": 10, "checkpoint_every": 10, "compile_cache": False},
        }
    )  # fmt: skip
    programs, data = Programs(exp), exp.task.load()
    state = programs.init()
    evaluated = programs.evaluate(state, programs.place(data.arrays))
    prober = probe.Prober.of_run(exp, state.params, state.rest, data)
    nothing = prober.ablate("zero", np.zeros((1, 1, 2), np.float32))
    assert nothing["loss"][0, 0] == pytest.approx(evaluated["loss"][0], rel=1e-6)

    inputs_EBL, targets_EBL, weights_EBL, valid_EBL = prober.eval_batches
    assert not np.asarray(valid_EBL).all()  # the batches are padded
    model = Definition.of(exp).merge(
        *(jax.tree.map(lambda x: x[0], s) for s in (state.params, state.rest))
    )
    unmasked = np.mean(
        [
            token_metrics(model(inputs_EBL[e]).logits, targets_EBL[e], weights_EBL[e])["loss"]
            for e in range(exp.train.eval_batches)
        ]
    )
    assert abs(unmasked - evaluated["loss"][0]) > 0.01  # the mask does move the numbers

    # A replacement pattern attends only to the batch's unpadded positions: the probe's
    # "uniform" on every head equals every head averaging its visible positions, built here by
    # hand through the mixer edit, and differs from averaging padding too.
    from ablate.ablation import edited
    from ablate.attention import normalize_rows
    from ablate.model import visibility

    N, H, L, K = 1, 2, exp.task.seq_len, exp.model.head_dim
    probed = prober.ablate("uniform", np.ones((1, N, H), np.float32))["loss"][0, 0]

    def uniform_loss(mask_padding: bool) -> float:
        losses = []
        for e in range(exp.train.eval_batches):
            B = inputs_EBL.shape[1]
            valid = valid_EBL[e] if mask_padding else None
            visible_BLS = visibility(L, False, valid, B)
            fill = normalize_rows(jnp.ones((B, H, L, L)), visible_BLS)[None]
            ones, zeros = jnp.ones((N, H)), jnp.zeros((N, H))
            averaged = edited(model, ones, ones, fill, zeros, jnp.zeros((N, 1, L, H, K)))
            logits = averaged(inputs_EBL[e], valid_BL=valid_EBL[e]).logits
            losses.append(token_metrics(logits, targets_EBL[e], weights_EBL[e])["loss"])
        return float(np.mean(losses))

    assert probed == pytest.approx(uniform_loss(mask_padding=True), rel=1e-5)
    assert abs(probed - uniform_loss(mask_padding=False)) > 1e-3
