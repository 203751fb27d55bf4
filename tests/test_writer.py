"""BatchWriter: retries transient failures, isolates refused lines (sink faked in memory)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ingest.metrics import Metrics
from ingest.sinks.base import WriteError
from ingest.writer import BatchWriter, WriteResult


class FlakySink:
    name = "flaky"

    def __init__(
        self,
        fail_first: int = 0,
        bad: frozenset[str] = frozenset(),
        retry_after: float | None = 0.0,
    ) -> None:
        self.fail_first = fail_first
        self.retry_after = retry_after
        self.bad = bad
        self.stored: list[str] = []
        self.calls = 0

    def open(self) -> None: ...

    def close(self) -> None: ...

    def write(self, lines: Sequence[str]) -> None:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise WriteError("503", retryable=True, status=503, retry_after=self.retry_after)
        if self.bad.intersection(lines):
            # Like InfluxDB 1.x: the good lines of a partial write are stored anyway.
            self.stored.extend(x for x in lines if x not in self.bad)
            raise WriteError("partial write: field type conflict", retryable=False, status=400)
        self.stored.extend(lines)


def test_transient_failures_are_retried() -> None:
    sink = FlakySink(fail_first=3)
    writer = BatchWriter(sink, Metrics(), lambda line, why: None, retry_initial=0.001)
    assert writer.write(["a", "b"]) is WriteResult.WRITTEN
    assert sink.stored == ["a", "b"]
    assert writer.metrics.counters["write_retries"] == 3


def test_refused_lines_are_isolated_and_the_rest_written() -> None:
    lines = [f"l{i}" for i in range(100)]
    sink = FlakySink(bad=frozenset({"l13", "l77"}))
    refused: list[tuple[str, str]] = []
    writer = BatchWriter(sink, Metrics(), lambda line, why: refused.append((line, why)))
    assert writer.write(lines) is WriteResult.WRITTEN
    assert [line for line, _ in refused] == ["l13", "l77"]
    assert "type conflict" in refused[0][1]
    assert set(sink.stored) == set(lines) - {"l13", "l77"}


def test_stop_abandons_retries() -> None:
    stop = threading.Event()
    sink = FlakySink(fail_first=10**9)
    writer = BatchWriter(sink, Metrics(), lambda line, why: None, retry_initial=0.01, stop=stop)
    threading.Timer(0.2, stop.set).start()
    assert writer.write(["a"]) is WriteResult.STOPPED
    assert sink.stored == []


def test_gives_up_after_the_bound() -> None:
    sink = FlakySink(fail_first=10**9, retry_after=None)
    writer = BatchWriter(sink, Metrics(), lambda line, why: None, retry_initial=0.05)
    assert writer.write(["a"], give_up_after=0.3) is WriteResult.GAVE_UP
    assert writer.write(["a"], give_up_after=0) is WriteResult.GAVE_UP
    assert 2 <= sink.calls <= 10


class RecordingStop(threading.Event):
    """A stop event that records how long the writer asked to wait, without waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        return False


def test_retry_after_is_honoured_and_backoff_grows() -> None:
    stop = RecordingStop()
    sink = FlakySink(fail_first=2, retry_after=7.0)
    writer = BatchWriter(sink, Metrics(), lambda line, why: None, retry_max=30.0, stop=stop)
    assert writer.write(["a"]) is WriteResult.WRITTEN
    assert all(7.0 * 0.8 <= w <= 7.0 * 1.2 for w in stop.waits) and len(stop.waits) == 2

    stop = RecordingStop()
    sink = FlakySink(fail_first=6, retry_after=None)
    writer = BatchWriter(
        sink, Metrics(), lambda line, why: None, retry_initial=1.0, retry_max=8.0, stop=stop
    )
    assert writer.write(["a"]) is WriteResult.WRITTEN
    nominal = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert all(n * 0.8 <= w <= n * 1.2 for n, w in zip(nominal, stop.waits, strict=True))
