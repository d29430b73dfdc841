"""Training: learning, seed vmapping, scan, freezing, resume, logs, bad input."""

import base64
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ablate.attention import Fixed, Frozen
from ablate.cli import main
from ablate.config import ConfigError
from ablate.core import Programs
from ablate.experiment import TrainConfig, build_experiment
from ablate.runfolder import PATTERNS_FILE, PATTERNS_INIT_FILE, read_jsonl
from ablate.train import train


def tiny(**over):
    """A small assoc_recall experiment; `over` maps dotted paths to values."""
    data = {
        "name": "tiny",
        "task": {"name": "assoc_recall", "n_pairs": 4, "n_keys": 4, "n_values": 4},
        "model": {"d_model": 32, "n_heads": 2, "n_layers": 2},
        "optim": {"learning_rate": 3e-3, "warmup_steps": 10},
        "train": {
            "steps": 20,
            "batch_size": 16,
            "seeds": [0],
            "steps_per_dispatch": 10,
            "log_every": 10,
            "eval_every": 0,
            "eval_batches": 2,
            "checkpoint_every": 10,
            "compile_cache": False,
            "gradient_alignment": False,  # on where a test reads it
        },
    }
    for dotted, value in over.items():
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return build_experiment(data)


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def run_steps(exp):
    programs = Programs(exp)
    state = programs.init()
    for _ in range(exp.train.steps // exp.train.steps_per_dispatch):
        state, _ = programs.train_chunk(state, ())  # a synthetic task: no arrays
    return state


@pytest.mark.slow
def test_learned_beats_chance_and_uniform_falls_far_behind(tmp_path):
    # 8 pairs drawn from 32 keys: measured, uniform averaging reaches ~0.3 here while learned
    # attention solves it. (With only 8 keys, the bag of pair tokens fits in d_model and uniform
    # attention + MLP reaches ~0.75: averaging is not always as weak as one expects.)
    over = {
        "task.n_pairs": 8,
        "task.n_keys": 32,
        "task.n_values": 8,
        "model.d_model": 64,
        "model.n_heads": 4,
        "train.steps": 400,
        "train.batch_size": 64,
        "train.steps_per_dispatch": 50,
        "train.log_every": 50,
        "train.checkpoint_every": 400,
        "train.eval_batches": 4,
    }
    learned = train(tiny(**over), tmp_path / "learned", progress=False)
    uniform = train(tiny(**over, **{"model.attention": "uniform"}), tmp_path / "u", progress=False)
    chance = learned.chance
    assert chance == pytest.approx(1 / 8)
    assert learned.final["accuracy"][0] > 0.9
    assert uniform.final["accuracy"][0] < learned.final["accuracy"][0] - 0.4
    rows = [
        json.loads(x) for x in (tmp_path / "learned" / "metrics.jsonl").read_text().splitlines()
    ]
    train_loss = [r["loss"] for r in rows if r["kind"] == "train"]
    assert train_loss[-1] < 0.2 * train_loss[0]
    # Learned heads attend to the dependency positions far more than uniform attention would.
    best = np.nanmax(np.asarray(learned.final["alignment"][0], dtype=float))
    assert best > learned.final["uniform_alignment"][0] + 0.2


def test_vmapped_seeds_equal_separate_runs():
    together = run_steps(tiny(**{"train.seeds": [3, 7]}))
    for k, seed in enumerate([3, 7]):
        alone = run_steps(tiny(**{"train.seeds": [seed]}))
        for a, b in zip(leaves(together.params), leaves(alone.params)):
            np.testing.assert_allclose(a[k], b[0], rtol=2e-5, atol=2e-6)
    # The two seeds really differ (the comparison above is not trivially true).
    p = leaves(together.params)[0]
    assert not np.allclose(p[0], p[1])


def test_scanned_steps_equal_looped_steps():
    scanned = run_steps(tiny(**{"train.steps_per_dispatch": 10}))
    looped = run_steps(
        tiny(**{"train.steps_per_dispatch": 1, "train.log_every": 1, "train.checkpoint_every": 1})
    )
    for a, b in zip(leaves(scanned.params), leaves(looped.params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    assert int(scanned.step[0]) == int(looped.step[0]) == 20


def test_frozen_and_fixed_state_unchanged_by_training():
    exp = tiny(**{"model.attention": [["frozen", "random_fixed"], ["learned", "synthesizer"]]})
    before = Programs(exp).init()
    rest_before = leaves(before.rest)
    params_before = leaves(before.params)
    after = run_steps(exp)
    # Only Fixed/Frozen live in `rest`, and they did not move by a single bit.
    types = {
        type(v) for v in jax.tree.leaves(before.rest, is_leaf=lambda x: isinstance(x, nnx.Variable))
    }
    assert types == {Fixed, Frozen}
    for a, b in zip(rest_before, leaves(after.rest)):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(params_before, leaves(after.params))]
    assert all(changed)


def test_eval_schedules_give_their_steps_and_bad_values_are_refused():
    every = lambda **kw: TrainConfig(steps=1000, steps_per_dispatch=50, **kw).eval_steps()
    assert every(eval_every=250) == (0, 250, 500, 750, 1000)
    assert every(eval_every=300) == (0, 300, 600, 900, 1000)
    assert every(eval_every=0) == (0, 1000)

    log = lambda **kw: TrainConfig(eval_schedule="log", **kw).eval_steps()
    # 1000 ** (i / 3) for i = 0..3; in chunks of 5 steps, 8 ** (i / 3).
    assert log(steps=1000, steps_per_dispatch=1, eval_points=4) == (0, 1, 10, 100, 1000)
    assert log(steps=40, steps_per_dispatch=5, eval_points=4) == (0, 5, 10, 20, 40)
    steps = log(steps=10_000, steps_per_dispatch=10, eval_points=24)
    gaps = np.diff(steps)
    assert steps[0] == 0 and steps[-1] == 10_000 and (gaps > 0).all()
    assert all(s % 10 == 0 for s in steps)  # only chunk boundaries are reachable
    assert 20 <= len(steps) <= 25 and gaps[:5].max() < gaps[-5:].min()
    assert log(steps=100, steps_per_dispatch=50) == (0, 50, 100)  # two chunks: merged
    # The log schedule reads eval_points, not eval_every.
    assert log(steps=1000, steps_per_dispatch=1, eval_points=4, eval_every=500)[2] == 10

    for field, value, words in (
        ("eval_schedule", "linear", ["'every'", "'log'"]),
        ("eval_points", 1, ["[2, 1000]"]),
        ("eval_points", 10**6, ["[2, 1000]"]),
    ):
        with pytest.raises(ConfigError) as e:
            tiny(**{f"train.{field}": value})
        assert [p for p, _ in e.value.problems] == [f"train.{field}"]
        assert all(w in str(e.value) for w in words), str(e.value)
        with pytest.raises(ConfigError, match=field):  # built directly, too
            TrainConfig(**{field: value})


def test_resume_is_bit_identical(tmp_path):
    # On the log schedule, evals land before, at and after the step the first run stops at.
    log = {"train.eval_schedule": "log", "train.eval_points": 4, "train.steps_per_dispatch": 5}
    exp = tiny(**{"train.steps": 40, "train.seeds": [0, 1]}, **log)
    assert exp.train.eval_steps() == (0, 5, 10, 20, 40)
    straight = train(exp, tmp_path / "straight", progress=False)
    partial = train(exp, tmp_path / "resumed", progress=False, stop_after=20)
    assert partial.steps == 20
    resumed = train(exp, tmp_path / "resumed", progress=False)
    assert resumed.steps == 40
    assert resumed.final["loss"] == straight.final["loss"]

    from ablate.checkpoint import Checkpointer, abstract_like

    target = abstract_like(Programs(exp).init())
    straight_ckpt = Checkpointer(tmp_path / "straight" / "checkpoints")
    resumed_ckpt = Checkpointer(tmp_path / "resumed" / "checkpoints")
    # Saved every checkpoint_every = 10 steps (the newest 2 kept), whatever the evals do.
    assert straight_ckpt.steps() == resumed_ckpt.steps() == [30, 40]
    _, a, _ = straight_ckpt.restore_latest(target)
    _, b, _ = resumed_ckpt.restore_latest(target)
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(x, y)

    # Every logged value matches and no step is logged twice.
    def rows(d):
        out = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["seed"], r["kind"], r["loss"]) for r in out]

    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")
    # The loop evaluated exactly at the schedule's steps (eval_every = 0 would be 0 and 40).
    for d in ("straight", "resumed"):
        evals = [r for r in read_jsonl(tmp_path / d / "metrics.jsonl") if r["kind"] == "eval"]
        for seed in (0, 1):
            assert [r["step"] for r in evals if r["seed"] == seed] == [0, 5, 10, 20, 40]

    # The viewer's examples: the resumed run keeps the same ones (step 0's written before its
    # first checkpoint, the last step's once), and its page holds what the model computes.
    for name in (PATTERNS_INIT_FILE, PATTERNS_FILE):
        kept, again = (np.load(tmp_path / d / name) for d in ("straight", "resumed"))
        for key in kept.files:
            np.testing.assert_array_equal(again[key], kept[key])
    page_holds_the_models_patterns(
        exp, tmp_path / "resumed", {"init": Programs(exp).init(), "final": a}
    )


