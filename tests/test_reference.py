"""Reference levels and the task audit: no task may give away more than it says it needs."""

import jax.numpy as jnp
import numpy as np
import pytest

from ablate import reference
from ablate.reference import _Splits, audit, draw, estimate_bag, reference_levels
from ablate.tasks import TASKS, CompetingRecall, Majority, make_task, mode_share
from ablate.tasks.base import random_bits, static_batch
from ablate.tasks.recall import CompetingRecallConfig

# Every registered synthetic task at its defaults and two other sizes. A task added to the
# registry without an entry here fails `test_every_registered_task_is_audited`.
AUDIT_SIZES = {
    "assoc_recall": [{}, {"n_pairs": 4, "n_keys": 6}, {"pair_tokens": "separate"}],
    "mqar": [{}, {"n_pairs": 8, "seq_len": 32, "n_keys": 16, "n_values": 16}, {"n_pairs": 2}],
    "competing_recall": [
        {},
        {"cheap_share": 0.0, "n_pairs": 6, "n_keys": 12, "n_values": 12},
        {"cheap_share": 1.0},
    ],
    # repeat_len 4 would fail: its bag ceiling H_3 / 3 = 0.61 closes 0.59 of the gap.
    "induction": [{}, {"repeat_len": 6, "max_gap": 4}, {"max_gap": 0}],
    "copy": [{}, {"n_items": 4, "n_symbols": 4}, {"n_items": 12, "n_symbols": 16}],
    "reverse": [{}, {"n_items": 4, "n_symbols": 4}, {"n_items": 12, "n_symbols": 16}],
    "sort": [{}, {"n_items": 4, "n_symbols": 4}, {"n_items": 12, "n_symbols": 16}],
    "selective_copy": [{}, {"n_items": 2, "seq_len": 12}, {"n_items": 6, "seq_len": 24}],
    "majority": [{}, {"n_items": 64}, {"n_items": 48, "n_symbols": 16}],
    "memorize": [{}, {"seq_len": 8, "n_keys": 16, "n_values": 4}, {"n_keys": 64}],
    # Few symbols at the smaller sample: the lookup of (own token, twin) must see each pair.
    "masked_copy": [
        {},
        {"n_items": 4, "n_symbols": 4},
        {"n_items": 12, "n_symbols": 6, "mask_rate": 0.3, "mask_share": 0.6, "random_share": 0.2},
    ],
    "masked_recall": [
        {},
        {"n_pairs": 2, "n_distractors": 2, "n_keys": 6, "n_values": 6},
        {"n_pairs": 6, "n_distractors": 2, "mask_rate": 0.5, "random_share": 0.0},
    ],
}
CASES = [(name, knobs) for name, sizes in AUDIT_SIZES.items() for knobs in sizes]


def test_every_registered_task_is_audited():
    # The seq2seq tasks are audited in tests/test_seq2seq_tasks.py.
    synthetic = {n for n, cls in TASKS.items() if cls.has_dependencies and not cls.seq2seq}
    assert synthetic == set(AUDIT_SIZES)


@pytest.mark.parametrize(
    "name,knobs", CASES, ids=[f"{n}-{i % 3}" for i, (n, _) in enumerate(CASES)]
)
def test_task_passes_the_shortcut_audit(name, knobs):
    # The defaults with the sample the toolkit uses; the other sizes with a smaller one.
    n_sequences = 3 * 2**14 if not knobs else 3 * 4096
    assert audit(make_task(name, knobs), n_sequences=n_sequences) == []


class OldMajority(Majority):
    """The sampler majority had before the audit: the mode's extra copy at the first
    non-winner position, so position 0 always held the answer."""

    def sample(self, key, batch_size):
        n, m = self.config.n_items, self.config.n_symbols
        x_BN = (random_bits(key, batch_size, n)[0] % m).astype(jnp.int32)
        rows_B1 = jnp.arange(batch_size)[:, None]
        positions_BN = jnp.broadcast_to(jnp.arange(n)[None, :], x_BN.shape)
        counts_BM = jnp.zeros((batch_size, m), jnp.int32).at[rows_B1, x_BN].add(1)
        first_BM = jnp.full((batch_size, m), n, jnp.int32).at[rows_B1, x_BN].min(positions_BN)
        winner_B1 = jnp.argmax(counts_BM * (n + 1) - first_BM, axis=-1)[:, None]
        other_BN = x_BN != winner_B1
        promote_BN = other_BN & (jnp.arange(n)[None, :] == jnp.argmax(other_BN, -1)[:, None])
        x_BN = jnp.where(promote_BN, winner_B1, x_BN) + 1
        inputs_BL = jnp.concatenate([x_BN, jnp.zeros((batch_size, 1), jnp.int32)], axis=1)
        targets_BL = jnp.where(self.scored_L[None, :], winner_B1 + 1, 0)
        return static_batch(inputs_BL, targets_BL, self.scored_L, self.deps_LL)


