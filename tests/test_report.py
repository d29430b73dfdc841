"""The sweep report: statistics against hand-computed values, files, and number-driven words."""

import itertools
import json

import numpy as np
import pytest

from ablate import report
from ablate.model import ModelConfig, frozen_parts
from ablate.report import summarize, write_report

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def _frozen(**model) -> list[dict]:
    """What ablate.sweep writes in a row's "frozen": the model's own account (2 heads)."""
    cfg = ModelConfig(vocab_size=4, seq_len=4, d_model=8, n_heads=2, n_layers=1, **model)
    return frozen_parts(cfg)


FROZEN_QK = _frozen(attention="frozen")


LEVELS = {"fixed_routing_ceiling": 0.3, "fixed_routing_ceiling_se": 0.002}
LEVELS |= {"fixed_routing_ceiling_method": "estimated: held-out lookup", "bag_ceiling": 0.25}
LEVELS |= {"bag_ceiling_se": 0.0, "bag_ceiling_method": "exact: 1 / n_pairs"}


def _row(task, variant, seed, acc, *, chance=0.25, need="content", status="ok", **extra):
    """One results.jsonl row shaped as ablate.sweep writes it."""
    run = f"{task}-{variant}"
    row = {
        "run": run,
        "task": task,
        "context_need": need,
        "variant": variant,
        "attention": {"variant": variant},
        "frozen": FROZEN_QK if variant == "frozen" else [],
        "grid": {},
        "seed": seed,
        "status": status,
        "error": "",
        "chance": chance,
        **LEVELS,
        "eval_sequences": 128,
        "wall_seconds": 12.5,
        "run_dir": run,
    }
    if status == "ok":
        align = None if variant in ("uniform", "none") else 0.8 if variant == "learned" else 0.3
        row |= {
            "accuracy": acc,
            "sequence_accuracy": acc,
            "loss": 1.0 - acc,
            "alignment": [[align, None]],
            "alignment_max": align,
            "alignment_uniform": 0.1,
            "alignment_max_init": 0.12,
            "gradient_alignment_max_init": 0.15 if align else None,
            "gradient_alignment_max_peak": 0.6 + 0.01 * seed if align else None,
            "gradient_alignment_peak_step": 50 if align else None,
            "gradient_alignment_max": 0.4 if align else None,
            "steps": 100,
            "compile_seconds": 2.0,
        }
    return row | extra


def _sweep(tmp_path, accs, *, needs=None, curves=True, patterns=True):
    """A sweep folder from {(task, variant): [acc per seed]}, with curves and patterns."""
    rows = [
        _row(task, variant, seed, a, need=(needs or {}).get(task, "content"))
        for (task, variant), values in accs.items()
        for seed, a in enumerate(values)
    ]
    return _write(tmp_path, rows, curves=curves, patterns=patterns)


def _write(tmp_path, rows, *, curves=True, patterns=True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sweep.json").write_text(
        json.dumps(
            {
                "name": "fake",
                "experiment_file": "experiments/fake.toml",
                "overrides": [],
                "command": "ablate sweep experiments/fake.toml --set train.steps=100",
                "points": [],
            }
        )
    )
    for run, group in itertools.groupby(rows, key=lambda r: r["run"]):
        group = [r for r in group if r["status"] == "ok"]
        run_dir = tmp_path / run
        run_dir.mkdir(exist_ok=True)
        if curves:
            lines = []
            for r, step in itertools.product(group, (0, 50, 100)):
                frac = step / 100
                align = r["alignment_max"]
                lines.append(
                    {
                        "step": step,
                        "seed": r["seed"],
                        "kind": "train",
                        "loss": 1.0,
                        "accuracy": 0.5,
                        "learning_rate": 1e-3,
                        "grad_norm": 1.0,
                        "param_norm": 3.0,
                    }
                )
                lines.append(
                    {
                        "step": step,
                        "seed": r["seed"],
                        "kind": "eval",
                        "loss": 1.0,
                        "accuracy": r["chance"] + frac * (r["accuracy"] - r["chance"]),
                        "sequence_accuracy": 0.1,
                        "chance": r["chance"],
                        "alignment": [[None if align is None else 0.1 + frac * align, None]],
                        "uniform_alignment": 0.1,
                        "entropy": [[1.0, None]],
                        "distance": [[2.0, None]],
                    }
                )
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        if patterns and group and group[0]["variant"] == "learned":
            rng = np.random.default_rng(0)
            probs = rng.dirichlet(np.ones(6), size=(len(group), 1, 2, 6))
            deps = np.eye(6, dtype=bool)[None].repeat(len(group), 0)
            np.savez(
                run_dir / "patterns_final.npz",
                probs=probs,
                deps=deps,
                weights=np.ones((len(group), 6)),
            )
    return tmp_path


