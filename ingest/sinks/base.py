"""What every sink promises: ``write(lines)`` either stores all lines or raises."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


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

    def write(self, lines: Sequence[str]) -> None:
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
