#!/usr/bin/env python3
"""Write the TensorBoard fixture with TensorBoard's own writer, and read event files back with
TensorBoard's own reader.

    ~/.cache/distclip-anchor-venv/bin/python tools/parity/make_tensorboard_fixture.py
    ~/.cache/distclip-anchor-venv/bin/python tools/parity/make_tensorboard_fixture.py --read RUN/tensorboard

The first form writes ``tests/fixtures/tensorboard/events.out.tfevents.fixture`` with
``tensorboard.summary.writer.record_writer.RecordWriter`` (TFRecord framing, masked CRC32C)
and ``event_pb2.Event`` messages as ``torch.utils.tensorboard.SummaryWriter.add_scalar``
builds them, at fixed wall times, so distclip's test can compare its own bytes for the same
events. The events are listed in ``events.json`` next to it.

``--read DIR`` loads a directory with ``EventAccumulator`` (what TensorBoard's UI uses) and
prints every scalar tag with its (step, value) pairs as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "tensorboard"

# (wall_time, step, tag, value); value None is the file_version header event.
EVENTS = [
    (1000.5, 0, None, None),
    (1001.25, 0, "train/loss", 0.0),
    (1001.25, 1, "train/loss", 3.25),
    (1001.25, 1, "train/lr", 1e-3),
    (1002.0, 7, "val/imagenet-zeroshot-val-top1", 0.5),
    (1002.0, 123456789012, "train/samples_per_second", -17.125),
]


def write() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "events.out.tfevents.fixture"
    with open(path, "wb") as f:
        w = RecordWriter(f)
        for wall, step, tag, value in EVENTS:
            if tag is None:
                ev = event_pb2.Event(wall_time=wall, step=step, file_version="brain.Event:2")
            else:
                summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
                ev = event_pb2.Event(wall_time=wall, step=step, summary=summary)
            w.write(ev.SerializeToString())
        w.flush()
    (OUT / "events.json").write_text(json.dumps(EVENTS) + "\n")
    print(f"{path.relative_to(REPO)}  {path.stat().st_size} B")


def read(folder: str) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder, size_guidance={"scalars": 0})
    acc.Reload()
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--read":
        read(sys.argv[2])
    else:
        write()
