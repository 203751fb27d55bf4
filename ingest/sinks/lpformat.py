"""Line protocol for a whole batch of readings at once, in a Numba kernel.

:func:`telemetry_body` writes the ``telemetry`` lines of a batch straight into
one byte buffer: no Python string per reading or per field. It writes what the
plain-Python reference :func:`ingest.sinks.lineprotocol.telemetry_lines` writes
(a test compares the two):

* ``value`` exactly: the reading reads back as the same double. The kernel
  finds the fewest decimals ``d`` (up to 17) for which ``N / 10**d`` gives the
  value back, both ``N`` and ``10**d`` exact in a double, so the division is
  correctly rounded and the decimal parses to the value. That is ``repr``'s
  text for every value from 1e-4 up to 2**53. Other values (tiny, huge, or
  with 17 significant digits that are not a short decimal) are rare in sensor
  data; Python's ``repr`` formats those before the kernel runs.
* the statistics ``mean``, ``std``, ``z``, ``score`` with 12 significant
  digits, laid out as ``%.12g`` (the last digit may differ by one from correct
  rounding: the scaling by a power of ten is itself rounded).
* the series key (measurement and escaped, sorted tags) of each stream, kept
  encoded in a :class:`SeriesTable`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit

from ingest.sinks.lineprotocol import STAT_DIGITS

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]

#: Longest text of one line besides its series key and an exact value formatted by
#: Python: the field names, four statistics of at most 19 characters, seq, ts.
_LINE_MAX = 224
#: Decimals tried for an exact short value.
_MAX_DECIMALS = 17
_TWO53 = 9007199254740992.0


def _const(text: str) -> U8:
    return np.frombuffer(text.encode(), dtype=np.uint8).copy()


_VALUE = _const(" value=")
_MEAN = _const(",mean=")
_STD = _const(",std=")
_Z = _const(",z=")
_SCORE = _const(",score=")
_TRUE = _const(",anomaly=true")
_FALSE = _const(",anomaly=false")
_SEQ = _const(",seq=")
_RX = _const(",rx_time=true")
_POW10 = np.array([10.0**k for k in range(309)])  # exact up to 10**22
_IPOW10 = np.array([10**k for k in range(19)], dtype=np.int64)
_PAIRS = _const("".join(f"{k:02d}" for k in range(100)))


@njit(cache=True, nogil=True)
def _put(out: U8, pos: int, src: U8) -> int:
    for j in range(src.shape[0]):
        out[pos + j] = src[j]
    end: int = pos + src.shape[0]
    return end


@njit(cache=True, nogil=True)
def _put_uint(out: U8, pos: int, n: int | np.integer[Any], width: int) -> int:
    """``n`` >= 0 in decimal, left-padded with zeros to ``width`` digits."""
    digits = 1
    while digits < 19 and n >= _IPOW10[digits]:
        digits += 1
    end = pos + max(digits, width)
    i = end
    while n >= 100:  # two digits per division
        q = n // 100
        r = 2 * (n - q * 100)
        out[i - 1] = _PAIRS[r + 1]
        out[i - 2] = _PAIRS[r]
        i -= 2
        n = q
    if n >= 10:
        out[i - 1] = _PAIRS[2 * n + 1]
        out[i - 2] = _PAIRS[2 * n]
        i -= 2
    else:
        out[i - 1] = 48 + n
        i -= 1
    while i > pos:
        out[i - 1] = 48
        i -= 1
    return end


@njit(cache=True, nogil=True)
def short_decimals(x: float) -> int:
    """Fewest decimals (0..17) in which ``x`` is written exactly, or -1."""
    a = abs(x)
    if not (1e-4 <= a < _TWO53):
        return -1
    for d in range(_MAX_DECIMALS + 1):
        p = _POW10[d]
        scaled = np.rint(a * p)
        if scaled >= _TWO53:
            return -1
        if scaled / p == a:
            return d
    return -1


@njit(cache=True, nogil=True)
def _put_fixed(out: U8, pos: int, x: float, d: int) -> int:
    """``x`` with exactly ``d`` decimals (at least one), as ``repr`` writes it."""
    if x < 0:
        out[pos] = 45
        pos += 1
    a = abs(x)
    n = np.int64(np.rint(a * _POW10[d]))
    p = _IPOW10[d]
    pos = _put_uint(out, pos, n // p, 1)
    out[pos] = 46  # "."
    pos += 1
    if d == 0:
        out[pos] = 48
        return pos + 1
    return _put_uint(out, pos, n % p, d)


@njit(cache=True, nogil=True)
def _put_stat(out: U8, pos: int, x: float) -> int:
    """``x`` (finite) as ``format(x, '.12g')``, with ``.0`` after a positional whole number."""
    digits = STAT_DIGITS
    if x < 0 or (x == 0.0 and math.copysign(1.0, x) < 0):
        out[pos] = 45
        pos += 1
    a = abs(x)
    if a == 0.0:
        out[pos] = 48
        out[pos + 1] = 46
        out[pos + 2] = 48
        return pos + 3
    e = math.floor(math.log10(a))
    top = _IPOW10[digits]
    n = np.int64(0)
    for _ in range(3):  # log10 can be off by one next to a power of ten
        k = digits - 1 - e
        if k > 300:  # subnormal
            scaled = a * 1e300 * _POW10[k - 300]
        elif k >= 0:
            scaled = a * _POW10[k]
        else:
            scaled = a / _POW10[-k]
        n = np.int64(np.rint(scaled))
        if n >= top:
            e += 1
        elif n < top // 10:
            e -= 1
        else:
            break
    nd = digits
    while nd > 1 and n % 10 == 0:
        n //= 10
        nd -= 1
    if -4 <= e < digits:  # positional
        if e < 0:
            out[pos] = 48
            out[pos + 1] = 46
            pos += 2
            for _ in range(-e - 1):
                out[pos] = 48
                pos += 1
            return _put_uint(out, pos, n, nd)
        if nd <= e + 1:  # a whole number
            pos = _put_uint(out, pos, n, 1)
            for _ in range(e + 1 - nd):
                out[pos] = 48
                pos += 1
            out[pos] = 46
            out[pos + 1] = 48
            return pos + 2
        p = _IPOW10[nd - e - 1]
        pos = _put_uint(out, pos, n // p, 1)
        out[pos] = 46
        return _put_uint(out, pos + 1, n % p, nd - e - 1)
    # exponent form: d[.ddd]e(+|-)XX
    p = _IPOW10[nd - 1]
    pos = _put_uint(out, pos, n // p, 1)
    if nd > 1:
        out[pos] = 46
        pos = _put_uint(out, pos + 1, n % p, nd - 1)
    out[pos] = 101  # "e"
    out[pos + 1] = 45 if e < 0 else 43
    return _put_uint(out, pos + 2, abs(e), 2)


@njit(cache=True, nogil=True)
def value_decimals(values: F64) -> npt.NDArray[np.int8]:
    """Per value: the decimals to write it with, or -1 where Python must format it."""
    out = np.empty(values.shape[0], np.int8)
    for i in range(values.shape[0]):
        out[i] = short_decimals(values[i])
    return out


@njit(cache=True, nogil=True)
def format_telemetry(
    series: U8,
    series_off: I64,
    rows: I64,
    ts: I64,
    values: F64,
    decimals: npt.NDArray[np.int8],
    value_text: U8,
    value_off: I64,
    mean: F64,
    std: F64,
    z: F64,
    score: F64,
    anomaly: B,
    seq: I64,
    rx_time: B,
    out: U8,
) -> int:
    """Write one line per reading into ``out``; returns the number of bytes written.
    ``value_text[value_off[i]:value_off[i + 1]]`` is the value of a reading whose
    ``decimals`` is -1."""
    pos = 0
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(series_off[r], series_off[r + 1]):
            out[pos] = series[j]
            pos += 1
        pos = _put(out, pos, _VALUE)
        if decimals[i] >= 0:
            pos = _put_fixed(out, pos, values[i], decimals[i])
        else:
            for j in range(value_off[i], value_off[i + 1]):
                out[pos] = value_text[j]
                pos += 1
        if math.isfinite(mean[i]) and math.isfinite(std[i]):
            pos = _put(out, pos, _MEAN)
            pos = _put_stat(out, pos, mean[i])
            pos = _put(out, pos, _STD)
            pos = _put_stat(out, pos, std[i])
        if math.isfinite(z[i]):
            pos = _put(out, pos, _Z)
            pos = _put_stat(out, pos, z[i])
        if math.isfinite(score[i]):
            pos = _put(out, pos, _SCORE)
            pos = _put_stat(out, pos, score[i])
        pos = _put(out, pos, _TRUE if anomaly[i] else _FALSE)
        if seq[i] >= 0:
            pos = _put(out, pos, _SEQ)
            pos = _put_uint(out, pos, seq[i], 1)
            out[pos] = 105  # "i"
            pos += 1
        if rx_time[i]:
            pos = _put(out, pos, _RX)
        out[pos] = 32
        pos = _put_uint(out, pos + 1, ts[i], 1)
        out[pos] = 10
        pos += 1
    return pos


class SeriesTable:
    """The encoded series key of every stream (by registry row), for the kernel."""

    def __init__(self) -> None:
        self.buf = np.zeros(0, np.uint8)
        self.off = np.zeros(1, np.int64)
        self.lengths = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.lengths.shape[0]

    def extend(self, keys: Sequence[str]) -> None:
        """Append the series keys of new streams (rows ``len(self)`` onwards)."""
        if not keys:
            return
        encoded = [k.encode() for k in keys]
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        self.buf = np.concatenate([self.buf, np.frombuffer(b"".join(encoded), np.uint8)])
        self.lengths = np.concatenate([self.lengths, lengths])
        self.off = np.concatenate([self.off, self.off[-1] + np.cumsum(lengths)])


def telemetry_body(
    table: SeriesTable,
    rows: I64,
    ts: I64,
    values: F64,
    mean: F64,
    std: F64,
    z: F64,
    score: F64,
    anomaly: B,
    seq: I64,
    rx_time: B,
) -> bytes:
    """The ``telemetry`` lines of a batch, each ending in a newline, as one body."""
    n = rows.shape[0]
    if n == 0:
        return b""
    if ts.min() < 0 or seq.min() < -1:
        raise ValueError("timestamps and sequence numbers must not be negative")
    decimals = value_decimals(values)
    value_off = np.zeros(n + 1, np.int64)
    slow = np.flatnonzero(decimals < 0)
    value_text = np.zeros(0, np.uint8)
    if slow.shape[0]:
        texts = [repr(v).encode() for v in values[slow].tolist()]
        lengths = np.zeros(n, np.int64)
        lengths[slow] = np.fromiter(map(len, texts), np.int64, len(texts))
        np.cumsum(lengths, out=value_off[1:])
        value_text = np.frombuffer(b"".join(texts), np.uint8)
    size = int(table.lengths[rows].sum()) + n * _LINE_MAX + value_text.shape[0]
    out = np.empty(size, np.uint8)
    used = format_telemetry(
        table.buf,
        table.off,
        rows,
        ts,
        values,
        decimals,
        value_text,
        value_off,
        mean,
        std,
        z,
        score,
        anomaly,
        seq,
        rx_time,
        out,
    )
    return out[:used].tobytes()


def warm_up() -> None:
    """Compile (or load from the cache) the kernels with the types the service uses."""
    table = SeriesTable()
    table.extend(["telemetry,sensor=a"])
    one: Any = np.ones(1)
    telemetry_body(
        table,
        np.zeros(1, np.int64),
        np.ones(1, np.int64),
        one,
        one,
        one,
        one,
        one,
        np.zeros(1, np.bool_),
        np.zeros(1, np.int64),
        np.zeros(1, np.bool_),
    )
