"""Sample sources for the gateway agent.

A source yields contract samples ``{"ts": <epoch ms int>, "values": {name: float}}``
(the agent adds ``seq``). Any iterable of such dicts works; the classes here also
offer ``iter_samples(stop)``, which the agent prefers because it lets a paced
(real-time) source stop promptly instead of sleeping until its next sample.

* :class:`CsvSource` replays a CSV file (a historian export, a public data set).
* :class:`SimulatedSource` makes plain gaussian-plus-sine signals, for demos and
  tests. It is deliberately small; the full fleet simulator lives elsewhere.
"""

from __future__ import annotations

import csv
import math
import random
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from devices.contract import IDENTIFIER_RE

SampleDict = dict[str, Any]
"""``{"ts": int, "values": {str: float}}`` (plus ``"seq"`` once the agent has numbered it)."""

#: Column names recognised as the timestamp column, case-insensitively, in this order.
TS_COLUMN_NAMES = ("ts", "timestamp", "time", "datetime", "date_time", "date", "t")
#: Delimiters the CSV sniffer may choose from (a timestamp's ' ' and ':' are never delimiters).
CSV_DELIMITERS = ",;\t|"
#: Numbers below this are taken as epoch *seconds* rather than milliseconds (1973-03-03 in ms).
_SECONDS_THRESHOLD = 1e11
#: Highest simulated rate: the contract's timestamps have millisecond resolution.
MAX_SIM_RATE_HZ = 1000.0


@runtime_checkable
class SampleSource(Protocol):
    """A source that can be asked to stop between (or while waiting for) samples."""

    def iter_samples(self, stop: threading.Event | None = None) -> Iterator[SampleDict]: ...


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _wait(stop: threading.Event | None, seconds: float) -> bool:
    """Sleep ``seconds``; return True if ``stop`` was set meanwhile."""
    if seconds <= 0:
        return stop is not None and stop.is_set()
    if stop is None:
        time.sleep(seconds)
        return False
    return stop.wait(seconds)


# --------------------------------------------------------------------------- CSV


