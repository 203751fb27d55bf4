"""Pipelined writes: several batches in flight, acknowledgements still in arrival order.

The writer thread of a real :class:`IngestService` is fed batches directly; the sink
(in memory) holds each write until the test releases it, in an order the test picks,
and the MQTT source's ``ack`` is replaced by a recorder. No broker or database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import pytest

from ingest.config import load_settings
from ingest.mqtt_consumer import Received
from ingest.service import IngestService
from ingest.sinks.base import LineBatch, WriteError
from tests.integration.conftest import wait_for


class GatedSink:
    """Each write waits until its first line's batch number is released."""

    name = "gated"

    def __init__(self, fail: set[int] | None = None) -> None:
        self.gates: dict[int, threading.Event] = {}
        self.started: list[int] = []
        self.written: list[int] = []
        self.fail = fail or set()
        self.lock = threading.Lock()

    def gate(self, n: int) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(n, threading.Event())

    def open(self) -> None:
        pass

    def write(self, lines: Iterable[str]) -> None:
        n = int(next(iter(lines)).split()[0].removeprefix("b"))
        with self.lock:
            self.started.append(n)
        assert self.gate(n).wait(10)
        if n in self.fail:
            raise WriteError("refused", retryable=False, status=400)
        with self.lock:
            self.written.append(n)

    def close(self) -> None:
        pass


def start(concurrency: int, sink: GatedSink) -> tuple[IngestService, list[int], threading.Thread]:
    settings = load_settings(
        environ={
            "INGEST_PROCESSING_STATE_FILE": "",
            "INGEST_SPOOL_DIR": "",
            "INGEST_MQTT_DEAD_LETTER": "none",
            "INGEST_INFLUX_WRITE_CONCURRENCY": str(concurrency),
        }
    )
    svc = IngestService(settings, sink=sink)
    acked: list[int] = []

    def ack(msgs: list[Received]) -> int:
        acked.extend(m.mid for m in msgs)
        return len(msgs)

    svc.source.ack = ack  # type: ignore[method-assign]
    writer = threading.Thread(target=svc._write_loop, daemon=True)
    writer.start()
    return svc, acked, writer


def batch(n: int) -> tuple[LineBatch, list[Received]]:
    lines = LineBatch()
    lines.add_body(f"b{n} value=1 {n}\n".encode(), 1)  # as telemetry bodies come
    return lines, [Received("t", b"", 0.0, n, 1, 0)]


def wait(cond: Callable[[], bool]) -> bool:
    return wait_for(cond, 5.0, interval=0.01)


@pytest.mark.parametrize("concurrency", [2, 3])
def test_writes_overlap_and_acks_keep_arrival_order(concurrency: int) -> None:
    sink = GatedSink()
    svc, acked, writer = start(concurrency, sink)
    for n in range(concurrency):
        svc._write_queue.put(batch(n))
    # All are in flight at once: the sink has started every one before any finished.
    assert wait(lambda: len(sink.started) == concurrency), sink.started
    # The last finishes first: nothing may be acknowledged before batch 0.
    sink.gate(concurrency - 1).set()
    assert wait(lambda: sink.written == [concurrency - 1])
    time.sleep(0.2)
    assert acked == []
    sink.gate(0).set()
    assert wait(lambda: acked[:1] == [0])
    for n in range(1, concurrency - 1):
        sink.gate(n).set()
    assert wait(lambda: acked == list(range(concurrency))), acked
    svc._write_queue.put(None)
    writer.join(5)
    assert not writer.is_alive()


def test_one_at_a_time_when_concurrency_is_one() -> None:
    sink = GatedSink()
    svc, acked, writer = start(1, sink)
    svc._write_queue.put(batch(0))
    svc._write_queue.put(batch(1))
    assert wait(lambda: sink.started == [0])
    time.sleep(0.2)
    assert sink.started == [0]  # the second waits for the first
    sink.gate(0).set()
    sink.gate(1).set()
    assert wait(lambda: acked == [0, 1])
    svc._write_queue.put(None)
    writer.join(5)


def test_a_refused_line_is_dead_lettered_and_the_rest_acked_in_order() -> None:
    sink = GatedSink(fail={1})
    svc, acked, writer = start(2, sink)
    refused: list[str] = []
    svc.writer.on_refused = lambda line, reason: refused.append(line)
    for n in range(3):
        sink.gate(n).set()
        svc._write_queue.put(batch(n))
    assert wait(lambda: acked == [0, 1, 2]), acked
    assert refused == ["b1 value=1 1"]
    assert svc.metrics.snapshot()["points_written"] == 2
    svc._write_queue.put(None)
    writer.join(5)


def test_lines_that_update_earlier_points_are_written_in_order() -> None:
    """An episode's closing write must not overtake its opening one; telemetry may."""
    sink = GatedSink()
    svc, acked, writer = start(2, sink)
    for n in (0, 1):
        lines, msgs = batch(n)
        lines.extend([f"b{100 + n} status=1 {n}"])  # as event lines come
        svc._write_queue.put((lines, msgs))
    # Both telemetry parts and the first ordered part are in flight; the second
    # ordered part waits for the first.
    assert wait(lambda: sorted(sink.started) == [0, 1, 100]), sink.started
    time.sleep(0.2)
    assert 101 not in sink.started
    for n in (0, 1):
        sink.gate(n).set()
    time.sleep(0.2)
    assert acked == [] and 101 not in sink.started
    sink.gate(100).set()
    assert wait(lambda: 101 in sink.started)
    assert wait(lambda: acked == [0])
    sink.gate(101).set()
    assert wait(lambda: acked == [0, 1]), acked
    assert sink.written.index(100) < sink.written.index(101)
    svc._write_queue.put(None)
    writer.join(5)


def test_line_batch_keeps_ordered_lines_apart() -> None:
    body = LineBatch()
    body.add_body(b"telemetry value=1 1\n", 1)
    assert not body.ordered  # points of their own: any order
    body.merge(LineBatch(['anomaly_events,kind=gap status="closed" 1']))
    assert body.ordered and len(body) == 2
    plain, ordered = body.parts()
    assert list(plain) == ["telemetry value=1 1"] and not plain.ordered
    assert list(ordered) == ['anomaly_events,kind=gap status="closed" 1'] and ordered.ordered
