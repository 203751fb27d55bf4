"""On-disk spool: where batches wait while the database is unreachable.

Append-only segment files ``<dir>/<16-digit number>.spool``. A record is::

    magic b"SPL1" | payload length (u32 LE) | CRC-32 of the payload (u32 LE) | payload

and the payload is the batch's line protocol, UTF-8, gzip-compressed. Every append
is flushed and fsynced before :meth:`Spool.append` returns: only then may the
batch's MQTT messages be acknowledged. Records are read back in order; a
segment is deleted once all of its records are written to the database. A
crash in the middle of a segment replays that segment from its start, which
only rewrites points that already exist (each point is keyed by its device
timestamp). A torn record at the end of the newest segment (a crash during an
append, before its fsync and so before any acknowledgement) is truncated away
at open.

The spool is bounded (``max_bytes``): past it, :meth:`append` raises
:class:`SpoolFullError` and the caller falls back to not acknowledging, so the
broker keeps the messages.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"SPL1"
HEADER = struct.Struct("<4sII")
SUFFIX = ".spool"


class SpoolFullError(RuntimeError):
    """The spool has reached its size limit."""


class Spool:
    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int = 1 << 30,
                 segment_bytes: int = 16 << 20) -> None:  # fmt: skip
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._segments: list[Path] = sorted(self.dir.glob(f"*{SUFFIX}"))
        self._size = 0
        self._records = 0
        for seg in self._segments:
            valid, count = _scan(seg)
            if valid < seg.stat().st_size:
                log.warning("spool segment %s has a torn record at byte %d: truncated", seg, valid)
                with open(seg, "r+b") as fh:
                    fh.truncate(valid)
                    os.fsync(fh.fileno())
            self._size += valid
            self._records += count
        self._read_offset = 0  # in _segments[0]
        self._next_offset = 0
        self._write_fh = None if not self._segments else open(self._segments[-1], "ab")  # noqa: SIM115
        if self._records:
            log.warning("spool %s holds %d batches (%d bytes) from before: replaying them first",
                        self.dir, self._records, self._size)  # fmt: skip

    # -- state ------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def pending(self) -> int:
        """Batches appended and not yet consumed."""
        return self._records

    def __bool__(self) -> bool:
        return self._records > 0

    # -- writing ----------------------------------------------------------------------

    def append(self, lines: Sequence[str]) -> None:
        """Durably append one batch; raises SpoolFullError past ``max_bytes``."""
        payload = gzip.compress(("\n".join(lines)).encode("utf-8"), compresslevel=1)
        record = HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        with self._lock:
            if self._size + len(record) > self.max_bytes:
                raise SpoolFullError(
                    f"spool {self.dir} is full ({self._size} of {self.max_bytes} bytes)"
                )
            if self._write_fh is None or self._write_fh.tell() >= self.segment_bytes:
                self._new_segment()
            assert self._write_fh is not None
            self._write_fh.write(record)
            self._write_fh.flush()
            os.fsync(self._write_fh.fileno())
            self._size += len(record)
            self._records += 1

    def _new_segment(self) -> None:
        if self._write_fh is not None:
            self._write_fh.close()
        number = int(self._segments[-1].stem) + 1 if self._segments else 1
        path = self.dir / f"{number:016d}{SUFFIX}"
        self._write_fh = open(path, "ab")  # noqa: SIM115 - kept open for appends
        self._segments.append(path)
        _fsync_dir(self.dir)

    # -- reading ----------------------------------------------------------------------

    def peek(self) -> list[str] | None:
        """The oldest batch not yet consumed, or None. Reading is always in ``_segments[0]``:
        finished segments are deleted."""
        with self._lock:
            while self._segments:
                seg = self._segments[0]
                with open(seg, "rb") as fh:
                    fh.seek(self._read_offset)
                    head = fh.read(HEADER.size)
                    if len(head) == HEADER.size:
                        magic, length, crc = HEADER.unpack(head)
                        payload = fh.read(length)
                        if magic == MAGIC and len(payload) == length and zlib.crc32(payload) == crc:
                            self._next_offset = self._read_offset + HEADER.size + length
                            return gzip.decompress(payload).decode("utf-8").split("\n")
                if len(self._segments) == 1:
                    return None  # the segment being written: nothing more yet
                self._drop_first()
            return None

    def consume(self) -> None:
        """Mark the batch returned by :meth:`peek` as written; drop finished segments."""
        with self._lock:
            self._size -= self._next_offset - self._read_offset
            self._read_offset = self._next_offset
            self._records -= 1
            if self._records == 0:
                # All written: delete everything; the next append starts a new segment.
                if self._write_fh is not None:
                    self._write_fh.close()
                    self._write_fh = None
                while self._segments:
                    self._drop_first()
                self._size = 0
            elif len(self._segments) > 1 and self._read_offset >= self._segments[0].stat().st_size:
                self._drop_first()

    def _drop_first(self) -> None:
        self._segments.pop(0).unlink(missing_ok=True)
        self._read_offset = 0
        _fsync_dir(self.dir)

    def close(self) -> None:
        with self._lock:
            if self._write_fh is not None:
                self._write_fh.close()
                self._write_fh = None


def _scan(path: Path) -> tuple[int, int]:
    """(bytes of whole valid records from the start, number of those records)."""
    valid = count = 0
    with open(path, "rb") as fh:
        while True:
            head = fh.read(HEADER.size)
            if len(head) < HEADER.size:
                break
            magic, length, crc = HEADER.unpack(head)
            payload = fh.read(length)
            if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
                break
            valid += HEADER.size + length
            count += 1
    return valid, count


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
