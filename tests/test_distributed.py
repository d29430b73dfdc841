"""Many devices and many processes: every mesh computes what one device computes.

The N-device runs happen in other processes (`XLA_FLAGS` must be set before JAX starts);
this process has one CPU device and computes the reference. The tests that need the
4-device process or two processes are marked slow (CI runs them in its second step).
"""

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from ablate.checkpoint import Checkpointer
from ablate.config import ConfigError
from ablate.core import Programs
from ablate.distributed import MeshConfig, launched_as_many, mesh_problems
from ablate.probe import probe_run
from ablate.sweep import run_sweep
from ablate.train import train
from tests.test_train import leaves, tiny

ROOT = Path(__file__).parent.parent
N = 4
TOL = 2e-5


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)
    return env


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    subprocess.run(
        [sys.executable, str(ROOT / "tests" / "mesh_worker.py"), str(N), str(out)],
        check=True,
        env=_env(),
        timeout=600,
    )
    return out


def _saved(path: Path):
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files) - 1)], z["loss"]


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL)


def _reference(**over):
    exp = tiny(**{"train.mesh": {"data": 1}, **over})
    programs = Programs(exp)
    state = programs.init()
    for _ in range(exp.train.steps // exp.train.steps_per_dispatch):
        state, metrics = programs.train_chunk(state, ())
    return leaves(state), np.asarray(metrics["loss"])


@pytest.mark.slow  # a 4-device process: ~1.5 min of compiling on 2 cores
def test_data_parallel_over_4_devices_matches_one_device(worker):
    got, got_loss = _saved(worker / "data.npz")
    want, want_loss = _reference()
    _assert_same(got, want)
    np.testing.assert_allclose(got_loss, want_loss, rtol=TOL)
    # The batch really was split: the step sums gradients across devices.
    assert json.loads((worker / "hlo.json").read_text())["all_reduce"]


@pytest.mark.slow  # a 4-device process: ~1.5 min of compiling on 2 cores
def test_seed_axis_over_4_devices_matches_vmapped_seeds(worker):
    got, got_loss = _saved(worker / "seeds.npz")
    want, want_loss = _reference(**{"train.seeds": list(range(N))})
    _assert_same(got, want)
    np.testing.assert_allclose(got_loss, want_loss, rtol=TOL)


@pytest.mark.slow  # a 4-device process: ~1.5 min of compiling on 2 cores
def test_fsdp_and_a_2x2_mesh_match_one_device(worker):
    _assert_same(_saved(worker / "fsdp.npz")[0], _reference()[0])
    specs = json.loads((worker / "fsdp_specs.json").read_text())
    assert sum("'data'" in s for s in specs) >= 10  # the weight matrices and their Adam slots
    _assert_same(_saved(worker / "both.npz")[0], _reference(**{"train.seeds": list(range(N))})[0])


@pytest.mark.slow  # a 4-device process: ~1.5 min of compiling on 2 cores
def test_checkpoint_from_4_devices_resumes_on_one(worker, tmp_path):
    run = worker / "resume"
    assert Checkpointer(run / "checkpoints").steps() == [10]
    # Its config says data = 4; probing it needs only this one device.
    assert probe_run(run, kinds="zero", out_dir=tmp_path / "probe")["step"] == 10
    # The same experiment on this 1-device process: the default mesh is now 1 device.
    exp = tiny()
    resumed = train(exp, run, progress=False)
    straight = train(exp, tmp_path / "straight", progress=False)
    assert resumed.steps == 20
    np.testing.assert_allclose(resumed.final["loss"], straight.final["loss"], rtol=TOL)
    restore = lambda d: Checkpointer(d / "checkpoints").restore_latest(
        Programs(exp).abstract_state()
    )
    _assert_same(leaves(restore(run)[1]), leaves(restore(tmp_path / "straight")[1]))


@pytest.mark.slow  # a 4-device process: ~1.5 min of compiling on 2 cores
def test_meshes_that_do_not_fit_are_refused_with_the_reason(worker):
    refused = json.loads((worker / "refused.json").read_text())
    assert "train.mesh.data" in refused["batch"] and "batch_size = 6" in refused["batch"]
    assert "train.mesh.seeds" in refused["seed_count"] and "3 seeds" in refused["seed_count"]
    assert "needs 8 devices; JAX sees 4" in refused["too_many"]


@pytest.mark.parametrize(
    "cfg, devices, seeds, batch, where",
    [
        (MeshConfig(), 4, 1, 16, None),
        (MeshConfig(seeds=2), 4, 2, 16, None),
        (MeshConfig(seeds=3), 4, 3, 16, "train.mesh.seeds"),  # 3 does not divide 4 devices
        (MeshConfig(seeds=3, data=1), 4, 3, 16, None),  # ...unless data says to use fewer
        (MeshConfig(), 4, 1, 10, "train.mesh.data"),
        (MeshConfig(seeds=2), 4, 3, 16, "train.mesh.seeds"),
        (MeshConfig(data=2, seeds=4), 4, 4, 16, "train.mesh"),
    ],
)
def test_mesh_problems(cfg, devices, seeds, batch, where):
    found = mesh_problems(cfg, devices, seeds, batch)
    assert [p for p, _ in found][:1] == ([where] if where else [])


def test_mesh_on_one_device_is_refused_before_anything_is_made(tmp_path):
    with pytest.raises(ConfigError, match="needs 2 devices; JAX sees 1"):
        train(tiny(**{"train.mesh": {"data": 2}}), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"needs 2 devices; JAX sees 1 \(every run\)"):
        run_sweep(
            ROOT / "experiments" / "context_quick.toml",
            overrides=["train.mesh.data=2"],
            workdir=tmp_path / "sweeps",
        )
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweeps").exists()


@pytest.mark.slow
def test_resuming_on_another_mesh_is_not_a_config_change(tmp_path):
    exp = tiny(**{"train.steps": 10})
    train(exp, tmp_path / "r", progress=False)
    # The saved config says data = 0; data = 1 is the same experiment on the same device.
    again = train(tiny(**{"train.steps": 10, "train.mesh": {"data": 1}}), tmp_path / "r")
    assert again.steps == 10


def test_launch_detection(monkeypatch):
    names = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE")
    for name in (*names, "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    assert not launched_as_many()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
    assert launched_as_many()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert not launched_as_many()  # Open MPI 5: JAX finds no coordinator; must be explicit
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "123@tcp://10.0.0.1:4000")
    assert launched_as_many()
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert not launched_as_many()  # sbatch's own shell, outside srun
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert launched_as_many()


TOML = """
name = "tiny"
[task]
name = "assoc_recall"
n_pairs = 4
n_keys = 4
n_values = 4
[model]
d_model = 32
n_heads = 2
n_layers = 2
[optim]
learning_rate = 3e-3
warmup_steps = 10
[train]
steps = 20
batch_size = 16
seeds = [0]
steps_per_dispatch = 10
log_every = 10
eval_every = 0
eval_batches = 2
checkpoint_every = 10
compile_cache = false
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ABLATE = [sys.executable, "-m", "ablate.cli"]


def _start_two_processes(argv: list[str], out: Path) -> list[subprocess.Popen]:
    """Start ARGV as 2 processes of 2 CPU devices each, joined on loopback; their outputs
    go to OUT/process_0.txt and OUT/process_1.txt."""
    port = _free_port()
    procs = []
    for i in range(2):
        with (out / f"process_{i}.txt").open("w") as log:
            procs.append(
                subprocess.Popen(
                    argv,
                    env=_env(
                        XLA_FLAGS="--xla_force_host_platform_device_count=2",
                        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                        JAX_NUM_PROCESSES="2",
                        JAX_PROCESS_ID=str(i),
                    ),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
    return procs


def _outputs(procs: list[subprocess.Popen], out: Path) -> list[str]:
    return [(out / f"process_{i}.txt").read_text() for i in range(len(procs))]


def _fail(procs: list[subprocess.Popen], out: Path, why: str) -> None:
    for p in procs:
        p.kill()
        p.wait()
    pytest.fail(f"{why}:\n" + "\n\n".join(_outputs(procs, out)))


def _finish(procs: list[subprocess.Popen], out: Path, codes=(0, 0), timeout=600) -> list[str]:
    """Wait for the processes; check their exit codes and return their outputs."""
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _fail(procs, out, f"still running after {timeout}s")
    outputs = _outputs(procs, out)
    assert tuple(p.returncode for p in procs) == tuple(codes), "\n\n".join(outputs)
    return outputs


def _two_processes(args: list[str], codes=(0, 0), timeout=600) -> list[str]:
    """Run `ablate ARGS` as 2 processes; check their exit codes and return their outputs."""
    with tempfile.TemporaryDirectory() as out:
        return _finish(_start_two_processes([*ABLATE, *args], Path(out)), Path(out), codes, timeout)


@pytest.mark.slow
def test_two_processes_train_and_probe_together_and_one_writes(tmp_path):
    exp_file = tmp_path / "tiny.toml"
    exp_file.write_text(TOML)
    outputs = _two_processes(
        ["train", str(exp_file), "--quiet", "--workdir", str(tmp_path / "runs")]
    )
    assert "2 process(es)" in outputs[0]
    run = tmp_path / "runs" / "tiny"
    straight = train(tiny(), tmp_path / "straight", progress=False)
    final = json.loads((run / "final.json").read_text())
    np.testing.assert_allclose(final["final"]["loss"], straight.final["loss"], rtol=TOL)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    one = [
        json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [(r["step"], r["kind"]) for r in rows] == [(r["step"], r["kind"]) for r in one]
    assert len(list((run / "seed_0").glob("events.out.tfevents.*"))) == 1
    # The checkpoint of the 2-process run (4 devices) restores here, on one device.
    restore = lambda d: Checkpointer(d / "checkpoints").restore_latest(
        Programs(tiny()).abstract_state()
    )
    step, state, _ = restore(run)
    assert step == 20
    _assert_same(leaves(state), leaves(restore(tmp_path / "straight")[1]))

    # Probing the run as 2 processes gives what one process gives, written once.
    _two_processes(["probe", str(run), "--kinds", "zero"])
    here = probe_run(tmp_path / "straight", kinds="zero", out_dir=tmp_path / "p1")
    there = json.loads((run / "probe" / "probe.json").read_text())
    np.testing.assert_allclose(
        [r["accuracy"] for r in there["rows"]], [r["accuracy"] for r in here["rows"]], atol=1e-4
    )


@pytest.mark.slow
def test_a_failure_on_process_0_alone_stops_every_process(tmp_path):
    # Only process 0 makes and locks the run folder; here it cannot (the workdir is a file).
    # Process 1 must stop too, told why, rather than wait for process 0 in a collective.
    exp_file = tmp_path / "tiny.toml"
    exp_file.write_text(TOML)
    (tmp_path / "file").write_text("")
    args = ["train", str(exp_file), "--quiet", "--workdir", str(tmp_path / "file")]
    first, second = _two_processes(args, codes=(74, 1), timeout=300)
    assert "cannot create or open the run folder" in first
    assert "locking the run folder failed on process 0 (its output says why)" in second


@pytest.mark.slow
def test_a_long_wait_for_the_lock_then_a_sigterm_preempts_every_process(tmp_path):
    # Another holder has the run folder's lock; process 0 waits for it while process 1
    # waits for process 0 (which once killed process 1 after 30 s: gloo's connect timeout).
    # Then process 0 gets a SIGTERM (a preemption): every process must exit 75, resumable;
    # process 1 with a failure would make a sweep record the point and go on alone.
    exp_file = tmp_path / "tiny.toml"
    exp_file.write_text(TOML)
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    args = ["train", str(exp_file), "--quiet", "--workdir", str(tmp_path / "runs")]
    with (run_dir / ".ablate.lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        procs = _start_two_processes([*ABLATE, *args], tmp_path)
        deadline = time.monotonic() + 300
        while "waiting for process" not in (tmp_path / "process_0.txt").read_text():
            if not all(p.poll() is None for p in procs) or time.monotonic() > deadline:
                _fail(procs, tmp_path, "process 0 never waited for the lock")
            time.sleep(0.1)
        time.sleep(35)
        if not all(p.poll() is None for p in procs):
            _fail(procs, tmp_path, "a process ended while process 0 waited for the lock")
        os.kill(procs[0].pid, signal.SIGTERM)
        first, second = _finish(procs, tmp_path, codes=(75, 75), timeout=300)
    assert "stopped by SIGTERM; before training started" in first
    assert "stopped by SIGTERM; on process 0 while locking the run folder;" in second
    assert not (run_dir / "config.json").exists()


@pytest.mark.slow
def test_a_sigterm_to_process_1_mid_training_stops_both_at_one_checkpoint(tmp_path):
    # The scheduler may signal any process: process 1's SIGTERM must stop process 0 too, at
    # the same step, with one checkpoint; both exit 75 and a rerun resumes from it.
    exp_file = tmp_path / "tiny.toml"
    exp_file.write_text(TOML)
    run_dir = tmp_path / "runs" / "tiny"
    args = ["train", str(exp_file), "--quiet", "--workdir", str(tmp_path / "runs")]
    long = ["--set", "train.steps=1000000", "--set", "train.checkpoint_every=100000"]
    procs = _start_two_processes([*ABLATE, *args, *long], tmp_path)
    deadline = time.monotonic() + 300
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and '"train"' in metrics.read_text()):
        if not all(p.poll() is None for p in procs) or time.monotonic() > deadline:
            _fail(procs, tmp_path, "the run never logged a training step")
        time.sleep(0.1)
    os.kill(procs[1].pid, signal.SIGTERM)
    first, _ = _finish(procs, tmp_path, codes=(75, 75), timeout=300)
    saved = int(re.search(r"saved a checkpoint at step (\d+)", first).group(1))
    ckpts = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert ckpts == [str(saved)] and 10 <= saved < 100000

    end = saved + 20
    resume = [*args, "--set", f"train.steps={end}", "--allow-config-change"]
    first, _ = _two_processes(resume)
    assert f"from checkpoint step {saved}" in first
    final = json.loads((run_dir / "final.json").read_text())
    assert final["steps"] == end


@pytest.mark.slow
def test_a_sigterm_outside_training_ends_a_process_of_a_multi_process_run(tmp_path):
    # Outside `train` nothing of ours handles SIGTERM: it must end the process, as in a
    # single-process run, not be caught and only logged by JAX's preemption service.
    code = "from ablate.distributed import initialize; initialize(); print('up', flush=True); "
    code += "import time; time.sleep(120)"
    procs = _start_two_processes([sys.executable, "-c", code], tmp_path)
    deadline = time.monotonic() + 120
    while not all("up" in (tmp_path / f"process_{i}.txt").read_text() for i in range(2)):
        if not all(p.poll() is None for p in procs) or time.monotonic() > deadline:
            _fail(procs, tmp_path, "the processes never connected")
        time.sleep(0.1)
    for p in procs:
        os.kill(p.pid, signal.SIGTERM)
    _finish(procs, tmp_path, codes=(-signal.SIGTERM, -signal.SIGTERM), timeout=30)
