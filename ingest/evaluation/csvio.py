"""Read time-series CSV files and write backtest results.

Input (``read_series_csv``):

- The delimiter is the most frequent of ``,`` ``;`` and tab in the header line.
- Lines starting with ``#`` and blank lines are skipped; a row equal to the
  header (as in multi-table InfluxDB exports) is skipped too.
- The timestamp column is the first one named ``timestamp``, ``time``,
  ``datetime`` or ``_time`` (case-insensitive), else the first column.
  Every other named column is a value column; columns with an empty header
  are ignored.
- Timestamps: a plain number is epoch milliseconds if it is greater than 1e11,
  else epoch seconds. Otherwise ISO 8601 ``YYYY-MM-DD[(T| )HH:MM[:SS[.fff]]]``
  with an optional ``Z`` or ``±HH[:MM]`` offset; aware times are converted to
  UTC and naive ones are taken as UTC. Digits below the millisecond are dropped.
- Empty value cells are NaN; any other cell that is not a number is an error
  naming the file, line and column.
- InfluxDB annotated CSV: with ``_time`` and ``_value`` columns, each distinct
  ``_field`` becomes one column (several fields are aligned on their sorted
  union of timestamps, NaN where a field has no sample). With a ``#datatype``
  annotation and no ``_value`` column (a pivoted query), only columns typed
  ``double``, ``long`` or ``unsignedLong`` are read, except ``table``.

Rows keep the file's order (single series); they are not sorted or de-duplicated.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

TIME_COLUMN_NAMES = ("timestamp", "time", "datetime", "_time")
EPOCH_MS_MIN = 1e11  # plain numbers above this are epoch milliseconds, else seconds
_DELIMITERS = (",", ";", "\t")
_NUMERIC_TYPES = {"double", "long", "unsignedlong"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_EPOCH_NUMBER = re.compile(r"\d+(?:\.\d*)?")


@dataclass(frozen=True, eq=False, slots=True)
class SeriesTable:
    """A CSV file as arrays: timestamps, value columns and the raw timestamp text."""

    ts_ms: IntArray
    columns: dict[str, FloatArray]
    raw_ts: list[str]
    time_column: str

    def __len__(self) -> int:
        return len(self.ts_ms)


def parse_timestamp(text: str) -> int:
    """Epoch milliseconds (UTC) of one timestamp cell; raises ValueError if unreadable."""
    s = text.strip()
    if not s:
        raise ValueError("empty timestamp")
    if _EPOCH_NUMBER.fullmatch(s):
        if "." in s:
            f = float(s)
            return round(f) if f > EPOCH_MS_MIN else round(f * 1000.0)
        v = int(s)
        return v if v > EPOCH_MS_MIN else v * 1000
    try:
        moment = datetime.fromisoformat(s.upper())  # RFC 3339 allows "t" and "z"
    except ValueError as exc:
        raise ValueError(f"not a timestamp: {text!r} ({exc})") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # naive: taken as UTC
    return (moment - _EPOCH) // _MS


def format_timestamp(ts_ms: int) -> str:
    """ISO 8601 UTC text ``YYYY-MM-DDTHH:MM:SS.mmmZ`` for epoch milliseconds."""
    dt = datetime.fromtimestamp(ts_ms // 1000, tz=UTC)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ts_ms % 1000:03d}Z"


def sniff_delimiter(header: str) -> str:
    """The most frequent of ``,`` ``;`` tab in a header line (``,`` if none occurs)."""
    counts = [header.count(d) for d in _DELIMITERS]
    best = max(range(len(_DELIMITERS)), key=lambda k: (counts[k], -k))
    return _DELIMITERS[best] if counts[best] else ","


class _Lines:
    """Iterates a file's data lines (skipping ``#`` and blank lines), tracking line numbers."""

    def __init__(self, fh: IO[str]) -> None:
        self._fh = fh
        self.lineno = 0
        self.comments: list[str] = []

    def __iter__(self) -> Iterator[str]:
        for line in self._fh:
            self.lineno += 1
            stripped = line.strip()
            if not stripped:
                continue
            if stripped.startswith("#"):
                self.comments.append(stripped)
                continue
            yield line


