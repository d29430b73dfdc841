"""Faults and bad input, each driven through the real `ablate` command in a subprocess.

One promise of the README's reliability table per test (the number in each docstring).
Kills are timed by conditions on the run folder, never by sleeping: the process is frozen
with SIGSTOP, the condition is checked again on the frozen folder, and only then killed.
The slow tests share one uninterrupted reference run and compare against it bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

TIMEOUT = 600  # seconds for one command; generous for a loaded 2-core CI machine
EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED, EXIT_IO, EXIT_PREEMPTED = 2, 3, 4, 74, 75

# Checkpoints at 30, 60, ..., 180 and 200; logs every 20 steps, so most checkpoints fall in
# the middle of a logging window (its metrics ride in the checkpoint).
BASE = {
    "name": "rel",
    "task": {"name": "assoc_recall", "n_pairs": 4, "n_keys": 4, "n_values": 4},
    "model": {"d_model": 16, "n_heads": 2, "n_layers": 1},
    "optim": {"warmup_steps": 10},
    "train": {
        "steps": 200,
        "batch_size": 8,
        "seeds": [0, 1],
        "steps_per_dispatch": 10,
        "log_every": 20,
        "eval_every": 50,
        "eval_batches": 1,
        "gradient_alignment": False,
        "checkpoint_every": 30,
        "keep_checkpoints": 8,
        "compile_cache": True,
    },
}


# --------------------------------------------------------------------------- helpers


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def write_experiment(path: Path, data: dict = BASE) -> Path:
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict[str, str]:
    """Subprocess environment: CPU, one compilation cache shared by every test."""
    cache = os.environ.get("ABLATE_CACHE_DIR") or str(tmp_path_factory.mktemp("jax_cache"))
    return {**os.environ, "JAX_PLATFORMS": "cpu", "ABLATE_CACHE_DIR": cache}


def ablate_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "ablate.cli", *map(str, args)]


class Proc:
    """A running `ablate` command whose output goes to files (no pipe can fill up)."""

    def __init__(self, args, env, cwd: Path, *, prefix=()):
        cwd.mkdir(parents=True, exist_ok=True)
        n = len(list(cwd.glob("out-*.txt")))
        self.out_path, self.err_path = cwd / f"out-{n}.txt", cwd / f"err-{n}.txt"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.popen = subprocess.Popen(
                [*prefix, *args] if prefix else ablate_cmd(*args),
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=err,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise

    def alive(self) -> bool:
        return self.popen.poll() is None

    def describe(self) -> str:
        return f"exit {self.popen.poll()}\n--- stderr ---\n{self.stderr[-4000:]}"


def run(args, env, cwd: Path, **kw) -> Proc:
    proc = Proc(args, env, cwd, **kw)
    proc.wait()
    return proc


def kill_when(proc: Proc, condition, what: str, sig=signal.SIGKILL, poll=0.02) -> None:
    """Send `sig` once `condition()` holds, checked again while the process is frozen."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if not proc.alive():
            pytest.fail(f"the process ended before {what}: {proc.describe()}")
        if condition():
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                if condition():
                    os.kill(proc.pid, sig)
                    return
            finally:
                if proc.alive():
                    os.kill(proc.pid, signal.SIGCONT)
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}")


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps with a finished, verified-looking checkpoint (a manifest), oldest first."""
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in ckpts.iterdir()
        if p.name.isdigit() and (p / "ablate-manifest.json").is_file()
    )


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def last_train_step(run_dir: Path) -> int:
    return max((r["step"] for r in metric_rows(run_dir) if r["kind"] == "train"), default=-1)


def tensorboard_scalars(seed_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event per tag, duplicates included (no purging of 'orphaned' steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(
        str(seed_dir), size_guidance={"tensors": 0, "images": 0}, purge_orphaned_data=False
    )
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        values = []
        for e in acc.Tensors(tag):
            array = tensor_util.make_ndarray(e.tensor_proto)
            scalar = array.ndim == 0 and array.dtype.kind == "f"
            values.append((e.step, float(array) if scalar else None))
        out[tag] = values
    return out


def assert_same_tensorboard(run_dir: Path, ref_dir: Path, seeds=(0, 1)) -> None:
    for seed in seeds:
        got = tensorboard_scalars(run_dir / f"seed_{seed}")
        want = tensorboard_scalars(ref_dir / f"seed_{seed}")
        assert set(got) == set(want)
        for tag, events in got.items():
            steps = [s for s, _ in events]
            assert len(steps) == len(set(steps)), f"seed {seed} {tag}: duplicate steps {steps}"
            assert steps == [s for s, _ in want[tag]], tag
            if not tag.startswith("perf/"):  # timings differ, everything else must not
                assert events == want[tag], tag


def load_exp(path: Path, *overrides: str):
    from ablate.experiment import load_experiment

    return load_experiment(path, overrides)[0]


def restore(run_dir: Path, exp, step: int | None = None):
    """The state of the newest (or the given) checkpoint, read in this process."""
    import orbax.checkpoint as ocp

    from ablate.checkpoint import Checkpointer
    from ablate.core import Programs

    ckpt = Checkpointer(run_dir / "checkpoints", keep=100)
    try:
        target = Programs(exp).abstract_state()
        if step is None:
            got = ckpt.restore_latest(target)
            assert got is not None, f"no good checkpoint in {run_dir}"
            return got
        assert ckpt.verify(step) is None, ckpt.verify(step)
        restored = ckpt.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return step, restored["state"], dict(restored["meta"])
    finally:
        ckpt.close()


def leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_bit_identical(run_dir: Path, ref_dir: Path, exp) -> None:
    step_a, a, _ = restore(run_dir, exp)
    step_b, b, _ = restore(ref_dir, exp)
    assert step_a == step_b == exp.train.steps
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert metric_rows(run_dir) == metric_rows(ref_dir)
    assert_same_tensorboard(run_dir, ref_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """(experiment file, run folder) of one uninterrupted run of BASE."""
    root = tmp_path_factory.mktemp("reference")
    exp_file = write_experiment(root / "rel.toml")
    proc = run(["train", exp_file, "--workdir", root / "runs", "--quiet"], env, root)
    assert proc.popen.returncode == 0, proc.describe()
    return exp_file, root / "runs" / "rel"


def copy_run(reference, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(experiment file, workdir, run folder): a private copy of the reference run."""
    exp_file, ref_dir = reference
    workdir = tmp_path / "runs"
    shutil.copytree(ref_dir, workdir / "rel", symlinks=True)
    return exp_file, workdir, workdir / "rel"