def test_the_audit_catches_the_old_majority_sampler():
    old = OldMajority(Majority.Config(n_items=16))
    problems = audit(old, n_sequences=3 * 4096)
    assert len(problems) == 1 and "one fixed other position gives 1.000" in problems[0]


def test_the_audit_catches_a_content_task_that_fixed_routing_solves():
    """induction with a fixed offset is a position task: labelled content, it must fail."""
    task = make_task("induction", {"max_gap": 0})
    task.context_need = "content"
    problems = audit(task, n_sequences=3 * 4096)
    assert len(problems) == 1 and "fixed routing reaches 1.000" in problems[0]


def test_the_audit_catches_a_wrong_chance_level():
    task = make_task("copy")
    task.chance = 0.3
    assert any("chance is stated as 0.300" in p for p in audit(task, n_sequences=3 * 4096))


def test_majority_counts_are_balanced_and_no_position_is_special():
    task = make_task("majority")
    s = draw(task, 4096)
    x = s.inputs[:, :-1]
    counts = np.stack([np.bincount(r, minlength=task.vocab_size)[1:] for r in x])
    assert np.all(np.sort(counts, 1)[:, ::-1] == np.sort([5, 4, 4, 4, 4, 4, 4, 3])[::-1])
    answer = s.targets[:, -1]
    assert np.all(counts.argmax(1) + 1 == answer)
    # The answer's share at each position is its count share (5/32), not more at any one.
    at_answer_N = (x == answer[:, None]).mean(0)
    assert np.all(np.abs(at_answer_N - 5 / 32) < 0.035)
    assert np.all(np.abs(np.bincount(answer, minlength=9)[1:] / len(answer) - 1 / 8) < 0.03)


def test_mqar_values_are_distinct_by_default_and_drawn_with_replacement_on_request():
    for distinct in (True, False):
        task = make_task("mqar", {"distinct_values": distinct})
        values = draw(task, 2048).inputs[:, 1:8:2]
        repeats = np.mean([len(set(v)) < 4 for v in values])
        assert repeats == 0 if distinct else repeats > 0.4  # P(repeat) = 1 - 8*7*6*5/8^4
    levels = reference_levels(make_task("mqar", {"distinct_values": False}), n_sequences=3 * 4096)
    assert levels.bag.value == pytest.approx(0.412, abs=1e-3)  # the most frequent value
    assert reference_levels(make_task("mqar"), n_sequences=3 * 4096).bag.value == 0.25


def test_mode_share_matches_sampled_counts():
    rng = np.random.default_rng(0)
    for n, m in [(4, 8), (8, 8), (5, 3)]:
        top = np.array(
            [np.bincount(rng.integers(0, m, n), minlength=m).max() for _ in range(40000)]
        )
        value, se, how = mode_share(n, m)
        assert se == 0 and how.startswith("exact")
        assert abs(value - top.mean() / n) < 4 * top.std() / n / 200


# Sizes small enough that every bag repeats often in the sample, so the held-out lookup of
# the generic estimator is close to the best bag reader: it must agree with the derivation.
DENSE = [
    ("copy", {"n_items": 3, "n_symbols": 3}),
    ("reverse", {"n_items": 3, "n_symbols": 4}),
    ("selective_copy", {"n_items": 2, "n_symbols": 3, "seq_len": 6}),
    ("induction", {"repeat_len": 4, "n_symbols": 4, "max_gap": 1}),
    ("mqar", {"n_pairs": 2, "seq_len": 6, "n_keys": 2, "n_values": 3, "distinct_values": False}),
    ("mqar", {"n_pairs": 2, "seq_len": 6, "n_keys": 2, "n_values": 2}),
    ("assoc_recall", {"n_pairs": 2, "n_keys": 2, "n_values": 3, "pair_tokens": "separate"}),
    ("majority", {"n_items": 5, "n_symbols": 3}),
    ("sort", {"n_items": 3, "n_symbols": 3}),
]


@pytest.mark.parametrize("name,knobs", DENSE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DENSE)])
def test_derived_bag_ceiling_equals_the_estimated_one_where_bags_repeat(name, knobs):
    task = make_task(name, knobs)
    value, _, _ = task.bag_ceiling()
    estimated = estimate_bag(_Splits(draw(task, 3 * 8192), causal=True))
    assert abs(estimated.value - value) < 4 * estimated.se + 0.01, (estimated, value)


def test_levels_are_ordered_and_the_estimates_come_with_a_standard_error():
    levels = reference_levels(make_task("mqar"), n_sequences=3 * 2**14)
    assert levels.chance.value == 0.125 and levels.chance.se == 0
    assert 0 < levels.fixed_routing.se < 0.01 and "held-out" in levels.fixed_routing.method
    # mqar: one fixed position holds one of the 4 values; reading it is right 1/4 of the time.
    assert levels.fixed_routing.value == pytest.approx(0.25, abs=0.02)
    row = levels.row()
    assert row["bag_ceiling"] == 0.25 and row["bag_ceiling_method"].startswith("exact")


