"""Orbax checkpoints of a run, with our own checksum manifest.

Orbax checksums only its shard index: a flipped byte in a finished checkpoint restores
without error (NOTES.md). Every step folder therefore gets `ablate-manifest.json` (sha256 of
every file) written after orbax finishes; a step whose files do not match is set aside
(renamed `<step>.corrupt-<n>`, never deleted) and the previous good step is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

MANIFEST = "ablate-manifest.json"
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or restored."""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(step_dir)): _digest(p)
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


class Checkpointer:
    """Save and restore the training state pytree plus a small JSON `meta` dict per step."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Write `state` and `meta` at `step` (synchronously), then the checksum manifest."""
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
            self.manager.wait_until_finished()
            step_dir = self.directory / str(step)
            manifest = step_dir / MANIFEST
            tmp = manifest.with_suffix(".tmp")
            tmp.write_text(json.dumps(_files(step_dir), indent=0))
            os.replace(tmp, manifest)
        except OSError as e:
            raise CheckpointError(
                f"could not write checkpoint step {step} in {self.directory}: {e}"
            ) from e

    def steps(self) -> list[int]:
        """Finished steps, oldest first (unfinished orbax temp folders are not listed)."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def verify(self, step: int) -> str | None:
        """None if step's files match its manifest, else what is wrong."""
        step_dir = self.directory / str(step)
        manifest = step_dir / MANIFEST
        if not manifest.is_file():
            return f"{step_dir} has no {MANIFEST} (save interrupted, or not written by ablate)"
        try:
            expected = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return f"{manifest} is unreadable: {e}"
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
        (dst / "ABLATE_CORRUPT.txt").write_text(reason + "\n")
        log.warning("checkpoint step %d set aside as %s: %s", step, dst, reason)
        self.manager.reload()
        return dst

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest good checkpoint, setting bad ones aside; or None."""
        for step in reversed(self.steps()):
            problem = self.verify(step)
            if problem is None:
                try:
                    restored = self.manager.restore(
                        step,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract_state),
                            meta=ocp.args.JsonRestore(),
                        ),
                    )
                    return step, restored["state"], dict(restored["meta"])
                except Exception as e:  # noqa: BLE001 - any restore failure means "bad step"
                    problem = f"restore failed: {type(e).__name__}: {e}"
            self.set_aside(step, problem)
        return None

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs for every array leaf (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