# ------------------------------------------------------------ fast: no training at all


def test_bad_config_reports_every_problem_before_compiling(tmp_path, env):
    """6: all errors at once with dotted paths and allowed values; duplicates; no exec."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        textwrap.dedent(
            """
            colour = "blue"
            [task]
            name = "assoc_recall"
            n_pairs = 999
            [model]
            attention = "telepathy"
            d_modle = 3
            [train]
            steps = "many"
            seeds = []
            """
        )
    )
    proc = run(["train", bad, "--workdir", tmp_path / "runs"], env, tmp_path)
    assert proc.popen.returncode == EXIT_CONFIG, proc.describe()
    err = proc.stderr
    paths = ("colour", "task.n_pairs", "model.attention", "model.d_modle", "train.steps")
    for path in (*paths, "train.seeds"):
        assert re.search(rf"^\s*{re.escape(path)}\b", err, re.M), (path, err)
    assert "learned, uniform" in err and "d_model" in err  # what is allowed is listed
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before a run folder or compile

    dup = tmp_path / "dup.toml"
    dup.write_text('[task]\nname = "assoc_recall"\n[model]\nd_model = 16\nd_model = 32\n')
    proc = run(["train", dup, "--workdir", tmp_path / "runs"], env, tmp_path)
    assert proc.popen.returncode == EXIT_CONFIG, proc.describe()
    assert str(dup) in proc.stderr and "d_model = 32" in proc.stderr  # the line is shown

    # An experiment file is data: Python in it is a parse error, never run.
    marker = tmp_path / "executed"
    code = tmp_path / "code.toml"
    code.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    proc = run(["train", code, "--workdir", tmp_path / "runs"], env, tmp_path)
    assert proc.popen.returncode == EXIT_CONFIG, proc.describe()
    assert "not valid TOML" in proc.stderr
    assert not marker.exists()


def test_run_names_cannot_leave_the_run_root(tmp_path, env):
    """11: run and sweep names from the config or the command line stay inside --workdir,
    also through a symlink planted in the run root."""
    exp_file = write_experiment(tmp_path / "rel.toml")
    workdir = tmp_path / "root" / "runs"
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("../../escaped", str(tmp_path / "absolute"), "a/../../escaped"):
        proc = run(
            ["train", exp_file, "--workdir", workdir, "--set", f"name={json.dumps(name)}"],
            env,
            tmp_path,
        )
        assert proc.popen.returncode == EXIT_CONFIG, proc.describe()
        assert "name" in proc.stderr
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "absolute").exists()
    assert not workdir.exists()

    workdir.mkdir(parents=True)
    (workdir / "rel").symlink_to(outside)
    proc = run(["train", exp_file, "--workdir", workdir], env, tmp_path)
    assert proc.popen.returncode == EXIT_CONFIG, proc.describe()
    assert "would leave the run root" in proc.stderr

    sweep = json.loads(json.dumps(BASE))
    sweep["sweep"] = {"name": "rel"}  # the same planted symlink, as a sweep folder
    sweep_file = write_experiment(tmp_path / "sweep.toml", sweep)
    proc = run(["sweep", sweep_file, "--workdir", workdir, "--no-report"], env, tmp_path)
    assert proc.popen.returncode == EXIT_CONFIG, proc.describe()
    assert "would leave the run root" in proc.stderr
    assert list(outside.iterdir()) == []


def test_unwritable_run_folder_is_a_clear_error(tmp_path, env):
    """8: a run folder that cannot be created stops at once, naming the path."""
    exp_file = write_experiment(tmp_path / "rel.toml")
    workdir = tmp_path / "runs"
    workdir.mkdir()
    (workdir / "rel").write_text("a file where the run folder should be\n")
    proc = run(["train", exp_file, "--workdir", workdir], env, tmp_path)
    assert proc.popen.returncode == EXIT_IO, proc.describe()
    assert str(workdir / "rel") in proc.stderr and "Traceback" not in proc.stderr
    assert (workdir / "rel").read_text() == "a file where the run folder should be\n"


BAD_SAMPLER = textwrap.dedent(
    """
    import sys

    import jax.numpy as jnp

    from ablate import tasks
    from ablate.cli import main

    original = tasks.AssocRecall.sample

    def bad_sample(self, key, batch_size):
        b = original(self, key, batch_size)
        inputs = b.inputs.at[3, 4].set(self.vocab_size + 7)
        targets = b.targets.at[2].set(jnp.where(b.weights[2] > 0, self.vocab_size + 3, 0))
        pad = ((0, 0), (0, 1))
        return tasks.Batch(
            jnp.pad(inputs, pad), jnp.pad(targets, pad), jnp.pad(b.weights, pad),
            jnp.pad(b.deps, ((0, 0), (0, 1), (0, 1))),
        )

    tasks.AssocRecall.sample = bad_sample
    sys.exit(main(sys.argv[1:]))
    """
)


def test_bad_token_ids_labels_and_lengths_exit_3_before_training(tmp_path, env):
    """7: ids >= vocab, labels out of range, too-long sequences: exit 3, all named."""
    exp_file = write_experiment(tmp_path / "rel.toml")
    script = tmp_path / "bad_sampler.py"
    script.write_text(BAD_SAMPLER)
    proc = run(
        ["train", exp_file, "--workdir", tmp_path / "runs"],
        env,
        tmp_path,
        prefix=[sys.executable, script],
    )
    assert proc.popen.returncode == EXIT_DATA, proc.describe()
    exp = load_exp(exp_file)
    vocab, length = exp.model.vocab_size, exp.model.seq_len
    err = proc.stderr
    assert f"first: {vocab + 7} at sequence 3, position 4" in err
    assert f"model.vocab_size = {vocab}" in err
    assert f"first: {vocab + 3} at sequence 2" in err and "labels" in err
    assert f"length {length + 1} exceed model.seq_len = {length}" in err
    assert "training batch 1 of seed 0" in err and "eval batch 1" in err
    run_dir = tmp_path / "runs" / "rel"
    assert checkpoint_steps(run_dir) == [] and metric_rows(run_dir) == []


BAD_IDS_UNCHECKED = textwrap.dedent(
    """
    import sys

    from ablate import tasks, train
    from ablate.cli import main

    original = tasks.AssocRecall.sample

    def bad_sample(self, key, batch_size):
        b = original(self, key, batch_size)
        return b._replace(inputs=b.inputs.at[3, 4].set(self.vocab_size + 7))

    tasks.AssocRecall.sample = bad_sample
    train.check_data = lambda programs, arrays: None  # only the check inside the step is left
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_bad_token_ids_past_the_host_check_are_caught_on_the_device(tmp_path, env):
    """7: ids the host check did not see are counted inside the compiled step: exit 3
    naming the step, before any checkpoint (instead of NaN reported as divergence)."""
    exp_file = write_experiment(tmp_path / "rel.toml")
    script = tmp_path / "bad_ids.py"
    script.write_text(BAD_IDS_UNCHECKED)
    args = ["train", exp_file, "--workdir", tmp_path / "runs", "--quiet"]
    proc = run(args, env, tmp_path, prefix=[sys.executable, script])
    assert proc.popen.returncode == EXIT_DATA, proc.describe()
    assert "step 1 (seed 0): the task produced 1 token ids or labels outside" in proc.stderr
    run_dir = tmp_path / "runs" / "rel"
    assert checkpoint_steps(run_dir) == []
    assert [r for r in metric_rows(run_dir) if r["kind"] == "train"] == []


