"""SKAB corpus loading and scoring, following ``shared/datasets/skab/README.md``.

Predictions are per file: one value per row of the file (the first 400 rows are
ignored) or one per test row. Values are 0/1 (any non-zero value is an alarm) and
NaN means "no prediction".

Choices where the README leaves room:

- CP flags from predictions use a plain difference, so a flag next to a NaN
  prediction is NaN and ignored (as ``pandas.Series.diff`` would give).
- The TP weight's bucket ``j = floor(1000 r)`` is computed exactly in integer
  milliseconds, not from a rounded float ``r``.
- Scores are not rounded; round to 2 decimals for display as the README does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.evaluation.csvio import read_series_csv

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

SENSOR_COLUMNS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)
TRAIN_ROWS = 400
WINDOW_MS = 60_000
FOLDERS = ("valve1", "valve2", "other")


@dataclass(frozen=True, slots=True)
class CpProfile:
    """Signed weights (A_TP, A_FP, A_FN) of a SKAB changepoint profile."""

    name: str
    tp: float
    fp: float
    fn: float


CP_PROFILES: dict[str, CpProfile] = {
    "Standard": CpProfile("Standard", 1.0, -0.11, -1.0),
    "LowFP": CpProfile("LowFP", 1.0, -0.22, -1.0),
    "LowFN": CpProfile("LowFN", 1.0, -0.11, -2.0),
}


@dataclass(frozen=True, eq=False, slots=True)
class SkabFile:
    """One labelled experiment: timestamps, the 8 sensor columns and both label columns."""

    name: str
    ts_ms: IntArray
    columns: dict[str, FloatArray]
    anomaly: BoolArray
    changepoint: BoolArray

    def __len__(self) -> int:
        return len(self.ts_ms)


@dataclass(frozen=True, slots=True)
class OutlierResult:
    """Point-wise metrics over all test rows; FAR and MAR in percent (NaN if undefined)."""

    f1: float
    far: float
    mar: float
    tp: int
    fp: int
    fn: int
    tn: int


@dataclass(frozen=True, slots=True)
class CpResult:
    """NAB-style changepoint score of one profile, aggregated over files."""

    profile: str
    score: float
    raw: float
    null: float
    perfect: float
    tp: int  # windows with a detection
    missed: int  # windows without one
    fp: int  # detections outside all windows
    mean_delay_s: float  # detection minus window start, over TP windows (NaN if none)


def _sort_key(path: Path, root: Path) -> tuple[int, int, str]:
    folder = path.parent.name
    rank = FOLDERS.index(folder) if folder in FOLDERS else len(FOLDERS)
    return (rank, int(path.stem) if path.stem.isdigit() else -1, path.relative_to(root).as_posix())


def load_corpus(root: Path) -> list[SkabFile]:
    """The labelled files under ``root`` (``anomaly-free`` skipped), valve1, valve2, other."""
    paths = [p for p in root.glob("*/*.csv") if p.parent.name != "anomaly-free"]
    files: list[SkabFile] = []
    for path in sorted(paths, key=lambda p: _sort_key(p, root)):
        name = path.relative_to(root).as_posix()
        table = read_series_csv(path)
        missing = [c for c in (*SENSOR_COLUMNS, "anomaly", "changepoint") if c not in table.columns]
        if missing:
            raise ValueError(f"{name}: missing columns {missing}")
        files.append(
            SkabFile(
                name=name,
                ts_ms=table.ts_ms,
                columns={c: table.columns[c] for c in SENSOR_COLUMNS},
                anomaly=table.columns["anomaly"] != 0,
                changepoint=table.columns["changepoint"] != 0,
            )
        )
    return files


def _test_predictions(f: SkabFile, predictions: Mapping[str, npt.NDArray[Any]]) -> FloatArray:
    """The test-row part of a file's predictions as 0.0/1.0/NaN."""
    if f.name not in predictions:
        raise KeyError(f"no predictions for {f.name}")
    p = np.asarray(predictions[f.name], dtype=np.float64)
    n_test = max(len(f) - TRAIN_ROWS, 0)
    if p.shape == (len(f),):
        p = p[TRAIN_ROWS:]
    elif p.shape != (n_test,):
        raise ValueError(
            f"{f.name}: {p.shape} predictions; expected {len(f)} (all rows) or {n_test} (test rows)"
        )
    return np.where(np.isnan(p), np.nan, (p != 0).astype(np.float64))