def _group(summary, task):
    return next(g for g in summary["groups"] if g["task"] == task)


def test_dependence_is_exactly_one_when_the_variant_sits_at_chance():
    rows = [_row("t", "learned", s, 1.0) for s in range(3)]
    rows += [_row("t", "uniform", s, 0.25) for s in range(3)]
    dep = _group(summarize(rows), "t")["variants"]["uniform"]["dependence"]
    assert (dep["mean"], dep["low"], dep["high"]) == pytest.approx((1.0, 1.0, 1.0))


def test_dependence_is_paired_per_seed_with_a_t_interval_by_hand():
    from scipy import stats

    learned, uniform = [0.9, 1.0, 0.8], [0.5, 0.6, 0.6]
    rows = [_row("t", "learned", s, a, chance=0.1) for s, a in enumerate(learned)]
    rows += [_row("t", "uniform", s, a, chance=0.1) for s, a in enumerate(uniform)]
    v = _group(summarize(rows), "t")["variants"]
    per_seed = [(a - b) / (a - 0.1) for a, b in zip(learned, uniform)]
    dep = v["uniform"]["dependence"]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(per_seed), scale=stats.sem(per_seed))
    assert (dep["mean"], dep["low"], dep["high"]) == pytest.approx((np.mean(per_seed), low, high))
    assert dep["n"] == 3 and dep["method"] == "t"
    assert v["uniform"]["per_seed"]["2"]["dependence"] == pytest.approx(0.2 / 0.7)
    diff = v["uniform"]["difference"]
    assert diff["mean"] == pytest.approx(np.mean(np.subtract(learned, uniform)))
    acc = v["learned"]["accuracy"]
    # The t-interval reaches past 1; an accuracy cannot, so the interval is cut there.
    assert acc["mean"] == pytest.approx(0.9) and acc["low"] < 0.8 and acc["high"] == 1.0


def test_full_report_files_and_numbers(tmp_path):
    accs = {
        ("assoc", "learned"): [1.0, 0.96, 0.98],
        ("assoc", "uniform"): [0.25, 0.27, 0.26],
        ("assoc", "frozen"): [0.6, 0.7, 0.65],
        ("majority", "learned"): [0.9, 0.92, 0.91],
        ("majority", "uniform"): [0.9, 0.91, 0.92],
    }
    sweep = _sweep(tmp_path / "s", accs, needs={"majority": "none"})
    path = write_report(sweep)
    text = path.read_text()
    assert path == sweep / "REPORT.md"
    assert "ablate sweep experiments/fake.toml --set train.steps=100" in text
    pngs = sorted(p.name for p in (sweep / "report").glob("*.png"))
    assert pngs == [
        "accuracy.png",
        "curves_assoc.png",
        "curves_majority.png",
        "dependence.png",
        "patterns_assoc-learned.png",
        "patterns_majority-learned.png",
    ]
    for name in pngs:
        assert (sweep / "report" / name).read_bytes()[:8] == PNG_HEADER
        assert f"](report/{name})" in text
    summary = json.loads((sweep / "report" / "summary.json").read_text())
    assoc = _group(summary, "assoc")["variants"]
    assert assoc["learned"]["accuracy"]["mean"] == pytest.approx(0.98)
    per_seed = [(a - b) / (a - 0.25) for a, b in zip([1.0, 0.96, 0.98], [0.25, 0.27, 0.26])]
    assert assoc["uniform"]["dependence"]["mean"] == pytest.approx(np.mean(per_seed))
    assert assoc["learned"]["dependence"] is None
    assert assoc["learned"]["alignment_max"]["mean"] == pytest.approx(0.8)
    assert _group(summary, "majority")["variants"]["uniform"]["verdict"] == "dispensable"
    assert "0.80 of their mass" in text and "0.12 at init" in text and "uniform: 0.10" in text
    # The report opens with the answer: one table, before how to read it and the details.
    assert text.index("## Answer") < text.index("## How to read") < text.index("## assoc")
    answer = text[text.index("## Answer") : text.index("## How to read")]
    assert "95% Student-t interval over 3 seeds, each seed on the same 128 held-out" in answer
    # The loss's pull on learned heads, from the rows' gradient alignment.
    assert "a uniform push gives 0.10) was 0.15 [0.15, 0.15] at init, peaked at 0.61" in text
    assert "(step 50 on average) and ended at 0.40" in text
    assert "training pushed attention towards the context" in text
    assert "| assoc (needs content) | 0.25 / 0.30 +- 0.002 / 0.25 | learned |" in answer
    assert "| majority (control: no pairwise context) |" in answer
    assert (
        "| uniform | learned routing | 0.26 [0.24, 0.28] | at chance, below fixed, at bag" in answer
    )
    assert "| essential |" in answer and "| dispensable |" in answer
    assert "Reference levels: chance 0.25" in text and "exact: 1 / n_pairs" in text


