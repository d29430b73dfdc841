"""The attention viewer: what view.html embeds equals what the model computes on the stored
examples, and a real browser (headless Chromium) draws those values and the dependency marks
after a selection made through the page's own controls."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ablate.checkpoint import Checkpointer
from ablate.config import ConfigError
from ablate.core import EXAMPLES, Programs, eval_batch
from ablate.experiment import build_experiment
from ablate.runfolder import CHECKPOINT_DIR, PATTERNS_FILE, PATTERNS_INIT_FILE, VIEW_FILE
from ablate.train import train
from ablate.view import LEVELS, write_view

ROUNDING = 0.5 / LEVELS + 1e-3  # the page's bytes, and float16 in the run folder


def experiment():
    """Two layers (learned, then a fixed random pattern), 2 heads, 2 seeds, mqar (padded
    with fillers, 4 scored queries per sequence)."""
    return build_experiment(
        {
            "name": "view_run",
            "task": {"name": "mqar"},
            "model": {
                "d_model": 16,
                "n_heads": 2,
                "n_layers": 2,
                "attention": ["learned", "random_fixed"],
            },
            "optim": {"learning_rate": 1e-2, "warmup_steps": 0},
            "train": {
                "steps": 20,
                "batch_size": 8,
                "seeds": [0, 3],
                "steps_per_dispatch": 10,
                "log_every": 10,
                "eval_every": 20,
                "eval_batches": 1,
                "checkpoint_every": 20,
                "compile_cache": True,
                "gradient_alignment": False,
            },
        }
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run, stopped at step 10 and resumed to 20 (as a preempted run is), and its page;
    the init examples as the first part left them."""
    run_dir = tmp_path_factory.mktemp("view") / "view_run"
    exp = experiment()
    train(exp, run_dir, progress=False, stop_after=10)
    assert not (run_dir / PATTERNS_FILE).exists()
    init = (run_dir / PATTERNS_INIT_FILE).read_bytes()
    train(exp, run_dir, progress=False)
    return exp, run_dir, write_view(run_dir), init


def embedded(page: Path) -> dict:
    text = page.read_text()
    start = text.index('id="ablate-data">') + len('id="ablate-data">')
    return json.loads(text[start : text.index("</script>", start)])


def decoded(r: dict, stage: str, seed: int, example: int, key: str = "attention") -> np.ndarray:
    """(N, H, scored targets, key positions) of one stored example, as the page reads it."""
    ex = r["examples"][example]
    S = len(ex["source"] if key == "cross" else ex["tokens"])
    raw = np.frombuffer(base64.b64decode(r[key][stage][seed][example]), np.uint8)
    return raw.reshape(r["layers"], r["heads"], len(ex["scored"]), S) / LEVELS


def model_patterns(exp):
    """state -> the patterns (Z, E, N, H, L, S) the model computes on the first eval
    sequences (compiled once), and those sequences."""
    programs = Programs(exp)
    batch = eval_batch(exp.task, (), programs.sampler.eval_key, 0, exp.train.batch_size)
    first = jax.tree.map(lambda x: x[:EXAMPLES], batch)

    def one(params, rest):
        model = programs.definition.merge(params, rest)
        return jnp.stack(model(first.inputs, return_patterns=True).patterns, 1)

    per_seed = jax.jit(jax.vmap(one))
    return lambda state: np.asarray(per_seed(state.params, state.rest)), first