def _time_column(names: list[str]) -> int:
    lowered = [n.lower() for n in names]
    for k, n in enumerate(lowered):
        if n in TIME_COLUMN_NAMES:
            return k
    return 0


def _datatypes(comments: list[str], delimiter: str, width: int) -> list[str] | None:
    """Column types from an InfluxDB ``#datatype`` annotation, aligned with the header."""
    for line in comments:
        cells = [c.strip().lower() for c in next(csv.reader([line], delimiter=delimiter))]
        # The annotation's first cell sits above the header's leading empty column.
        if cells and cells[0] == "#datatype" and len(cells) == width:
            return cells
    return None


def read_series_csv(path: Path) -> SeriesTable:
    """Read a time-series CSV file (see the module docstring for the accepted forms)."""
    with path.open(encoding="utf-8-sig", newline="") as fh:
        lines = _Lines(fh)
        it = iter(lines)
        header_line = next(it, None)
        if header_line is None:
            raise ValueError(f"{path}: no header line")
        delimiter = sniff_delimiter(header_line)
        names = [c.strip() for c in next(csv.reader([header_line], delimiter=delimiter))]
        rows: list[tuple[int, list[str]]] = []
        for cells in csv.reader(it, delimiter=delimiter):
            rows.append((lines.lineno, cells))
        comments = lines.comments
    if not any(names):
        raise ValueError(f"{path}: empty header line")
    named = [n for n in names if n]
    if len(set(named)) != len(named):
        raise ValueError(f"{path}: duplicate column names in header {names}")
    width = len(names)
    data: list[tuple[int, list[str]]] = []
    for lineno, cells in rows:
        if [c.strip() for c in cells] == names:
            continue  # repeated header of a multi-table export
        if len(cells) != width:
            raise ValueError(f"{path}, line {lineno}: {len(cells)} cells, the header has {width}")
        data.append((lineno, cells))
    tcol = _time_column(names)
    lowered = [n.lower() for n in names]
    if "_time" in lowered and "_value" in lowered:
        return _read_influx_long(path, names, tcol, data)
    value_cols = [k for k, n in enumerate(names) if n and k != tcol]
    types = _datatypes(comments, delimiter, width)
    if types is not None:
        value_cols = [k for k in value_cols if types[k] in _NUMERIC_TYPES and lowered[k] != "table"]
    ts = np.empty(len(data), dtype=np.int64)
    raw_ts: list[str] = []
    values = {names[k]: np.empty(len(data), dtype=np.float64) for k in value_cols}
    for i, (lineno, cells) in enumerate(data):
        raw = cells[tcol].strip()
        ts[i] = _parse_ts_cell(path, lineno, names[tcol], raw)
        raw_ts.append(raw)
        for k in value_cols:
            values[names[k]][i] = _parse_value_cell(path, lineno, names[k], cells[k])
    return SeriesTable(ts_ms=ts, columns=values, raw_ts=raw_ts, time_column=names[tcol])


def _parse_ts_cell(path: Path, lineno: int, column: str, raw: str) -> int:
    try:
        return parse_timestamp(raw)
    except ValueError as exc:
        raise ValueError(f"{path}, line {lineno}, column {column!r}: {exc}") from None


def _parse_value_cell(path: Path, lineno: int, column: str, cell: str) -> float:
    text = cell.strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"{path}, line {lineno}, column {column!r}: not a number: {cell!r}"
        ) from None


