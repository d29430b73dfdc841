"""Where a sweep's points run: Ray tasks on a cluster, or a SLURM job array through submitit.

A point (all its seeds) is one unit of work, a call `fn(job)` that leaves its rows in its run
folder and returns a small outcome ({"status", "message"}). These engines only carry such
calls to workers and hand each outcome back (`on_result(run, outcome)`, in the driver, as
points finish); what a point is and how its rows reach the results table is `ablate.sweep`'s.
A worker that died, or a job that ended without an outcome, is handed back as
{"status": "lost", "message": why}.

Both engines are optional extras (`pip install -e ".[ray]"`, `".[slurm]"`), imported only
when asked for, and checked before anything is read or compiled (`check`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ablate.config import ConfigError
from ablate.runfolder import SLURM_DIR, note, write_atomic

EXECUTORS = ("local", "ray", "slurm")
EXTRAS = {"ray": ("ray", "ray"), "slurm": ("submitit", "slurm")}  # executor: (module, extra)

OnResult = Callable[[str, dict[str, str]], None]


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """How points run as Ray tasks."""

    address: str | None = None  # None: start a local Ray instance (or RAY_ADDRESS's cluster)
    cpus_per_point: float = 1.0
    gpus_per_point: float = 0.0  # a share: 0.25 packs four points onto one GPU
    retries: int = 2  # times a point whose worker died is run again

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if not self.cpus_per_point > 0:
            found.append(("--cpus-per-point", f"must be > 0, got {self.cpus_per_point}"))
        if not self.gpus_per_point >= 0 or (
            self.gpus_per_point > 1 and self.gpus_per_point != int(self.gpus_per_point)
        ):
            found.append(
                (
                    "--gpus-per-point",
                    f"must be a share in [0, 1] or a whole number, got {self.gpus_per_point}",
                )
            )
        if self.retries < 0:
            found.append(("--retries", f"must be >= 0, got {self.retries}"))
        return found


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """How points run as the tasks of a SLURM job array (one point per array task)."""

    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int = 1
    time_minutes: int = 60
    array_parallelism: int = 256  # array tasks running at once
    additional: Mapping[str, str] = dataclasses.field(default_factory=dict)  # more sbatch options
    cluster: str = "slurm"  # "local": submitit runs the array on this machine (a stand-in)
    poll_seconds: float = 10.0

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if self.cluster not in ("slurm", "local"):
            found.append(("--slurm-cluster", f"must be slurm or local, got {self.cluster!r}"))
        for flag, value, least in (
            ("--slurm-gpus-per-job", self.gpus_per_job, 0),
            ("--slurm-cpus-per-job", self.cpus_per_job, 1),
            ("--slurm-time", self.time_minutes, 1),
            ("--slurm-array-parallelism", self.array_parallelism, 1),
        ):
            if value < least:
                found.append((flag, f"must be >= {least}, got {value}"))
        if self.cluster == "slurm" and shutil.which("sbatch") is None:
            found.append(
                (
                    "--executor",
                    "slurm needs SLURM's `sbatch` on this machine's PATH: run the sweep from a "
                    "login node of the cluster (--slurm-cluster local runs the array here)",
                )
            )
        return found


def parse_minutes(text: str) -> int:
    """`--slurm-time`: minutes ("90") or hours:minutes:seconds ("1:30:00")."""
    parts = text.split(":")
    if 1 <= len(parts) <= 3 and all(p.isdigit() for p in parts):
        h, m, s = [0] * (3 - len(parts)) + [int(p) for p in parts]
        if len(parts) == 1:
            h, m, s = 0, int(parts[0]), 0
        return h * 60 + m + (1 if s else 0)
    raise ConfigError([("--slurm-time", f"{text!r} must be minutes (90) or H:MM:SS (1:30:00)")])


def require(executor: str) -> Any:
    """The engine's module, imported now; a clear error naming the extra when it is missing."""
    module, extra = EXTRAS[executor]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            [
                (
                    "--executor",
                    f"{executor} needs the `{module}` package, which is not installed ({e}): "
                    f'pip install -e ".[{extra}]" (or pip install "ablate[{extra}]")',
                )
            ]
        ) from None


