"""Thin classes that own kernel state and map streams to state rows."""

from __future__ import annotations

import fnmatch
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.processing import kernels as k

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
StreamKey = tuple[str, str, str, str]  # site, line, device, sensor

DETECTOR_BITS = {name: bit for bit, name in k.DETECTOR_NAMES.items() if bit != k.RANGE}
DEFAULT_DETECTORS = ("zscore", "ewma", "mad", "cusum", "flatline", "roc")


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
        self._rows: dict[StreamKey, int] = {}
        self.keys: list[StreamKey] = []

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, key: StreamKey) -> int:
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


def detector_mask(names: Sequence[str]) -> int:
    mask = 0
    for name in names:
        try:
            mask |= DETECTOR_BITS[name]
        except KeyError:
            raise ValueError(
                f"unknown detector {name!r}; known: {', '.join(DETECTOR_BITS)}"
            ) from None
    return mask


def detector_names(mask: int) -> list[str]:
    """Names of the detectors in a bit mask, in bit order."""
    return [name for bit, name in sorted(k.DETECTOR_NAMES.items()) if mask & bit]


@dataclass(frozen=True, slots=True)
class DetectorParams:
    """Which detectors run on a stream, and how; ``docs/detectors.md`` explains each."""

    detectors: tuple[str, ...] = DEFAULT_DETECTORS
    warmup: int = 30
    zscore_window: int = 100
    zscore_threshold: float = 5.0
    ewma_halflife: float = 10.0
    ewma_threshold: float = 8.0
    mad_window: int = 41
    mad_threshold: float = 6.0
    cusum_halflife: float = 200.0
    cusum_k: float = 1.0
    cusum_h: float = 20.0
    flatline_samples: int = 30
    roc_threshold: float = 8.0
    gap_factor: float = 5.0
    onset: int = 1
    clear: int = 1
    hold: int = 100
    learn_limit: int = 0

    def __post_init__(self) -> None:
        detector_mask(self.detectors)
        if self.zscore_window < 2 or self.mad_window < 3:
            raise ValueError("zscore_window must be at least 2 and mad_window at least 3")
        if self.warmup < 2:
            raise ValueError("warmup must be at least 2")
        if "zscore" in self.detectors and self.warmup > self.zscore_window:
            raise ValueError("warmup must not exceed zscore_window")
        for name in (
            "zscore_threshold",
            "ewma_halflife",
            "ewma_threshold",
            "mad_threshold",
            "cusum_halflife",
            "cusum_h",
            "roc_threshold",
            "gap_factor",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.cusum_k < 0 or self.flatline_samples < 1 or self.onset < 1 or self.clear < 1:
            raise ValueError("cusum_k >= 0, flatline_samples >= 1, onset >= 1 and clear >= 1")
        if self.hold < self.clear:
            raise ValueError("hold must be at least clear")
        if self.learn_limit and self.learn_limit < self.warmup:
            raise ValueError("learn_limit must be 0 (always learn) or at least warmup")

    @property
    def mask(self) -> int:
        return detector_mask(self.detectors)

    def vector(self) -> FloatArray:
        p = np.zeros(k.N_PARAMS, dtype=np.float64)
        p[k.P_WARMUP] = self.warmup
        p[k.P_ZS_THRESHOLD] = self.zscore_threshold
        p[k.P_EW_HALFLIFE] = self.ewma_halflife
        p[k.P_EW_THRESHOLD] = self.ewma_threshold
        p[k.P_MAD_THRESHOLD] = self.mad_threshold
        p[k.P_CU_HALFLIFE] = self.cusum_halflife
        p[k.P_CU_K] = self.cusum_k
        p[k.P_CU_H] = self.cusum_h
        p[k.P_FLAT_LEN] = self.flatline_samples
        p[k.P_ROC_THRESHOLD] = self.roc_threshold
        p[k.P_GAP_FACTOR] = self.gap_factor
        p[k.P_ONSET] = self.onset
        p[k.P_CLEAR] = self.clear
        p[k.P_LEARN_LIMIT] = self.learn_limit
        p[k.P_HOLD] = self.hold
        return p

    def replace(self, **changes: Any) -> DetectorParams:
        values = asdict(self)
        values.update(changes)
        if "detectors" in changes:
            values["detectors"] = tuple(values["detectors"])
        return DetectorParams(**values)


PARAM_NAMES = tuple(f.name for f in fields(DetectorParams))


@dataclass(slots=True)
class DetectResult:
    """Per-sample outputs of :meth:`DetectorBank.update` (see :func:`kernels.detect`)."""

    mean: FloatArray
    std: FloatArray
    z: FloatArray
    score: FloatArray
    hits: IntArray
    anomaly: BoolArray
    gap: IntArray  # start (ms) of the silence a sample ends, else 0
    event: npt.NDArray[np.int8]
    ev_start: IntArray
    ev_end: IntArray
    ev_peak: FloatArray
    ev_dets: IntArray

    @classmethod
    def empty(cls, n: int) -> DetectResult:
        return cls(
            mean=np.empty(n, np.float64),
            std=np.empty(n, np.float64),
            z=np.empty(n, np.float64),
            score=np.empty(n, np.float64),
            hits=np.empty(n, np.int64),
            anomaly=np.empty(n, np.bool_),
            gap=np.empty(n, np.int64),
            event=np.empty(n, np.int8),
            ev_start=np.empty(n, np.int64),
            ev_end=np.empty(n, np.int64),
            ev_peak=np.empty(n, np.float64),
            ev_dets=np.empty(n, np.int64),
        )

    def scatter(self, index: IntArray, part: DetectResult) -> None:
        """Write ``part`` (results for the samples at ``index``) into this result."""
        for f in fields(self):
            getattr(self, f.name)[index] = getattr(part, f.name)


_STATE_NAMES = ("zbuf", "msorted", "mindex", "fstate", "istate")


class DetectorBank:
    """State of one parameter set for any number of streams (rows 0, 1, 2, ...).

    Owns the arrays of :func:`ingest.processing.kernels.detect` and grows them
    (doubling) as streams appear.
    """

    def __init__(
        self,
        params: DetectorParams | None = None,
        capacity: int = 64,
        max_rows: int | None = None,
    ) -> None:
        self.params = params or DetectorParams()
        #: Growth stops here (the registry's stream limit), not at the next power of two.
        self.max_rows = max_rows
        self._mask = self.params.mask
        self._vector = self.params.vector()
        zw = self.params.zscore_window if self._mask & k.ZSCORE else 1
        mw = self.params.mad_window if self._mask & k.MAD else 1
        self.zbuf, self.msorted, self.mindex, self.fstate, self.istate = k.new_state(
            max(capacity, 1), zw, mw
        )

    @property
    def capacity(self) -> int:
        return int(self.fstate.shape[0])

    def _ensure(self, n_rows: int) -> None:
        if n_rows <= self.capacity:
            return
        new = self.capacity
        while new < n_rows:
            new *= 2
        if self.max_rows is not None:
            new = max(min(new, self.max_rows), n_rows)
        fresh = k.new_state(new, self.zbuf.shape[1], self.msorted.shape[1])
        for name, arr in zip(_STATE_NAMES, fresh, strict=True):
            old = getattr(self, name)
            arr[: old.shape[0]] = old
            setattr(self, name, arr)

    def update(self, rows: IntArray, ts: IntArray, values: FloatArray) -> DetectResult:
        """Score then learn a batch of samples (any interleaving of streams)."""
        n = values.shape[0]
        if n:
            self._ensure(int(rows.max()) + 1)
        out = DetectResult.empty(n)
        self.run(rows, ts, values, out)
        return out

    def run(self, rows: IntArray, ts: IntArray, values: FloatArray, out: DetectResult) -> None:
        """The kernel call itself, into preallocated outputs; rows must fit the capacity."""
        k.detect(
            rows,
            ts,
            values,
            self._mask,
            self._vector,
            self.zbuf,
            self.msorted,
            self.mindex,
            self.fstate,
            self.istate,
            out.mean,
            out.std,
            out.z,
            out.score,
            out.hits,
            out.anomaly,
            out.gap,
            out.event,
            out.ev_start,
            out.ev_end,
            out.ev_peak,
            out.ev_dets,
        )

    def silent(
        self, now_ms: float, n_rows: int, last_ms: npt.NDArray[Any] | None = None
    ) -> IntArray:
        """Rows (of the first ``n_rows``) silent for more than ``gap_factor`` usual intervals
        at ``now_ms``: since their newest timestamp, or since ``last_ms[row]`` if given
        (the service passes when it last received each stream, so a device whose clock
        lags is not taken for a silent one)."""
        n_rows = min(n_rows, self.capacity)
        mean_dt = self.fstate[:n_rows, k.F_MEAN_DT]
        last = self.istate[:n_rows, k.I_LAST_TS] if last_ms is None else last_ms[:n_rows]
        quiet = (self.istate[:n_rows, k.I_N] >= self.params.warmup) & (mean_dt > 0.0)
        quiet &= now_ms - last > self.params.gap_factor * mean_dt
        return np.flatnonzero(quiet).astype(np.int64)

    def state_arrays(self, n_rows: int) -> dict[str, npt.NDArray[Any]]:
        return {name: getattr(self, name)[:n_rows] for name in _STATE_NAMES}

    def load_rows(self, arrays: dict[str, npt.NDArray[Any]], src: IntArray, dst: IntArray) -> None:
        """Copy the saved rows ``src`` of ``arrays`` into this bank's rows ``dst``."""
        if len(dst):
            self._ensure(int(dst.max()) + 1)
        for name in _STATE_NAMES:
            getattr(self, name)[dst] = arrays[name][src]

    def warm_up_jit(self) -> None:
        """Compile (or load from cache) the kernel on a throw-away instance."""
        tmp = DetectorBank(self.params, capacity=1)
        tmp.update(np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.float64))


