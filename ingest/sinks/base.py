"""What every sink promises: ``write(lines)`` either stores all lines or raises."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol


class LineBatch:
    """The line protocol of one write, kept encoded: whole lines, each ending in a
    newline, in chunks. The processing path adds a whole batch's telemetry body at
    once (:meth:`add_body`); iterating gives the lines as text, for the rare paths
    that need single lines (a refused line, the spool, tests).

    Lines added as text (:meth:`extend`: anomaly episodes, gaps, device status, the
    service's stats) are kept apart as the *ordered* part: an episode's closing write
    updates the point its opening write made, so such lines must reach the database
    in the order they were made. Telemetry points are points of their own, identical
    when redelivered, and may be written in any order (:meth:`parts`).
    """

    __slots__ = ("_chunks", "_count", "_ordered", "_ordered_count")

    def __init__(self, lines: Iterable[str] = ()) -> None:
        self._chunks: list[bytes] = []
        self._count = 0
        self._ordered: list[bytes] = []
        self._ordered_count = 0
        self.extend(lines)

    def extend(self, lines: Iterable[str]) -> None:
        text = list(lines)
        if text:
            self._ordered.append(("\n".join(text) + "\n").encode("utf-8"))
            self._ordered_count += len(text)

    def add_body(self, body: bytes, count: int) -> None:
        """Append ``count`` lines already encoded, each ending in a newline."""
        if count:
            self._chunks.append(body)
            self._count += count

    def merge(self, other: LineBatch) -> None:
        self._chunks.extend(other._chunks)
        self._count += other._count
        self._ordered.extend(other._ordered)
        self._ordered_count += other._ordered_count

    @property
    def ordered(self) -> bool:
        """Whether it holds lines that must be written in order."""
        return self._ordered_count > 0

    def parts(self) -> tuple[LineBatch, LineBatch]:
        """The lines that may go in any order, and those that must go in order."""
        plain, ordered = LineBatch(), LineBatch()
        plain._chunks, plain._count = list(self._chunks), self._count
        ordered._ordered, ordered._ordered_count = list(self._ordered), self._ordered_count
        return plain, ordered

    def body(self) -> bytes:
        """Every line, each ending in a newline."""
        chunks = self._chunks + self._ordered
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def __len__(self) -> int:
        return self._count + self._ordered_count

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[str]:
        return iter(self.body().decode("utf-8").split("\n")[:-1])

    def halves(self) -> tuple[LineBatch, LineBatch]:
        """The first ``len // 2`` lines and the rest."""
        lines = list(self)
        mid = len(lines) // 2
        return LineBatch(lines[:mid]), LineBatch(lines[mid:])


def as_batch(lines: LineBatch | Iterable[str]) -> LineBatch:
    return lines if isinstance(lines, LineBatch) else LineBatch(lines)


class WriteError(Exception):
    """A write failed.

    ``retryable``: the same lines may succeed later (network, 5xx, 429, or a
    credential / database an operator can fix). Otherwise the server refused the
    content itself (400, 413, 422): retrying the same body cannot help, but
    splitting it can isolate the bad lines.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


class Sink(Protocol):
    name: str

    def open(self) -> None:
        """Connect / prepare (may raise WriteError)."""

    def write(self, lines: LineBatch) -> None:
        """Store every line, or raise WriteError."""

    def close(self) -> None:
        """Release resources."""


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from databases; fall back to our own backoff
