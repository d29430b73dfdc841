"""Sweeps across machines: shards, Ray tasks and SLURM arrays (submitit's local stand-in)
give the local executor's results table row for row, a killed worker or driver loses nothing,
and bad input is refused before anything compiles."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import ablate.sweep as sweep_module
from ablate import executors
from ablate.config import ConfigError
from ablate.runfolder import LOCK_FILE, METRICS_FILE, ROWS_FILE, SHARED_MARKER, SLURM_DIR
from ablate.sweep import PointJob, ResultsTable, expand, parse_shard, point_job, run_sweep

# 1 task x 2 variants x 2 step budgets = 4 points; the budgets share compiled programs (a
# cold compile is most of a tiny sweep's time), and the 40-step points finish first (the
# driver-kill test stops the sweep in between).
FOUR_POINTS = """
[sweep]
name = "four"
variants = ["learned", "uniform"]
tasks = [{ name = "assoc_recall", n_pairs = 2, n_keys = 4, n_values = 2 }]
grid = { "train.steps" = [40, 160] }
[model]
d_model = 16
n_heads = 2
n_layers = 1
[train]
steps = 40
batch_size = 8
seeds = [0, 1]
steps_per_dispatch = 10
log_every = 10
eval_every = 20
eval_batches = 1
gradient_alignment = false
checkpoint_every = 20
"""
RUNS = [f"assoc_recall-{v}-steps{n}" for v in ("learned", "uniform") for n in (40, 160)]
TIMING = ("wall_seconds", "compile_seconds")  # the only fields that depend on who trained


def table(sweep_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (sweep_dir / "results.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def report_text(sweep_dir: Path) -> str:
    """REPORT.md without its wall-time section (the one part that depends on the machine),
    its work folder written as WORKDIR."""
    text = (sweep_dir / "REPORT.md").read_text().replace(str(sweep_dir.parent), "WORKDIR")
    start = text.index("## Wall time")
    end = text.find("\n## ", start + 1)
    return text[:start] + ("" if end < 0 else text[end:])


def write_experiment(folder: Path) -> Path:
    path = folder / "four.toml"
    path.write_text(FOUR_POINTS)
    return path


def cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(
        [sys.executable, "-m", "ablate.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


# ---- fast: input refused before anything compiles, the driver's collection path ----------


@pytest.mark.parametrize("text", ["2/2", "1", "-1/2", "a/b", "0/0", "1/2/3", ""])
def test_a_bad_shard_is_refused_naming_what_is_allowed(text):
    with pytest.raises(ConfigError, match=r"--shard: .* must be i/n with whole numbers 0 <= i < n"):
        parse_shard(text)


def test_shards_cover_every_point_once():
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) is None
    import tomllib

    _, points = expand(tomllib.loads(FOUR_POINTS))
    slices = [points[i::n] for i, n in [parse_shard(f"{i}/3") for i in range(3)]]
    assert sorted(p.run_name for s in slices for p in s) == sorted(RUNS)


@pytest.mark.parametrize(
    "executor,kwargs,match",
    [
        ("kubernetes", {}, "--executor: unknown 'kubernetes'; one of local, ray, slurm"),
        ("ray", {"shard": "0/2"}, "--shard: runs its slice in this process"),
        (
            "ray",
            {"options": executors.RayOptions(gpus_per_point=1.5)},
            r"--gpus-per-point: must be a share in \[0, 1\] or a whole number",
        ),
        ("ray", {"options": executors.RayOptions(retries=-1)}, "--retries: must be >= 0"),
        (
            "slurm",
            {"options": executors.SlurmOptions(cluster="local", time_minutes=0)},
            "--slurm-time: must be >= 1",
        ),
    ],
)
def test_bad_executor_input_is_refused_before_the_sweep_folder_is_made(
    tmp_path, executor, kwargs, match
):
    with pytest.raises(ConfigError, match=match):
        run_sweep(write_experiment(tmp_path), workdir=tmp_path, executor=executor, **kwargs)
    assert not (tmp_path / "four").exists()


@pytest.mark.parametrize("executor,package", [("ray", "ray"), ("slurm", "submitit")])
def test_a_missing_extra_names_the_pip_command(tmp_path, monkeypatch, executor, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    options = executors.SlurmOptions(cluster="local") if executor == "slurm" else None
    with pytest.raises(ConfigError) as e:
        run_sweep(write_experiment(tmp_path), workdir=tmp_path, executor=executor, options=options)
    assert f'pip install -e ".[{executor}]"' in str(e.value)
    assert f"{executor} needs the `{package}` package" in str(e.value)
    assert not (tmp_path / "four").exists()


def test_slurm_without_sbatch_says_where_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(executors.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="slurm needs SLURM's `sbatch` on this machine's PATH"):
        run_sweep(write_experiment(tmp_path), workdir=tmp_path, executor="slurm")


def test_slurm_time_reads_minutes_or_hours_minutes_seconds():
    assert executors.parse_minutes("90") == 90
    assert executors.parse_minutes("1:30:00") == 90
    assert executors.parse_minutes("2:00:30") == 121  # a started minute counts
    with pytest.raises(ConfigError, match="--slurm-time: '1h' must be minutes"):
        executors.parse_minutes("1h")


def _job(tmp_path: Path, marker: str) -> PointJob:
    import tomllib

    _, points = expand(tomllib.loads(FOUR_POINTS))
    return PointJob(points[0], str(tmp_path), marker, "driver-host")


def test_a_worker_that_cannot_see_the_drivers_folder_refuses_before_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained without checking the marker")

    monkeypatch.setattr(sweep_module, "train", no_training)
    monkeypatch.setattr(sweep_module, "task_levels", no_training)
    out = point_job(_job(tmp_path, "abc"))  # a folder the driver never wrote
    assert out["status"] == "not_shared"
    assert (
        f"finds no marker {tmp_path / SHARED_MARKER} written by the driver on driver-host"
        in (out["message"])
    )
    assert "must be on storage every worker shares" in out["message"]
    token = sweep_module.shared_marker(tmp_path)  # another sweep's marker
    assert sweep_module.shared_marker(tmp_path) == token  # written once, then kept
    out = point_job(_job(tmp_path, "abc"))
    assert out["status"] == "not_shared" and "finds another sweep's marker" in out["message"]
    assert not (tmp_path / RUNS[0]).exists()


def test_the_driver_stops_when_a_worker_does_not_share_its_folder(tmp_path, monkeypatch):
    def engine(fn, jobs, options, sweep_dir, on_result):  # Ray, as a worker elsewhere saw it
        run, job = next(iter(jobs.items()))
        on_result(run, fn(PointJob(job.point, str(tmp_path / "elsewhere"), "x", "h")))

    monkeypatch.setattr(executors, "run_ray", engine)
    with pytest.raises(ConfigError, match="--workdir: the worker on .* finds no marker"):
        run_sweep(write_experiment(tmp_path), workdir=tmp_path, executor="ray", report=False)


def _rows(run: str, status: str = "ok", accuracy: float = 0.5) -> list[dict]:
    return [{"run": run, "seed": s, "status": status, "accuracy": accuracy} for s in (0, 1)]


def test_the_table_collects_run_folders_in_point_order_once(tmp_path):
    from ablate.runfolder import write_jsonl

    results = ResultsTable(tmp_path / "results.jsonl", order=["a", "b", "c"])
    write_jsonl(results.path, _rows("old"))  # a run from before rows.jsonl: kept as it is
    for run in ("c", "a"):  # finished in another order than the points'
        (tmp_path / run).mkdir()
        write_jsonl(tmp_path / run / ROWS_FILE, _rows(run))
    assert results.collect(["a", "b", "c", "old"]) == ["a", "c"]
    assert [(r["run"], r["seed"]) for r in results.rows()] == [
        ("a", 0), ("a", 1), ("c", 0), ("c", 1), ("old", 0), ("old", 1)
    ]  # fmt: skip
    before = results.path.stat().st_mtime_ns
    assert results.collect(["a", "b", "c"]) == []  # nothing new: the table is not rewritten
    assert results.path.stat().st_mtime_ns == before
    write_jsonl(tmp_path / "c" / ROWS_FILE, _rows("c", accuracy=0.9))  # retried: replaced
    assert results.collect(["c"]) == ["c"]
    assert [r["accuracy"] for r in results.rows() if r["run"] == "c"] == [0.9, 0.9]
    assert len(results.rows()) == 6 and results.done() == {"a", "c", "old"}


def test_a_rerun_collects_what_workers_finished_after_the_driver_died(tmp_path, monkeypatch):
    """Rows a worker left in a run folder reach the table on the driver's next run; only
    points without ok rows are sent again."""
    from ablate.runfolder import write_jsonl

    exp = write_experiment(tmp_path)
    for run in RUNS[:3]:
        (tmp_path / "four" / run).mkdir(parents=True)
        write_jsonl(tmp_path / "four" / run / ROWS_FILE, _rows(run))
    sent = []

    def engine(fn, jobs, options, sweep_dir, on_result):
        sent.extend(jobs)
        for run in jobs:  # its worker died and Ray gave up on it
            on_result(run, {"status": "lost", "message": "the Ray worker failed: killed"})

    monkeypatch.setattr(executors, "run_ray", engine)
    summary = run_sweep(exp, workdir=tmp_path, executor="ray", report=False)
    assert sent == [RUNS[3]]
    assert "4 runs: 3 already done, 0 trained now, 1 failed" in summary
    got = ResultsTable(tmp_path / "four" / "results.jsonl").rows()
    assert [r["run"] for r in got] == [run for run in RUNS for _ in (0, 1)]
    lost = [r for r in got if r["run"] == RUNS[3]]
    assert [r["status"] for r in lost] == ["failed", "failed"]
    assert lost[0]["error"] == "the Ray worker failed: killed" and lost[0]["seed"] == 0
    # The lost point's rows are in its folder, so `ablate report` merges the same table.
    left = (tmp_path / "four" / RUNS[3] / ROWS_FILE).read_text().splitlines()
    assert [json.loads(x)["status"] for x in left] == ["failed", "failed"]


# ---- slow: the same table whoever trains it ------------------------------------------------


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """The local executor's sweep: the reference every other launch path must equal."""
    folder = tmp_path_factory.mktemp("local")
    run_sweep(write_experiment(folder), workdir=folder, progress=False)
    return folder / "four"


