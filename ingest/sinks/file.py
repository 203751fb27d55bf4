"""Sinks without a database: a line-protocol file (demo, offline runs) and memory (tests)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import IO


class LineProtocolFileSink:
    """Appends line protocol to a file; each write is flushed and fsynced."""

    name = "file"

    def __init__(self, path: str) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    def open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def write(self, lines: Iterable[str]) -> None:
        assert self._fh is not None, "open() first"
        self._fh.write("".join(f"{line}\n" for line in lines))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class MemorySink:
    """Keeps every line in a list (unit tests of the processing path)."""

    name = "memory"

    def __init__(self) -> None:
        self.lines: list[str] = []

    def open(self) -> None:
        pass

    def write(self, lines: Iterable[str]) -> None:
        self.lines.extend(lines)

    def close(self) -> None:
        pass
