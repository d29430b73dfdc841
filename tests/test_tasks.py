"""Tests of the synthetic task suite: batches agree with the host solver, dependency masks are
truthful under single-token perturbations, chance levels match measurement, sampling is
deterministic under jit and vmap, and bad knobs are refused with their dotted paths."""

import dataclasses
import functools
import typing

import jax
import numpy as np
import pytest

from ablate import tasks
from ablate.config import ConfigError

# Small knobs per task, unlike the defaults, so every formula is checked at two sizes; small
# enough that single-token perturbation sweeps stay fast, with more symbols than a sequence
# uses so that a changed token can keep the instance valid.
SMALL = {
    "assoc_recall": [
        {"n_pairs": 3, "n_keys": 5, "n_values": 4},
        {"n_pairs": 3, "n_keys": 4, "n_values": 6, "pair_tokens": "separate"},
    ],
    "mqar": [{"n_pairs": 3, "seq_len": 11, "n_keys": 5, "n_values": 6}],
    "competing_recall": [{"n_pairs": 3, "n_keys": 5, "n_values": 6, "cheap_share": 0.5}],
    "induction": [{"repeat_len": 4, "n_symbols": 6}],
    "copy": [{"n_items": 4, "n_symbols": 3}],
    "reverse": [{"n_items": 4, "n_symbols": 3}],
    "sort": [{"n_items": 4, "n_symbols": 3}],
    "selective_copy": [{"n_items": 3, "n_symbols": 3, "seq_len": 9}],
    "majority": [{"n_items": 7, "n_symbols": 4}],  # counts 3, 2, 1, 1: one change can move it
    "memorize": [{"seq_len": 5, "n_keys": 10, "n_values": 4, "table_seed": 3}],
    "masked_copy": [{"n_items": 3, "n_symbols": 3}],
    "masked_recall": [{"n_pairs": 2, "n_distractors": 2, "n_keys": 6, "n_values": 6}],
}
SMALL_CASES = [(name, params) for name, options in SMALL.items() for params in options]
# The seq2seq tasks (a source beside the sequence) have tests of their own:
# tests/test_seq2seq_tasks.py.
DECODER = [n for n in tasks.task_names() if not tasks.TASKS[n].seq2seq]
SYNTHETIC = [n for n in DECODER if tasks.TASKS[n].has_dependencies]
CASES = [(name, {}) for name in SYNTHETIC] + SMALL_CASES


def case_id(case):
    name, params = case
    return name + ("-" + "-".join(f"{k}{v}" for k, v in params.items()) if params else "")


cases = pytest.mark.parametrize("case", CASES, ids=map(case_id, CASES))
small_cases = pytest.mark.parametrize("case", SMALL_CASES, ids=map(case_id, SMALL_CASES))


BATCH = 4096  # one compiled shape per case serves every test below


@functools.cache
def _built(name: str, params: tuple) -> tuple[tasks.Task, typing.Callable]:
    task = tasks.make_task(name, dict(params))
    return task, jax.jit(task.sample, static_argnums=1)


def build(case) -> tasks.Task:
    return _built(case[0], tuple(case[1].items()))[0]


def sample(case, seed: int) -> tuple[np.ndarray, ...]:
    """A batch of BATCH sequences as numpy arrays (inputs, targets, weights, deps)."""
    batch = _built(case[0], tuple(case[1].items()))[1](jax.random.key(seed), BATCH)
    return tuple(np.array(a) for a in batch)


def host(batch: tasks.Batch) -> tuple[np.ndarray, ...]:
    return tuple(np.array(a) for a in batch)


def instance(task: tasks.Task, inputs: np.ndarray, weights: np.ndarray) -> tuple:
    """The host-side arguments of one sequence: a bidirectional (masked-LM) task's instance
    is its inputs and which positions were selected (not readable from the inputs)."""
    return (inputs, weights > 0) if task.bidirectional else (inputs,)


