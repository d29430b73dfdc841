"""Run logs: TensorBoard event files (no TensorFlow needed) and metrics as JSON lines.

TensorBoard is written with the `tensorboard` package alone: scalar and image
summaries and the hparams plugin's protos go into one EventFileWriter per seed folder, so
seeds overlay as runs and the HParams tab compares them. A step is never written twice,
since readers disagree on duplicates: before a resume, `truncate_events` cuts every event
file back to the checkpoint the run resumes from (as `MetricsFile.truncate_after` does for
the JSON lines), whatever each file managed to hold when the process died, and the resumed
run writes the later steps into a fresh file.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from ablate.runfolder import append_jsonl, read_jsonl, write_atomic, write_jsonl


class TensorBoardWriter:
    """Scalars, images and hparams for one TensorBoard run folder."""

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(self.logdir), flush_secs=30)

    def _add(self, summary: summary_pb2.Summary, step: int) -> None:
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
        self._writer.add_event(event)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """One scalar per tag (non-finite values are written too: they are what happened)."""
        summary = summary_pb2.Summary()
        for tag, value in values.items():
            summary.value.extend(scalar_summary.scalar_pb(tag, float(value)).value)
        self._add(summary, step)

    def image(self, tag: str, png: bytes, width: int, height: int, step: int) -> None:
        """A PNG image (the image plugin's string tensor [width, height, png])."""
        tensor = TensorProto(
            dtype=7,  # DT_STRING
            string_val=[str(width).encode(), str(height).encode(), png],
            tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=3)]),
        )
        metadata = image_metadata.create_summary_metadata(display_name=tag, description="")
        value = summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
        self._add(summary_pb2.Summary(value=[value]), step)

    def hparams(
        self, hparams: Mapping[str, Any], trial_id: str, metrics: tuple[str, ...] = ()
    ) -> None:
        """The HParams tab's session for this run; `metrics` name scalar tags to show as columns."""
        clean = {k: _hparam_value(v) for k, v in hparams.items()}
        config = hparams_summary.hparams_config_pb(
            hparams=[hparams_summary.HParam(k) for k in clean],
            metrics=[hparams_summary.Metric(tag) for tag in metrics],
        )
        session = hparams_summary.hparams_pb(clean, trial_id=trial_id)
        for summary in (config, session):
            self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


_EVENT_FILE_MARK = "tfevents"  # what TensorBoard's readers look for in a file name


def _read_records(path: Path) -> tuple[list[bytes], bool]:
    """The intact records of a TFRecord file, and whether the file ended cleanly.

    A process killed mid-write leaves a cut or garbled last record; reading stops there.
    """
    data = path.read_bytes()
    records, pos = [], 0
    while pos + 12 <= len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        end = pos + 12 + length + 4
        if header_crc != masked_crc32c(header) or end > len(data):
            return records, False
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[end - 4 : end])
        if payload_crc != masked_crc32c(payload):
            return records, False
        records.append(payload)
        pos = end
    return records, pos == len(data)


def _records_bytes(records: list[bytes]) -> bytes:
    out = []
    for payload in records:
        header = struct.pack("<Q", len(payload))
        out += [header, struct.pack("<I", masked_crc32c(header))]
        out += [payload, struct.pack("<I", masked_crc32c(payload))]
    return b"".join(out)


def _is_hparams(event: event_pb2.Event) -> bool:
    return any(v.metadata.plugin_data.plugin_name == "hparams" for v in event.summary.value)


def truncate_events(logdir: str | Path, step: int, *, drop_hparams: bool = False) -> int:
    """Drop summaries past `step` (and hparams sessions if asked) from every event file.

    Each file is replaced atomically (`write_atomic`), so a kill during truncation leaves
    every file either old or new; running it again finishes the job.
    Returns the number of events dropped.
    """
    logdir = Path(logdir)
    if not logdir.is_dir():
        return 0
    dropped = 0
    for path in sorted(logdir.iterdir()):
        if _EVENT_FILE_MARK not in path.name or not path.is_file():
            continue
        records, clean = _read_records(path)
        kept = []
        for payload in records:
            event = event_pb2.Event.FromString(payload)
            has_summary = event.HasField("summary")
            if has_summary and (event.step > step or (drop_hparams and _is_hparams(event))):
                dropped += 1
            else:
                kept.append(payload)
        if len(kept) < len(records) or not clean:
            write_atomic(path, _records_bytes(kept))
    return dropped


def _hparam_value(v: Any) -> bool | int | float | str:
    if isinstance(v, bool | int | float | str):
        return v
    return json.dumps(v)


class MetricsFile:
    """Metrics as JSON lines, one row per (step, seed, kind); resumable without duplicates."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def rows(self) -> list[dict[str, Any]]:
        """The rows written so far (a last line cut by a kill is left out: `read_jsonl`)."""
        return read_jsonl(self.path)

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (they will be recomputed) and a cut last line.

        A negative step (a run starting afresh) empties the file without reading it.
        """
        kept = [r for r in self.rows() if r["step"] <= step] if step >= 0 else []
        write_jsonl(self.path, kept)

    def append(self, rows: list[dict[str, Any]]) -> None:
        append_jsonl(self.path, rows)

    def sync(self) -> None:
        """Force the rows written so far to disk (called before each checkpoint)."""
        if self.path.is_file():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
