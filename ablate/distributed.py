"""Placement on many devices and many hosts, on JAX's own distribution.

One jitted train step serves every layout: `Placement` builds a `jax.sharding.Mesh` with two
axes and hands the engine shardings to annotate its functions with, nothing else changes.

- `seeds`: the leading seed axis of the training state is split over these devices, so K
  seeds train on K devices at once (each seed's model lives on its own devices).
- `data`: each batch is split by rows over these devices; parameters are replicated there
  (data parallelism: XLA inserts the gradient all-reduce), or with `fsdp = true` each
  parameter and optimiser slot is also split over `data` along its largest divisible axis.

The mesh is `[train.mesh]` in an experiment (`data`, `seeds`, `fsdp`); the default puts all
devices on `data`. It is placement, not the experiment: a run may resume on another mesh
(checkpoints hold global arrays, and orbax re-shards them on restore).

Multi-host: `initialize()` calls `jax.distributed.initialize()` when the process was
launched as one of several (SLURM, Open MPI, a TPU pod slice, or the explicit
`JAX_COORDINATOR_ADDRESS`/`JAX_NUM_PROCESSES`/`JAX_PROCESS_ID`). Every process runs the same
program on its own devices; only process 0 writes logs, results and reports
(`is_primary`), checkpoints go through orbax's multi-host save (each process writes its own
shards), and host decisions that must agree (SIGTERM seen by any process) are agreed with
`any_process`. Batches are drawn inside the step from data every device holds and
constrained to be split by rows: no host ships batches to another.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ablate.config import ConfigError, check
from ablate.runfolder import Preempted

AXES = ("seeds", "data")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices per mesh axis. `data = 0` means every device not used by `seeds`.

    `fsdp` splits every weight matrix (and its Adam slots) over `data` along its largest axis
    the data devices divide; vectors and scalars stay replicated.
    """

    data: int = 0
    seeds: int = 1
    fsdp: bool = False

    def __post_init__(self):
        check(self)

    def problems(self):
        found = []
        if self.data < 0:
            found.append(("data", f"must be >= 0 (0 = all remaining devices), got {self.data}"))
        if self.seeds < 1:
            found.append(("seeds", f"must be >= 1, got {self.seeds}"))
        return found


def mesh_problems(
    cfg: MeshConfig, n_devices: int, n_seeds: int, batch_size: int
) -> list[tuple[str, str]]:
    """Why `cfg` cannot lay out `n_seeds` seeds and batches of `batch_size` on the devices."""
    found = []
    if not cfg.data and n_devices % cfg.seeds:
        return [
            (
                "train.mesh.seeds",
                f"{cfg.seeds} does not divide the {n_devices} devices JAX sees; choose a "
                f"divisor of {n_devices} (or set train.mesh.data to use fewer devices)",
            )
        ]
    data = cfg.data or n_devices // cfg.seeds
    if data * cfg.seeds > n_devices:
        found.append(
            (
                "train.mesh",
                f"data = {data} x seeds = {cfg.seeds} needs {data * cfg.seeds} devices; "
                f"JAX sees {n_devices}",
            )
        )
    if jax.process_count() > 1 and data * cfg.seeds != n_devices:
        found.append(
            (
                "train.mesh",
                f"data x seeds must use all {n_devices} devices of a multi-process run, "
                f"got {data * cfg.seeds}",
            )
        )
    if n_seeds % cfg.seeds:
        found.append(
            (
                "train.mesh.seeds",
                f"{cfg.seeds} devices do not divide the {n_seeds} seeds of train.seeds; "
                "use a divisor of the seed count (or add seeds)",
            )
        )
    if batch_size % data:
        found.append(
            (
                "train.mesh.data",
                f"{data} devices do not divide train.batch_size = {batch_size}; "
                f"use a batch size that is a multiple of {data}",
            )
        )
    return found


def check_mesh(mesh: MeshConfig, n_seeds: int, batch_size: int) -> None:
    """Raise ConfigError if the mesh does not fit this machine's devices, seeds or batch."""
    problems = mesh_problems(mesh, jax.device_count(), n_seeds, batch_size)
    if problems:
        raise ConfigError(problems)