@pytest.mark.slow
def test_shards_in_two_processes_then_report_equal_one_local_sweep(tmp_path, local_sweep):
    exp = write_experiment(tmp_path)
    shards = [
        cli("sweep", str(exp), "--workdir", str(tmp_path), "--shard", s, "--quiet")
        for s in ("0/2", "1/2")
    ]
    outputs = [p.communicate(timeout=600)[0] for p in shards]
    assert [p.returncode for p in shards] == [0, 0], outputs
    assert "2 runs shard 0/2: 0 already done, 2 trained now, 0 failed" in outputs[0]
    assert not (tmp_path / "four" / "results.jsonl").exists()  # shards write run folders only
    from ablate.cli import main

    assert main(["report", str(tmp_path / "four")]) == 0
    assert table(tmp_path / "four") == table(local_sweep)
    assert report_text(tmp_path / "four") == report_text(local_sweep)


@pytest.mark.slow
def test_ray_sweep_with_a_killed_worker_equals_the_local_sweep(tmp_path, local_sweep):
    """A local Ray instance with 2 workers; the worker training a 160-step point is killed
    (SIGKILL) after its step-20 eval: Ray runs the point again, it resumes from its
    checkpoint, and the table equals the local executor's, number for number."""
    pytest.importorskip("ray")
    killed = []
    run_dir = tmp_path / "four" / RUNS[1]

    def kill_mid_point():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            metrics = run_dir / METRICS_FILE
            if metrics.is_file() and '"step": 20' in metrics.read_text():
                if not (run_dir / "final.json").exists():
                    pid = int((run_dir / LOCK_FILE).read_text())
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_mid_point, daemon=True)
    watcher.start()
    options = executors.RayOptions(cpus_per_point=1, retries=2)
    summary = run_sweep(
        write_experiment(tmp_path),
        workdir=tmp_path,
        executor="ray",
        options=options,
        progress=False,
    )
    watcher.join(timeout=5)
    assert killed and killed[0] != os.getpid(), "the point finished before it could be killed"
    assert "4 runs: 0 already done, 4 trained now, 0 failed" in summary
    assert table(tmp_path / "four") == table(local_sweep)
    assert report_text(tmp_path / "four") == report_text(local_sweep)