def check(executor: str, options: Any, *, sharded: bool) -> Callable[..., None] | None:
    """The engine that runs points for `executor` (None: this process), refusing an unknown
    executor, a missing extra, bad options or a shard given to a remote executor."""
    if executor not in EXECUTORS:
        raise ConfigError([("--executor", f"unknown {executor!r}; one of {', '.join(EXECUTORS)}")])
    if executor == "local":
        return None
    if sharded:
        raise ConfigError(
            [
                (
                    "--shard",
                    f"runs its slice in this process; it does not go with --executor {executor}",
                )
            ]
        )
    kind = RayOptions if executor == "ray" else SlurmOptions
    if options is None:
        options = kind()
    if not isinstance(options, kind):
        raise TypeError(f"--executor {executor} takes {kind.__name__}, got {type(options)}")
    if problems := options.problems():
        raise ConfigError(problems)
    require(executor)
    return run_ray if executor == "ray" else run_slurm


def run_ray(
    fn: Callable, jobs: Mapping[str, Any], options: RayOptions, sweep_dir: Path, on_result: OnResult
) -> None:
    """Run `fn(job)` for every job as a Ray task; a task whose worker dies is run again up to
    `options.retries` times, then handed back as lost with Ray's reason."""
    ray = require("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address, include_dashboard=False)
    remote = ray.remote(
        num_cpus=options.cpus_per_point,
        num_gpus=options.gpus_per_point,
        max_retries=options.retries,
        retry_exceptions=False,  # a point's own failure is in its rows; only deaths are retried
    )(fn)
    runs = {remote.remote(job): run for run, job in jobs.items()}
    pending = list(runs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # raised by ablate itself: a bug
                    outcome = {"status": "lost", "message": f"the point raised: {e.cause!r}"}
                except ray.exceptions.RayError as e:
                    why = (str(e).strip().split("\n") + [""])[0][:300]
                    outcome = {
                        "status": "lost",
                        "message": f"its Ray worker died (run {options.retries + 1} times): "
                        f"{type(e).__name__}: {why}",
                    }
                on_result(runs[ref], outcome)
    finally:
        for ref in pending:  # interrupted, or a worker that cannot see the folder
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED")


def run_slurm(
    fn: Callable,
    jobs: Mapping[str, Any],
    options: SlurmOptions,
    sweep_dir: Path,
    on_result: OnResult,
) -> None:
    """Submit the jobs as one SLURM job array (one point per array task), then wait, handing
    each outcome back as its task ends. The job ids are kept in SLURM_DIR/jobs.json: a rerun
    waits for a point whose job is still queued or running instead of submitting it again.
    Interrupting the wait leaves the jobs running."""
    submitit = require("slurm")
    folder = Path(sweep_dir) / SLURM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    ids_path = folder / "jobs.json"
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    live = {}
    if options.cluster == "slurm":  # a local stand-in's jobs end with the driver that ran them
        for run in jobs:
            if run in ids:
                job = submitit.SlurmJob(folder=folder, job_id=ids[run])
                try:
                    state = job.state.split()[0]
                except Exception:  # noqa: BLE001 - sacct cannot say: submit it again
                    state = "UNKNOWN"
                if state in LIVE_STATES:
                    live[run] = job
    executor = submitit.AutoExecutor(folder=folder, cluster=options.cluster)
    executor.update_parameters(
        name=f"ablate-{Path(sweep_dir).name}",
        timeout_min=options.time_minutes,
        cpus_per_task=options.cpus_per_job,
        gpus_per_node=options.gpus_per_job,
        slurm_array_parallelism=options.array_parallelism,
        **({"slurm_partition": options.partition} if options.partition else {}),
        **({"slurm_additional_parameters": dict(options.additional)} if options.additional else {}),
    )
    submit = [run for run in jobs if run not in live]
    if live:
        note(f"waiting for {len(live)} points still queued or running from an earlier submission")
    pending = dict(live)
    if submit:
        submitted = executor.map_array(fn, [jobs[run] for run in submit])
        pending |= dict(zip(submit, submitted))
        ids |= {run: job.job_id for run, job in zip(submit, submitted)}
        write_atomic(ids_path, json.dumps(ids, indent=2) + "\n")
    while pending:
        for run, job in list(pending.items()):
            if not job.done():
                continue
            try:
                outcome = job.result()
            except Exception as e:  # noqa: BLE001 - the job's end (timeout, kill) is its reason
                why = str(e).strip().splitlines()
                outcome = {
                    "status": "lost",
                    "message": f"SLURM job {job.job_id} ended without a result ({job.state}): "
                    + (why[-1][:300] if why else type(e).__name__),
                }
            del pending[run]
            on_result(run, outcome)
        if pending:
            time.sleep(options.poll_seconds)
