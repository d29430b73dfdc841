"""Masked language modelling: the masking scheme's rates and loss weights, the own token's
level, text MLM windows, causal models refused, and an MLM sweep end to end.

The synthetic MLM tasks' batches, dependency masks, chance and audit are checked with every
other task in tests/test_tasks.py and tests/test_reference.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ablate.sweep as sweep_module
from ablate.cli import EXIT_CONFIG, EXIT_OK, main
from ablate.config import ConfigError
from ablate.core import Programs
from ablate.experiment import build_experiment
from ablate.metrics import token_metrics
from ablate.tasks import make_task
from ablate.tasks.masked import expected_selected

CORPUS = "".join(f"line {i}: the cat sat on the mat, a dog ran far\n" for i in range(300))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(CORPUS)
    return path


def synthetic(name, knobs, batch_size, seed=0):
    task = make_task(name, knobs)
    batch = jax.jit(task.sample, static_argnums=1)(jax.random.key(seed), batch_size)
    return task, tuple(np.asarray(a) for a in batch)


@pytest.fixture(scope="module")
def text_mlm(corpus):
    """text_mlm on the corpus: the task, a training batch, and the clean windows it masked."""
    task = make_task("text_mlm", {"source": str(corpus), "seq_len": 64, "mask_rate": 0.3})
    data = task.load()
    key, step, batch_size = jax.random.fold_in(jax.random.key(0), 1), 3, 256
    batch = jax.jit(task.sample_at, static_argnums=3)(data.arrays, key, step, batch_size)
    ids = np.asarray(data.arrays.train)
    starts_of = jax.jit(task.epoch_starts, static_argnums=(0, 3))  # eagerly it takes seconds
    starts = np.asarray(starts_of(len(ids), key, step, batch_size))
    clean = ids[starts[:, None] + np.arange(task.seq_len)[None, :]]
    return task, tuple(np.asarray(a) for a in batch), clean


@pytest.mark.parametrize("name", ["masked_copy", "masked_recall", "text_mlm"])
def test_unmasked_positions_carry_no_loss(name, request):
    if name == "text_mlm":
        task, (inputs, targets, weights, deps), _ = request.getfixturevalue("text_mlm")
    else:
        task, (inputs, targets, weights, deps) = synthetic(name, {}, 64)
    unselected = weights == 0
    assert unselected.any() and (~unselected).any()
    assert np.all(targets[unselected] == 0) and not deps[unselected].any()
    logits = jax.random.normal(jax.random.key(1), (*inputs.shape, task.vocab_size))

    def loss(lg):
        return token_metrics(lg, jnp.asarray(targets), jnp.asarray(weights))["loss"]

    grad = np.asarray(jax.grad(loss)(logits))
    assert np.all(grad[unselected] == 0)  # exactly: no loss reaches them
    assert np.all(np.abs(grad[~unselected]).sum(-1) > 0)
    noise = 100.0 * jax.random.normal(jax.random.key(2), logits.shape)
    at_unselected = jnp.where(jnp.asarray(unselected)[..., None], noise, 0.0)
    assert float(loss(logits + at_unselected)) == pytest.approx(float(loss(logits)), rel=1e-6)
    assert float(loss(logits + noise - at_unselected)) != pytest.approx(float(loss(logits)))


def _within(count, n, p, what):
    sigma = np.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= 4 * sigma + 1e-9, f"{what}: {count / n:.4f} vs {p:.4f}"


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"mask_rate": 0.4, "mask_share": 0.5, "random_share": 0.3},
        {"mask_rate": 0.5, "mask_share": 0.0, "random_share": 1.0},
        {"mask_rate": 0.05, "mask_share": 1.0, "random_share": 0.0},
    ],
)
def test_the_replacement_scheme_holds_its_rates_within_sampling_error(knobs):
    # 64 twin pairs: a sequence without any selection (then one is forced) has probability
    # (1 - 2 * mask_rate)^64, below 4e-2 even at 0.05, so the rate is mask_rate's.
    n_symbols, n_items = 8, 64
    task, (inputs, targets, weights, _) = synthetic(
        "masked_copy", {"n_items": n_items, "n_symbols": n_symbols, **knobs}, 4096
    )
    c = task.config
    candidates = np.ones(task.seq_len, bool)
    candidates[n_items] = False  # SEP is never a candidate
    selected = weights > 0
    assert not selected[:, n_items].any()
    forced = expected_selected(n_items, 2, c.mask_rate) - 2 * n_items * c.mask_rate
    n_candidates = selected[:, candidates].size
    _within(selected.sum(), n_candidates, c.mask_rate + forced / (2 * n_items), "selected")
    shown, answer, n = inputs[selected], targets[selected], selected.sum()
    _within(np.sum(shown == task.MASK), n, c.mask_share, "masked")
    changed = (shown != task.MASK) & (shown != answer)
    _within(changed.sum(), n, c.random_share * (1 - 1 / n_symbols), "randomly replaced")
    _within(np.sum(shown == answer), n, c.keep_share + c.random_share / n_symbols, "unchanged")
    assert np.all((shown == task.MASK) | ((shown >= 2) & (shown < 2 + n_symbols)))


def test_text_mlm_masks_every_position_at_its_rate_with_ordinary_tokens(text_mlm):
    task, (inputs, targets, weights, _), clean = text_mlm
    assert (task.mask_id, task.vocab_size) == (260, 261)  # one id after the byte tokenizer's
    selected = weights > 0
    _within(selected.sum(), selected.size, 0.3, "selected")
    np.testing.assert_array_equal(inputs[~selected], clean[~selected])
    np.testing.assert_array_equal(targets[selected], clean[selected])
    shown = inputs[selected]
    _within(np.sum(shown == task.mask_id), selected.sum(), 0.8, "masked")
    replaced = (shown != task.mask_id) & (shown != clean[selected])
    assert replaced.any() and np.all(shown[replaced] < 256)  # random ids are never specials


def test_every_sequence_is_scored_and_a_token_and_its_twin_never_both():
    for rate in (0.0, 0.15, 0.5):
        task, (_, _, weights, _) = synthetic("masked_copy", {"n_items": 2, "mask_rate": rate}, 8192)
        selected = weights > 0
        per_row = selected.sum(1)
        assert per_row.min() >= 1
        assert not np.any(selected[:, :2] & selected[:, 3:])
        mean = expected_selected(2, 2, rate)  # the forced selection counted
        assert abs(per_row.mean() - mean) <= 4 * per_row.std() / np.sqrt(len(per_row)) + 1e-9
        if rate == 0.0:
            assert np.all(per_row == 1)  # exactly the forced one
    _, (_, _, weights, _) = synthetic("masked_recall", {"mask_rate": 0.5}, 1024)
    assert np.all(weights.sum(1) == 4)  # at mask_rate 0.5 every pair gives one


@pytest.mark.parametrize(
    "name, knobs",
    [("masked_copy", {}), ("masked_recall", {}), ("masked_recall", {"random_share": 0.2})],
)
def test_the_own_token_alone_reaches_the_stated_own_token_level(name, knobs):
    """A kept token is the answer, a random one is it with probability 1/alphabet: reading
    the own token (when it is not MASK) gets chance + keep_share * (1 - chance); chance
    itself, as for every task, sees no input."""
    task, (inputs, targets, weights, _) = synthetic(name, knobs, 4096)
    selected = weights > 0
    shown, answer = inputs[selected], targets[selected]
    guess = np.where(shown == task.MASK, task.fill[0], shown)  # MASK: any constant
    n, right = selected.sum(), np.sum(guess == answer)
    level, keep = task.own_token_level, task.config.keep_share
    assert level == pytest.approx(task.chance + keep * (1 - task.chance))
    assert level > task.chance or keep == 0  # nothing kept: the own token tells nothing
    assert abs(right / n - level) <= 4 * np.sqrt(level * (1 - level) / n) + 2e-3, (right / n, level)


@pytest.mark.parametrize(
    "task",
    [
        {"name": "masked_copy"},
        {"name": "masked_recall", "n_pairs": 2},
        {"name": "stdlib_mlm", "seq_len": 32},
        {"name": "text_mlm", "source": "no/such/corpus.txt"},
    ],
)
def test_a_causal_model_with_an_mlm_task_is_refused(task):
    with pytest.raises(ConfigError) as info:
        build_experiment({"task": task})
    [(path, message)] = info.value.problems
    assert path == "model.causal" and "causal = false" in message and task["name"] in message
    exp = build_experiment({"task": task, "model": {"causal": False}})
    assert exp.task.bidirectional and not exp.model.causal


def test_a_bidirectional_model_reads_text_through_mlm_not_next_token_lm(corpus):
    """An LM window's target at i is its input at i + 1, which a bidirectional model sees:
    text_lm and stdlib_lm are refused for it, their MLM versions accepted."""
    for lm, mlm, knobs in [
        ("stdlib_lm", "stdlib_mlm", {"seq_len": 32}),
        ("text_lm", "text_mlm", {"source": str(corpus)}),
    ]:
        with pytest.raises(ConfigError) as info:
            build_experiment({"task": {"name": lm, **knobs}, "model": {"causal": False}})
        [(path, message)] = info.value.problems
        assert path == "model.causal" and "use causal = true" in message
        build_experiment({"task": {"name": mlm, **knobs}, "model": {"causal": False}})
    task = make_task("text_lm", {"source": str(corpus), "seq_len": 16})
    batch = task.eval_sample(task.load().arrays, jax.random.key(0), 4)
    np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # the leak


SWEEP = """# ablate sweep mlm.toml: a tiny MLM sweep (seconds)
[sweep]
name = "mlm"
variants = ["learned"]
tasks = [{{ name = "masked_copy", n_items = 3, n_symbols = 3 }},
         {{ name = "text_mlm", source = "{corpus}", seq_len = 16 }}]