def test_embedded_patterns_are_the_models_on_each_example_at_init_and_trained(run):
    exp, run_dir, page, _ = run
    data = embedded(page)
    (r,) = data["runs"]
    assert (r["layers"], r["heads"], r["seeds"], r["steps"]) == (
        2,
        2,
        [0, 3],
        {"init": 0, "final": 20},
    )
    programs = Programs(exp)
    init = programs.init()
    _, trained, _ = Checkpointer(run_dir / CHECKPOINT_DIR).restore_latest(programs.abstract_state())
    patterns, first = model_patterns(exp)
    for stage, state in (("init", init), ("final", trained)):
        probs_ZENHLS = patterns(state)
        for k in range(2):
            probs_ENHLS = probs_ZENHLS[k]
            for e, ex in enumerate(r["examples"]):
                scored = np.flatnonzero(np.asarray(first.weights[e]) > 0)
                assert ex["scored"] == scored.tolist() and len(scored) == 4
                want = probs_ENHLS[e][:, :, scored, :]
                np.testing.assert_allclose(decoded(r, stage, k, e), want, atol=ROUNDING)
                deps = np.asarray(first.deps[e])
                assert ex["deps"] == [np.flatnonzero(deps[i]).tolist() for i in scored]
                assert ex["tokens"] == exp.task.token_labels(first.inputs[e])
    # The compared things differ: training moved the learned layer, the seeds differ, and
    # the fixed random layer stayed where it was.
    moved = np.abs(decoded(r, "final", 0, 0)[0] - decoded(r, "init", 0, 0)[0]).max()
    assert moved > 0.05
    assert np.abs(decoded(r, "init", 0, 0) - decoded(r, "init", 1, 0)).max() > 0.05
    np.testing.assert_array_equal(decoded(r, "final", 1, 2)[1], decoded(r, "init", 1, 2)[1])
    # The head metrics are the eval rows of those steps.
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = next(x for x in rows if x["kind"] == "eval" and x["step"] == 20 and x["seed"] == 3)
    assert r["metrics"]["final"]["alignment"][1] == last["alignment"]
    assert r["metrics"]["init"]["entropy"][0] != r["metrics"]["final"]["entropy"][0]


def test_labels_name_a_tasks_special_tokens_and_decode_bytes():
    from ablate.tasks import make_task

    assert make_task("induction").token_labels([0, 1, 5]) == ["BOS", "FILL", "5"]
    text = make_task("stdlib_lm")
    assert text.token_labels([ord("a"), ord(" "), 10, 7, 256]) == ["a", "␣", "↵", "\\x07", "PAD"]
    assert make_task("translate").source_labels([0, 4]) == ["PAD", "4"]


def test_a_resumed_run_keeps_its_init_examples_and_a_foreign_page_is_never_replaced(run, tmp_path):
    exp, run_dir, page, init = run
    assert (run_dir / PATTERNS_INIT_FILE).read_bytes() == init  # step 0 was not redone
    assert int(np.load(run_dir / PATTERNS_FILE)["step"]) == 20

    mine = tmp_path / VIEW_FILE
    mine.write_text("<html>my own notes</html>")
    with pytest.raises(ConfigError, match="not written by `ablate view`"):
        write_view(run_dir, mine)
    assert mine.read_text() == "<html>my own notes</html>"
    with pytest.raises(ConfigError, match="neither a sweep folder"):
        write_view(tmp_path)
    assert write_view(run_dir, page) == page  # its own page is rewritten


