"""Orbax checkpoints of a run, with our own checksum manifest.

Orbax checksums only its shard index: a flipped byte in a finished checkpoint restores
without error (NOTES.md). Every step folder therefore gets `ablate-manifest.json` (sha256 of
every file) written after orbax finishes; a step whose files do not match, or that has no
manifest because the process died between the two, is set aside (renamed
`<step>.corrupt-<n>` with the reason in `ABLATE_CORRUPT.txt`, never deleted) and the
previous good step is used.

Old steps are pruned by us, not by orbax's `max_to_keep`, and only after the new step's
manifest is written: a kill at any moment of a save leaves the previous good step in place.
Leftover `<step>.orbax-checkpoint-tmp` folders of a killed save are removed by
`remove_unfinished` when the run is resumed (under the run folder's lock).

In a multi-process run every process calls `save` and `restore_latest` (orbax writes and reads
each process's own shards; the folder must be on storage all hosts share); the files of our
own (manifest, renames, pruning) are handled by process 0 alone, and the step to restore is
chosen there and broadcast, so all processes restore the same one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ablate.distributed import barrier, broadcast, is_primary, on_primary
from ablate.runfolder import write_atomic

MANIFEST = "ablate-manifest.json"
CORRUPT_NOTE = "ABLATE_CORRUPT.txt"
# Exactly what orbax names an unfinished save (path/step.py), and our own half-deleted steps.
_ORBAX_TMP = re.compile(r"^\d+\.orbax-checkpoint-tmp(-\d+)?$")
_DELETING = re.compile(r"^\d+\.deleting$")
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or restored."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint that does not fit the state it is restored into."""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(step_dir: Path) -> None:
    """The checksum manifest of a finished save (written last: a step without one is unfinished)."""
    digests = _files(step_dir)  # before the temporary file exists
    write_atomic(step_dir / MANIFEST, json.dumps(digests, indent=0))


def _files(step_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(step_dir)): _digest(p)
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


@contextmanager
def sigint_deferred():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block has finished.

    A KeyboardInterrupt raised inside orbax's save leaves its event loop and coroutines half
    built (they print tracebacks at exit) and the step unfinished; held, the save and its
    manifest complete and the interrupt is raised right after, so the newest checkpoint is
    whole. Outside the main thread signals cannot be handled, and the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class Checkpointer:
    """Save and restore the training state pytree plus a small JSON `meta` dict per step."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.keep = keep
        # What was removed or set aside, and why, for the caller to show.
        self.problems: list[str] = []
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot use checkpoint folder {self.directory}: {e}") from e
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def remove_unfinished(self) -> None:
        """Delete the temp folders of killed saves and deletions (orbax's and our own only)."""
        on_primary(self._remove_unfinished, "removing unfinished checkpoint saves")

    def _remove_unfinished(self) -> None:
        # Only under the run folder's lock: a live save's temp folder looks the same.
        for entry in self.directory.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                if _ORBAX_TMP.match(entry.name):
                    shutil.rmtree(entry)
                    self.problems.append(f"removed the unfinished save {entry}")
                elif _DELETING.match(entry.name):
                    shutil.rmtree(entry)

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Write `state` and `meta` at `step` (synchronously), its manifest, then prune."""
        with sigint_deferred():
            self._save(step, state, meta)

    def _save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        step_dir = self.directory / str(step)
        try:
            if broadcast(int(step_dir.exists())):
                # Never overwrite: whatever is there (a step set aside later, or one from an
                # earlier attempt) keeps its bytes under another name.
                reason = "a new checkpoint of the same step was saved"
                on_primary(lambda: self.set_aside(step, reason), "setting a checkpoint aside")
                self.manager.reload()
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
            self.manager.wait_until_finished()
            barrier("ablate-saved")
            on_primary(lambda: _write_manifest(step_dir), "writing the checkpoint manifest")
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise ValueError for I/O errors
            raise CheckpointError(
                f"could not write checkpoint step {step} in {self.directory} "
                f"(the previous checkpoints are untouched): {type(e).__name__}: {e}"
            ) from e
        on_primary(self._prune, "pruning old checkpoints")
        self.manager.reload()

    def _prune(self) -> None:
        """Delete all but the newest `keep` steps that have a manifest."""
        complete = [s for s in self.steps() if (self.directory / str(s) / MANIFEST).is_file()]
        for step in complete[: -self.keep]:
            doomed = self.directory / f"{step}.deleting"
            try:
                # A rename is atomic: a kill mid-delete leaves a `.deleting` folder, which
                # orbax does not list and the next open removes, never a half step.
                (self.directory / str(step)).rename(doomed)
                shutil.rmtree(doomed)
            except OSError as e:
                log.warning("could not delete old checkpoint step %d: %s", step, e)
        self.manager.reload()

    def steps(self) -> list[int]:
        """Finished steps, oldest first (unfinished orbax temp folders are not listed)."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def verify(self, step: int) -> str | None:
        """None if step's files match its manifest, else what is wrong."""
        step_dir = self.directory / str(step)
        manifest = step_dir / MANIFEST
        if not manifest.is_file():
            return (
                f"{step_dir} has no {MANIFEST}: the save was interrupted before it was "
                "verified (or the folder was not written by ablate)"
            )
        try:
            expected = json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{manifest} is unreadable: {e}"
        if not isinstance(expected, dict) or not expected:
            return f"{manifest} is not a manifest (expected a table of file checksums)"
        actual = _files(step_dir)
        missing = sorted(set(expected) - set(actual))
        changed = sorted(k for k in expected if k in actual and actual[k] != expected[k])
        if missing:
            return f"{step_dir}: missing files {missing}"
        if changed:
            return f"{step_dir}: contents changed (checksum mismatch) in {changed}"
        return None

    def set_aside(self, step: int, reason: str) -> Path:
        """Rename a bad step folder out of orbax's sight; never delete it."""
        src = self.directory / str(step)
        n = 0
        while (dst := self.directory / f"{step}.corrupt-{n}").exists():
            n += 1
        src.rename(dst)
        if dst.is_dir():
            (dst / CORRUPT_NOTE).write_text(reason + "\n")
        message = f"checkpoint step {step} set aside as {dst}: {reason}"
        self.problems.append(message)
        log.warning("%s", message)
        self.manager.reload()
        return dst

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest good checkpoint, setting bad ones aside; or None.

        A step whose files match its manifest but do not fit `abstract_state` is not corrupt:
        the model changed. That raises CheckpointError instead of discarding the run.
        """
        chosen = self._newest_good() if is_primary() else None
        chosen = broadcast(-1 if chosen is None else chosen)
        if chosen < 0:
            return None
        self.manager.reload()
        return self._restore(chosen, abstract_state)

    def _newest_good(self) -> int | None:
        """The newest step whose files match its manifest, setting bad ones aside."""
        for step in reversed(self.steps()):
            problem = self.verify(step)
            if problem is None:
                return step
            self.set_aside(step, problem)
        return None

    def _restore(self, step: int, abstract_state: Any) -> tuple[int, Any, dict]:
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # noqa: BLE001 - orbax raises many types here
            raise CheckpointMismatch(
                f"checkpoint {self.directory / str(step)} is intact (its checksums "
                f"match) but does not fit this model: {type(e).__name__}: {e}. "
                "Was the model config changed? Use a new run folder."
            ) from e
        return step, restored["state"], dict(restored["meta"])

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs for every array leaf (the restore target), placed by `shardings`.

    Orbax restores each array straight into its sharding, whatever mesh wrote it.
    """
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