def _dependence_rows(per_seed_dependence, learned=1.0, chance=0.25):
    """Rows whose per-seed context dependence of `uniform` is exactly the given values."""
    rows = [
        _row("t", "learned", s, learned, chance=chance) for s in range(len(per_seed_dependence))
    ]
    gap = learned - chance
    rows += [
        _row("t", "uniform", s, learned - d * gap, chance=chance)
        for s, d in enumerate(per_seed_dependence)
    ]
    return summarize(rows)["groups"][0]


@pytest.mark.parametrize(
    "per_seed,word,phrase",
    [
        ([0.9, 0.95, 1.0], "essential", "loses almost all"),
        ([0.03, 0.05, 0.04], "minor", "small but measurable"),  # excludes 0, close to it
        ([0.3, 0.4, 0.5], "partial", "interval excludes 0 and does not lie above 0.8"),
        ([-0.02, 0.01, 0.03], "dispensable", "includes 0 and stays below 0.2"),
        ([-0.1, 0.1, 0.3], "inconclusive", "not settled by 3 seeds"),
        ([-0.3, -0.2, -0.25], "better", "does better than learned"),
        ([0.5, 0.6], "too few seeds", "no interval, so no verdict"),
    ],
)
def test_every_verdict_branch_is_chosen_from_the_interval_bounds(per_seed, word, phrase):
    learned = 0.8 if word == "better" else 1.0
    g = _dependence_rows(per_seed, learned=learned)
    uniform = g["variants"]["uniform"]
    assert uniform["verdict"] == word
    assert phrase in g["statement"]
    if word != "too few seeds":
        assert "averages every visible position" in g["statement"]  # what uniform lacks
    if word in ("minor", "dispensable"):
        low, high = uniform["dependence"]["low"], uniform["dependence"]["high"]
        assert (low > 0) == (word == "minor") and high < 0.2


def test_none_is_read_as_lacking_any_mixing_never_as_lacking_learned_attention():
    rows = [_row("t", "learned", s, 1.0) for s in range(3)]
    rows += [_row("t", "none", s, 0.25 + 0.01 * s) for s in range(3)]
    g = summarize(rows)["groups"][0]
    assert "the task needs what `none` lacks, any mixing between positions" in g["statement"]
    assert "learned attention in" not in g["statement"]


def test_variants_are_read_against_the_reference_levels():
    rows = [_row("t", "learned", s, a) for s, a in enumerate([1.0, 0.99, 1.0])]
    rows += [_row("t", "uniform", s, a) for s, a in enumerate([0.4, 0.42, 0.41])]
    rows += [_row("t", "random_fixed", s, a) for s, a in enumerate([0.3, 0.29, 0.31])]
    g = summarize(rows)["groups"][0]
    v = g["variants"]
    assert v["uniform"]["levels"] == {"chance": "above", "fixed": "above", "bag": "above"}
    assert v["random_fixed"]["levels"] == {"chance": "above", "fixed": "at", "bag": "above"}
    assert (
        "`uniform` exceeds the bag ceiling: a two-layer uniform model is not order-free"
        in g["statement"]
    )
    assert (
        "`random_fixed` reaches 0.30 [0.28, 0.32]: above chance 0.25, at the fixed"
        in g["statement"]
    )
    assert "exceeds the fixed-routing" not in g["statement"]