def page_holds_the_models_patterns(exp, run_dir, states):
    """The view page's pattern rows of every stored example, stage and seed equal the
    patterns the model with that stage's state computes on the example (to the page's 1/255)."""
    from ablate.core import EXAMPLES, eval_batch
    from ablate.view import LEVELS, page_data

    programs = Programs(exp)
    batch = eval_batch(exp.task, (), programs.sampler.eval_key, 0, exp.train.batch_size)
    first = jax.tree.map(lambda x: x[:EXAMPLES], batch)

    @jax.jit
    @jax.vmap
    def patterns(params, rest):  # (E, N, H, L, S) of one seed
        model = programs.definition.merge(params, rest)
        return jnp.stack(model(first.inputs, return_patterns=True).patterns, 1)

    (r,) = page_data(run_dir)["runs"]
    assert r["steps"] == {"init": 0, "final": exp.train.steps}
    for stage, state in states.items():
        probs_ZENHLS = np.asarray(patterns(state.params, state.rest))
        for k in range(len(exp.train.seeds)):
            for e, ex in enumerate(r["examples"]):
                scored = np.flatnonzero(np.asarray(first.weights[e]) > 0)
                assert ex["scored"] == scored.tolist() and len(scored) > 0
                assert ex["tokens"] == exp.task.token_labels(first.inputs[e])
                deps = np.asarray(first.deps[e])
                assert ex["deps"] == [np.flatnonzero(deps[i]).tolist() for i in scored]
                raw = np.frombuffer(base64.b64decode(r["attention"][stage][k][e]), np.uint8)
                want = probs_ZENHLS[k, e][:, :, scored, :]
                np.testing.assert_allclose(
                    raw.reshape(want.shape) / LEVELS, want, atol=0.5 / LEVELS + 1e-3
                )
    # What was compared differs: training moved the patterns, and the seeds differ.
    init_ZENHLS = np.asarray(patterns(states["init"].params, states["init"].rest))
    final_ZENHLS = np.asarray(patterns(states["final"].params, states["final"].rest))
    assert np.abs(final_ZENHLS - init_ZENHLS).max() > 0.05
    assert np.abs(init_ZENHLS[0] - init_ZENHLS[1]).max() > 0.05


