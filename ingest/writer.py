"""Writes batches to a sink: retries what may succeed later, isolates what never will."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence

from ingest.metrics import Metrics
from ingest.sinks.base import Sink, WriteError

log = logging.getLogger(__name__)


class BatchWriter:
    """``write(lines)`` returns True once every line is stored or dead-lettered.

    * A transient failure (network, 5xx, 429, auth) is retried with exponential
      backoff and jitter, honouring ``Retry-After``, until it succeeds or
      ``stop`` is set (then ``write`` returns False and nothing is acknowledged,
      so the broker redelivers).
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

    def write(self, lines: Sequence[str]) -> bool:
        if not lines:
            return True
        delay = self.retry_initial
        while True:
            try:
                self.sink.write(lines)
                return True
            except WriteError as exc:
                self.metrics.inc("write_failures")
                if not exc.retryable:
                    return self._isolate(lines, exc)
                wait = exc.retry_after if exc.retry_after is not None else delay
                wait = min(wait, self.retry_max) * random.uniform(0.8, 1.2)
                log.warning(
                    "write of %d points failed, retrying in %.1f s: %s", len(lines), wait, exc
                )
                self.metrics.inc("write_retries")
                if self.stop.wait(wait):
                    return False
                delay = min(delay * 2, self.retry_max)

    def _isolate(self, lines: Sequence[str], exc: WriteError) -> bool:
        if len(lines) == 1:
            log.warning("database refused a point, dead-lettered: %s | %s", exc, lines[0][:200])
            self.metrics.inc("lines_dead_lettered")
            self.on_refused(lines[0], str(exc))
            return True
        mid = len(lines) // 2
        return self.write(lines[:mid]) and self.write(lines[mid:])