def test_frozen_gets_one_consistent_sentence_naming_what_stays_trainable(tmp_path):
    accs = {("assoc", "learned"): [1.0, 1.0, 0.99], ("assoc", "frozen"): [0.99, 1.0, 0.98]}
    statement = json.loads(
        (write_report(_sweep(tmp_path, accs)).parent / "report" / "summary.json").read_text()
    )["groups"][0]["statement"]
    assert "W_q, W_k in 2 heads" in statement and "embeddings and the rest" in statement
    assert "`frozen` is not a no-learned-context ablation" in statement
    assert statement.count("not a no-learned-context ablation") == 1
    # With the embeddings frozen too, the sentence says what still trains.
    frozen = _frozen(attention="frozen", freeze=("token_embed", "pos_embed"))
    rows = [_row("t", "learned", s, 1.0) for s in range(3)]
    rows += [_row("t", "frozen", s, 0.5, frozen=frozen) for s in range(3)]
    g = summarize(rows)["groups"][0]
    assert "value/output projections, MLPs, norms and readout still train" in g["statement"]
    assert "embeddings stay at init too" in g["statement"]


def test_learned_at_chance_makes_dependence_undefined():
    rows = [_row("t", "learned", s, a) for s, a in enumerate([0.25, 0.3, 0.24])]
    rows += [_row("t", "uniform", s, 0.25) for s in range(3)]
    g = summarize(rows)["groups"][0]
    assert g["variants"]["uniform"]["dependence"] is None
    assert (
        "not shown above chance 0.25 with 3 seeds: it is not shown to have learned"
        in g["statement"]
    )


def test_a_masked_lm_model_at_the_own_token_level_did_not_learn():
    # Above chance (0.0625) but within what the kept tokens give away (0.156).
    own = dict(chance=0.0625, own_token_level=0.156)
    rows = [_row("t", "learned", s, a, **own) for s, a in enumerate([0.15, 0.17, 0.16])]
    rows += [_row("t", "none", s, 0.14, **own) for s in range(3)]
    g = summarize(rows)["groups"][0]
    assert g["variants"]["none"]["dependence"] is None
    assert "not shown above the own-token level 0.16 (chance 0.06" in g["statement"]
    # Above the own-token level: learned, and the dependence is defined.
    rows = [_row("t", "learned", s, a, **own) for s, a in enumerate([0.9, 0.95, 0.92])]
    rows += [_row("t", "none", s, 0.156, **own) for s in range(3)]
    dependence = summarize(rows)["groups"][0]["variants"]["none"]["dependence"]
    # A variant at the own-token level loses all that learned attention gains over it.
    assert dependence["mean"] == pytest.approx(1.0)


def test_single_seed_and_task_without_learned(tmp_path):
    rows = [
        _row("t", "learned", 0, 1.0),
        _row("t", "uniform", 0, 0.25),
        _row("u", "uniform", 0, 0.5),
    ]
    summary = summarize(rows)
    t, u = _group(summary, "t"), _group(summary, "u")
    assert "1 seed, no interval" in t["statement"]
    assert t["variants"]["uniform"]["dependence"]["mean"] == pytest.approx(1.0)
    assert t["variants"]["uniform"]["verdict"] == "too few seeds"
    assert "no successful run with learned attention" in u["statement"]
    # No metrics files and None alignments: still a report, saying there are no curves.
    text = write_report(_write(tmp_path, rows, curves=False, patterns=False)).read_text()
    assert "no metrics.jsonl" in text


