"""Writes batches to a sink: retries what may succeed later, isolates what never will."""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable

from ingest.metrics import Metrics, RateLimitedLog
from ingest.sinks.base import LineBatch, Sink, WriteError, as_batch

log = logging.getLogger(__name__)


class WriteResult(enum.Enum):
    WRITTEN = "written"  # every line stored or dead-lettered
    GAVE_UP = "gave_up"  # still failing when the caller's time bound ran out
    STOPPED = "stopped"  # the stop event was set while retrying


class BatchWriter:
    """Writes a batch of lines to a sink and says how it went.

    * A transient failure (network, 5xx, 429, auth) is retried with exponential
      backoff and jitter, honouring ``Retry-After``, until it succeeds, until
      ``give_up_after`` seconds have passed (the caller then spools the batch),
      or until ``stop`` is set (nothing is acknowledged: the broker redelivers).
    * A content error (400/413/422) is never a reason to drop a batch: the batch
      is split in halves until the refused lines are alone; those go to the
      dead letter with the server's reason, every other line is written.
    """

    def __init__(
        self,
        sink: Sink,
        metrics: Metrics,
        on_refused: Callable[[str, str], None],
        *,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        stop: threading.Event | None = None,
    ) -> None:
        self.sink = sink
        self.metrics = metrics
        self.on_refused = on_refused
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.stop = stop or threading.Event()
        self._log = RateLimitedLog(log, burst=3, period=30.0)
        self.refused = 0  # lines the database refused, dead-lettered (all calls)
        self._lock = threading.Lock()

    def write(
        self, lines: LineBatch | Iterable[str], give_up_after: float | None = None
    ) -> WriteResult:
        return self.write_counted(lines, give_up_after)[0]

    def write_counted(
        self, lines: LineBatch | Iterable[str], give_up_after: float | None = None
    ) -> tuple[WriteResult, int]:
        """As :meth:`write`; also says how many lines of this batch were refused.
        Safe to call from several threads at once (pipelined writes)."""
        refused = [0]
        return self._write(as_batch(lines), give_up_after, refused), refused[0]

    def _write(
        self, lines: LineBatch, give_up_after: float | None, refused: list[int]
    ) -> WriteResult:
        if not lines:
            return WriteResult.WRITTEN
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        delay = self.retry_initial
        while True:
            try:
                self.sink.write(lines)
                return WriteResult.WRITTEN
            except WriteError as exc:
                self.metrics.inc("write_failures")
                if not exc.retryable:
                    return self._isolate(lines, exc, give_up_after, refused)
                wait = exc.retry_after if exc.retry_after is not None else delay
                wait = min(wait, self.retry_max) * random.uniform(0.8, 1.2)
                if deadline is not None and time.monotonic() + wait > deadline:
                    self._log.warning("gave_up", "write of %d points failed: %s", len(lines), exc)
                    return WriteResult.GAVE_UP
                self._log.warning(
                    "retry",
                    "write of %d points failed, retrying in %.1f s: %s",
                    len(lines),
                    wait,
                    exc,
                )
                self.metrics.inc("write_retries")
                if self.stop.wait(wait):
                    return WriteResult.STOPPED
                delay = min(delay * 2, self.retry_max)

    def _isolate(
        self, lines: LineBatch, exc: WriteError, give_up_after: float | None, refused: list[int]
    ) -> WriteResult:
        if len(lines) == 1:
            (line,) = lines
            log.warning("database refused a point, dead-lettered: %s | %s", exc, line[:200])
            self.metrics.inc("lines_dead_lettered")
            with self._lock:
                self.refused += 1
            refused[0] += 1
            self.on_refused(line, str(exc))
            return WriteResult.WRITTEN
        first_half, second_half = lines.halves()
        first = self._write(first_half, give_up_after, refused)
        if first is not WriteResult.WRITTEN:
            return first
        return self._write(second_half, give_up_after, refused)