def test_tensorboard_files_have_scalars_images_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = tiny(**{"train.seeds": [0, 1]})
    train(exp, tmp_path / "run", progress=False)
    for seed in (0, 1):
        acc = EventAccumulator(str(tmp_path / "run" / f"seed_{seed}"), size_guidance={"tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        scalar_tags = set(tags["tensors"])
        for tag in (
            "train/loss",
            "train/accuracy",
            "eval/accuracy",
            "eval/chance",
            "attention/alignment/layer0_head0",
            "attention/alignment_uniform",
            "attention/entropy/layer1_head1",
            "perf/steps_per_sec",
        ):
            assert tag in scalar_tags, tag
        assert any(t.startswith("patterns/layer0/init") for t in scalar_tags | set(tags["images"]))
        assert "_hparams_/session_start_info" in scalar_tags
        losses = [e.step for e in acc.Tensors("train/loss")]
        assert losses == sorted(set(losses)) == [10, 20]


def test_bad_experiment_file_exits_2_with_dotted_paths(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[task]\nname = "assoc_recall"\nn_pairs = 999\n'
        '[model]\nattention = "nope"\nd_modle = 3\n'
        '[train]\nsteps = "many"\n'
    )
    assert main(["train", str(bad), "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    for path in ("task.n_pairs", "model.attention", "model.d_modle", "train.steps"):
        assert path in err, path
    assert "learned" in err  # the valid names are listed
    assert not any(tmp_path.glob("*/checkpoints"))


def test_unknown_task_is_refused():
    with pytest.raises(ConfigError) as e:
        build_experiment({"task": {"name": "telepathy"}})
    assert "task.name" in str(e.value) and "assoc_recall" in str(e.value)


def test_fourier_refused_for_causal_task():
    with pytest.raises(ConfigError) as e:
        tiny(**{"model.attention": "fourier"})
    assert "model.attention" in str(e.value) and "causal" in str(e.value)


def _shared(state):
    """Every parameter outside the mixers, by path (what all variants have in common)."""
    flat = nnx.to_flat_state(state.params)
    return {path: np.asarray(v[...]) for path, v in flat if "mixers" not in path}


def test_paired_design_variants_of_one_seed_share_initial_values_and_batches():
    variants = ["learned", "uniform", [["frozen", "random_fixed"], ["none", "synthesizer"]]]
    engines = [Programs(tiny(**{"model.attention": v, "train.seeds": [5]})) for v in variants]
    states = [e.init() for e in engines]
    reference = _shared(states[0])
    assert len(reference) > 10  # embeddings, w_v, w_o, MLPs, norms, head
    for state in states[1:]:
        shared = _shared(state)
        assert shared.keys() == reference.keys()
        for path, value in reference.items():
            np.testing.assert_array_equal(shared[path], value, err_msg=str(path))
    # With the same head layout, frozen W_q/W_k are exactly learned's initial W_q/W_k.
    frozen = Programs(tiny(**{"model.attention": "frozen", "train.seeds": [5]})).init()
    qk = [
        {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(tree) if p[-1] in ("w_q", "w_k")}
        for tree in (states[0].params, frozen.rest)
    ]
    assert len(qk[0]) == 4 and qk[0].keys() == qk[1].keys()
    for path, value in qk[0].items():
        np.testing.assert_array_equal(qk[1][path], value)
    key = jax.random.PRNGKey(5)
    batches = [e.sampler.train((), key, 7) for e in engines]
    for batch in batches[1:]:
        for a, b in zip(batches[0], batch):
            np.testing.assert_array_equal(a, b)
    # ... and the batches are not all alike: another step or seed draws others.
    other = engines[0].sampler.train((), jax.random.PRNGKey(6), 7).inputs
    assert not np.array_equal(other, batches[0].inputs)
    assert not np.array_equal(engines[0].sampler.train((), key, 8).inputs, batches[0].inputs)


@pytest.mark.parametrize(
    "attention",
    ["learned", *(pytest.param(v, marks=pytest.mark.slow) for v in ("frozen", "random_fixed"))],
)
def test_pattern_gradients_match_finite_differences(attention):
    """dL/dp from the eval's gradient hook equals central differences of the eval loss."""
    import jax.numpy as jnp

    from ablate.ablation import edited
    from ablate.metrics import token_metrics

    exp = tiny(**{"model.attention": attention, "model.n_layers": 1})
    programs = Programs(exp)
    state = programs.init()
    params, rest = jax.tree.map(lambda x: x[0], (state.params, state.rest))
    model = programs.definition.merge(params, rest)
    batch = exp.task.sample(jax.random.PRNGKey(3), 4)
    patterns = model(batch.inputs, return_patterns=True).patterns
    (grad,) = programs.definition._pattern_gradients(model, batch, None, patterns)
    H, K = exp.model.n_heads, exp.model.head_dim
    B, L = batch.inputs.shape

    def loss(p_BHLS):  # float64 sums of the float32 forward pass
        ones_1H, zeros_1H = jnp.ones((1, H)), jnp.zeros((1, H))
        patched = edited(
            model, ones_1H, ones_1H, p_BHLS[None], zeros_1H, jnp.zeros((1, B, L, H, K))
        )
        logits = patched(batch.inputs).logits
        return float(token_metrics(logits, batch.targets, batch.weights)["loss"])

    eps = 1e-2
    for b, h, i, j in [(0, 0, L - 1, 0), (1, 1, L - 1, 3), (2, 0, L - 1, L - 1)]:
        up = patterns[0].at[b, h, i, j].add(eps)
        down = patterns[0].at[b, h, i, j].add(-eps)
        fd = (loss(up) - loss(down)) / (2 * eps)
        assert abs(float(grad[b, h, i, j]) - fd) < 2e-4 + 2e-2 * abs(fd), (b, h, i, j, fd)
    assert float(jnp.abs(grad[:, :, L - 1]).max()) > 1e-3  # the scored row: a real pull
    assert float(jnp.abs(grad[:, :, : L - 1]).max()) == 0.0  # unscored rows: none


def test_the_loss_points_at_the_context_before_accuracy_leaves_the_bag_level():
    """mqar: the share of the loss's push on the dependency positions rises above what a
    uniform push gives while accuracy still sits at the bag ceiling; attention follows."""
    exp = tiny(
        **{
            "task": {"name": "mqar"},
            "model.d_model": 64,
            "model.n_heads": 4,
            "train.steps": 300,
            "train.batch_size": 32,
            "train.steps_per_dispatch": 25,
            "train.log_every": 25,
            "train.checkpoint_every": 25,
            "train.gradient_alignment": True,
            "optim.warmup_steps": 50,
        }
    )
    programs, bag = Programs(exp), 0.25  # mqar's bag ceiling with 4 distinct values
    state, curve = programs.init(), []
    for _ in range(12):
        out = programs.evaluate(state, ())
        curve.append(
            (
                float(out["accuracy"][0]),
                float(np.nanmax(out["gradient_alignment"][0])),
                float(np.nanmax(out["alignment"][0])),
                float(out["uniform_alignment"][0]),
            )
        )
        state, _ = programs.train_chunk(state, ())
    acc, pull, attention, uniform = map(np.array, zip(*curve))
    leaves_bag = int(np.argmax(acc > bag + 0.2))
    assert acc[-1] > 0.9 and leaves_bag > 0
    pulled = int(np.argmax(pull > uniform + 0.2))
    assert pulled < leaves_bag, curve  # the pull comes first ...
    assert attention[pulled] < uniform[pulled] + 0.2  # ... while attention has not moved yet
    assert attention[-1] > 0.9


def test_a_task_with_two_routes_is_measured_against_both_masks_and_on_conflict_sequences():
    # Uniform heads put exactly the uniform share on any mask: alignment with the cheap
    # route's mask must equal uniform attention's share of it, 1 / (i + 1) at query slot i.
    P = 3
    task = {"name": "competing_recall", "n_pairs": P, "n_keys": 4, "n_values": 4}
    exp = tiny(
        task=task | {"cheap_share": 1.0},
        **{"model.attention": "uniform", "train.gradient_alignment": True},
    )
    programs = Programs(exp)
    out = programs.evaluate(programs.init(), ())
    share = np.mean([1 / (2 * P + t + 1) for t in range(P)])
    assert out["uniform_alignment_cheap"][0] == pytest.approx(share, rel=1e-5)
    np.testing.assert_allclose(out["alignment_cheap"][0], share, rtol=1e-5)
    assert out["alignment_cheap"].shape == out["conflict_alignment"].shape == (1, 2, 2)
    assert np.isfinite(out["gradient_alignment_cheap"]).all()
    assert np.isfinite(out["conflict_gradient_alignment"]).all()
    assert 0.0 < out["conflict_uniform_alignment"][0] < 1.0
    assert 0.0 <= out["conflict_accuracy"][0] <= 1.0
    # Conflict rows skip slot t = pair t, so the uniform share there is weighted otherwise:
    # finite, and the content mask (key and value) gets two positions' worth.
    assert np.all(out["conflict_alignment"][0] > out["conflict_alignment_cheap"][0])


@pytest.mark.slow
def test_pretrained_architecture_knobs_train_from_scratch():
    """GPT-2's and BERT's knobs (biased projections, exact GELU, post-norm, tied head) are
    configuration of the one model: such a model trains, its biases and tied embedding move,
    and each knob changes the function (none is silently ignored)."""
    import dataclasses

    from ablate.model import Transformer

    knobs = {
        "bias": True,
        "activation": "gelu",
        "norm_position": "post",
        "norm_eps": 1e-12,
        "tie_embeddings": True,
    }
    exp = tiny(**{f"model.{k}": v for k, v in knobs.items()})
    start, end = Programs(exp).init(), run_steps(exp)
    moved = {
        jax.tree_util.keystr(path): float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for (path, a), (_, b) in zip(
            jax.tree_util.tree_leaves_with_path(start.params),
            jax.tree_util.tree_leaves_with_path(end.params),
        )
    }
    for name in ("'b_v'", "'b_o'", "'b_q'", "'token_embed']['embedding'"):
        assert any(name in k and v > 0 for k, v in moved.items()), (name, list(moved))
    assert not any("'head'" in k for k in moved)  # tied: no head of its own

    tokens = jnp.tile(jnp.arange(exp.task.seq_len) % 5, (2, 1))
    with_knobs = Transformer(exp.model, rngs=nnx.Rngs(0))
    others = {"activation": "gelu_tanh", "norm_position": "pre", "norm_eps": 0.5,
              "tie_embeddings": False}  # fmt: skip
    for knob, value in others.items():
        cfg = dataclasses.replace(exp.model, **{knob: value})
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        apart = np.abs(np.asarray(model(tokens).logits) - np.asarray(with_knobs(tokens).logits))
        assert apart.max() > 1e-4, knob
