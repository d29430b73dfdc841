"""The attention viewer: view.html embeds the stored examples of a run folder (that training
stores the model's own patterns: tests/test_train.py), and a real browser (headless Chromium)
draws those values and the dependency marks after a selection made through the page's own
controls."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import jax
import numpy as np
import pytest

from ablate.config import ConfigError
from ablate.core import EXAMPLES
from ablate.runfolder import (
    CONFIG_FILE,
    METRICS_FILE,
    PATTERNS_FILE,
    PATTERNS_INIT_FILE,
    VIEW_FILE,
)
from ablate.tasks import make_task
from ablate.view import LEVELS, write_view


def stored_run(run_dir: Path, seeds=(0, 3), steps=20, N=2, H=2, E=EXAMPLES):
    """A run folder as training leaves it (config.json, metrics.jsonl, patterns_init.npz and
    patterns_final.npz: ablate/train.py `write_examples`), with mqar's real sequences and
    random causal patterns; whether training stores the model's own patterns is
    tests/test_train.py's `test_resume_is_bit_identical`."""
    task = make_task("mqar")
    batch = jax.tree.map(np.asarray, jax.jit(task.sample, static_argnums=1)(jax.random.key(0), E))
    L = task.seq_len
    rng = np.random.default_rng(1)
    causal_LS = np.tril(np.ones((L, L), bool))
    run_dir.mkdir(parents=True)
    config = {"task": {"name": "mqar"}, "model": {"causal": True}, "train": {"seeds": list(seeds)}}
    (run_dir / CONFIG_FILE).write_text(json.dumps(config))
    rows = []
    for stage, step, name in (("init", 0, PATTERNS_INIT_FILE), ("final", steps, PATTERNS_FILE)):
        logits = rng.normal(size=(len(seeds), E, N, H, L, L)) * (3 if stage == "final" else 1)
        probs = np.where(causal_LS, np.exp(logits), 0.0)
        probs /= probs.sum(-1, keepdims=True)
        per_seed = lambda x: np.repeat(x[None], len(seeds), 0)
        np.savez(
            run_dir / name,
            step=np.int64(step),
            probs=probs.astype(np.float16),
            deps=per_seed(batch.deps),
            weights=per_seed(batch.weights),
            inputs=per_seed(batch.inputs),
            targets=per_seed(batch.targets),
            input_labels=np.array([task.token_labels(x) for x in batch.inputs]),
            target_labels=np.array([task.token_labels(x) for x in batch.targets]),
            has_pattern=np.ones((N, H), bool),
        )
        for seed in seeds:
            metrics = rng.uniform(size=(3, N, H)).tolist()
            rows.append(dict(step=step, seed=seed, kind="eval", uniform_alignment=0.2))
            rows[-1] |= dict(zip(("alignment", "gradient_alignment", "entropy"), metrics))
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = stored_run(tmp_path_factory.mktemp("view") / "view_run")
    return run_dir, write_view(run_dir)


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


def test_the_page_embeds_each_stored_examples_scored_rows_tokens_deps_and_metrics(run):
    run_dir, page = run
    (r,) = embedded(page)["runs"]
    assert (r["layers"], r["heads"], r["seeds"], r["steps"]) == (
        2,
        2,
        [0, 3],
        {"init": 0, "final": 20},
    )
    rows = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
    for stage, name in (("init", PATTERNS_INIT_FILE), ("final", PATTERNS_FILE)):
        stored = np.load(run_dir / name)
        for k in range(2):
            for e, ex in enumerate(r["examples"]):
                scored = np.flatnonzero(stored["weights"][k, e] > 0)
                assert ex["scored"] == scored.tolist() and len(scored) == 4
                want = stored["probs"][k, e][:, :, scored, :].astype(float)
                np.testing.assert_allclose(decoded(r, stage, k, e), want, atol=0.5 / LEVELS)
                deps = stored["deps"][k, e]
                assert ex["deps"] == [np.flatnonzero(deps[i]).tolist() for i in scored]
                assert ex["tokens"] == stored["input_labels"][e].tolist()
                assert ex["targets"] == stored["target_labels"][e][scored].tolist()
        for k, seed in enumerate(r["seeds"]):
            row = next(x for x in rows if x["step"] == int(stored["step"]) and x["seed"] == seed)
            assert r["metrics"][stage]["alignment"][k] == row["alignment"]
    assert "FILLER" in r["examples"][0]["tokens"]  # mqar's own name of its filler token


def test_labels_name_a_tasks_special_tokens_and_decode_bytes():
    from ablate.tasks import make_task

    assert make_task("induction").token_labels([0, 1, 5]) == ["BOS", "FILL", "5"]
    text = make_task("stdlib_lm")
    assert text.token_labels([ord("a"), ord(" "), 10, 7, 256]) == ["a", "␣", "↵", "\\x07", "PAD"]
    assert make_task("translate").source_labels([0, 4]) == ["PAD", "4"]


def test_a_page_it_did_not_write_is_never_replaced(run, tmp_path):
    run_dir, page = run
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
    run_dir, page = run
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