def test_the_fixed_routing_reader_is_scored_on_sequences_it_was_not_fit_on(monkeypatch):
    """With one sequence per fit/choose/score part, a lookup fit on the first cannot know the
    others' random answers: the held-out estimate falls to chance, the in-sample one would be 1."""
    monkeypatch.setattr(reference, "CHUNK", 3)
    task = make_task("assoc_recall", {"pair_tokens": "separate", "n_values": 64, "n_keys": 64})
    levels = reference_levels(task, n_sequences=3)
    assert levels.fixed_routing.value < 0.5


def test_real_data_tasks_have_no_levels():
    task = make_task("stdlib_lm", {"max_tokens": 1000})
    assert reference_levels(task) is None


def test_causal_readers_see_only_earlier_positions_and_bidirectional_ones_all():
    """The visibility the estimators read; with it on, copy's bag at an output position would
    include the later blanks (no information), so the two estimates agree there."""
    s = draw(make_task("copy", {"n_items": 3, "n_symbols": 3}), 3 * 4096)
    causal, both = _Splits(s, causal=True), _Splits(s, causal=False)
    assert list(causal.visible(4)) == [0, 1, 2, 3] and list(both.visible(4)) == list(range(6))
    assert abs(estimate_bag(causal).value - estimate_bag(both).value) < 0.02


class UnderstatedRoute(CompetingRecall):
    """Claims its cheap route is right only at chance: the audit must measure it."""

    def __init__(self, config=None):
        super().__init__(config)
        self.cheap_level = self.chance


class HiddenRoute(CompetingRecall):
    """Declares a poor route (slot t copies the value of pair t + 1, right only where a
    random order put that pair there): the far better fixed route, value t, is hidden."""

    def __init__(self, config=None):
        super().__init__(config)
        p = self.threshold / 2**16
        self.cheap_level = (1 - p) / self.config.n_pairs

    def cheap_positions(self, i):
        t = i - 2 * self.config.n_pairs
        return [2 * ((t + 1) % self.config.n_pairs) + 1] if t >= 0 else []


def test_the_audit_measures_the_declared_cheap_route_and_finds_a_cheaper_one():
    n = 3 * 4096
    assert audit(make_task("competing_recall", {"cheap_share": 0.9}), n_sequences=n) == []
    understated = audit(UnderstatedRoute(CompetingRecallConfig(cheap_share=0.9)), n_sequences=n)
    assert any("cheap route is stated to reach 0.125" in f for f in understated), understated
    hidden = audit(HiddenRoute(CompetingRecallConfig(cheap_share=0.9)), n_sequences=n)
    assert any("yet fixed routing reaches 0.9" in f for f in hidden), hidden


def test_bidirectional_tasks_are_read_with_every_position_visible():
    """masked_copy's twin of a first-copy token comes later: a causal reading of the task
    would miss it (so the audit must read the task's own visibility, and does)."""
    task = make_task("masked_copy", {"n_items": 4, "n_symbols": 4})
    assert audit(task, n_sequences=3 * 4096) == []
    s = draw(task, 3 * 4096)
    causal = reference.estimate_fixed_routing(_Splits(s, causal=True))
    both = reference.estimate_fixed_routing(_Splits(s, causal=False))
    # Causally, half the targets (the first copy's) see only their own token: 0.5 + 0.5 * 0.325.
    assert both.value > 0.97 and causal.value < 0.75, (both, causal)
    levels = reference_levels(task, n_sequences=3 * 4096)  # its own reading by default
    assert levels.fixed_routing.value > 0.97


def test_masked_recall_bag_bound_is_above_the_estimated_bag_where_bags_repeat():
    """The derived bag level is an upper bound (a reader also told which tokens were masked,
    replaced or kept): never below the held-out lookup, close to it where bags repeat."""
    task = make_task(
        "masked_recall", {"n_pairs": 1, "n_distractors": 1, "n_keys": 2, "n_values": 2}
    )
    bound, _, how = task.bag_ceiling()
    assert how.startswith("upper bound")
    estimated = estimate_bag(_Splits(draw(task, 3 * 8192), causal=False))
    assert estimated.value <= bound + 4 * estimated.se
    assert bound - estimated.value < 0.15, (estimated, bound)


def test_the_fixed_routing_reader_sees_the_own_token_kept_in_masked_lm():
    """A kept token is the answer: fixed routing reaches at least the own token's level."""
    task = make_task("masked_recall", {"mask_share": 0.5, "random_share": 0.0})
    assert task.own_token_level == pytest.approx(1 / 16 + 0.5 * 15 / 16)
    levels = reference_levels(task, n_sequences=3 * 4096)
    assert levels.fixed_routing.value > task.own_token_level - 4 * levels.fixed_routing.se - 0.01