@pytest.mark.slow
def test_slurm_array_rerun_after_the_driver_is_killed_resubmits_only_the_unfinished(
    tmp_path, local_sweep
):
    """submitit's local executor stands in for SLURM. The driver (and the array tasks it
    started) is killed once the first point has its rows; the rerun submits only the points
    without rows, and the table equals the local executor's."""
    pytest.importorskip("submitit")
    exp = write_experiment(tmp_path)
    sweep_dir = tmp_path / "four"
    args = ["sweep", str(exp), "--workdir", str(tmp_path), "--executor", "slurm"]
    args += ["--slurm-cluster", "local", "--slurm-time", "20", "--quiet"]
    driver = cli(*args, start_new_session=True)
    deadline = time.monotonic() + 600
    while not any((sweep_dir / run / ROWS_FILE).is_file() for run in RUNS):
        assert driver.poll() is None, driver.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the array tasks it started
    driver.wait()
    finished = {run for run in RUNS if (sweep_dir / run / ROWS_FILE).is_file()}
    assert 1 <= len(finished) < len(RUNS)
    first_ids = json.loads((sweep_dir / SLURM_DIR / "jobs.json").read_text())
    assert sorted(first_ids) == sorted(RUNS)

    rerun = cli(*args)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output
    assert f"4 runs: {len(finished)} already done, {4 - len(finished)} trained now" in output
    ids = json.loads((sweep_dir / SLURM_DIR / "jobs.json").read_text())
    resubmitted = {run for run in RUNS if ids[run] != first_ids[run]}
    assert resubmitted == set(RUNS) - finished
    assert table(sweep_dir) == table(local_sweep)
    assert report_text(sweep_dir) == report_text(local_sweep)