def test_sigterm_before_training_exits_75_and_changed_config_is_refused(tmp_path, env):
    """3 and 12: SIGTERM while starting up (compiling) exits 75 at once with nothing lost;
    resuming the folder with a changed config is refused with the diff, before compiling."""
    exp_file = write_experiment(tmp_path / "rel.toml")
    workdir = tmp_path / "runs"
    run_dir = workdir / "rel"
    proc = Proc(["train", exp_file, "--workdir", workdir], env, tmp_path)
    # The lock file is the first thing a run writes, after its SIGTERM handler is in place.
    kill_when(proc, (run_dir / ".ablate.lock").is_file, "the run to start", sig=signal.SIGTERM)
    assert proc.wait() == EXIT_PREEMPTED, proc.describe()
    assert "SIGTERM" in proc.stderr and "before training started" in proc.stderr
    assert checkpoint_steps(run_dir) == []

    t0 = time.monotonic()
    proc = run(
        ["train", exp_file, "--workdir", workdir, "--set", "model.d_model=32"], env, tmp_path
    )
    assert proc.popen.returncode == EXIT_CONFIG, proc.describe()
    assert "model.d_model: 16 -> 32" in proc.stderr
    assert "--allow-config-change" in proc.stderr
    assert json.loads((run_dir / "config.json").read_text())["model"]["d_model"] == 16
    assert time.monotonic() - t0 < 120


# ------------------------------------------------------------------- slow: training