def test_failed_rows_listed_excluded_and_rerun_is_idempotent(tmp_path):
    rows = [_row("t", "learned", s, 1.0) for s in range(2)]
    rows += [_row("t", "uniform", 0, 0.25)]
    # A failed row carrying a bogus accuracy proves it is kept out of the statistics.
    rows += [
        _row(
            "t",
            "uniform",
            1,
            0.25,
            status="diverged",
            accuracy=0.9,
            error="training diverged at step 7 (seed 1): loss is not finite\ntrace",
        )
    ]
    sweep = _write(tmp_path, rows)
    first = write_report(sweep).read_text()
    summary = json.loads((sweep / "report" / "summary.json").read_text())
    uniform = summary["groups"][0]["variants"]["uniform"]
    assert uniform["accuracy"]["mean"] == pytest.approx(0.25)
    assert (uniform["seeds_ok"], uniform["seeds_total"]) == (1, 2)
    (failed,) = summary["failed"]
    assert (failed["run"], failed["status"], failed["seeds"], failed["failed"]) == (
        "t-uniform",
        "diverged",
        [0],
        [1],
    )
    assert failed["error"] == "training diverged at step 7 (seed 1): loss is not finite"
    assert "| t-uniform | 1 | diverged | training diverged at step 7" in first
    assert "trace" not in first
    first_summary = (sweep / "report" / "summary.json").read_text()
    assert write_report(sweep).read_text() == first
    assert (sweep / "report" / "summary.json").read_text() == first_summary


def test_grid_points_are_separate_groups():
    rows = [
        _row("t", v, s, a, grid={"model.n_layers": n})
        for n, (v, a) in itertools.product((1, 2), (("learned", 1.0), ("uniform", 0.25)))
        for s in (0, 1)
    ]
    labels = [g["label"] for g in summarize(rows)["groups"]]
    assert labels == ["t (model.n_layers=1)", "t (model.n_layers=2)"]


REAL = {"fixed_routing_ceiling": None, "bag_ceiling": None}
REAL |= {f"{k}_method": "not computable: real data has no known generating rule" for k in REAL}
# What a real-data row holds: no dependency mask, so no alignment.
NO_MASK = dict(
    alignment=[[None]], alignment_max=None, alignment_uniform=None, alignment_max_init=None
)


def test_real_data_shows_perplexity_not_alignment(tmp_path):
    rows = [
        _row("stdlib_lm", v, s, acc, need="unknown", chance=1 / 256, perplexity=p, **NO_MASK) | REAL
        for v, values in {
            "learned": [(0.48, 7.2), (0.49, 7.4)],
            "uniform": [(0.41, 9.8)] * 2,
        }.items()
        for s, (acc, p) in enumerate(values)
    ]
    text = (write_report(_write(tmp_path, rows))).read_text()
    detail = text[text.index("## stdlib_lm") :]
    assert "| perplexity | seeds ok/total |" in detail and "best-head alignment |" not in detail
    assert "fixed-routing ceiling n/a (not computable: real data" in detail
    g = summarize(rows)["groups"][0]
    assert g["variants"]["learned"]["perplexity"]["mean"] == pytest.approx(7.3)
    assert "`uniform` 9.80" in g["statement"] and "lower is better" in g["statement"]
    # Rows of older sweeps carry only the loss: perplexity is exp(loss).
    old = [{k: v for k, v in r.items() if k != "perplexity"} for r in rows]
    mean = summarize(old)["groups"][0]["variants"]["uniform"]["perplexity"]["mean"]
    assert mean == pytest.approx(np.exp(1 - 0.41))


def test_no_alignment_claim_where_the_dependencies_cover_every_position():
    rows = [_row("maj", "learned", s, 1.0, need="none", alignment_uniform=0.97) for s in range(3)]
    rows = [r | {"alignment_max": 0.975} for r in rows]
    g = summarize(rows)["groups"][0]
    assert "alignment cannot tell here" in g["statement"]
    assert "more than uniform" not in g["statement"] and "pull" not in g["statement"]


def test_a_pull_that_stays_at_the_uniform_share_is_said_so():
    rows = [
        _row("t", "learned", s, 1.0, gradient_alignment_max_peak=0.05 + 0.01 * s) for s in range(3)
    ]
    g = summarize(rows)["groups"][0]
    assert "the loss never pulled attention towards the dependency positions" in g["statement"]