def test_a_slurm_rerun_waits_for_jobs_still_running_and_submits_the_rest(tmp_path, monkeypatch):
    """Against a stand-in for submitit's SLURM side (no scheduler here): a point whose job
    from the last submission is still running is waited for, not submitted again; the rest
    go out as one array with the options given; a task that ended without a result is lost
    with the job's state."""
    import types

    submitted, parameters = [], {}

    class Job:
        def __init__(self, folder=None, job_id="", outcome=None, state="COMPLETED"):
            self.job_id, self.outcome, self.state = job_id, outcome, state

        def done(self):
            return True

        def result(self):
            if self.outcome is None:
                raise RuntimeError("Job 7_1 (task: 0) with path ... has not produced any output")
            return self.outcome

    class SlurmJob(Job):  # what a rerun finds of the last submission
        def __init__(self, folder, job_id):
            state = {"5_0": "RUNNING", "5_1": "FAILED"}[job_id]
            super().__init__(job_id=job_id, outcome={"status": "ok", "message": ""}, state=state)

    class AutoExecutor:
        def __init__(self, folder, cluster):
            assert cluster == "slurm"

        def update_parameters(self, **kwargs):
            parameters.update(kwargs)

        def map_array(self, fn, jobs):
            submitted.extend(jobs)
            return [Job(job_id=f"7_{i}", outcome=fn(j)) for i, j in enumerate(jobs)]

    fake = types.SimpleNamespace(SlurmJob=SlurmJob, AutoExecutor=AutoExecutor)
    monkeypatch.setitem(sys.modules, "submitit", fake)
    monkeypatch.setattr(executors.shutil, "which", lambda name: "/usr/bin/sbatch")
    (tmp_path / SLURM_DIR).mkdir()
    (tmp_path / SLURM_DIR / "jobs.json").write_text(json.dumps({"a": "5_0", "b": "5_1"}))
    got = {}
    options = executors.SlurmOptions(partition="gpu", gpus_per_job=1, time_minutes=90)
    options = executors.dataclasses.replace(options, poll_seconds=0, additional={"account": "x"})
    assert options.problems() == []
    fn = lambda job: {"status": "ok", "message": job} if job != "c" else None  # c: no result
    executors.run_slurm(fn, {"a": "a", "b": "b", "c": "c"}, options, tmp_path, got.__setitem__)
    assert submitted == ["b", "c"]  # a's job is still running: waited for, not resubmitted
    assert got["a"] == {"status": "ok", "message": ""} and got["b"]["message"] == "b"
    assert got["c"]["status"] == "lost"
    assert got["c"]["message"].startswith("SLURM job 7_1 ended without a result (COMPLETED)")
    assert json.loads((tmp_path / SLURM_DIR / "jobs.json").read_text()) == {
        "a": "5_0",
        "b": "7_0",
        "c": "7_1",
    }
    assert parameters["slurm_partition"] == "gpu" and parameters["gpus_per_node"] == 1
    assert parameters["timeout_min"] == 90
    assert parameters["slurm_additional_parameters"] == {"account": "x"}


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--executor", "mpi"], "--executor: unknown 'mpi'; one of local, ray, slurm"),
        (["--shard", "3/2"], "--shard: '3/2' must be i/n"),
        (["--executor", "ray", "--gpus-per-point", "-1"], "--gpus-per-point: must be a share"),
        (["--executor", "slurm", "--slurm-time", "soon"], "--slurm-time: 'soon' must be"),
        (["--executor", "slurm", "--slurm-option", "account"], "--slurm-option: 'account' must"),
        (
            ["--slurm-partition", "gpu", "--slurm-gpus-per-job", "1"],
            "--slurm-partition, --slurm-gpus-per-job apply only with --executor slurm",
        ),
        (["--executor", "slurm", "--gpus-per-point", "0.5"], "apply only with --executor ray"),
    ],
)
def test_the_command_refuses_bad_executor_flags_with_exit_2(tmp_path, capsys, flags, message):
    from ablate.cli import main

    exp = write_experiment(tmp_path)
    assert main(["sweep", str(exp), "--workdir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "four").exists()


def test_a_point_whose_run_folder_cannot_be_made_is_still_recorded(tmp_path, monkeypatch):
    """A file in the way of a run folder: the point fails, and its rows, which cannot go in
    the folder, go beside it, where the table collects them (once)."""
    sweep_dir = tmp_path / "four"
    sweep_dir.mkdir()
    (sweep_dir / RUNS[0]).write_text("in the way\n")

    def train(exp, run_dir, **kwargs):
        raise OSError(f"cannot create or open the run folder {run_dir}")

    monkeypatch.setattr(sweep_module, "train", train)
    monkeypatch.setattr(sweep_module, "task_levels", lambda exp, cache: {})
    exp = write_experiment(tmp_path)
    assert "4 failed" in run_sweep(exp, workdir=tmp_path, report=False, progress=False)
    got = ResultsTable(sweep_dir / "results.jsonl").rows()
    assert [(r["run"], r["status"]) for r in got] == [
        (run, "failed") for run in RUNS for _ in (0, 1)
    ]
    assert f"the run folder {sweep_dir / RUNS[0]}" in got[0]["error"]
    assert (sweep_dir / f".{RUNS[0]}.{ROWS_FILE}").is_file()
    assert (sweep_dir / RUNS[0]).read_text() == "in the way\n"  # the user's file is untouched
    run_sweep(exp, workdir=tmp_path, report=False, progress=False)  # retried, failed again
    assert len(ResultsTable(sweep_dir / "results.jsonl").rows()) == 8


def test_points_without_rows_are_named(tmp_path):
    """What `ablate report` warns of: points sweep.json lists that the table has no row of
    (shards still running, or a worker off the shared storage)."""
    (tmp_path / "sweep.json").write_text(json.dumps({"points": ["a", "b", "c"]}))
    assert sweep_module.points_without_rows(tmp_path) == ["a", "b", "c"]
    (tmp_path / "results.jsonl").write_text(json.dumps({"run": "b", "status": "ok"}) + "\n")
    assert sweep_module.points_without_rows(tmp_path) == ["a", "c"]
    assert sweep_module.points_without_rows(tmp_path / "nothing") == []