@pytest.mark.slow
def test_kill9_twice_then_resume_is_bit_identical(reference, tmp_path, env):
    """1 and 9: two kill -9 between checkpoints, then resume: identical params, metrics and
    TensorBoard scalars, no step twice, though the logs had run past the checkpoints."""
    exp_file, ref_dir = reference
    workdir = tmp_path / "runs"
    run_dir = workdir / "rel"
    args = ["train", exp_file, "--workdir", workdir, "--quiet"]

    def logged_past_checkpoint(at_least):
        def condition():
            done = checkpoint_steps(run_dir)
            return bool(done) and done[-1] >= at_least and last_train_step(run_dir) > done[-1]

        return condition

    proc = Proc(args, env, tmp_path)
    kill_when(proc, logged_past_checkpoint(30), "logs past the first checkpoint")
    proc.wait()
    first = checkpoint_steps(run_dir)[-1]
    tb_steps = [s for s, _ in tensorboard_scalars(run_dir / "seed_0")["train/loss"]]
    assert max(tb_steps) > first  # TensorBoard too holds steps the resume will redo
    # A kill mid-write leaves cut lines and records: resuming must cope with both.
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99999, "seed": 0, "ki')
    events = sorted((run_dir / "seed_1").glob("*tfevents*"))[-1]
    with events.open("ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00\x01\x02")

    proc = Proc(args, env, tmp_path)
    kill_when(proc, logged_past_checkpoint(first + 30), "logs past a later checkpoint")
    proc.wait()
    second = checkpoint_steps(run_dir)[-1]
    assert first < second < 200 and not (run_dir / "final.json").exists()

    proc = run(args, env, tmp_path)
    assert proc.popen.returncode == 0, proc.describe()
    assert f"from checkpoint step {second}" in proc.stderr
    assert_bit_identical(run_dir, ref_dir, load_exp(exp_file))