def test_rows_of_earlier_versions_with_frozen_parts_in_text_read_as_today(tmp_path):
    """Old results.jsonl rows name frozen parts in text; the report reads them as the entries
    today's sweep writes (the same statement as for today's rows)."""
    from ablate.report import _upgraded_row

    old_text = ["token_embed", "pos_embed", "layer 0 head 0: W_q, W_k", "layer 0 head 1: W_q, W_k"]
    today = _frozen(attention="frozen", freeze=("token_embed", "pos_embed"))
    assert _upgraded_row({"frozen": old_text})["frozen"] == today
    assert _upgraded_row({"frozen": ["layer 1 head 0: random pattern"]})["frozen"] == [
        {"part": "layer 1 head 0", "kind": "head", "what": "random pattern",
         "content_routing": False}
    ]  # fmt: skip
    accs = {("assoc", "learned"): [1.0, 1.0, 0.99], ("assoc", "frozen"): [0.99, 1.0, 0.98]}
    sweep_dir = _sweep(tmp_path, accs)
    results = sweep_dir / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    for r in rows:
        if r["variant"] == "frozen":
            r["frozen"] = old_text[2:]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((write_report(sweep_dir).parent / "report" / "summary.json").read_text())
    assert "W_q, W_k in 2 heads" in summary["groups"][0]["statement"]


def _onset_rows(alignment_minus_loss, pull_minus_alignment=None, *, spacing=50):
    """Learned rows whose per-seed alignment onset - loss onset are the given steps."""
    rows = []
    for s, d in enumerate(alignment_minus_loss):
        onsets = {"loss_onset_step": 300, "alignment_onset_step": None if d is None else 300 + d}
        if pull_minus_alignment is not None:
            onsets["gradient_alignment_onset_step"] = 300 + d + pull_minus_alignment[s]
        rows.append(_row("t", "learned", s, 1.0, eval_spacing=spacing, **onsets))
    return summarize(rows)["groups"][0]


@pytest.mark.parametrize(
    "per_seed,phrase",
    [
        ([-100, -90, -110], "the alignment's onset comes before the loss's"),
        ([100, 90, 110], "the alignment's onset comes after the loss's"),
        ([-100, -50, -150], "the interval includes 0"),  # spread: reaches 0
        (
            [-50, 0, 50],
            "the interval includes 0: the alignment's and the loss's onsets are not told "
            "apart (at evals at most 50 steps apart around the onsets, with these seeds)",
        ),
        ([0, 0, 0], "the interval includes 0"),  # the same eval every seed
        ([-100, -50], "with 2 seed(s) there is no interval, so no order is claimed"),
    ],
)
def test_the_alignment_onset_is_ordered_against_the_loss_from_the_interval_bounds(per_seed, phrase):
    g = _onset_rows(per_seed)
    d = g["variants"]["learned"]["alignment_minus_loss_onset"]
    assert d["mean"] == pytest.approx(np.mean(per_seed))
    assert phrase in g["statement"]
    assert "steps only as fine as the evals, at most 50 steps apart around the" in g["statement"]
    assert f"alignment onset - loss onset is {np.mean(per_seed):.0f}" in g["statement"]
    assert "the pull's" not in g["statement"]  # no pull onset recorded: nothing said of it
    said = [w for w in ("comes before", "comes after", "includes 0") if w in g["statement"]]
    assert len(said) <= 1 and all(w in phrase for w in said)  # one order, the one expected


@pytest.mark.parametrize(
    "pull,phrase",
    [
        ([-100, -90, -110], "the pull's onset comes before the alignment's"),
        ([20, 30, 25], "the pull's onset comes after the alignment's"),
        ([-50, 10, 50], "the pull's and the alignment's onsets are not told apart"),
    ],
)
def test_the_pull_onset_is_ordered_against_the_alignment_the_same_way(pull, phrase):
    g = _onset_rows([-100, -90, -110], pull)
    assert "the alignment's onset comes before the loss's" in g["statement"]
    assert phrase in g["statement"]
    assert g["variants"]["learned"]["gradient_alignment_onset_step"]["mean"] == pytest.approx(
        300 - 100 + np.mean(pull)
    )


def test_seeds_whose_alignment_never_rose_have_no_onset_and_are_counted():
    g = _onset_rows([-100, None, -50, -150])
    assert "(1 of 4 seeds' alignment did not rise: no onset, left out)" in g["statement"]
    assert g["variants"]["learned"]["alignment_minus_loss_onset"]["n"] == 3
    g = _onset_rows([None, None, None])
    assert "did not rise above its step-0 value in any of the 3 seeds" in g["statement"]
    assert "Onsets (" not in g["statement"]


