"""Sweeps: table, resume without duplicates, failures recorded, experiment files valid."""

import json
from pathlib import Path

import pytest
from flax import nnx

import ablate.sweep as sweep_module
from ablate.config import ConfigError, load_toml
from ablate.core import build_model
from ablate.model import Transformer
from ablate.seq2seq import Seq2SeqConfig
from ablate.sweep import expand, run_sweep

TINY_SWEEP = """
[sweep]
name = "tiny"
variants = ["learned", "uniform"]
probe = ["learned"]
tasks = [{ name = "assoc_recall", n_pairs = 2, n_keys = 4, n_values = 2 },
         { name = "majority", n_items = 5, n_symbols = 3 }]
[model]
d_model = 16
n_heads = 2
n_layers = 1
[train]
steps = 20
batch_size = 8
seeds = [0, 1]
steps_per_dispatch = 10
log_every = 10
eval_every = 10
eval_batches = 1
gradient_alignment = false   # measured and tested in test_train
checkpoint_every = 20
compile_cache = false
"""


def rows(sweep_dir: Path):
    return [json.loads(x) for x in (sweep_dir / "results.jsonl").read_text().splitlines()]


def test_tiny_sweep_table_report_resume_and_failure(tmp_path, monkeypatch):
    exp_file = tmp_path / "tiny.toml"
    exp_file.write_text(TINY_SWEEP)
    real_train = sweep_module.train

    def flaky_train(exp, run_dir, **kw):
        if exp.name == "majority-uniform":
            raise RuntimeError("simulated crash")
        return real_train(exp, run_dir, **kw)

    monkeypatch.setattr(sweep_module, "train", flaky_train)
    summary = run_sweep(exp_file, workdir=tmp_path, progress=False)
    sweep_dir = tmp_path / "tiny"
    table = rows(sweep_dir)
    assert len(table) == 4 * 2  # 2 tasks x 2 variants x 2 seeds
    failed = [r for r in table if r["status"] != "ok"]
    assert {r["run"] for r in failed} == {"majority-uniform"}
    assert "simulated crash" in failed[0]["error"]
    ok = [r for r in table if r["status"] == "ok"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in ok)
    assert "1 failed" in summary
    assert (sweep_dir / "REPORT.md").is_file() and (sweep_dir / "results.csv").is_file()
    pngs = list((sweep_dir / "report").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    report = (sweep_dir / "REPORT.md").read_text()
    assert "majority-uniform" in report
    # Learned runs were probed post hoc, and the report says what the probe found.
    assert (sweep_dir / "assoc_recall-learned" / "probe" / "probe.json").is_file()
    assert not (sweep_dir / "assoc_recall-uniform" / "probe").exists()
    assert "Post-hoc head ablation of `learned`" in report

    # Rerun: only the failed run is retried; nothing is duplicated.
    monkeypatch.setattr(sweep_module, "train", real_train)
    trained = []

    def counting_train(exp, run_dir, **kw):
        trained.append(exp.name)
        return real_train(exp, run_dir, **kw)

    monkeypatch.setattr(sweep_module, "train", counting_train)
    run_sweep(exp_file, workdir=tmp_path, progress=False)
    assert trained == ["majority-uniform"]
    table = rows(sweep_dir)
    assert len(table) == 8
    assert all(r["status"] == "ok" for r in table)
    keys = [(r["run"], r["seed"]) for r in table]
    assert len(set(keys)) == len(keys)

    run_sweep(exp_file, workdir=tmp_path, progress=False)
    assert trained == ["majority-uniform"]  # a third run trains nothing
    assert len(rows(sweep_dir)) == 8


def test_sweep_points_are_validated_together(tmp_path):
    data = load_toml_text(TINY_SWEEP)
    data["sweep"]["variants"] = ["learned", "telepathy"]
    data["sweep"]["tasks"].append({"name": "copy", "n_items": 0})
    with pytest.raises(ConfigError) as e:
        expand(data)
    text = str(e.value)
    assert "telepathy" in text and "task.n_items" in text


def test_duplicate_run_names_are_refused():
    data = load_toml_text(TINY_SWEEP)
    data["sweep"]["tasks"].append({"name": "majority"})
    with pytest.raises(ConfigError, match="share the run name"):
        expand(data)


def load_toml_text(text):
    import tomllib

    return tomllib.loads(text)


@pytest.mark.parametrize("path", sorted(Path("experiments").glob("*.toml")), ids=lambda p: p.name)
def test_every_experiment_file_loads_and_builds_a_model(path, monkeypatch):
    if "NEEDS NETWORK" in path.read_text():
        # Tests never reach the network: a tiny in-memory dataset stands in for the hub one.
        import datasets

        import ablate.data

        fake = datasets.Dataset.from_dict({"text": ["good", "bad"] * 4, "label": [1, 0] * 4})
        monkeypatch.setattr(ablate.data, "load_dataset", lambda *a, **k: fake)
    name, points = expand(load_toml(path), default_name=path.stem)
    assert points
    header = path.read_text().splitlines()[0]
    assert header.startswith("#")
    assert "ablate " in path.read_text().split("\n\n")[0]  # the exact command is in the header
    for point in points[:: max(1, len(points) // 4)]:
        cfg = point.experiment.model
        model = nnx.eval_shape(lambda cfg=cfg: build_model(cfg, nnx.Rngs(0)))
        if isinstance(cfg, Seq2SeqConfig):  # an encoder-decoder: encoder and decoder blocks
            assert (len(model.encoder), len(model.blocks)) == (cfg.n_layers, cfg.n_decoder_layers)
        else:
            assert isinstance(model, Transformer) and len(model.blocks) == cfg.n_layers


def test_list_names_every_variant_and_task(capsys):
    from ablate.attention import MIXERS
    from ablate.cli import main
    from ablate.tasks import task_names

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*MIXERS, *task_names()]:
        assert f"  {name} " in out, name
    assert "stdlib_lm" in out and "[unknown]" in out


def test_list_states_every_synthetic_tasks_reference_levels(capsys, monkeypatch):
    from ablate import reference
    from ablate.cli import main

    monkeypatch.setattr(reference, "N_SEQUENCES", 3 * 1024)  # the numbers are not the point
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    levels = out[out.index("reference levels") :]
    assert "  mqar             chance 0.125, fixed routing 0." in levels
    assert ", bag 0.250" in levels.split("mqar")[1].splitlines()[0]
    assert "stdlib_lm        not computable" in levels
    assert main(["list", "--no-levels"]) == 0
    assert "reference levels" not in capsys.readouterr().out


def test_eval_history_reads_the_pull_at_init_its_peak_and_the_end(tmp_path):
    from ablate.sweep import _eval_history

    lines = [
        {"kind": "train", "step": 0, "seed": 3},
        *(
            {
                "kind": "eval",
                "step": step,
                "seed": 3,
                "alignment": [[0.1, 0.2], [None, 0.15]],
                "gradient_alignment": [[pull, 0.1], [None, None]],
            }
            for step, pull in ((0, 0.2), (100, 0.7), (200, 0.5))
        ),
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert _eval_history(tmp_path) == {
        3: {
            "alignment_max_init": 0.2,
            "gradient_alignment_max_init": 0.2,
            "gradient_alignment_max_peak": 0.7,
            "gradient_alignment_peak_step": 100,
            "gradient_alignment_max": 0.5,
            # Onsets are of the head that ends most aligned (layer 0 head 1): its alignment
            # is flat at 0.2 and its pull at 0.1, so neither rose; the best-head pull above
            # is another head's (layer 0 head 0).
            "alignment_onset_step": None,
            "gradient_alignment_onset_step": None,
            "onset_head": "layer 0 head 1",
            "loss_onset_step": None,  # no loss in these rows
            "accuracy_onset_step": None,
            "eval_spacing": 100,
            "onset_spacing": None,
        }
    }
    # Head-matched: when head 0 of layer 0 ends most aligned, its own pull's onset counts.
    for row in lines[1:]:
        row["alignment"] = [[{0: 0.1, 100: 0.4, 200: 0.5}[row["step"]], 0.2], [None, 0.15]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    history = _eval_history(tmp_path)[3]
    assert history["onset_head"] == "layer 0 head 0"
    assert history["gradient_alignment_onset_step"] == 100  # half way from 0.2 to 0.7
    assert history["alignment_onset_step"] == 100  # 0.1 -> 0.5: half way at 0.3, step 100
    assert history["onset_spacing"] == 100


@pytest.mark.parametrize(
    "steps,values,target,rises,onset",
    [
        ([0, 50, 100, 150], [0.1, 0.2, 0.5, 0.6], 0.6, True, 100),  # half way: 0.35
        ([0, 50, 100], [0.25, 0.5, 0.75], 0.75, True, 50),  # exactly half way counts
        ([0, 50, 100], [2.0, 1.0, 0.5], 0.5, False, 50),  # a falling loss: half way is 1.25
        ([0, 50, 100], [0.1, None, 0.6], 0.6, True, 100),  # a step without a value is skipped
        ([0, 50, 100], [0.3, 0.3, 0.3], 0.3, True, None),  # flat: never rises
        ([0, 50, 100], [0.3, 0.5, 0.2], 0.2, True, None),  # ends below its start
        ([0, 50, 100], [2.0, 2.5, 3.0], 3.0, False, None),  # a loss that rose has no onset
        ([0, 50, 100], [None, 0.2, 0.6], 0.6, True, None),  # no step-0 value
        ([0, 50, 100], [None, None, None], None, True, None),  # no alignment (memorize)
        ([50, 100], [0.1, 0.6], 0.6, True, None),  # no eval at step 0
        ([0], [0.4], 0.4, True, None),  # a single eval never moves
        ([], [], None, True, None),
    ],
)
def test_onset_is_the_first_eval_half_way_from_the_start_to_the_target(
    steps, values, target, rises, onset
):
    from ablate.sweep import onset_step

    assert onset_step(steps, values, target, rises=rises) == onset


def _eval_rows(seed, evals):
    return [
        {"kind": "eval", "step": step, "seed": seed, "loss": loss, "alignment": align}
        | ({"gradient_alignment": pull} if pull is not None else {})
        for step, loss, align, pull in evals
    ]


def test_eval_history_onsets_of_alignment_loss_and_pull_per_seed(tmp_path):
    from ablate.sweep import _eval_history

    lines = _eval_rows(  # evals 50 then 100 steps apart
        0,
        [
            (0, 2.0, [[0.1, 0.05]], [[0.1, 0.1]]),
            (50, 1.0, [[0.15, 0.2]], [[0.6, 0.2]]),  # loss half way (<= 1.25); pull peaks
            (150, 0.8, [[0.5, 0.1]], [[0.3, 0.2]]),  # best head (another one) past 0.35
            (250, 0.5, [[0.6, 0.1]], [[0.2, 0.2]]),
        ],
    )
    lines += _eval_rows(1, [(0, 1.0, [[None]], None), (100, 0.5, [[None]], None)])  # memorize
    lines += _eval_rows(2, [(0, 1.0, [[0.3]], [[0.3]])])  # a single eval
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = _eval_history(tmp_path)
    onsets = ("alignment_onset_step", "loss_onset_step", "gradient_alignment_onset_step")
    assert [got[0][k] for k in onsets] == [150, 50, 50]
    assert got[0]["eval_spacing"] == 100
    assert [got[1][k] for k in onsets] == [None, 100, None]  # no alignment, no pull
    assert [got[2][k] for k in onsets] == [None, None, None]
    assert got[2]["eval_spacing"] is None


def test_rows_carry_entropy_against_uniform_attention():
    from ablate.sweep import _entropy_fields

    nan = float("nan")
    final = {
        "alignment": [[[0.2, nan], [0.4, 0.6]]],  # a head without a pattern is left out
        "entropy": [[[1.0, nan], [2.0, 0.5]]],
        "uniform_entropy": [2.5],
    }
    assert _entropy_fields(final, 0) == {
        "alignment_mean": pytest.approx(0.4),
        "entropy": [[1.0, None], [2.0, 0.5]],
        "entropy_mean": pytest.approx(3.5 / 3),
        "entropy_min": 0.5,
        "entropy_uniform": 2.5,
    }
    # A run from before uniform entropy was measured; a task with no alignment at all.
    old = {"alignment": [[[nan]]], "entropy": [[[1.0]]]}
    fields = _entropy_fields(old, 0)
    assert fields["entropy_uniform"] is None and fields["alignment_mean"] is None


@pytest.mark.slow
def test_a_text_task_is_read_once_per_sweep_and_shared_by_its_points(tmp_path, monkeypatch):
    """Three variants of one text task (one probed): its data is read once, and every run
    trains on that one device copy of it."""
    import jax

    import ablate.data
    from ablate.core import Programs

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the cat sat on the mat\n" for i in range(100)))
    exp_file = tmp_path / "text.toml"
    exp_file.write_text(
        f"""
[sweep]
name = "text"
variants = ["learned", "uniform", "frozen"]
probe = ["learned"]
tasks = [{{ name = "text_lm", source = "{corpus}", seq_len = 8 }}]
[model]
d_model = 16
n_heads = 2
n_layers = 1
[train]
steps = 10
batch_size = 8
steps_per_dispatch = 10
log_every = 10
eval_every = 0
eval_batches = 1
checkpoint_every = 10
compile_cache = false
"""
    )
    reads, placed = [], []
    load_dataset, place = ablate.data.load_dataset, Programs.place

    def counted_load(*args, **kwargs):
        reads.append(args)
        return load_dataset(*args, **kwargs)

    def recorded_place(self, arrays):
        out = place(self, arrays)
        placed.append((arrays, [x.unsafe_buffer_pointer() for x in jax.tree.leaves(out)]))
        return out

    monkeypatch.setattr(ablate.data, "load_dataset", counted_load)
    monkeypatch.setattr(Programs, "place", recorded_place)
    run_sweep(exp_file, workdir=tmp_path, progress=False, report=False)
    table = rows(tmp_path / "text")
    assert [r["status"] for r in table] == ["ok"] * 3 and all(0 < r["chance"] < 1 for r in table)
    assert len(reads) == 1  # one split, read once for three runs and a probe
    assert len(placed) == 3 and all(arrays is placed[0][0] for arrays, _ in placed)
    loaded = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(placed[0][0])]
    assert all(pointers == loaded for _, pointers in placed)  # no run made its own copy


def test_a_settled_onset_is_the_last_rise_and_a_start_replaces_the_step_0_value():
    from ablate.sweep import onset_step

    # Conflict accuracy: an early bump (guessing), back to 0 (the cheap route), then the
    # content route: the settled onset is the last rise, the plain one the bump.
    steps, values = [0, 10, 20, 30, 40, 50], [0.0, 0.5, 0.0, 0.0, 0.4, 0.8]
    assert onset_step(steps, values, 0.8, rises=True) == 10
    assert onset_step(steps, values, 0.8, rises=True, settled=True) == 40
    # A loss from 3.6 down to 0.1, measured from 2.1 (-log chance): half way is 1.1.
    loss = [3.6, 1.8, 1.5, 1.0, 0.5, 0.1]
    assert onset_step(steps, loss, 0.1, rises=False) == 10
    assert onset_step(steps, loss, 0.1, rises=False, start=2.1) == 30
