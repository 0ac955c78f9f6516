"""TensorBoard event files written without TensorFlow, by process 0 only, and cut back on resume so that a
resumed run's curve has every step once."""
from __future__ import annotations

import io
import time
import uuid
from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.summary.writer.record_writer import RecordWriter

from llm_jax.atomic import write_atomic


class Writer:
    """Event-file writer that needs no TensorFlow; a disabled writer (processes other than 0) is a no-op
    that creates no file.

    `resume_step`: the step a resumed run restarts from. Summaries past it in the event files already in
    `logdir` were written by the killed run after its last checkpoint and are about to be written again,
    so they are cut from those files first; the curve then continues with each step once. TensorBoard's
    own purge (SessionLog.START) would only hide them from some readers."""

    def __init__(self, logdir, enabled: bool, resume_step: int | None = None):
        self._events = None
        if not enabled:
            return
        suffix = ""
        if resume_step is not None:
            for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
                _drop_summaries_after(path, resume_step)
            # File names hold the time in seconds, host, pid and a per-process counter: a restart in the
            # same second that gets the same pid (pid 1 in a container) would reuse a name and truncate it.
            suffix = f".resume-{resume_step}-{uuid.uuid4().hex[:8]}"
        # A short flush interval so a researcher watching TensorBoard sees the curve move.
        self._events = EventFileWriter(str(logdir), flush_secs=10, filename_suffix=suffix)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._events is None or not values:
            return
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
                                             for tag, v in values.items()])
        self._write(step, summary)

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        """A text-plugin summary (a scalar string tensor), rendered as Markdown on the Text dashboard."""
        if self._events is None:
            return
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                                        string_val=[markdown.encode("utf-8")])
        value = summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
        self._write(step, summary_pb2.Summary(value=[value]))

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None

    def _write(self, step: int, summary: summary_pb2.Summary) -> None:
        self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))


class ReferenceLines:
    """Fixed values drawn beside a run's curves (Task.reference_lines: the compressors' bits per byte), each as
    a sibling run LOGDIR/<name> that writes its values at every evaluation step, so TensorBoard draws a flat line
    on the same chart as the model's curve (a point written once, at one step, would be invisible there)."""

    def __init__(self, logdir, lines: dict[str, dict[str, float]], enabled: bool, resume_step: int | None = None):
        self.lines = lines
        self.writers = {name: Writer(Path(logdir) / name, enabled, resume_step) for name in lines}

    def write(self, step: int) -> None:
        for name, writer in self.writers.items():
            writer.scalars(step, self.lines[name])

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _drop_summaries_after(path: Path, step: int) -> None:
    """Rewrites one event file without its summaries past `step`; leaves it untouched if it has none.

    The records are copied byte for byte, so the file keeps its own leading file_version event (what a
    reader needs first) and every other event without a summary. The copy goes to a hidden temporary
    name, is synced, then os.replace()s the original in one atomic step: a crash leaves either the old
    file whole (plus a temporary that readers skip, its name lacking "tfevents", and that the next resume
    overwrites) or the filtered one, never both, so no step can appear twice and none at or before `step`
    is lost. A second pass finds nothing to cut, so resuming again is harmless. A truncated last record
    (a kill mid-write) is where readers stop anyway; a rewrite drops it with the rest.
    """
    records = list(RawEventFileLoader(str(path)).Load())
    kept = [r for r in records if _at_or_before(event_pb2.Event.FromString(r), step)]
    if len(kept) != len(records):
        write_event_file(path, kept)


def write_event_file(path: Path, records: list[bytes]) -> None:
    """An event file of these serialized events, written atomically through a hidden temporary whose name
    lacks "tfevents", so that TensorBoard never reads it."""
    buffer = io.BytesIO()
    writer = RecordWriter(buffer)
    for record in records:
        writer.write(record)
    write_atomic(path, buffer.getvalue(), temporary=path.with_name("." + path.name.replace("tfevents", "rewrite")))


def _at_or_before(event: event_pb2.Event, step: int) -> bool:
    return not event.HasField("summary") or event.step <= step