def outlier_metrics(
    files: list[SkabFile], predictions: Mapping[str, npt.NDArray[Any]]
) -> OutlierResult:
    """F1, FAR and MAR micro-averaged over the test rows of all files; NaN rows are skipped."""
    tp = fp = fn = tn = 0
    for f in files:
        p = _test_predictions(f, predictions)
        truth = f.anomaly[TRAIN_ROWS:]
        have = ~np.isnan(p)
        pred = p[have] != 0
        true = truth[have]
        tp += int(np.sum(pred & true))
        fp += int(np.sum(pred & ~true))
        fn += int(np.sum(~pred & true))
        tn += int(np.sum(~pred & ~true))
    return OutlierResult(
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        far=100.0 * _ratio(fp, fp + tn),
        mar=100.0 * _ratio(fn, fn + tp),
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
    )


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


def changepoint_flags(p: FloatArray) -> FloatArray:
    """CP flags ``|p_t - p_(t-1)|`` with ``c = p`` at the first row (NaN where undefined)."""
    if len(p) == 0:
        return p.copy()
    return np.concatenate((p[:1], np.abs(np.diff(p))))


def cp_windows(cp_ts: IntArray) -> tuple[IntArray, IntArray]:
    """Window starts and ends for changepoint times (sorted), with the cut rule applied."""
    starts = cp_ts.astype(np.int64).copy()
    ends = starts + WINDOW_MS
    for k in range(1, len(starts)):
        starts[k] = max(ends[k - 1], starts[k])
    return starts, ends


def tp_weight(r: float, profile: CpProfile) -> float:
    """Weight of a TP detected at relative position ``r`` in [0, 1] of its window."""
    return _tp_weight_bucket(min(math.floor(1000.0 * r), 999), profile)


def _tp_weight_bucket(j: int, profile: CpProfile) -> float:
    x = -math.pi / 2 + j * math.pi / 999
    shape = (1.0 - math.tanh(x) / math.tanh(math.pi / 2)) / 2.0
    return profile.fp + (profile.tp - profile.fp) * shape


@dataclass(frozen=True, slots=True)
class _FileCp:
    buckets: list[int]  # j of every TP window
    delays_ms: list[int]
    missed: int
    fp: int
    windows: int


def _file_cp(f: SkabFile, flags: FloatArray) -> _FileCp:
    t = f.ts_ms[TRAIN_ROWS:]
    detections = t[(flags != 0) & ~np.isnan(flags)]
    detections = np.sort(detections)
    starts, ends = cp_windows(t[f.changepoint[TRAIN_ROWS:]])
    buckets: list[int] = []
    delays: list[int] = []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        i = int(np.searchsorted(detections, s, side="left"))
        if i < len(detections) and detections[i] <= e:
            d = int(detections[i])
            span = e - s  # 0 only if two changepoints share a timestamp
            buckets.append(min((1000 * (d - s)) // span, 999) if span else 0)
            delays.append(d - s)
    k = np.searchsorted(starts, detections, side="right") - 1
    inside = (k >= 0) & (detections <= ends[np.maximum(k, 0)]) if len(starts) else k >= 0
    return _FileCp(
        buckets=buckets,
        delays_ms=delays,
        missed=len(starts) - len(buckets),
        fp=int(np.sum(~inside)),
        windows=len(starts),
    )


def changepoint_scores(
    files: list[SkabFile],
    predictions: Mapping[str, npt.NDArray[Any]],
    *,
    flags: bool = False,
    profiles: Mapping[str, CpProfile] | None = None,
) -> dict[str, CpResult]:
    """NAB-style changepoint scores per profile.

    ``predictions`` are outlier predictions p_t, turned into CP flags by
    ``changepoint_flags``; with ``flags=True`` they are CP flags already.
    """
    per_file: list[_FileCp] = []
    for f in files:
        p = _test_predictions(f, predictions)
        per_file.append(_file_cp(f, p if flags else changepoint_flags(p)))
    delays = [d for fc in per_file for d in fc.delays_ms]
    mean_delay = sum(delays) / len(delays) / 1000.0 if delays else math.nan
    results: dict[str, CpResult] = {}
    for name, prof in (profiles or CP_PROFILES).items():
        raw = null = perfect = 0.0
        for fc in per_file:
            raw += math.fsum(_tp_weight_bucket(j, prof) for j in fc.buckets)
            raw += prof.fp * fc.fp + prof.fn * fc.missed
            null += prof.fn * fc.windows
            perfect += prof.tp * fc.windows
        span = perfect - null
        results[name] = CpResult(
            profile=name,
            score=100.0 * (raw - null) / span if span else math.nan,
            raw=raw,
            null=null,
            perfect=perfect,
            tp=sum(len(fc.buckets) for fc in per_file),
            missed=sum(fc.missed for fc in per_file),
            fp=sum(fc.fp for fc in per_file),
            mean_delay_s=mean_delay,
        )
    return results