def parse_timestamp_ms(text: str) -> int:
    """Epoch milliseconds from a CSV cell.

    Accepts integers or decimals (epoch milliseconds; values below 1e11 are taken
    as epoch seconds) and ISO 8601 date-times such as ``2014-04-01 00:00:00``,
    ``2014-04-01T00:00:00.250Z`` or ``2014-04-01T02:00:00+02:00``. A date-time
    without a UTC offset is taken as UTC. Raise ValueError otherwise.
    """
    cell = text.strip()
    if not cell:
        raise ValueError("empty timestamp")
    try:
        number = float(cell)
    except ValueError:
        pass
    else:
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"invalid epoch timestamp {cell[:40]!r}")
        return round(number * 1000) if number < _SECONDS_THRESHOLD else round(number)
    try:
        moment = datetime.fromisoformat(cell)
    except ValueError:
        raise ValueError(f"not an epoch-ms number or ISO 8601 date-time: {cell[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def sensor_name(column: str, index: int) -> str:
    """A contract identifier (``[A-Za-z0-9_.-]{1,64}``) made from a CSV column name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", column.strip()).strip("_")[:64]
    return name if name else f"col{index}"


def _parse_reading(cell: str, decimal_comma: bool) -> float | None:
    cell = cell.strip()
    if not cell:
        return None
    try:
        value = float(cell)
    except ValueError:
        if not (decimal_comma and cell.count(",") == 1):
            return None
        try:
            value = float(cell.replace(",", "."))
        except ValueError:
            return None
    return value if math.isfinite(value) else None


def _sniff_delimiter(head: str) -> str:
    try:
        return csv.Sniffer().sniff(head, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        first_line = head.splitlines()[0] if head else ""
        counts = {d: first_line.count(d) for d in CSV_DELIMITERS}
        best = max(counts, key=lambda d: counts[d])
        return best if counts[best] else ","


class CsvSource:
    """Replay a CSV file as samples, one per data row.

    * The delimiter (``,`` ``;`` tab ``|``) is sniffed unless ``delimiter`` is given.
    * ``ts_column``: the timestamp column's name; ``None`` (auto) looks for a column
      called ts/timestamp/time/datetime/date/t, else the first column whose first
      value parses as a timestamp. Timestamps are epoch milliseconds or ISO 8601
      (``2014-04-01 00:00:00`` is read as UTC); see :func:`parse_timestamp_ms`.
    * Every other column is a sensor, named after its header (made a valid
      identifier). Cells that are empty or not finite numbers are skipped, so a
      text column (a status, a label) simply contributes nothing; rows with no
      reading at all are skipped. With a non-comma delimiter, a decimal comma
      (``21,5``) is accepted. An unnamed first column (a pandas index) is ignored.
    * ``realtime=True`` paces the replay by the timestamps, ``speed`` times faster
      than recorded; otherwise rows come as fast as they are read.
    * ``rebase=True`` shifts all timestamps so that the first row is "now" (useful
      to replay an old data set into a live dashboard).
    * ``loop=True`` starts again from the top at the end (with ``rebase``, the
      timestamps keep increasing).
    """

    def __init__(
        self,
        path: str | Path,
        ts_column: str | None = None,
        *,
        realtime: bool = False,
        speed: float = 1.0,
        delimiter: str | None = None,
        rebase: bool = False,
        loop: bool = False,
        encoding: str = "utf-8-sig",
    ) -> None:
        if not speed > 0 or not math.isfinite(speed):
            raise ValueError("speed must be a positive number")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"CSV file not found: {self.path}")
        self.realtime = realtime
        self.speed = speed
        self.rebase = rebase
        self.loop = loop
        self.encoding = encoding
        with self.path.open(newline="", encoding=encoding) as fh:
            head = fh.read(64 * 1024)
        if not head.strip():
            raise ValueError(f"CSV file {self.path} is empty")
        self.delimiter = delimiter or _sniff_delimiter(head)
        reader = csv.reader(head.splitlines(), delimiter=self.delimiter)
        header = next(reader)
        first_row = next(reader, None)
        self.header: list[str] = header
        self.ts_index = self._find_ts_column(header, first_row, ts_column)
        self.columns: list[tuple[int, str]] = []
        used: set[str] = set()
        for index, column in enumerate(header):
            if index == self.ts_index or (index == 0 and not column.strip()):
                continue
            name = base = sensor_name(column, index)
            suffix = 2
            while name in used:
                tail = f"_{suffix}"
                name = base[: 64 - len(tail)] + tail
                suffix += 1
            used.add(name)
            self.columns.append((index, name))
        if not self.columns:
            raise ValueError(f"CSV file {self.path} has no sensor columns besides the timestamp")
        assert all(IDENTIFIER_RE.match(name) for _, name in self.columns)

    @property
    def sensors(self) -> list[str]:
        return [name for _, name in self.columns]

    def _find_ts_column(
        self, header: Sequence[str], first_row: Sequence[str] | None, ts_column: str | None
    ) -> int:
        stripped = [h.strip() for h in header]
        if ts_column is not None:
            if ts_column in stripped:
                return stripped.index(ts_column)
            raise ValueError(
                f"CSV file {self.path} has no column {ts_column!r} (columns: {stripped})"
            )
        lowered = [h.lower() for h in stripped]
        for candidate in TS_COLUMN_NAMES:
            if candidate in lowered:
                return lowered.index(candidate)
        if first_row is not None:
            for index, cell in enumerate(first_row):
                try:
                    ts = parse_timestamp_ms(cell)
                except ValueError:
                    continue
                # A plain small number is a reading, not a timestamp; ISO text or a
                # large epoch number is a timestamp.
                if not _looks_numeric(cell) or ts >= 946_684_800_000:
                    return index
        raise ValueError(
            f"CSV file {self.path}: no timestamp column found; name it one of "
            f"{', '.join(TS_COLUMN_NAMES)} or pass ts_column"
        )

    def _rows(self) -> Iterator[SampleDict]:
        decimal_comma = self.delimiter != ","
        with self.path.open(newline="", encoding=self.encoding) as fh:
            reader = csv.reader(fh, delimiter=self.delimiter)
            next(reader, None)  # header
            for line_no, row in enumerate(reader, start=2):
                if not row or self.ts_index >= len(row):
                    continue
                try:
                    ts = parse_timestamp_ms(row[self.ts_index])
                except ValueError as exc:
                    raise ValueError(f"{self.path}:{line_no}: {exc}") from None
                values: dict[str, float] = {}
                for index, name in self.columns:
                    if index < len(row):
                        value = _parse_reading(row[index], decimal_comma)
                        if value is not None:
                            values[name] = value
                if values:
                    yield {"ts": ts, "values": values}

    def iter_samples(self, stop: threading.Event | None = None) -> Iterator[SampleDict]:
        shift = 0  # added to every timestamp (rebase, later passes of a loop)
        first_ts: int | None = None  # first timestamp of the file, as recorded
        first_out: int | None = None  # first timestamp emitted (pacing origin)
        last_out = 0
        start_wall = time.monotonic()
        while True:
            emitted = False
            for sample in self._rows():
                if stop is not None and stop.is_set():
                    return
                ts = int(sample["ts"])
                if first_ts is None:
                    first_ts = ts
                    if self.rebase:
                        shift = _now_ms() - ts
                out = ts + shift
                if first_out is None:
                    first_out = out
                if self.realtime:
                    due = start_wall + (out - first_out) / 1000.0 / self.speed
                    if _wait(stop, due - time.monotonic()):
                        return
                sample["ts"] = last_out = out
                emitted = True
                yield sample
            if not self.loop or not emitted:
                return
            # The next pass continues 1 ms after the last sample of this one.
            assert first_ts is not None
            shift = last_out + 1 - first_ts

    def __iter__(self) -> Iterator[SampleDict]:
        return self.iter_samples(None)


def _looks_numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------- simulated


class SimulatedSource:
    """Plain synthetic signals: ``offset + amplitude*sin(2*pi*t/period + phase) + noise``.

    Each sensor gets its own offset, amplitude, period, phase and noise level,
    drawn from ``seed``, so a given seed always produces the same series.

    * ``rate_hz`` samples per second (at most 1000: timestamps are milliseconds).
    * ``count``: stop after this many samples (``None``: run until stopped).
    * ``realtime=True`` paces the samples to the wall clock and stamps them with
      the current time; ``realtime=False`` yields as fast as possible with
      timestamps spaced ``1/rate_hz`` apart, starting at ``start_ms`` (default:
      early enough that the last of ``count`` samples is "now", never in the future).
    """

    DEFAULT_SENSORS = ("spindle_temp", "vibration_rms", "spindle_load")

    def __init__(
        self,
        rate_hz: float = 10.0,
        seed: int = 0,
        sensors: Sequence[str] = DEFAULT_SENSORS,
        *,
        count: int | None = None,
        realtime: bool = True,
        start_ms: int | None = None,
    ) -> None:
        if not (0 < rate_hz <= MAX_SIM_RATE_HZ) or not math.isfinite(rate_hz):
            raise ValueError(f"rate_hz must be in (0, {MAX_SIM_RATE_HZ:g}]")
        if count is not None and count < 0:
            raise ValueError("count must be >= 0")
        if not sensors:
            raise ValueError("at least one sensor is needed")
        for name in sensors:
            if not IDENTIFIER_RE.match(name):
                raise ValueError(
                    f"invalid sensor name {name!r} (must match [A-Za-z0-9_.-]{{1,64}})"
                )
        self.rate_hz = rate_hz
        self.seed = seed
        self.sensors = tuple(sensors)
        self.count = count
        self.realtime = realtime
        self.start_ms = start_ms
        rng = random.Random(seed)
        self._params = [
            (
                rng.uniform(10.0, 100.0),  # offset
                rng.uniform(1.0, 10.0),  # amplitude
                rng.uniform(5.0, 120.0),  # period, seconds
                rng.uniform(0.0, 2 * math.pi),  # phase
                rng.uniform(0.05, 1.0),  # noise sigma
            )
            for _ in self.sensors
        ]

    def _values(self, rng: random.Random, t_s: float) -> dict[str, float]:
        values: dict[str, float] = {}
        for name, (off, amp, period, phase, sigma) in zip(self.sensors, self._params, strict=True):
            wave = amp * math.sin(2 * math.pi * t_s / period + phase)
            values[name] = round(off + wave + rng.gauss(0, sigma), 4)
        return values

    def iter_samples(self, stop: threading.Event | None = None) -> Iterator[SampleDict]:
        rng = random.Random(self.seed + 1)
        step_ms = 1000.0 / self.rate_hz
        if self.realtime:
            start_ms = _now_ms() if self.start_ms is None else self.start_ms
            start_wall = time.monotonic()
        elif self.start_ms is not None:
            start_ms = self.start_ms
        else:
            start_ms = _now_ms() - round(step_ms * max((self.count or 1) - 1, 0))
        i = 0
        while self.count is None or i < self.count:
            if stop is not None and stop.is_set():
                return
            offset_ms = i * step_ms
            if self.realtime and _wait(stop, start_wall + offset_ms / 1000.0 - time.monotonic()):
                return
            values = self._values(rng, offset_ms / 1000.0)
            yield {"ts": start_ms + round(offset_ms), "values": values}
            i += 1

    def __iter__(self) -> Iterator[SampleDict]:
        return self.iter_samples(None)


def iterate(
    source: Iterable[SampleDict] | SampleSource, stop: threading.Event | None
) -> Iterator[SampleDict]:
    """Iterate ``source``, passing ``stop`` along when the source supports it."""
    if isinstance(source, SampleSource):
        return source.iter_samples(stop)
    return iter(source)