@dataclass(frozen=True, slots=True)
class DetectorRule:
    """Parameters for the sensors whose name matches ``sensors`` (a glob, e.g. ``vib*``)."""

    sensors: str
    params: DetectorParams


@dataclass(slots=True)
class _Group:
    params: DetectorParams
    bank: DetectorBank
    rows: list[int] = field(default_factory=list)  # global rows, in local-row order


class Detectors:
    """Every stream's detectors: each stream gets the parameters of the first rule
    whose pattern matches its sensor name, or the defaults.

    Streams are numbered by the :class:`StreamRegistry`; each parameter set keeps
    its own compact state (its own local rows).
    """

    def __init__(
        self,
        registry: StreamRegistry,
        default: DetectorParams | None = None,
        rules: Sequence[DetectorRule] = (),
    ) -> None:
        self.registry = registry
        self.rules = list(rules)
        params = [default or DetectorParams()] + [r.params for r in self.rules]
        self.groups = [_Group(p, DetectorBank(p, max_rows=registry.max_streams)) for p in params]
        self._group_of = np.zeros(0, np.int64)  # global row -> group
        self._local = np.zeros(0, np.int64)  # global row -> row in its group

    @property
    def default(self) -> DetectorParams:
        return self.groups[0].params

    def group_for(self, sensor: str) -> int:
        for i, rule in enumerate(self.rules):
            if fnmatch.fnmatchcase(sensor, rule.sensors):
                return i + 1
        return 0

    def params_for(self, row: int) -> DetectorParams:
        self._assign()
        return self.groups[int(self._group_of[row])].params

    def _assign(self) -> None:
        """Give every stream registered since the last call its group and local row."""
        n = len(self.registry)
        old = self._group_of.shape[0]
        if n == old:
            return
        group_of = np.empty(n, np.int64)
        local = np.empty(n, np.int64)
        group_of[:old] = self._group_of
        local[:old] = self._local
        for row in range(old, n):
            g = self.group_for(self.registry.keys[row][3])
            group_of[row] = g
            local[row] = len(self.groups[g].rows)
            self.groups[g].rows.append(row)
        self._group_of = group_of
        self._local = local

    def update(self, rows: IntArray, ts: IntArray, values: FloatArray) -> DetectResult:
        self._assign()
        if len(self.groups) == 1:
            return self.groups[0].bank.update(rows, ts, values)
        g = self._group_of[rows]
        out = DetectResult.empty(len(rows))
        for gi in np.unique(g).tolist():
            index = np.flatnonzero(g == gi)
            part = self.groups[gi].bank.update(self._local[rows[index]], ts[index], values[index])
            out.scatter(index, part)
        return out

    def silent(self, now_ms: float, last_ms: npt.NDArray[Any] | None = None) -> IntArray:
        """Global rows of the streams that are silent now (see :meth:`DetectorBank.silent`);
        ``last_ms`` is indexed by global row."""
        self._assign()
        found = []
        for grp in self.groups:
            if not grp.rows:
                continue
            rows = np.asarray(grp.rows, np.int64)
            last = None if last_ms is None else last_ms[rows]
            found.append(rows[grp.bank.silent(now_ms, len(rows), last)])
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def last_ts(self, row: int) -> int:
        """Newest timestamp (ms) the stream has sent."""
        self._assign()
        grp = self.groups[int(self._group_of[row])]
        return int(grp.bank.istate[int(self._local[row]), k.I_LAST_TS])

    def end_episode(self, row: int) -> tuple[int, int, float, int] | None:
        """End the stream's open episode now, as if ``hold`` quiet samples had passed:
        for a stream gone silent mid-episode. Returns (start, last hit, peak, detectors)
        of the episode, or None if none was open."""
        self._assign()
        bank = self.groups[int(self._group_of[row])].bank
        r = int(self._local[row])
        ist, fs = bank.istate, bank.fstate
        if not ist[r, k.I_ACTIVE]:
            return None
        ist[r, k.I_ACTIVE] = 0
        ist[r, k.I_HITS] = 0
        ist[r, k.I_QUIET] = bank.params.hold
        return (
            int(ist[r, k.I_EV_START]),
            int(ist[r, k.I_EV_LAST_HIT]),
            float(fs[r, k.F_EV_PEAK]),
            int(ist[r, k.I_EV_DETS]),
        )

    def warm_up_jit(self) -> None:
        self.groups[0].bank.warm_up_jit()

    # ---- snapshots -------------------------------------------------------------------
    def save(self, path: Path) -> int:
        """Write every stream's state to ``path`` atomically; returns the number of streams."""
        self._assign()
        arrays: dict[str, npt.NDArray[Any]] = {}
        for gi, grp in enumerate(self.groups):
            arrays[f"g{gi}_params"] = np.array(repr(asdict(grp.params)))
            arrays[f"g{gi}_keys"] = _keys_array([self.registry.keys[r] for r in grp.rows])
            for name, arr in grp.bank.state_arrays(len(grp.rows)).items():
                arrays[f"g{gi}_{name}"] = arr
        arrays["groups"] = np.array(len(self.groups))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)  # type: ignore[arg-type]
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(self.registry)

    def load(self, path: Path) -> int:
        """Restore the state saved by :meth:`save`; returns the number of streams restored.

        A stream is restored only into a group with exactly the same parameters
        it was saved with; streams whose parameters changed start afresh.
        """
        with np.load(path, allow_pickle=False) as data:
            saved = {name: data[name] for name in data.files}
        restored = 0
        for gi in range(int(saved["groups"])):
            params = str(saved[f"g{gi}_params"])
            keys: list[StreamKey] = [(a, b, c, d) for a, b, c, d in saved[f"g{gi}_keys"].tolist()]
            arrays = {name: saved[f"g{gi}_{name}"] for name in _STATE_NAMES}
            src: list[int] = []
            rows: list[int] = []
            for i, key in enumerate(keys):
                try:
                    row = self.registry.row(key)
                except StreamLimitError:
                    break
                src.append(i)
                rows.append(row)
            self._assign()
            by_group: dict[int, tuple[list[int], list[int]]] = {}
            for i, row in zip(src, rows, strict=True):
                g = int(self._group_of[row])
                if repr(asdict(self.groups[g].params)) != params:
                    continue
                s, d = by_group.setdefault(g, ([], []))
                s.append(i)
                d.append(int(self._local[row]))
            for g, (s, d) in by_group.items():
                self.groups[g].bank.load_rows(
                    arrays, np.asarray(s, np.int64), np.asarray(d, np.int64)
                )
                restored += len(s)
        return restored


def _keys_array(keys: list[StreamKey]) -> npt.NDArray[Any]:
    if not keys:
        return np.zeros((0, 4), dtype="U1")
    return np.array(keys, dtype=str)