@pytest.mark.slow
def test_kill9_during_a_checkpoint_save(reference, tmp_path, env):
    """2: kill -9 in the middle of a save (orbax still writing, or done but not yet
    verified): the unfinished save is removed or set aside, the newest complete
    checkpoint restores, and the run ends as if nothing happened."""
    exp_file, ref_dir = reference
    workdir = tmp_path / "runs"
    run_dir = workdir / "rel"
    ckpts = run_dir / "checkpoints"
    args = ["train", exp_file, "--workdir", workdir, "--quiet"]
    proc = Proc(args, env, tmp_path)
    kill_when(
        proc,
        lambda: _save_in_progress(ckpts) and checkpoint_steps(run_dir) != [],
        "a save in progress after a complete one",
        poll=0.002,
    )
    proc.wait()
    orbax_tmp = [p.name for p in ckpts.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    unverified = [p.name for p in ckpts.iterdir() if p.name.isdigit() and not _verified(p)]
    assert orbax_tmp or unverified  # the kill really cut a save short
    good = checkpoint_steps(run_dir)

    proc = run(args, env, tmp_path)
    assert proc.popen.returncode == 0, proc.describe()
    assert f"from checkpoint step {good[-1]}" in proc.stderr, proc.stderr
    for name in orbax_tmp:
        assert f"removed the unfinished save {ckpts / name}" in proc.stderr
    assert not any(".orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir())
    for name in unverified:  # finished by orbax, never verified by us: kept, set aside
        assert (ckpts / f"{name}.corrupt-0").is_dir()
        assert f"{ckpts / name} has no ablate-manifest.json" in proc.stderr
    assert_bit_identical(run_dir, ref_dir, load_exp(exp_file))


def _save_in_progress(ckpts: Path) -> bool:
    if not ckpts.is_dir():
        return False
    return any(
        ".orbax-checkpoint-tmp" in p.name or (p.name.isdigit() and not _verified(p))
        for p in ckpts.iterdir()
    )


def _verified(step_dir: Path) -> bool:
    return (step_dir / "ablate-manifest.json").is_file()


@pytest.mark.slow
def test_sigterm_storm_saves_exits_75_and_resumes_without_recomputing(reference, tmp_path, env):
    """3: SIGTERM every few ms from the first checkpoint on, so later ones land during the
    save: one clean save, exit 75; the rerun starts at that step and ends identical."""
    exp_file, ref_dir = reference
    workdir = tmp_path / "runs"
    run_dir = workdir / "rel"
    args = ["train", exp_file, "--workdir", workdir, "--quiet"]
    proc = Proc(args, env, tmp_path)
    kill_when(proc, lambda: checkpoint_steps(run_dir) != [], "a checkpoint", sig=signal.SIGTERM)
    sent = 1
    while proc.alive():
        try:
            os.kill(proc.pid, signal.SIGTERM)
            sent += 1
        except ProcessLookupError:
            break
        time.sleep(0.005)
    assert proc.wait() == EXIT_PREEMPTED, proc.describe()
    assert sent > 3
    saved = int(re.search(r"saved a checkpoint at step (\d+)", proc.stderr).group(1))
    assert checkpoint_steps(run_dir)[-1] == saved < 200
    assert last_train_step(run_dir) <= saved

    proc = run(args, env, tmp_path)
    assert proc.popen.returncode == 0, proc.describe()
    assert f"from checkpoint step {saved}" in proc.stderr  # nothing recomputed
    assert_bit_identical(run_dir, ref_dir, load_exp(exp_file))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.slow
def test_corrupted_checkpoints_are_set_aside_and_resume_falls_back(reference, tmp_path, env):
    """4: flipped byte, truncation, deleted file, broken metadata, missing manifest, empty
    folder: each found, reported with its path, renamed (not deleted); resume from the
    newest good step, and the run ends identical to the uninterrupted one."""
    exp_file, workdir, run_dir = copy_run(reference, tmp_path)
    ckpts = run_dir / "checkpoints"
    assert checkpoint_steps(run_dir) == [30, 60, 90, 120, 150, 180, 200]
    flipped = _largest_file(ckpts / "200")
    _flip_byte(flipped)
    flipped_bytes = flipped.read_bytes()
    truncated = _largest_file(ckpts / "180")
    truncated.write_bytes(truncated.read_bytes()[:100])
    (ckpts / "150" / "state" / "_METADATA").unlink()
    (ckpts / "120" / "_CHECKPOINT_METADATA").write_text("{not json")
    (ckpts / "90" / "ablate-manifest.json").unlink()  # as if killed before the manifest
    shutil.rmtree(ckpts / "60")
    (ckpts / "60").mkdir()

    proc = run(["train", exp_file, "--workdir", workdir, "--quiet"], env, tmp_path)
    assert proc.popen.returncode == 0, proc.describe()
    err = proc.stderr
    reasons = {
        200: "checksum mismatch",
        180: "checksum mismatch",
        150: "missing files",
        120: "checksum mismatch",
        90: "has no ablate-manifest.json",
        60: "has no ablate-manifest.json",
    }
    for step, reason in reasons.items():
        aside = ckpts / f"{step}.corrupt-0"
        assert aside.is_dir(), step
        assert f"{aside}:" in err and str(ckpts / str(step)) in err, (step, err)
        assert reason in (aside / "ABLATE_CORRUPT.txt").read_text(), step
    assert (ckpts / "200.corrupt-0" / flipped.relative_to(ckpts / "200")).read_bytes() == (
        flipped_bytes
    )
    assert "from checkpoint step 30" in err
    assert_bit_identical(run_dir, reference[1], load_exp(exp_file))


@pytest.mark.slow
def test_divergence_stops_with_the_exact_step_and_keeps_the_last_good_checkpoint(
    reference, tmp_path, env
):
    """5 and 12: a changed config is refused with its diff unless allowed; an infinite
    learning rate then diverges: exit 4 naming the first non-finite step, nothing of it saved."""
    exp_file, workdir, run_dir = copy_run(reference, tmp_path)
    change = ["--set", "optim.learning_rate=inf", "--set", "train.steps=260"]
    args = ["train", exp_file, "--workdir", workdir, "--quiet", *change]
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = run(args, env, tmp_path)
    assert proc.popen.returncode == EXIT_CONFIG, proc.describe()
    assert "optim.learning_rate: 0.003 -> inf" in proc.stderr
    assert "train.steps: 200 -> 260" in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before

    proc = run([*args, "--allow-config-change"], env, tmp_path)
    assert proc.popen.returncode == EXIT_DIVERGED, proc.describe()
    reported = int(re.search(r"diverged at step (\d+)", proc.stderr).group(1))
    assert (run_dir / "config.before-change-0.json").is_file()
    # The finished run's result is kept under a free name, not overwritten or lost.
    assert (run_dir / "final.step200-0.json").is_file() and not (run_dir / "final.json").exists()

    # The first non-finite loss, found step by step in this process from checkpoint 200.
    from ablate.core import Programs

    exp = load_exp(exp_file, "optim.learning_rate=inf", "train.steps=260")
    _, state, _ = restore(run_dir, exp, 200)
    state, metrics = Programs(exp).train_chunk(state, ())
    # (seeds, steps 201..210): the loss, or the parameters the step's update left
    names = ("loss", "grad_norm", "param_norm")
    bad = np.any([~np.isfinite(np.asarray(metrics[n])) for n in names], axis=0)
    assert bad.any()
    first_bad = 200 + 1 + int(np.argwhere(bad)[:, 1].min())
    assert reported == first_bad

    assert checkpoint_steps(run_dir)[-1] == 200  # no checkpoint of a diverged state
    _, kept, _ = restore(run_dir, exp)
    _, ref_state, _ = restore(reference[1], load_exp(exp_file))
    for x, y in zip(leaves(kept), leaves(ref_state), strict=True):
        np.testing.assert_array_equal(x, y)
    rows = metric_rows(run_dir)
    assert max(r["step"] for r in rows) == 200
    assert all(np.isfinite(r["loss"]) for r in rows if r["kind"] == "train")


NAN_AT = textwrap.dedent(
    """
    import sys

    import jax
    import jax.numpy as jnp

    from ablate import core
    from ablate.cli import main

    what, bad_step, bad_seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    building = {}  # while a training step is traced: whether it is the one to poison
    train_step = core.train_step

    def poisoned_step(definition, optimizer, sampler, state, key, arrays):
        building["bad"] = (state.step + 1 == bad_step) & jnp.all(key == jax.random.PRNGKey(bad_seed))
        try:
            return train_step(definition, optimizer, sampler, state, key, arrays)
        finally:
            del building["bad"]

    def nan_gradient(loss, bad):
        # The same value, and a NaN derivative where `bad`: sqrt at 0 of a zero that
        # depends on the parameters (the inner where keeps the other steps' gradients exact).
        zero = jnp.square(loss - jax.lax.stop_gradient(loss))
        return loss + jnp.where(bad, jnp.sqrt(jnp.where(bad, zero, 1.0)), 0.0)

    token_metrics = core.token_metrics

    def poisoned_metrics(*args, **kwargs):
        metrics = token_metrics(*args, **kwargs)
        if what == "grad_norm" and "bad" in building:
            metrics["loss"] = nan_gradient(metrics["loss"], building["bad"])
        return metrics

    apply_updates = core.optax.apply_updates

    def poisoned_updates(params, updates):
        new = apply_updates(params, updates)
        if what == "params" and "bad" in building:
            new = jax.tree.map(lambda p: jnp.where(building["bad"], jnp.nan, p), new)
        return new

    core.train_step = poisoned_step
    core.token_metrics = poisoned_metrics
    core.optax.apply_updates = poisoned_updates
    sys.exit(main(sys.argv[4:]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["grad_norm", "params"])
def test_nan_grad_norm_or_parameters_stop_at_the_exact_step(what, reference, tmp_path, env):
    """5: a NaN gradient (the loss still finite) or a NaN parameter after an update, in
    seed 1 at step 37 (mid-window: logs every 20 steps): exit 4 naming step 37 and seed 1,
    not step 38 where the loss follows; nothing of it saved, checkpoint 30 kept as it was."""
    exp_file, ref_dir = reference
    script = tmp_path / "nan_at.py"
    script.write_text(NAN_AT)
    run_dir = tmp_path / "runs" / "rel"
    args = ["train", exp_file, "--workdir", tmp_path / "runs", "--quiet"]
    proc = run(args, env, tmp_path, prefix=[sys.executable, script, what, "37", "1"])
    assert proc.popen.returncode == EXIT_DIVERGED, proc.describe()
    named = {"grad_norm": "grad_norm", "params": "a parameter"}[what]
    assert f"training diverged at step 37 (seed 1): {named} is not finite" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert checkpoint_steps(run_dir) == [30]
    assert not (run_dir / "final.json").exists()
    assert last_train_step(run_dir) == 20  # the window holding step 37 was never logged
    exp = load_exp(exp_file)
    _, kept, _ = restore(run_dir, exp)
    _, ref_state, _ = restore(ref_dir, exp, 30)
    for x, y in zip(leaves(kept), leaves(ref_state), strict=True):
        # The poisoned program is another program: equal up to float reassociation.
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_ctrl_c_inside_a_save_is_held_until_the_step_and_its_manifest_are_written(
    tmp_path, monkeypatch
):
    """A SIGINT that lands inside orbax's save (as a Ctrl-C at the wrong moment does) is raised
    only after the save: the step is complete, with its manifest, and verifies."""
    import jax.numpy as jnp

    from ablate.checkpoint import MANIFEST, Checkpointer

    # Python's own handler, as in a terminal (a pytest-xdist worker ignores SIGINT).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    real_save = ckpt.manager.save

    def save_hit_by_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt.manager, "save", save_hit_by_ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(5, {"w": jnp.arange(3.0)}, {"step": 5})
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (tmp_path / "checkpoints" / "5" / MANIFEST).is_file()
    assert ckpt.verify(5) is None
    assert restored is signal.default_int_handler


@pytest.mark.slow
def test_ctrl_c_exits_130_keeps_the_newest_checkpoint_and_resumes_bit_identically(
    reference, tmp_path, env
):
    """Ctrl-C (SIGINT) mid-training: exit 130, the newest checkpoint intact (equal to the
    uninterrupted run's at that step); the rerun resumes from it and ends identical."""
    exp_file, ref_dir = reference
    workdir = tmp_path / "runs"
    run_dir = workdir / "rel"
    args = ["train", exp_file, "--workdir", workdir, "--quiet"]

    def training_past_a_checkpoint():
        done = checkpoint_steps(run_dir)
        return bool(done) and done[-1] >= 60 and last_train_step(run_dir) > done[-1]

    proc = Proc(args, env, tmp_path)
    kill_when(proc, training_past_a_checkpoint, "training past checkpoint 60", sig=signal.SIGINT)
    assert proc.wait() == 130, proc.describe()
    assert "ablate: interrupted" in proc.stderr and "Traceback" not in proc.stderr
    newest = checkpoint_steps(run_dir)[-1]
    assert 60 <= newest < 200 and not (run_dir / "final.json").exists()
    exp = load_exp(exp_file)
    step, state, _ = restore(run_dir, exp)  # the newest one that passes its checksums
    assert step == newest
    _, ref_state, _ = restore(ref_dir, exp, newest)
    for x, y in zip(leaves(state), leaves(ref_state), strict=True):
        np.testing.assert_array_equal(x, y)

    proc = run(args, env, tmp_path)
    assert proc.popen.returncode == 0, proc.describe()
    assert f"from checkpoint step {newest}" in proc.stderr
    assert_bit_identical(run_dir, ref_dir, exp)


def test_lock_wait_setting_is_validated(tmp_path, env):
    """ABLATE_LOCK_WAIT_SECONDS: seconds >= 0 (default 60); anything else exits 2 at once,
    before the run folder is made."""
    from ablate.config import ConfigError
    from ablate.runfolder import LOCK_WAIT_ENV, LOCK_WAIT_SECONDS, lock_wait_seconds

    assert lock_wait_seconds({}) == LOCK_WAIT_SECONDS == 60
    assert lock_wait_seconds({LOCK_WAIT_ENV: " 2.5 "}) == 2.5
    assert lock_wait_seconds({LOCK_WAIT_ENV: "0"}) == 0
    for bad in ("nan", "inf", "1e999", "2s"):
        with pytest.raises(ConfigError, match=LOCK_WAIT_ENV):
            lock_wait_seconds({LOCK_WAIT_ENV: bad})
    exp_file = write_experiment(tmp_path / "rel.toml")
    for bad in ("soon", "-1"):  # through the command: exit 2, nothing made
        proc = run(
            ["train", exp_file, "--workdir", tmp_path / "runs"],
            {**env, LOCK_WAIT_ENV: bad},
            tmp_path,
        )
        assert proc.popen.returncode == EXIT_CONFIG, proc.describe()
        assert f"{LOCK_WAIT_ENV}: must be a number of seconds >= 0, got {bad!r}" in proc.stderr
        assert not (tmp_path / "runs" / "rel").exists()


@pytest.mark.slow
def test_run_folder_in_use_by_another_process_exits_74_and_the_first_finishes_untouched(
    reference, tmp_path, env
):
    """8: a second `ablate train` of a folder another process is training waits its lock
    time (ABLATE_LOCK_WAIT_SECONDS), then exits 74 naming the holder, writing nothing; a
    third, started while the first still holds the folder, gets it once the first is done
    (the wait a preempted predecessor still saving needs). The first ends as if alone."""
    exp_file, ref_dir = reference
    workdir = tmp_path / "runs"
    run_dir = workdir / "rel"
    lock = run_dir / ".ablate.lock"
    args = ["train", exp_file, "--workdir", workdir, "--quiet"]
    first = Proc(args, env, tmp_path)
    deadline = time.monotonic() + TIMEOUT
    while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        assert first.alive() and time.monotonic() < deadline, first.describe()
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGSTOP)  # it holds the lock, frozen, while the others try
    try:
        before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
        t0 = time.monotonic()
        second = run(args, {**env, "ABLATE_LOCK_WAIT_SECONDS": "3"}, tmp_path)
        waited = time.monotonic() - t0
        assert second.popen.returncode == EXIT_IO, second.describe()
        assert f"waiting for process {first.pid} to release {run_dir}" in second.stderr
        assert (
            f"run folder {run_dir} is in use by another ablate process (pid {first.pid}); "
            "waited 3s" in second.stderr
        )
        assert "Traceback" not in second.stderr and waited >= 3
        after = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
        assert after == before

        third = Proc(args, {**env, "ABLATE_LOCK_WAIT_SECONDS": str(TIMEOUT)}, tmp_path)
        while f"waiting for process {first.pid}" not in third.stderr:
            assert third.alive() and time.monotonic() < deadline, third.describe()
            time.sleep(0.1)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait() == 0, first.describe()
    assert third.wait() == 0, third.describe()
    assert "from checkpoint step 200" in third.stderr  # found the run done: nothing retrained
    assert_bit_identical(run_dir, ref_dir, load_exp(exp_file))


FULL_DISK = textwrap.dedent(
    """
    import resource
    import signal
    import sys

    from ablate.cli import main

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG errors instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_disk_full_during_a_save_is_a_clear_error_and_keeps_older_checkpoints(tmp_path, env):
    """8 and 9: a run killed once its checkpoint 30 is complete resumes with writes beyond
    100 kB failing (RLIMIT_FSIZE, like a full disk): checkpoint 60 cannot be written; exit 74
    naming the path, checkpoint 30 intact. With space again it resumes from 30 and ends
    identical to an uninterrupted run: params, every metrics row and TensorBoard scalar.

    Its own, wider model: orbax splits a checkpoint's data into a varying number of files
    (by write timing): the reference run's largest file per checkpoint ranged 32-93 kB;
    this one's ~3 MB of state leaves every split with a file far above the limit."""
    data = json.loads(json.dumps(BASE))
    data["model"].update(d_model=64, n_layers=2)
    data["train"]["steps"] = 90
    exp_file = write_experiment(tmp_path / "rel.toml", data)
    proc = run(["train", exp_file, "--workdir", tmp_path / "ref", "--quiet"], env, tmp_path)
    assert proc.popen.returncode == 0, proc.describe()
    ref_dir = tmp_path / "ref" / "rel"
    limit = 100_000
    logs = [p for p in ref_dir.rglob("*") if p.is_file() and "checkpoints" not in p.parts]
    assert max(p.stat().st_size for p in logs) < limit / 2  # room to log, none to save
    assert max(p.stat().st_size for p in (ref_dir / "checkpoints" / "30").rglob("*")) > 4 * limit

    workdir = tmp_path / "runs"
    run_dir = workdir / "rel"
    ckpts = run_dir / "checkpoints"
    args = ["train", exp_file, "--workdir", workdir, "--quiet"]
    proc = Proc(args, env, tmp_path)
    kill_when(proc, lambda: checkpoint_steps(run_dir) == [30], "the first checkpoint")
    proc.wait()
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK.format(limit=limit))
    proc = run(args, env, tmp_path, prefix=[sys.executable, script])
    assert proc.popen.returncode == EXIT_IO, proc.describe()
    assert "could not write checkpoint step 60" in proc.stderr
    assert "File too large" in proc.stderr and str(ckpts) in proc.stderr
    assert checkpoint_steps(run_dir) == [30]

    proc = run(args, env, tmp_path)  # space again: the run continues from step 30
    assert proc.popen.returncode == 0, proc.describe()
    assert "from checkpoint step 30" in proc.stderr
    assert checkpoint_steps(run_dir) == [30, 60, 90]
    assert not any(".orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir())
    assert_bit_identical(run_dir, ref_dir, load_exp(exp_file))


@pytest.mark.slow
def test_sweep_records_a_crashing_member_and_retries_only_it(tmp_path, env):
    """10: one member cannot even create its folder: recorded with the error, the other
    finishes; a SIGTERM stops the sweep without a false failure; the rerun trains only the
    failed member."""
    data = json.loads(json.dumps(BASE))
    data["train"]["steps"] = 40
    data["sweep"] = {"name": "sw", "grid": {"train.log_every": [10, 20]}}
    exp_file = write_experiment(tmp_path / "sweep.toml", data)
    sweep_dir = tmp_path / "runs" / "sw"
    ok_name, bad_name = "assoc_recall-learned-log_every10", "assoc_recall-learned-log_every20"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / bad_name).write_text("in the way\n")
    args = ["sweep", exp_file, "--workdir", tmp_path / "runs", "--quiet", "--no-report"]

    proc = run(args, env, tmp_path)
    assert proc.popen.returncode == 0, proc.describe()
    rows = [json.loads(x) for x in (sweep_dir / "results.jsonl").read_text().splitlines()]
    status = {(r["run"], r["seed"]): r["status"] for r in rows}
    assert status == {
        (ok_name, 0): "ok",
        (ok_name, 1): "ok",
        (bad_name, 0): "failed",
        (bad_name, 1): "failed",
    }
    failed = next(r for r in rows if r["run"] == bad_name)
    assert str(sweep_dir / bad_name) in failed["error"]
    assert "1 failed" in proc.stdout
    ok_rows = [r for r in rows if r["run"] == ok_name]
    ok_metrics = sweep_dir / ok_name / "metrics.jsonl"
    stamp = ok_metrics.stat().st_mtime_ns

    # Preempting the sweep stops it (exit 75) without recording the member as failed.
    (sweep_dir / bad_name).unlink()
    proc = Proc(args, env, tmp_path)
    started = (sweep_dir / bad_name / ".ablate.lock").is_file
    kill_when(proc, started, "the retried member to start", sig=signal.SIGTERM)
    assert proc.wait() == EXIT_PREEMPTED, proc.describe()
    rows = [json.loads(x) for x in (sweep_dir / "results.jsonl").read_text().splitlines()]
    assert {(r["run"], r["seed"]): r["status"] for r in rows} == status

    proc = run(args, env, tmp_path)
    assert proc.popen.returncode == 0, proc.describe()
    assert "1 already done, 1 trained now, 0 failed" in proc.stdout
    rows = [json.loads(x) for x in (sweep_dir / "results.jsonl").read_text().splitlines()]
    assert sorted((r["run"], r["seed"], r["status"]) for r in rows) == [
        (ok_name, 0, "ok"),
        (ok_name, 1, "ok"),
        (bad_name, 0, "ok"),
        (bad_name, 1, "ok"),
    ]
    assert [r for r in rows if r["run"] == ok_name] == ok_rows  # not retrained
    assert ok_metrics.stat().st_mtime_ns == stamp


NO_PICKLE = textwrap.dedent(
    """
    import pickle
    import sys

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    class RefusingUnpickler(pickle.Unpickler):
        def load(self):
            refuse()

    pickle.load = pickle.loads = refuse
    pickle.Unpickler = RefusingUnpickler

    from ablate.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_resume_loads_no_pickle_and_tensorboard_listens_on_localhost_only(reference, tmp_path, env):
    """11 and 9: restoring a checkpoint and training on never unpickles, and the run ends
    identical to the uninterrupted one; `ablate tensorboard` listens on 127.0.0.1 and
    nowhere else."""
    exp_file, workdir, run_dir = copy_run(reference, tmp_path)
    # As if killed after checkpoint 150, its logs and TensorBoard already past it.
    for step in (180, 200):
        shutil.rmtree(run_dir / "checkpoints" / str(step))
    (run_dir / "final.json").unlink()
    script = tmp_path / "no_pickle.py"
    script.write_text(NO_PICKLE)
    args = ["train", exp_file, "--workdir", workdir, "--quiet"]
    proc = run(args, env, tmp_path, prefix=[sys.executable, script])
    assert proc.popen.returncode == 0, proc.describe()
    assert "from checkpoint step 150" in proc.stderr
    assert_bit_identical(run_dir, reference[1], load_exp(exp_file))  # promise 9

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Proc(["tensorboard", run_dir, "--port", port], env, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while f"127.0.0.1:{port}" not in server.stdout:
            assert server.alive() and time.monotonic() < deadline, server.describe()
            time.sleep(0.2)
        listening = _listening_addresses(port)
        assert listening == {"127.0.0.1"}, listening
    finally:
        server.popen.send_signal(signal.SIGINT)  # `serve` then stops its TensorBoard child
        server.wait()
    deadline = time.monotonic() + 60
    while _listening_addresses(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _listening_addresses(port)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (Linux /proc/net)."""
    found = set()
    for name, size in (("tcp", 4), ("tcp6", 16)):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if int(hex_port, 16) != port or state != "0A":  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            if size == 4:
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found
