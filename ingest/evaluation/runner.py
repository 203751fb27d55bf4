"""Replay series through the live detectors: ``ingest backtest`` and ``ingest evaluate``.

Every replay builds the same :class:`~ingest.processing.detectors.Detectors` the
service builds from the same settings, and feeds it the samples in file order,
so what a backtest shows is what ``ingest run`` would have flagged.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ingest.config import ProcessingSettings
from ingest.evaluation import nab, skab
from ingest.evaluation.csvio import read_series_csv, write_backtest_csv
from ingest.processing import kernels as k
from ingest.processing.detectors import Detectors, DetectResult, StreamRegistry

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Stream key of a replayed column: site, line and device name the file.
SOURCE = "backtest"


def replay(
    ts_ms: IntArray, columns: Mapping[str, FloatArray], settings: ProcessingSettings
) -> dict[str, DetectResult]:
    """Run the configured detectors over a table, row by row, every column a stream
    named after it (so ``[[processing.rules]]`` match on column names)."""
    registry = StreamRegistry(max(len(columns), 1))
    detectors = Detectors(registry, settings.params(), settings.detector_rules())
    names = list(columns)
    n = len(ts_ms)
    if not names or n == 0:
        return {name: DetectResult.empty(0) for name in names}
    rows = np.array([registry.row((SOURCE, SOURCE, SOURCE, c)) for c in names], np.int64)
    m = len(names)
    out = detectors.update(
        np.tile(rows, n),
        np.repeat(np.asarray(ts_ms, np.int64), m),
        np.stack([np.asarray(columns[c], np.float64) for c in names], axis=1).ravel(),
    )
    result = {}
    for j, name in enumerate(names):
        part = DetectResult.empty(n)
        for field in part.__slots__:
            getattr(part, field)[:] = getattr(out, field)[j::m]
        result[name] = part
    return result


def backtest(input_csv: Path, output_csv: Path, settings: ProcessingSettings) -> dict[str, int]:
    """Replay a CSV file; write ``timestamp,value,score,anomaly`` per row (per sensor if
    there are several columns). Returns the anomalous rows per column."""
    table = read_series_csv(input_csv)
    results = replay(table.ts_ms, table.columns, settings)
    write_backtest_csv(
        output_csv,
        table.ts_ms,
        {
            name: {"value": table.columns[name], "score": r.score, "anomaly": r.anomaly}
            for name, r in results.items()
        },
        raw_ts=table.raw_ts,
    )
    return {name: int(r.anomaly.sum()) for name, r in results.items()}


def episode_onsets(result: DetectResult) -> FloatArray:
    """One score per row: each episode's score on the row that opened it, 0 elsewhere.

    This is what the service raises (an ``anomaly_events`` point per episode), and
    what the NAB submission holds: NAB counts every alarming row, so a detector
    that keeps an episode open would be charged for each of its rows.
    """
    return np.where(result.event == k.EVENT_OPENED, result.ev_peak, 0.0)


@dataclass(frozen=True, slots=True)
class NabReport:
    results: dict[str, nab.NabResult]
    files: int
    rows: int
    seconds: float


def _warm_up(settings: ProcessingSettings) -> None:
    """Compile (or load) the kernels first, so the timings below leave compilation out."""
    replay(np.zeros(2, np.int64), {"x": np.zeros(2)}, settings)


def evaluate_nab(root: Path, settings: ProcessingSettings) -> NabReport:
    files = nab.load_corpus(root)
    _warm_up(settings)
    t0 = time.perf_counter()
    scores = {
        f.name: episode_onsets(replay(f.ts_ms, {"value": f.values}, settings)["value"])
        for f in files
    }
    seconds = time.perf_counter() - t0
    return NabReport(
        nab.score_corpus(files, scores), len(files), sum(len(f) for f in files), seconds
    )


@dataclass(frozen=True, slots=True)
class SkabReport:
    outlier: skab.OutlierResult
    changepoint: dict[str, skab.CpResult]
    files: int
    rows: int
    seconds: float


def skab_predictions(f: skab.SkabFile, settings: ProcessingSettings) -> FloatArray:
    """A row is anomalous while any of its sensors is in an episode."""
    results = replay(f.ts_ms, f.columns, settings)
    flag = np.zeros(len(f.ts_ms), dtype=bool)
    for r in results.values():
        flag |= r.anomaly
    return flag.astype(np.float64)


def evaluate_skab(root: Path, settings: ProcessingSettings) -> SkabReport:
    files = skab.load_corpus(root)
    _warm_up(settings)
    t0 = time.perf_counter()
    preds = {f.name: skab_predictions(f, settings) for f in files}
    seconds = time.perf_counter() - t0
    return SkabReport(
        skab.outlier_metrics(files, preds),
        skab.changepoint_scores(files, preds),
        len(files),
        sum(len(f.ts_ms) for f in files),
        seconds,
    )


def format_nab(report: NabReport) -> str:
    lines = [
        f"NAB: {report.files} files, {report.rows} rows, detectors "
        f"{report.rows / max(report.seconds, 1e-9) / 1e6:.2f} M rows/s",
        "",
        "| profile | score | threshold | detected windows | missed windows | false alarms |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report.results.items():
        lines.append(f"| {name} | {r.score:.1f} | {r.threshold:.4f} | {r.tp} | {r.fn} | {r.fp} |")
    return "\n".join(lines)


def format_skab(report: SkabReport) -> str:
    o = report.outlier
    lines = [
        f"SKAB: {report.files} files, {report.rows} rows (test rows from row "
        f"{skab.TRAIN_ROWS} of each file)",
        "",
        "Outlier detection",
        "",
        "| F1 | FAR, % | MAR, % | TP | FP | FN | TN |",
        "|---|---|---|---|---|---|---|",
        f"| {o.f1:.2f} | {o.far:.2f} | {o.mar:.2f} | {o.tp} | {o.fp} | {o.fn} | {o.tn} |",
        "",
        "Changepoint detection (NAB-style)",
        "",
        "| profile | score | missed CPs | false alarms |",
        "|---|---|---|---|",
    ]
    for name, r in report.changepoint.items():
        lines.append(f"| {name} | {r.score:.2f} | {r.missed} | {r.fp} |")
    return "\n".join(lines)
