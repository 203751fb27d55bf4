"""Store-and-forward outbox of a gateway, kept on disk in SQLite.

Every telemetry message is written here *before* it is published; a row is
deleted only once the broker has acknowledged it (PUBACK). A gateway that loses
power, its network or its broker therefore loses nothing that ``append`` has
returned for, and replays the backlog oldest first when it is back.

Design notes
------------
* One connection, guarded by a lock, opened with ``check_same_thread=False``:
  the agent, the reader thread and paho's callbacks may all touch the buffer.
* ``journal_mode=WAL`` so that appends and deletes do not rewrite the database
  file and readers never block the writer.
* ``synchronous=FULL`` by default: every commit is fsynced to the WAL, so a row
  survives a power cut the moment ``append`` returns. Gateways on Raspberry Pis
  and PLC cabinets lose power far more often than servers do, and at the
  intended rate (a few batches per second) the fsyncs are cheap even on an SD
  card. ``synchronous="NORMAL"`` is accepted for high-rate sources on fragile
  flash: in WAL mode it still never corrupts the database, but the last
  transactions before a power cut can roll back (the data is lost, not damaged).
* ``AUTOINCREMENT`` guarantees that ids are never reused, even after the table
  has been emptied, so "publish everything after id N" stays correct forever.
* A ``meta`` table holds small counters, such as the gateway's next sequence
  number, in the same file (and the same durability) as the rows.
* When the buffer is full, :meth:`OutboxBuffer.append` refuses the row with
  :class:`BufferFull` instead of evicting old rows; what to do then is the
  caller's policy (the agent drops the newest data, see ``agent.py``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Literal, NamedTuple, Self

DEFAULT_MAX_ROWS = 1_000_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

_SEQ_KEY = "next_seq"


class BufferFull(Exception):  # noqa: N818 - the name is the public API
    """The outbox holds ``max_rows`` rows; the new row was not stored."""


class Row(NamedTuple):
    id: int
    topic: str
    payload: bytes
    created_ms: int


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class OutboxBuffer:
    """A persistent FIFO of ``(topic, payload)`` messages waiting for a PUBACK.

    ``max_rows`` bounds the number of stored messages (not samples: one row is
    one MQTT message, which may carry a whole batch).
    """

    def __init__(
        self,
        path: str | Path,
        max_rows: int = DEFAULT_MAX_ROWS,
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be 'FULL' or 'NORMAL'")
        self.path = Path(path)
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit; transactions are opened explicitly.
        conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"could not switch {self.path} to WAL (got {mode})")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.executescript(_SCHEMA)
            self._count: int = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    # -- internals -----------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"outbox {self.path} is closed")
        return self._conn

    # -- rows ------------------------------------------------------------------------

    def append(self, topic: str, payload: bytes) -> int:
        """Store one message; return its id. Raise :class:`BufferFull` when full."""
        with self._lock:
            conn = self._db()
            if self._count >= self.max_rows:
                raise BufferFull(f"outbox {self.path} holds {self._count} rows (max_rows)")
            cur = conn.execute(
                "INSERT INTO outbox (topic, payload, created_ms) VALUES (?, ?, ?)",
                (topic, payload, _now_ms()),
            )
            self._count += 1
            row_id = cur.lastrowid
            assert row_id is not None
            return row_id

    def peek(self, after_id: int = 0, limit: int = 100) -> list[Row]:
        """Up to ``limit`` rows with ``id > after_id``, oldest (lowest id) first."""
        if limit <= 0:
            return []
        with self._lock:
            cur = self._db().execute(
                "SELECT id, topic, payload, created_ms FROM outbox"
                " WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            )
            return [Row(i, t, bytes(p), c) for i, t, p, c in cur.fetchall()]

    def delete(self, ids: Iterable[int]) -> int:
        """Delete the rows with these ids (unknown ids are ignored); return how many went."""
        params = [(i,) for i in ids]
        if not params:
            return 0
        with self._lock:
            conn = self._db()
            before = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("DELETE FROM outbox WHERE id = ?", params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            deleted = conn.total_changes - before
            self._count -= deleted
            return deleted

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def oldest_age_ms(self) -> int | None:
        """Age of the oldest stored row in milliseconds, or None when the buffer is empty."""
        with self._lock:
            row = self._db().execute("SELECT created_ms FROM outbox ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return None
        return max(0, _now_ms() - int(row[0]))

    # -- counters ----------------------------------------------------------------

    def reserve_seq(self, count: int) -> int:
        """Reserve ``count`` consecutive sequence numbers; return the first.

        The counter is committed (durably) before the numbers are used, so a
        restarted gateway never reuses one. Numbers whose samples are then
        dropped (buffer full, crash before ``append``) leave a visible gap.
        """
        if count < 0:
            raise ValueError("count must be >= 0")
        with self._lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = ?", (_SEQ_KEY,)).fetchone()
                first = int(row[0]) if row is not None else 0
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (_SEQ_KEY, first + count),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return first

    def next_seq(self) -> int:
        """The sequence number the next :meth:`reserve_seq` will return."""
        with self._lock:
            row = self._db().execute("SELECT value FROM meta WHERE key = ?", (_SEQ_KEY,)).fetchone()
        return int(row[0]) if row is not None else 0

    # -- lifecycle -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        """Checkpoint the WAL into the database file and close. Idempotent."""
        with self._lock:
            if self._conn is None:
                return
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # a busy checkpoint is harmless; the WAL is replayed on next open
            finally:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
