"""Thin classes that own kernel state and map streams to state rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.processing import kernels as k

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


class StreamLimitError(RuntimeError):
    """More distinct streams than the configured maximum."""


class StreamRegistry:
    """Stable mapping of a stream key (site, line, device, sensor) to a dense row.

    Rows are never reused, so every per-stream array indexed by row stays valid.
    The number of streams is bounded: a flood of invented identifiers cannot
    grow state without limit.
    """

    def __init__(self, max_streams: int = 100_000) -> None:
        self.max_streams = max_streams
        self._rows: dict[tuple[str, str, str, str], int] = {}
        self.keys: list[tuple[str, str, str, str]] = []

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, key: tuple[str, str, str, str]) -> int:
        row = self._rows.get(key)
        if row is None:
            if len(self.keys) >= self.max_streams:
                raise StreamLimitError(
                    f"stream limit reached ({self.max_streams} streams); "
                    "raise processing.max_streams"
                )
            row = len(self.keys)
            self._rows[key] = row
            self.keys.append(key)
        return row


@dataclass(frozen=True, slots=True)
class ZScoreParams:
    window: int = 100
    warmup: int = 20
    threshold: float = 4.0

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError("window must be at least 2")
        if not 2 <= self.warmup <= self.window:
            raise ValueError("warmup must be between 2 and window")
        if not self.threshold > 0:
            raise ValueError("threshold must be positive")


@dataclass(slots=True)
class ZScoreResult:
    mean: FloatArray
    std: FloatArray
    z: FloatArray
    score: FloatArray
    anomaly: BoolArray


class RollingZScore:
    """Rolling z-score over the last ``window`` values of every stream.

    Owns the state arrays of :func:`ingest.processing.kernels.rolling_zscore`
    and grows them (doubling) as streams appear.
    """

    def __init__(self, params: ZScoreParams | None = None, capacity: int = 64) -> None:
        self.params = params or ZScoreParams()
        capacity = max(capacity, 1)
        self.buf = np.zeros((capacity, self.params.window), dtype=np.float64)
        self.fstate = np.zeros((capacity, k.ZS_N_FLOAT_COLS), dtype=np.float64)
        self.istate = np.zeros((capacity, k.ZS_N_INT_COLS), dtype=np.int64)

    @property
    def capacity(self) -> int:
        return int(self.buf.shape[0])

    def _ensure(self, n_rows: int) -> None:
        if n_rows <= self.capacity:
            return
        new = self.capacity
        while new < n_rows:
            new *= 2
        self.buf = _grow(self.buf, new)
        self.fstate = _grow(self.fstate, new)
        self.istate = _grow(self.istate, new)

    def update(self, rows: IntArray, ts: IntArray, values: FloatArray) -> ZScoreResult:
        """Score then learn a batch of samples (any interleaving of streams)."""
        n = values.shape[0]
        if n:
            self._ensure(int(rows.max()) + 1)
        out = ZScoreResult(
            mean=np.empty(n, dtype=np.float64),
            std=np.empty(n, dtype=np.float64),
            z=np.empty(n, dtype=np.float64),
            score=np.empty(n, dtype=np.float64),
            anomaly=np.empty(n, dtype=np.bool_),
        )
        p = self.params
        k.rolling_zscore(
            rows,
            ts,
            values,
            p.window,
            p.warmup,
            p.threshold,
            self.buf,
            self.fstate,
            self.istate,
            out.mean,
            out.std,
            out.z,
            out.score,
            out.anomaly,
        )
        return out

    def warm_up_jit(self) -> None:
        """Compile (or load from cache) the kernel on a throw-away instance."""
        tmp = RollingZScore(self.params, capacity=1)
        tmp.update(np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.float64))


def _grow(a: npt.NDArray[Any], rows: int) -> npt.NDArray[Any]:
    out = np.zeros((rows, *a.shape[1:]), dtype=a.dtype)
    out[: a.shape[0]] = a
    return out