def _control_rows(task, alignment_max, entropy_min, *, alignment_uniform=0.5):
    """Learned rows of a control task with the given per-seed alignment and lowest-head
    entropy (uniform attention's entropy is 2.0, its alignment `alignment_uniform`)."""
    rows = []
    for s, (a, e) in enumerate(zip(alignment_max, entropy_min)):
        fields = dict(
            alignment_max=a,
            alignment_mean=a,
            alignment_uniform=alignment_uniform,
            entropy_mean=2.0 - 0.001 * s,
            entropy_min=e,
            entropy_uniform=2.0,
            entropy_mean_init=2.2,
            entropy_min_init=1.5,
        )
        rows.append(_row(task, "learned", s, 1.0, need="none", **fields))
    return summarize(rows)["groups"][0]


def test_controls_say_whether_learned_attention_stays_at_the_uniform_level():
    # Alignment within 0.01 of uniform's, the mean-head entropy too, one head concentrates.
    g = _control_rows("majority", [0.5, 0.51, 0.505], [1.0, 0.9, 1.1])
    text = g["statement"]
    assert (
        "for the best head: it stays at the uniform level (the interval lies within +-0.02" in text
    )
    assert "nats averaged over heads: it stays at the uniform level" in text
    assert (
        "for the most concentrated head -1.00 [-1.25, -0.75]: it ends below the uniform level "
        "by 1.00 nats (more concentrated than uniform attention)" in text
    )
    # From init (2.2 on average): training moved the mean-head entropy by -0.20.
    assert "Training moved it by -0.20 [" in text
    low = g["variants"]["learned"]["entropy_min_minus_uniform"]
    assert (low["mean"], low["high"] < 0) == (pytest.approx(-1.0), True)
    # An interval that holds 0 but is wide is not "stays".
    g = _control_rows("majority", [0.3, 0.7, 0.5], [2.0, 2.0, 2.0])
    assert (
        "not distinguishable from the uniform level, but the interval reaches beyond +-0.02"
        in g["statement"]
    )
    # Memorize has no context dependencies: entropy only, and said so.
    g = _control_rows("memorize", [None] * 3, [2.0, 1.99, 2.0], alignment_uniform=None)
    assert "alignment does not apply, only entropy" in g["statement"]
    assert "final alignment minus" not in g["statement"]
    # Where the mask is almost every visible position, alignment is not read at all.
    g = _control_rows("majority", [0.97, 0.98, 0.97], [2.0, 2.0, 2.0], alignment_uniform=0.97)
    assert "final alignment minus" not in g["statement"] and "entropy minus" in g["statement"]
    # A task that needs context gets no control sentence.
    rows = [_row("t", "learned", s, 1.0, entropy_mean=1.0, entropy_uniform=2.0) for s in range(3)]
    assert "Control" not in summarize(rows)["groups"][0]["statement"]


def _route_rows(conflict, accuracy=1.0, rise=0.1):
    """Learned rows of a two-route task (chance 0.125) with the given per-seed accuracy on
    conflict sequences."""
    fields = dict(
        cheap_route="slot t copies the value of pair t",
        cheap_level=0.9,
        alignment_uniform_cheap=0.07,
        alignment_cheap_max=0.9,
        conflict_alignment_max=0.3,
        conflict_alignment_cheap_max=0.95,
        gradient_alignment_cheap_max_peak=0.5,
        alignment_cheap_onset_step=40,
        conflict_accuracy_onset_step=120,
        conflict_share=0.075,
        conflict_fixed_routing_ceiling=0.33,
        conflict_bag_ceiling=0.25,
    )
    rows = [
        _row("competing", "learned", s, accuracy, chance=0.125, need="competing", **fields)
        | {
            "conflict_accuracy": c,
            # The cheap route's answer where the accuracy is 0; some of each otherwise.
            "conflict_cheap_agreement": 0.95 + 0.01 * s if c < 0.05 else 0.3,
            "cheap_phase_start": 50,
            "cheap_phase_end": None if c < 0.05 else 200,
            "conflict_accuracy_tail_rise": rise + 0.01 * s,
            "conflict_alignment_uniform": 0.1,
            "conflict_gradient_alignment_max_init": 0.2,
            "conflict_gradient_alignment_max_peak": 0.7 + 0.01 * s,
            "conflict_gradient_alignment_peak_step": 100,
            "conflict_gradient_alignment_max": 0.6 + 0.01 * s,
        }
        for s, c in enumerate(conflict)
    ]
    return summarize(rows)