[model]
causal = {causal}
d_model = 16
n_heads = 2
n_layers = 1
[train]
steps = 10
batch_size = 8
seeds = [0]
steps_per_dispatch = 5
log_every = 5
eval_every = 5
eval_batches = 1
gradient_alignment = false
checkpoint_every = 10
compile_cache = false
"""


def test_ablate_sweep_refuses_a_causal_mlm_sweep_before_compiling(
    tmp_path, corpus, capsys, monkeypatch
):
    sweep = tmp_path / "mlm.toml"
    sweep.write_text(SWEEP.format(corpus=corpus, causal="true"))
    single = tmp_path / "one.toml"
    single.write_text('[task]\nname = "masked_copy"\n')

    def never(*args, **kwargs):
        raise AssertionError("built programs or trained despite a refused config")

    monkeypatch.setattr(Programs, "__init__", never)
    monkeypatch.setattr(sweep_module, "train", never)
    for command, path in (("sweep", sweep), ("train", single)):
        code = main([command, str(path), "--workdir", str(tmp_path), "--quiet"])
        err = capsys.readouterr().err
        assert code == EXIT_CONFIG and "model.causal" in err and "masked_copy" in err, err
    assert not (tmp_path / "mlm").exists() and not (tmp_path / "one").exists()


@pytest.mark.slow  # ~75 s of CPU: two runs, reference levels and the report
def test_an_mlm_sweep_runs_end_to_end(tmp_path, corpus):
    path = tmp_path / "mlm.toml"
    path.write_text(SWEEP.format(corpus=corpus, causal="false"))
    assert main(["sweep", str(path), "--workdir", str(tmp_path), "--quiet"]) == EXIT_OK
    sweep_dir = tmp_path / "mlm"
    rows = [json.loads(x) for x in (sweep_dir / "results.jsonl").read_text().splitlines()]
    assert sorted(r["run"] for r in rows) == ["masked_copy-learned", "text_mlm-learned"]
    assert all(r["status"] == "ok" and 0 <= r["accuracy"] <= 1 for r in rows)
    for r in rows:
        if r["run"].startswith("masked_copy"):
            # Levels read bidirectionally: the twin always shows the answer.
            assert r["chance"] == pytest.approx(1 / 3) and r["fixed_routing_ceiling"] > 0.95
            assert r["context_need"] == "position"
        else:
            assert r["fixed_routing_ceiling"] is None and 1 < r["perplexity"] < 1e4
            assert 0 < r["chance"] < 1
    evals = [
        json.loads(x)
        for x in (sweep_dir / "text_mlm-learned" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [e["step"] for e in evals if e["kind"] == "eval"] == [0, 5, 10]
    report = (sweep_dir / "REPORT.md").read_text()
    assert "masked_copy" in report and "text_mlm" in report
