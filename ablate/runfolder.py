"""A run folder's guards: one writer at a time, SIGTERM as a flag, no silent config change.

`train` holds a `RunLock` on the folder (two processes never write one run), turns SIGTERM
into a flag checked between dispatches (`SigtermFlag`), and refuses to resume into a folder
whose saved config differs (`check_run_config`).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from ablate.config import ConfigError
from ablate.logging import flatten

CONFIG_FILE = "config.json"
LOCK_FILE = ".ablate.lock"
LOCK_WAIT_SECONDS = 60.0  # default; the environment variable below overrides it
LOCK_WAIT_ENV = "ABLATE_LOCK_WAIT_SECONDS"
# Placement, not the experiment: a run may resume on another mesh.
PLACEMENT_PREFIX = "train.mesh."


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
        saved = flatten(json.loads(path.read_text()))
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
