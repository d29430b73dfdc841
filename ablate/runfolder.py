"""A run folder's layout, its file writes and reads, and its guards.

The layout (a name in parentheses is this module's constant for it, which every module that
writes or reads the file uses):

    RUN_DIR/                      one `ablate train` run, all its seeds
      config.json                 the resolved experiment (CONFIG_FILE)
      config.before-change-N.json a config replaced by an allowed change (BACKUP_CONFIG)
      final.json                  the result, once the last step is done (FINAL_FILE)
      final.step<S>-N.json        a result kept when the run was extended at step S (KEPT_FINAL)
      metrics.jsonl               train and eval rows, one per (step, seed, kind) (METRICS_FILE)
      patterns_init.npz           every head's patterns at step 0 on the first few eval
                                  sequences, with their tokens and masks (PATTERNS_INIT_FILE)
      patterns_final.npz          the same at the last step (PATTERNS_FILE)
      checkpoints/STEP/           orbax checkpoints with ablate's manifest (CHECKPOINT_DIR)
      seed_<seed>/                TensorBoard events of one seed (`seed_dir`)
        probe_written.json        the probe images already in its events (PROBE_RECORD)
      probe/                      `ablate probe` outputs (PROBE_DIR): probe.json (PROBE_FILE),
                                  probe.csv, pruning.png (PRUNING_PNG), drop_KIND.png (DROP_PNG)
      .ablate.lock                held by the process writing the run (LOCK_FILE)
      rows.jsonl                  in a sweep, the run's rows of the results table, written
                                  by whoever trained it once it is done (ROWS_FILE); beside
                                  the folder, as .RUN.rows.jsonl, when it cannot hold them
    SWEEP_DIR/                    one `ablate sweep`: a RUN_DIR per point, and
      sweep.json                  the command (SWEEP_FILE)
      .ablate-shared              the driver's marker: a worker that cannot read it does not
                                  share the driver's storage (SHARED_MARKER)
      results.jsonl, results.csv  one row per (run, seed), collected by the driver from the
                                  runs' rows.jsonl (RESULTS_FILE, RESULTS_CSV)
      slurm/                      submitit's job files and jobs.json (SLURM_DIR)
      REPORT.md, report/          the report (REPORT_FILE, REPORT_DIR)
      view.html                   the attention viewer, data inlined (VIEW_FILE)

Writes that replace a file go through `write_atomic` (a reader, or a kill, sees the old
content or the new, whole); JSON lines are appended whole by `append_jsonl` and read back by
`read_jsonl` under one rule for a cut last line. The guards: `train` holds a `RunLock` on the
folder (two processes never write one run), turns SIGTERM into a flag checked between
dispatches (`SigtermFlag`), and refuses to resume into a folder whose saved config differs
(`check_run_config`).
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ablate.config import ConfigError, flatten, upgrade_saved

CONFIG_FILE = "config.json"
BACKUP_CONFIG = "config.before-change"  # + "-N.json"
FINAL_FILE = "final.json"
KEPT_FINAL = "final.step{step}"  # + "-N.json"
METRICS_FILE = "metrics.jsonl"
PATTERNS_FILE = "patterns_final.npz"
PATTERNS_INIT_FILE = "patterns_init.npz"
CHECKPOINT_DIR = "checkpoints"
PROBE_DIR = "probe"
PROBE_FILE = "probe.json"
PRUNING_PNG = "pruning.png"
DROP_PNG = "drop_{kind}.png"
PROBE_RECORD = "probe_written.json"
LOCK_FILE = ".ablate.lock"
SWEEP_FILE = "sweep.json"
RESULTS_FILE = "results.jsonl"
RESULTS_CSV = "results.csv"
ROWS_FILE = "rows.jsonl"
SHARED_MARKER = ".ablate-shared"
SLURM_DIR = "slurm"
REPORT_FILE = "REPORT.md"
REPORT_DIR = "report"
VIEW_FILE = "view.html"
LOCK_WAIT_SECONDS = 60.0  # default; the environment variable below overrides it
LOCK_WAIT_ENV = "ABLATE_LOCK_WAIT_SECONDS"
# Placement, not the experiment: a run may resume on another mesh.
PLACEMENT_PREFIX = "train.mesh."


def seed_dir(run_dir: Path, seed: int) -> Path:
    """The TensorBoard folder of one seed of a run."""
    return Path(run_dir) / f"seed_{seed}"


class DamagedFile(ValueError):
    """A run-folder file damaged by something other than a write cut short."""


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data`: readers and a kill see the old content or the new, whole.

    The data goes to a temporary file beside it, is flushed to disk, then renamed over it.
    The temporary name (`.ablate-<random>.tmp`) never contains the target's name, so no
    reader that picks files by name (TensorBoard's "tfevents") sees a half-written file; a
    kill between the write and the rename leaves it behind, read by nothing.
    """
    path = Path(path)
    tmp = path.with_name(f".ablate-{secrets.token_hex(6)}.tmp")
    try:
        with tmp.open("xb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Compressed arrays, written atomically (`write_atomic`)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_atomic(path, buf.getvalue())


def _json_default(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v)}")


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(row, default=_json_default) + "\n" for row in rows)


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Replace a JSON-lines file with `rows` (one object per line; numpy values as lists)."""
    write_atomic(path, _jsonl(rows))


def append_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows to a JSON-lines file in one write, so a kill cuts at most the last line."""
    text = _jsonl(rows)
    with Path(path).open("a") as f:
        f.write(text)
        f.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file, one JSON object per line; [] when there is no file.

    One rule for every reader of ablate's JSON lines: blank lines are skipped; the last
    non-blank line is dropped when it is not a whole JSON object, since rows are appended
    whole (`append_jsonl`) and a writer killed mid-append (or out of disk) cuts only the line
    it was writing, which the next writer's rewrite leaves out; any other line that is not a
    JSON object raises `DamagedFile` naming the file and line, for something other than a
    cut write changed the file.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif i < len(lines) - 1:
            shown = line[:80].decode(errors="replace")
            raise DamagedFile(
                f"{path}, line {n}: not a JSON object ({shown!r}); only the last line may be "
                "cut short, so something else damaged the file: repair or remove it"
            )
    return rows