class Placement:
    """The mesh of one experiment and the shardings its engine annotates with."""

    def __init__(self, cfg: MeshConfig, n_seeds: int, batch_size: int, local: bool = False):
        if local:
            # One device of this process, whatever mesh the run trained on (probing a run).
            cfg, devices = MeshConfig(data=1), jax.local_devices()[:1]
        else:
            check_mesh(cfg, n_seeds, batch_size)
            devices = jax.devices()
        data = cfg.data or len(devices) // cfg.seeds
        self.cfg = cfg
        self.shape = {"seeds": cfg.seeds, "data": data}
        used = np.asarray(devices[: cfg.seeds * data]).reshape(cfg.seeds, data)
        self.mesh = Mesh(used, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
        self.replicated = NamedSharding(self.mesh, P())
        self.per_seed = NamedSharding(self.mesh, P("seeds"))
        self._rows = NamedSharding(self.mesh, P("data"))

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    def state(self, abstract_tree):
        """Shardings for a tree whose every leaf has a leading seed axis."""
        return jax.tree.map(self._leaf, abstract_tree)

    def _leaf(self, leaf) -> NamedSharding:
        spec: list[str | None] = ["seeds"] + [None] * (len(leaf.shape) - 1)
        data = self.shape["data"]
        if self.cfg.fsdp and data > 1 and len(leaf.shape) >= 3:
            # FSDP: split the largest axis the data devices divide (matrices only).
            sizes = [(n, i) for i, n in enumerate(leaf.shape[1:], 1) if n % data == 0]
            if sizes:
                spec[max(sizes)[1]] = "data"
        return NamedSharding(self.mesh, P(*spec))

    def rows(self, tree):
        """Constrain every array of a per-seed batch to be split by rows over `data`."""
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self._rows), tree)

    def put(self, value: np.ndarray, sharding: NamedSharding) -> jax.Array:
        """A global array from a host value every process holds in full."""
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

    def describe(self) -> str:
        kind = jax.devices()[0].platform
        return (
            f"mesh seeds={self.shape['seeds']} x data={self.shape['data']} on "
            f"{self.n_devices} {kind} device(s), {jax.process_count()} process(es)"
            + (", fsdp" if self.cfg.fsdp else "")
        )


# --- multi-process -------------------------------------------------------------------------

_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def launched_as_many() -> bool:
    """True when this process is one of several of one job (and JAX should connect them)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_ID" in env:
        return True
    # Open MPI as JAX detects it (mpirun of Open MPI 4); others: set JAX_COORDINATOR_ADDRESS.
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1 and "OMPI_MCA_orte_hnp_uri" in env:
        return True
    # A TPU pod slice lists every worker of the slice.
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


_initialized = False


def initialize() -> bool:
    """Connect the processes of a multi-process launch (once, before any computation).

    Returns True if this is a multi-process run. A single process does nothing.
    """
    global _initialized
    if _initialized or not launched_as_many():
        return _initialized
    # CPU processes need a collectives library to talk to each other; harmless elsewhere.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service would catch SIGTERM from here on and only log it: a SIGTERM
    # outside a training loop (between sweep members, while writing a report) would be
    # swallowed and the process would run on until killed. Without it, SIGTERM ends such a
    # process as it ends a single one, and inside `train` our own handler saves and exits 75.
    jax.config.update("jax_enable_preemption_service", False)
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [name for name in _EXPLICIT[1:] if not env.get(name)]
        if missing:
            raise ConfigError(
                [("", f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not")]
            )
        jax.distributed.initialize(
            env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()  # SLURM, Open MPI and TPU pods are detected by JAX
    _initialized = True
    # Connect the processes' collectives now, while all are here. On CPU, gloo connects them
    # at their first collective and gives up after 30 s, so a first one that process 0 joins
    # late (it waited for the run folder's lock) would kill the others; once connected, they
    # wait as long as process 0 takes.
    broadcast(0)
    return True


def is_primary() -> bool:
    """The one process that writes logs, results and reports."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (a no-op with one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast(value: int) -> int:
    """Process 0's `value`, on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


T = TypeVar("T")


class OtherProcessFailed(RuntimeError):
    """Raised on the other processes when a step that only process 0 does failed there."""


_OK, _FAILED, _PREEMPTED = 0, 1, 2


def on_primary(action: Callable[[], T], what: str) -> T | None:
    """Run `action` on process 0 only, then agree on whether it worked.

    If it raised there, process 0 re-raises its error and every other process raises
    `OtherProcessFailed` (`Preempted` if it was a SIGTERM's), so that none is left waiting
    in a collective for a process that has stopped, and all exit with the same code.
    Returns the action's result on process 0, None on the others. Every process must call
    it (it is a collective, and so also a barrier); with one process it only runs it.
    """
    result, error = None, None
    if is_primary():
        try:
            result = action()
        except BaseException as e:  # re-raised below, once the others know
            error = e
    status = _OK if error is None else _PREEMPTED if isinstance(error, Preempted) else _FAILED
    status = broadcast(status)
    if error is not None:
        raise error
    if status == _PREEMPTED:
        raise Preempted(None, saved=False, where=f"on process 0 while {what}")
    if status == _FAILED:
        raise OtherProcessFailed(f"{what} failed on process 0 (its output says why)")
    return result
