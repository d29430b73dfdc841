"""The seq2seq tasks: batches agree with the host solver, the cross-attention masks are
truthful under single-token perturbations of the source, chance and reference levels hold
their stated values, sampling is deterministic under jit and vmap, bad knobs are refused."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from ablate import tasks
from ablate.config import ConfigError
from ablate.reference import audit, reference_levels
from ablate.tasks.translation import EOS, PAD, Seq2SeqTask

SEQ2SEQ = sorted(n for n, cls in tasks.TASKS.items() if getattr(cls, "seq2seq", False))
SMALL = {"n_items": 5, "min_items": 2, "n_symbols": 6, "table_seed": 7}
CASES = [(n, {}) for n in SEQ2SEQ] + [(n, SMALL) for n in SEQ2SEQ]
IDS = [f"{n}-{'small' if k else 'default'}" for n, k in CASES]
cases = pytest.mark.parametrize("case", CASES, ids=IDS)
BATCH = 512


@functools.cache
def _sampled(name: str, knobs: tuple):
    task = tasks.make_task(name, dict(knobs))
    batch = jax.jit(task.sample, static_argnums=1)(jax.random.key(0), BATCH)
    return task, tuple(np.asarray(x) for x in batch)


def sampled(case):
    return _sampled(case[0], tuple(case[1].items()))


def test_every_seq2seq_task_is_here():
    assert SEQ2SEQ == ["phrase_translate", "reverse_copy", "translate", "translate_reorder"]


@cases
def test_batches_match_the_host_solver(case):
    task, (inputs, targets, weights, deps, source, cross) = sampled(case)
    S, L = task.source_len, task.seq_len
    assert source.shape == (BATCH, S) and inputs.shape == targets.shape == (BATCH, L)
    assert deps.shape == (BATCH, L, L) and cross.shape == (BATCH, L, S)
    assert not deps.any()  # the targets are functions of the source alone
    assert source.max() < task.source_vocab_size and targets.max() < task.vocab_size
    lengths = (source != PAD).sum(1)
    c = task.config
    assert set(lengths) == set(range(c.min_items, c.n_items + 1))
    for b in range(64):
        assert task.is_valid(source[b])
        ref_targets, ref_weights = task.reference(source[b])
        np.testing.assert_array_equal(ref_weights, weights[b])
        np.testing.assert_array_equal(ref_targets * ref_weights, targets[b])
        np.testing.assert_array_equal(task.decoder_inputs(ref_targets, ref_weights), inputs[b])
        mask = np.zeros((L, S), bool)
        for i, js in enumerate(task.cross_sources(source[b])):
            mask[i, js] = True
        np.testing.assert_array_equal(mask, cross[b])
        # Every scored target but EOS has a source position deciding it, and only real ones.
        eos = int(np.flatnonzero(targets[b] == EOS)[0])
        assert cross[b, :eos].any(-1).all() and not cross[b, eos:].any()
        assert not cross[b][:, lengths[b] :].any()


def _same_lengths(task, a: int, b: int) -> bool:
    lengths = getattr(task, "phrase_len", None)
    return lengths is None or lengths[a] == lengths[b]


@cases
def test_cross_masks_are_truthful_under_perturbation(case):
    """Changing a source token outside deps[i] never moves target i; each marked position
    can move it. phrase_translate's mask is the word alignment: outside it, only changes that
    keep every phrase length are guaranteed not to move the target (see its docstring)."""
    task, (_, targets, weights, _, source, cross) = sampled(case)
    symbols = range(1, task.config.n_symbols + 1)
    for b in range(24):
        x = source[b]
        n = int((x != PAD).sum())
        base, _ = task.reference(x)
        moved = np.zeros((task.seq_len, task.source_len), bool)  # (target, source) pairs
        kept_by_any = np.zeros_like(moved)
        for j in range(n):
            for v in symbols:
                if v == x[j]:
                    continue
                y = x.copy()
                y[j] = v
                assert task.is_valid(y)
                now, _ = task.reference(y)
                changed = now != base
                moved[:, j] |= changed
                if _same_lengths(task, x[j], v):
                    kept_by_any[:, j] |= changed
        rows = weights[b] > 0
        # Sufficiency: nothing outside the mask moved a target (length-keeping changes).
        assert not (kept_by_any[rows] & ~cross[b][rows]).any()
        # Necessity: every marked position moved its target with some change.
        assert not (cross[b] & ~moved).any()


@cases
def test_reference_levels_and_audit(case):
    task, _ = sampled(case)
    assert audit(task, n_sequences=3 * 4096) == []
    levels = reference_levels(task, n_sequences=3 * 4096)
    assert levels.chance.value == task.chance
    assert task.chance < levels.fixed_routing.value <= 1.0
    if task.context_need == "position":
        assert levels.fixed_routing.value > 0.98


@pytest.mark.parametrize("name", ["translate", "translate_reorder", "reverse_copy"])
def test_exact_chance_agrees_with_the_host_estimate(name):
    for knobs in ({}, SMALL):
        task = tasks.make_task(name, knobs)
        estimated = Seq2SeqTask._chance(task)  # the base's host Monte Carlo
        assert abs(estimated - task.chance) < 0.01, (knobs, estimated, task.chance)


def test_sampling_is_deterministic_under_jit_and_vmap():
    task = tasks.make_task("phrase_translate", SMALL)
    keys = jax.random.split(jax.random.key(3), 3)
    together = jax.jit(jax.vmap(lambda k: task.sample(k, 8)))(keys)
    for z in range(3):
        alone = task.sample(keys[z], 8)
        for a, b in zip(together, alone, strict=True):
            np.testing.assert_array_equal(np.asarray(a)[z], np.asarray(b))


def test_the_language_follows_table_seed():
    a, b = (tasks.make_task("translate", {"table_seed": s}) for s in (0, 1))
    assert not np.array_equal(a.lexicon, b.lexicon)
    np.testing.assert_array_equal(a.lexicon, tasks.make_task("translate").lexicon)


def test_bad_knobs_are_refused_with_paths():
    with pytest.raises(ConfigError) as e:
        tasks.make_task("translate", {"n_items": 3, "min_items": 4, "max_phrase": 2})
    problems = dict(e.value.problems)
    assert "task.min_items" in problems and "task.max_phrase" in problems
    with pytest.raises(ConfigError) as e:
        tasks.make_task("phrase_translate", {"max_phrase": 4})
    assert e.value.problems[0][0] == "task.max_phrase"