class Preempted(RuntimeError):
    """SIGTERM received: the state was saved at `step` and the run can be resumed.

    `where` says where the SIGTERM stopped another process, when it was not this one.
    """

    def __init__(self, step: int | None, saved: bool = True, where: str = ""):
        self.step, self.saved = step, saved
        if where:
            what = where
        elif saved:
            what = f"saved a checkpoint at step {step}"
        elif step:
            what = f"before training resumed (the checkpoint of step {step} is unchanged)"
        else:
            what = "before training started (nothing to save)"
        super().__init__(f"stopped by SIGTERM; {what}; rerun the same command to resume")


class RunFolderBusy(OSError):
    """Another process holds the run folder's lock."""


class SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between dispatches (main thread only).

    Installed before anything compiles, so a SIGTERM during compilation, restore or a save
    is noticed at the next boundary; later SIGTERMs change nothing. Once one arrived, the
    process ignores SIGTERM after `train` returns: it is on its way out with the
    preemption exit code, and the default action would turn that into a kill.
    """

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is None:
            return
        # After a SIGTERM, ignore further ones rather than restore the default: Python resets
        # its own handlers at shutdown (not SIG_IGN), and a late SIGTERM would then turn the
        # clean preemption exit into a kill.
        signal.signal(signal.SIGTERM, signal.SIG_IGN if self.raised else self._previous)


def lock_wait_seconds(environ: Mapping[str, str] = os.environ) -> float:
    """How long a run waits for another process to release its folder, in seconds.

    A preempted predecessor may still be saving when its replacement starts; the wait covers
    that. `ABLATE_LOCK_WAIT_SECONDS` sets it (default LOCK_WAIT_SECONDS).
    """
    raw = environ.get(LOCK_WAIT_ENV, "").strip()
    if not raw:
        return LOCK_WAIT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise ConfigError([(LOCK_WAIT_ENV, f"must be a number of seconds >= 0, got {raw!r}")])
    return seconds


class RunLock:
    """An exclusive lock on the run folder, so two processes never write one run."""

    def __init__(self, run_dir: Path, sigterm: SigtermFlag):
        wait = lock_wait_seconds()  # a bad setting is refused before the folder is made
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = (run_dir / LOCK_FILE).open("a+")
        except OSError as e:
            raise OSError(e.errno, f"cannot create or open the run folder {run_dir}: {e}") from e
        deadline = time.monotonic() + wait
        told = False
        while True:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                self._file.seek(0)
                holder = self._file.read().strip() or "unknown"
                # A preempted process may still be saving while its replacement starts.
                if sigterm.raised:
                    self._file.close()
                    raise Preempted(None, saved=False) from None
                if time.monotonic() > deadline:
                    self._file.close()
                    raise RunFolderBusy(
                        f"run folder {run_dir} is in use by another ablate process "
                        f"(pid {holder}); waited {wait:g}s"
                    ) from None
                if not told:
                    note(f"waiting for process {holder} to release {run_dir}")
                    told = True
                time.sleep(0.5)
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def check_run_config(run_dir: Path, config: dict, allow_change: bool) -> list[str]:
    """Refuse to resume a run folder whose saved config differs (unless allowed).

    Returns the differences ("field: old -> new"), empty when there are none.
    """
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return []
    try:
        saved = flatten(upgrade_saved(json.loads(path.read_text())))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            [("", f"{path} is unreadable ({e}); refusing to resume into {run_dir}")]
        ) from None
    new = flatten(json.loads(json.dumps(config)))
    diff = [
        f"{k}: {saved.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
        for k in sorted(set(saved) | set(new))
        if saved.get(k) != new.get(k) and not k.startswith(PLACEMENT_PREFIX)
    ]
    if diff and not allow_change:
        raise ConfigError(
            [
                (
                    "",
                    f"{run_dir} holds a run with a different config; refusing to resume into it. "
                    "Changed: " + "; ".join(diff) + ". Use another --workdir/name, or "
                    "--allow-config-change to resume anyway.",
                )
            ]
        )
    return diff


def note(message: str) -> None:
    """Print a one-line notice on stderr."""
    print(f"ablate: {message}", file=sys.stderr, flush=True)


def free_name(folder: Path, stem: str, suffix: str) -> Path:
    """folder/stem-N.suffix for the first N not taken."""
    n = 0
    while (path := folder / f"{stem}-{n}{suffix}").exists():
        n += 1
    return path