@pytest.mark.parametrize(
    "conflict, route, phrase",
    [
        ([0.9, 0.95, 0.99], "content", "it answers by content (conflict accuracy half way up"),
        ([0.0, 0.01, 0.0], "cheap", "it answers as the cheap route does"),
        # Mean 0.22 above chance but at most what readers without content reach (0.33).
        ([0.2, 0.25, 0.22], "no content", "per seed 0.20, 0.25, 0.22) and gives the cheap"),
        # Mean 0.35 above 0.33, but the interval reaches below it: no claim.
        ([0.2, 0.5, 0.35], "unclear", "the interval straddles that level"),
    ],
)
def test_the_route_taken_is_read_from_the_conflict_accuracy_bounds(conflict, route, phrase):
    summary = _route_rows(conflict)
    g = summary["groups"][0]
    assert report.route_taken(g, g["variants"]["learned"]) == route
    assert phrase in g["statement"]
    assert "which alone reaches 0.90 here" in g["statement"]
    assert "There the loss's pull on the content route's positions" in g["statement"]
    assert "the routes disagree on 0.075 of training targets" in g["statement"]
    assert "3 of 3 seeds went through a cheap phase" in g["statement"]
    # Still rising at the end (0.11 [0.09, 0.13]): said whatever the verdict.
    assert "was still rising at the end (0.11 [" in g["statement"]
    why = report._why(summary)
    assert why[0] == "## Why attention learned context here"
    assert any(line.startswith("| competing |") and f"| {route} (" in line for line in why)


def test_a_conflict_accuracy_that_stopped_moving_is_not_called_still_rising():
    g = _route_rows([0.9, 0.95, 0.99], rise=-0.01)["groups"][0]  # -0.01, 0.00, 0.01
    assert "still rising" not in g["statement"]


def test_no_route_sentence_without_a_cheap_route():
    rows = [_row("t", "learned", s, 1.0) for s in range(3)]
    g = summarize(rows)["groups"][0]
    assert report.route_taken(g, g["variants"]["learned"]) is None
    assert "Two routes" not in g["statement"]


def test_mixed_heads_say_which_kind_the_other_heads_are():
    mixed = {"attention": [["learned", "uniform"], "uniform"]}
    long, short = report._lacks(mixed, "one_learned")
    assert long.startswith("in some heads, ") and long.endswith("(the other heads are learned)")
    assert short.endswith("(some heads)")
    long, _ = report._lacks({"attention": [["uniform", "frozen"]]}, "no_learned")
    assert "the other heads are learned" not in long and long.count("in some heads") == 2
    s2s = {"attention": "learned", "decoder_attention": "learned", "cross_attention": "uniform"}
    long, short = report._lacks(s2s, "uniform_cross")
    assert long.startswith("in cross-attention, ") and short.endswith("(cross-attention)")


def test_an_encoder_decoders_curves_and_patterns_are_its_cross_attentions(tmp_path):
    from ablate.runfolder import METRICS_FILE, PATTERNS_FILE

    row = dict(kind="eval", seed=0, step=10, accuracy=0.5, uniform_alignment=0.9)
    row |= dict(alignment=[[0.9]], gradient_alignment=[[0.8]])  # the decoder's own: not these
    row |= dict(cross_alignment=[[0.3, 0.6]], cross_gradient_alignment=[[0.2, 0.4]])
    row |= dict(cross_uniform_alignment=0.25)
    (tmp_path / METRICS_FILE).write_text(json.dumps(row) + "\n")
    c = report._curves(tmp_path, [0])
    assert (c["alignment"], c["pull"], c["uniform"], c["cross"]) == ([0.6], [0.4], [0.25], True)
    own, cross = np.full((1, 1, 1, 3, 3), 0.5), np.full((1, 1, 1, 3, 2), 0.25)
    deps = np.ones((1, 3, 2), bool)
    np.savez(
        tmp_path / PATTERNS_FILE,
        probs=own,
        deps=np.ones((1, 3, 3), bool),
        weights=np.ones((1, 3)),
        cross_probs=cross,
        cross_deps=deps,
    )
    probs, mask, _, what = report._load_patterns(tmp_path / PATTERNS_FILE)
    assert probs.shape == (1, 1, 3, 2) and mask.shape == (3, 2) and what.startswith("cross")