def _read_influx_long(
    path: Path, names: list[str], tcol: int, data: list[tuple[int, list[str]]]
) -> SeriesTable:
    lowered = [n.lower() for n in names]
    vcol = lowered.index("_value")
    fcol = lowered.index("_field") if "_field" in lowered else None
    series: dict[str, dict[int, float]] = {}
    raw_of: dict[int, str] = {}
    order: list[int] = []
    for lineno, cells in data:
        field = cells[fcol].strip() if fcol is not None else names[vcol]
        raw = cells[tcol].strip()
        t = _parse_ts_cell(path, lineno, names[tcol], raw)
        v = _parse_value_cell(path, lineno, names[vcol], cells[vcol])
        points = series.setdefault(field, {})
        if t in points:
            raise ValueError(
                f"{path}, line {lineno}: field {field!r} has two values at {raw}; "
                "filter the query to one series per field or pivot it"
            )
        points[t] = v
        if t not in raw_of:
            raw_of[t] = raw
        if len(series) == 1:
            order.append(t)
    keys = order if len(series) <= 1 else sorted(raw_of)
    ts = np.asarray(keys, dtype=np.int64)
    columns = {
        field: np.array([points.get(t, math.nan) for t in keys], dtype=np.float64)
        for field, points in series.items()
    }
    return SeriesTable(
        ts_ms=ts, columns=columns, raw_ts=[raw_of[t] for t in keys], time_column=names[tcol]
    )


def _float_text(x: float) -> str:
    return "" if math.isnan(x) else repr(x)


def write_backtest_csv(
    path: Path,
    ts_ms: npt.NDArray[np.int64],
    rows: Mapping[str, Mapping[str, npt.NDArray[Any]]],
    raw_ts: Sequence[str] | None = None,
) -> None:
    """Write backtest output: ``timestamp,value,score,anomaly`` for one input column,
    ``timestamp,sensor,value,score,anomaly`` (one row per timestamp and sensor) for several.

    ``rows`` maps each sensor to arrays ``value``, ``score`` and ``anomaly``.
    Timestamps are written as ``raw_ts`` (the input's own text) when given, else as
    ISO 8601 UTC with milliseconds. NaN values and scores are written as empty cells;
    ``anomaly`` as 0/1 (NaN counts as 0).
    """
    if not rows:
        raise ValueError("no columns to write")
    n = len(ts_ms)
    if raw_ts is not None and len(raw_ts) != n:
        raise ValueError(f"raw_ts has {len(raw_ts)} entries, ts_ms has {n}")
    prepared: list[tuple[str, list[str], list[str], list[str]]] = []
    for sensor, arrays in rows.items():
        missing = {"value", "score", "anomaly"} - set(arrays)
        if missing:
            raise ValueError(f"column {sensor!r}: missing arrays {sorted(missing)}")
        value = np.asarray(arrays["value"], dtype=np.float64)
        score = np.asarray(arrays["score"], dtype=np.float64)
        flag = np.nan_to_num(np.asarray(arrays["anomaly"], dtype=np.float64), nan=0.0) != 0
        for label, arr in (("value", value), ("score", score), ("anomaly", flag)):
            if len(arr) != n:
                raise ValueError(f"column {sensor!r}: {label} has {len(arr)} rows, expected {n}")
        prepared.append(
            (
                sensor,
                [_float_text(x) for x in value.tolist()],
                [_float_text(x) for x in score.tolist()],
                ["1" if a else "0" for a in flag.tolist()],
            )
        )
    stamps = list(raw_ts) if raw_ts is not None else [format_timestamp(int(t)) for t in ts_ms]
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if len(prepared) == 1:
            _, value_s, score_s, flag_s = prepared[0]
            writer.writerow(["timestamp", "value", "score", "anomaly"])
            writer.writerows(zip(stamps, value_s, score_s, flag_s, strict=True))
            return
        writer.writerow(["timestamp", "sensor", "value", "score", "anomaly"])
        for i, stamp in enumerate(stamps):
            for sensor, value_s, score_s, flag_s in prepared:
                writer.writerow([stamp, sensor, value_s[i], score_s[i], flag_s[i]])