def test_every_task_is_tested():
    names = tasks.task_names()  # the data-backed tasks too (tested in tests/test_data.py)
    synthetic = {n for n in names if tasks.TASKS[n].has_dependencies and n in DECODER}
    assert set(SMALL) == synthetic and set(tasks.TASKS) == set(names)
    assert len(synthetic) >= 9


@cases
def test_batch_shapes_ranges_and_reference(case):
    task = build(case)
    for seed in range(3):
        inputs, targets, weights, deps = sample(case, seed)
        length = task.seq_len
        assert inputs.shape == targets.shape == weights.shape == (BATCH, length)
        assert deps.shape == (BATCH, length, length)
        assert (inputs.dtype, targets.dtype) == (np.int32, np.int32)
        assert (weights.dtype, deps.dtype) == (np.float32, np.bool_)
        assert inputs.min() >= 0 and inputs.max() < task.vocab_size
        assert targets.min() >= 0 and targets.max() < task.vocab_size
        assert set(np.unique(weights)) <= {0.0, 1.0} and weights.sum(axis=1).min() > 0
        assert np.all(targets[weights == 0] == 0)
        assert not deps[weights == 0].any()
        assert deps[weights == 1].any(axis=-1).all()
        # Causal targets depend on earlier positions only; masked ones on both sides.
        assert np.triu(deps, k=1).any() == task.bidirectional
        for b in range(4):
            assert task.is_valid(*instance(task, inputs[b], weights[b]))
            ref_targets, ref_weights = task.reference(*instance(task, inputs[b], weights[b]))
            np.testing.assert_array_equal(ref_weights, weights[b])
            np.testing.assert_array_equal(ref_targets * ref_weights, targets[b])
            if task.bidirectional:  # a prefix is no instance: its targets need what follows
                assert not task.is_valid(inputs[b, :-1], weights[b, :-1] > 0)
                continue
            # Causal targets: a prefix is solved exactly as the whole sequence was.
            for n in (1, length // 2, length - 1):
                assert task.is_valid(inputs[b, :n])
                np.testing.assert_array_equal(task.reference(inputs[b, :n])[0], ref_targets[:n])


def _changes(task, x, i, selected):
    """Yield (j, prefix_or_sequence) for every single-token change that keeps x valid.

    Positions j <= i are changed in the prefix x[:i+1], where validity means "can be
    completed": target i must be a function of inputs[0..i] whatever follows (this is what
    lets teacher-forced tasks be probed at all). Positions j > i are changed in the whole
    sequence. A bidirectional task's target depends on both sides: every change is made in
    the whole sequence, its selection (`selected`) kept.
    """
    for j in range(len(x)):
        base = x[: i + 1] if j <= i and not task.bidirectional else x
        for v in range(task.vocab_size):
            if v != x[j]:
                y = base.copy()
                y[j] = v
                if task.is_valid(*((y, selected) if task.bidirectional else (y,))):
                    yield j, y


# Dependencies no single-token change can reach while the instance stays well posed: the key
# a query must find (changing it leaves the query unanswerable), in induction the query
# itself (the second copy must repeat the first), and in masked_recall the other occurrence
# of the masked value's key. Nothing else may be unreachable.
def _pinned_ok(name, x, i, j):
    if name in ("assoc_recall", "mqar", "competing_recall"):
        return j < i and x[j] == x[i]
    if name == "induction":
        return j == i
    if name == "masked_recall":
        return j % 2 == 0 and j != i - 1 and x[j] == x[i - 1]
    return False


@small_cases
def test_dependency_masks_are_truthful(case):
    name, _ = case
    task = build(case)
    # Majority: one change moves the answer only where it hits a copy of the mode.
    n_sequences = 200 if name == "majority" else 48
    inputs, _, weights, deps = (a[:n_sequences] for a in sample(case, 7))
    length = task.seq_len
    seen = np.zeros((length, length), bool)
    sensitive = np.zeros((length, length), bool)
    excused = np.zeros((length, length), bool)
    for b in range(len(inputs)):
        x, selected = inputs[b], weights[b] > 0
        targets, _ = task.reference(*instance(task, x, weights[b]))
        for i in np.flatnonzero(weights[b]):
            reachable = np.zeros(length, bool)
            for j, y in _changes(task, x, i, selected):
                new_targets, new_weights = task.reference(*instance(task, y, weights[b]))
                changed = (new_targets[i], new_weights[i]) != (targets[i], 1.0)
                assert deps[b, i, j] or not changed, f"target {i} moved by input {j} outside deps"
                reachable[j] = True
                sensitive[i, j] |= changed
            # A pin is a dependency even though no probe can move it.
            for j in range(length if task.bidirectional else i + 1):
                assert deps[b, i, j] or not _pinned_ok(name, x, i, j), f"pin ({i}, {j}) not in deps"
            for j in np.flatnonzero(deps[b, i]):
                seen[i, j] = True
                excused[i, j] |= not reachable[j] and _pinned_ok(name, x, i, j)
    # Every dependency seen moves its target in some sequence, or is one of the pins above.
    proven = sensitive | excused
    assert seen.any() and np.array_equal(proven & seen, seen), np.argwhere(seen & ~proven)


@cases
def test_chance_matches_best_input_free_predictor(case):
    task = build(case)
    # Fit the best constant per position on one batch, score it on another: an unbiased
    # estimate of the accuracy a predictor that sees no input token reaches.
    fit = [np.concatenate(arrays) for arrays in zip(*(sample(case, s) for s in range(4)))]
    held = [np.concatenate(arrays) for arrays in zip(*(sample(case, s) for s in range(4, 8)))]
    counts = np.zeros((task.seq_len, task.vocab_size))
    rows, positions = np.nonzero(fit[2])
    np.add.at(counts, (positions, fit[1][rows, positions]), 1.0)
    best = counts.argmax(axis=1)
    _, targets, weights, _ = held
    n_scored = weights.sum()
    accuracy = float((weights * (targets == best[None, :])).sum() / n_scored)
    sigma = np.sqrt(task.chance * (1 - task.chance) / n_scored)
    assert abs(accuracy - task.chance) < 4 * sigma + 1e-3, (accuracy, task.chance)


def test_chance_values_worked_by_hand():
    # Sort, 4 draws from 3 symbols: the min is 0 (and the max 2) with P = 1 - (2/3)^4 = 65/81;
    # the 2nd smallest is 1 with P = (1 - 1/81 - 8/81) - (1 - 16/81 - 32/81) = 39/81, its mode
    # (and likewise the 3rd). Mean of the modes: (65 + 39 + 39 + 65) / 4 / 81 = 52/81.
    assert tasks.make_task("sort", {"n_items": 4, "n_symbols": 3}).chance == pytest.approx(52 / 81)
    # Memorize, 10 keys over 4 values: a balanced table answers 3 keys with the commonest value.
    memorize = tasks.make_task("memorize", {"n_keys": 10, "n_values": 4})
    assert memorize.chance == pytest.approx(0.3)
    assert np.bincount(memorize.table).tolist() == [3, 3, 2, 2]
    recall = tasks.make_task("assoc_recall", {"n_pairs": 3, "n_keys": 5, "n_values": 4})
    assert recall.chance == pytest.approx(0.25)


@cases
def test_leaks_future_is_honest(case):
    task = build(case)
    inputs, targets, weights, _ = (a[:64] for a in sample(case, 3))
    scored = weights == 1

    def revealed_by(offset):
        later = np.full_like(inputs, -1)
        later[:, :-offset] = inputs[:, offset:]
        return np.all(later[scored] == targets[scored])

    assert any(revealed_by(d) for d in range(1, task.seq_len)) == task.leaks_future


@pytest.mark.parametrize("name", SYNTHETIC)
def test_sampling_is_deterministic_and_transformable(name):
    case = (name, {})
    task = build(case)
    seeds = (11, 12, 13)
    compiled = [sample(case, seed) for seed in seeds]
    for a, b in zip(compiled[0], sample(case, 11), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(compiled[0][0], compiled[1][0])
    # Not jitted: vmap runs the sampler op by op, so this checks eager execution against the
    # compiled program as well as vmapped keys against separate calls (one compile, not two).
    keys = jax.vmap(jax.random.key)(np.array(seeds))
    stacked = host(jax.vmap(lambda k: task.sample(k, BATCH))(keys))
    for s, batch in enumerate(compiled):
        for a, b in zip(batch, stacked, strict=True):
            np.testing.assert_array_equal(a, b[s])


def test_memorize_table_comes_from_table_seed_not_batch_key():
    a, b = tasks.make_task("memorize"), tasks.make_task("memorize", {"table_seed": 1})
    np.testing.assert_array_equal(a.table, tasks.make_task("memorize").table)
    assert not np.array_equal(a.table, b.table)
    inputs, targets, _, _ = sample(("memorize", {}), 5)
    np.testing.assert_array_equal(targets, a.table[inputs - a.config.n_values])


def test_is_valid_rejects_broken_instances():
    recall = tasks.make_task("assoc_recall", {"pair_tokens": "separate"})
    x = sample(("assoc_recall", {"pair_tokens": "separate"}), 0)[0][0]
    duplicate_key, query_is_value = x.copy(), x.copy()
    duplicate_key[2], query_is_value[-1] = x[0], x[1]
    assert recall.is_valid(x)
    assert not recall.is_valid(duplicate_key) and not recall.is_valid(query_is_value)
    induction = tasks.make_task("induction")
    y = sample(("induction", {}), 0)[0][0]
    y[-1] = y[1]
    assert not induction.is_valid(y)
    assert not tasks.make_task("copy").is_valid(np.zeros(16, np.int32))
    majority = tasks.make_task("majority", {"n_items": 4, "n_symbols": 3})
    assert majority.is_valid(np.array([1, 1, 2, 3, 0]))
    assert not majority.is_valid(np.array([1, 1, 2, 2, 0]))  # no unique answer
    assert not majority.is_valid(np.array([1, 1, 2, 3, 0, 0]))  # too long
    assert not majority.is_valid(np.array([1, 1, 2, 4, 0]))  # out of vocabulary


@pytest.mark.parametrize(
    "name, params, path, fragment",
    [
        ("assoc_recall", {"n_pairs": 40}, "task.n_pairs", "must be <= 8 (n_keys allows 8"),
        ("assoc_recall", {"pair_tokens": "both"}, "task.pair_tokens", "'joint', 'separate'"),
        ("assoc_recall", {"n_keys": 512, "n_values": 512}, "task.n_values", "<= 65536"),
        ("mqar", {"seq_len": 10}, "task.seq_len", "must be >= 12 (3 * n_pairs"),
        ("mqar", {"n_values": 1}, "task.n_values", "must be >= 2"),
        ("induction", {"repeat_len": 20}, "task.n_symbols", "must be >= 20 (repeat_len"),
        ("copy", {"n_items": 0}, "task.n_items", "must be >= 1"),
        ("sort", {"n_symbols": "8"}, "task.n_symbols", "expected int"),
        ("selective_copy", {"n_items": 9}, "task.seq_len", "must be >= 18 (2 * n_items"),
        ("majority", {"n_items": 5000}, "task.n_items", "must be <= 4095"),
        ("memorize", {"n_values": 64}, "task.n_values", "must be <= 32 (n_keys"),
        ("memorize", {"bogus": 1}, "task.bogus", "unknown field"),
        ("masked_copy", {"mask_rate": 0.6}, "task.mask_rate", "must be <= 0.5 (a token and"),
        ("masked_copy", {"mask_rate": -0.1}, "task.mask_rate", "must be in [0, 1]"),
        ("masked_recall", {"mask_share": 1.5}, "task.mask_share", "must be in [0, 1]"),
        ("masked_recall", {"mask_share": 0.8, "random_share": 0.3}, "task.random_share", "<= 1"),
        ("masked_recall", {"n_pairs": 14}, "task.n_keys", "must be >= n_pairs + n_distractors"),
        ("stdlib_mlm", {"mask_rate": 2.0}, "task.mask_rate", "must be in [0, 1]"),
        ("text_mlm", {"random_share": "0.1"}, "task.random_share", "expected float"),
    ],
)
def test_bad_knobs_are_refused_with_their_path(name, params, path, fragment):
    with pytest.raises(ConfigError) as info:
        tasks.make_task(name, params)
    assert any(p == path and fragment in m for p, m in info.value.problems), info.value.problems


def test_unknown_task_lists_valid_names_and_paths_nest():
    with pytest.raises(ConfigError) as info:
        tasks.make_task("parity")
    [(path, message)] = info.value.problems
    assert path == "task.name" and all(name in message for name in tasks.TASKS)
    with pytest.raises(ConfigError) as info:
        tasks.make_task("copy", {"n_items": 0}, path="sweep.task")
    assert info.value.problems[0][0] == "sweep.task.n_items"
    with pytest.raises(ConfigError, match="expected a table"):
        tasks.make_task("copy", [8, 8])


@pytest.mark.parametrize("name", SYNTHETIC)
def test_configs_are_frozen_plain_data_with_defaults(name):
    cls = tasks.TASKS[name]
    needs = ("content", "position", "bag", "none", "competing")
    assert cls.name == name and cls.context_need in needs
    config = cls.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.__setattr__(dataclasses.fields(config)[0].name, 1)
    hints = typing.get_type_hints(cls.Config)
    assert all(hints[f.name] in (int, float, bool, str) for f in dataclasses.fields(config))
    with pytest.raises(TypeError):
        cls(object())


@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 1.0])
def test_competing_recall_cheap_route_is_right_in_its_share(p):
    # The cheap route (slot t copies position 2t + 1) is right in every query of an in-order
    # sequence, a share p of sequences plus the random orders that happen to be in order
    # (1/P!), and per token in p + (1 - p)/P (the task's stated cheap_level); its mask marks
    # exactly that position and the query itself.
    P, n = 4, 8192
    task = tasks.make_task("competing_recall", {"n_pairs": P, "cheap_share": p})
    inputs, targets, weights, _ = host(jax.jit(task.sample, static_argnums=1)(jax.random.key(1), n))
    copied = inputs[:, [2 * t + 1 for t in range(P)]]
    right = copied == targets[:, 2 * P :]
    in_order = p + (1 - p) / 24
    assert abs(right.all(1).mean() - in_order) < 4 * np.sqrt(in_order * (1 - in_order) / n) + 1e-9
    # Tokens of one sequence are not independent: bound by the sequence-level spread.
    assert abs(right.mean() - task.cheap_level) < 4 * right.mean(1).std() / np.sqrt(n) + 1e-9
    cheap = np.asarray(task.cheap_deps(jax.numpy.asarray(weights[:2])))
    for t in range(P):
        assert np.flatnonzero(cheap[0, 2 * P + t]).tolist() == [2 * t + 1, 2 * P + t]
    assert not cheap[:, : 2 * P].any()


def test_competing_recall_conflict_sequences_defeat_only_the_cheap_route():
    # Scored only where slot t does not ask pair t: the cheap route is always wrong there
    # (values are distinct), the content route (the host solver) always right.
    P = 4
    task = tasks.make_task("competing_recall", {"n_pairs": P, "cheap_share": 1.0})
    inputs, targets, weights, deps = host(task.conflict_sample(jax.random.key(2), 2048))
    scored = weights[:, 2 * P :] > 0
    copied = inputs[:, [2 * t + 1 for t in range(P)]]
    assert scored.mean() == pytest.approx(1 - 1 / P, abs=0.03)
    assert not np.any((copied == targets[:, 2 * P :]) & scored)
    for b in range(64):
        assert task.is_valid(inputs[b])
        np.testing.assert_array_equal(task.reference(inputs[b])[0] * weights[b], targets[b])
    assert not deps[weights == 0].any()