# --- in a real browser ----------------------------------------------------------------------


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def browse(page: Path, fragment: str, tmp_path: Path, *flags: str) -> str:
    """Headless Chromium on the page from disk; returns its stdout (the DOM for --dump-dom)."""
    browser = chromium()
    if browser is None:
        pytest.skip(
            "no Chromium here (`apt-get install chromium`; .ci/run installs it where it can)"
        )
    cmd = [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1000",
        "--virtual-time-budget=5000",
        *flags,
        f"{page.resolve().as_uri()}#{fragment}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Cells(HTMLParser):
    """What the page drew: per (stage, layer, head), the attention strip's token cells
    [(weight, dependency mark)] (`strips`) and the small multiples' squares (`minis`)."""

    def __init__(self):
        super().__init__()
        self.strips, self.minis, self.selection, self.error = {}, {}, None, None
        self.current = self.cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "body":
            self.error = a.get("data-error")
        if a.get("id") == "selection":
            self.selection = json.loads(a["data-state"])
        if "strip" in classes:
            self.current = None
            if "attn" in classes:
                self.current = self.strips.setdefault(
                    (a["data-stage"], int(a["data-layer"]), int(a["data-head"])), []
                )
        elif "cell" in classes:
            self.cell = (int(a["data-layer"]), int(a["data-head"]))
        elif "mini" in classes:
            self.current = self.minis.setdefault((a["data-stage"], *self.cell), [])
        elif "data-attn" in a and self.current is not None:
            self.current.append((float(a["data-attn"]), "dep" in classes))


def test_chromium_draws_the_selected_heads_attention_and_dependencies(run, tmp_path):
    exp, run_dir, page, _ = run
    (r,) = embedded(page)["runs"]
    seed, example, layer, head = 1, 2, 0, 1
    ex = r["examples"][example]
    t = 2  # the third scored target
    target = ex["scored"][t]
    fragment = (
        f"task=mqar&variant=view_run&seed={r['seeds'][seed]}&example={example}"
        f"&layer={layer}&head={head}&target={target}"
    )
    cells = Cells()
    cells.feed(browse(page, fragment, tmp_path, "--dump-dom"))
    assert cells.error is None
    assert cells.selection == {
        "run": "view_run",
        "seed": seed,
        "example": example,
        "part": "self",
        "layer": layer,
        "head": head,
        "target": target,
    }
    assert set(cells.strips) == {("init", layer, head), ("final", layer, head)}
    for stage in ("init", "final"):
        drawn = cells.strips[(stage, layer, head)]
        want = decoded(r, stage, seed, example)[layer, head, t]
        np.testing.assert_allclose([v for v, _ in drawn], want, atol=1e-4)
        assert [j for j, (_, dep) in enumerate(drawn) if dep] == ex["deps"][t]
    # Another target of the same head draws another row (the selection is really applied).
    other = Cells()
    other.feed(
        browse(
            page,
            fragment.replace(f"target={target}", f"target={ex['scored'][0]}"),
            tmp_path,
            "--dump-dom",
        )
    )
    assert [v for v, _ in other.strips[("final", layer, head)]] != [v for v, _ in drawn]

    # All heads as small multiples: init and trained of each head of the layer.
    grid = Cells()
    grid.feed(browse(page, fragment.replace(f"head={head}", "head=all"), tmp_path, "--dump-dom"))
    assert grid.selection["head"] == "all" and not grid.strips
    assert len(grid.minis) == 2 * r["layers"] * r["heads"]
    for (stage, n, h), drawn in grid.minis.items():
        want = decoded(r, stage, seed, example)[n, h, t]
        np.testing.assert_allclose([v for v, _ in drawn], want, atol=1e-4)
        assert [j for j, (_, dep) in enumerate(drawn) if dep] == ex["deps"][t]

    # A value the page does not offer is reported, not silently replaced.
    bad = Cells()
    bad.feed(browse(page, "task=mqar&layer=7", tmp_path, "--dump-dom"))
    assert bad.error and bad.error.startswith("layer=7 is not one of")

    shot = tmp_path / "view.png"
    browse(page, fragment, tmp_path, f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000


def test_readme_screenshot(tmp_path):
    """The README's screenshot, of the page named by ABLATE_VIEW_PAGE (path#selection),
    written to ABLATE_VIEW_SCREENSHOT; skipped unless both are set."""
    page, out = os.environ.get("ABLATE_VIEW_PAGE"), os.environ.get("ABLATE_VIEW_SCREENSHOT")
    if not (page and out):
        pytest.skip("set ABLATE_VIEW_PAGE=view.html#selection and ABLATE_VIEW_SCREENSHOT=out.png")
    path, _, fragment = page.partition("#")
    cells = Cells()
    cells.feed(browse(Path(path), fragment, tmp_path, "--dump-dom"))
    assert cells.error is None and cells.strips
    browse(Path(path), fragment, tmp_path, f"--screenshot={Path(out).resolve()}")
    assert Path(out).stat().st_size > 10_000
