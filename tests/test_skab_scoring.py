"""SKAB scorers: outlier metrics and the NAB-style changepoint metric."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ingest.evaluation import skab
from ingest.evaluation.skab import SkabFile

SKAB_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "skab"
STD = skab.CP_PROFILES["Standard"]
T0 = 1583748873000  # 2020-03-09 10:14:33


def _file(ts_s: list[int], cp_rows: list[int], anomaly_rows: list[int] | None = None) -> SkabFile:
    n = len(ts_s)
    cp = np.zeros(n, dtype=bool)
    cp[cp_rows] = True
    an = np.zeros(n, dtype=bool)
    an[anomaly_rows or []] = True
    return SkabFile(
        name="x/0.csv",
        ts_ms=T0 + np.asarray(ts_s, dtype=np.int64) * 1000,
        columns={c: np.zeros(n) for c in skab.SENSOR_COLUMNS},
        anomaly=an,
        changepoint=cp,
    )


# --- rules, hand-computed -----------------------------------------------------------------


@pytest.mark.parametrize(
    "r,weight",
    [
        (0.0, 1.0),
        (0.1, 0.959),
        (0.25, 0.842),
        (0.5, 0.444),
        (0.75, 0.047),
        (0.9, -0.070),
        (1.0, -0.11),
    ],
)
def test_tp_weight_values_from_readme(r: float, weight: float) -> None:
    assert skab.tp_weight(r, STD) == pytest.approx(weight, abs=5e-4)


def test_tp_weight_ends_are_the_profile_weights() -> None:
    for prof in skab.CP_PROFILES.values():
        assert skab.tp_weight(0.0, prof) == pytest.approx(prof.tp)
        assert skab.tp_weight(1.0, prof) == pytest.approx(prof.fp)
        assert skab.tp_weight(0.9995, prof) == skab.tp_weight(1.0, prof)  # j capped at 999


def test_cp_windows_cut_rule() -> None:
    starts, ends = skab.cp_windows(np.array([0, 30_000, 200_000, 250_000, 255_000]))
    assert starts.tolist() == [0, 60_000, 200_000, 260_000, 310_000]
    assert ends.tolist() == [60_000, 90_000, 260_000, 310_000, 315_000]


def test_changepoint_flags_from_predictions() -> None:
    p = np.array([1.0, 1.0, 0.0, np.nan, 1.0, 1.0, 0.0])
    c = skab.changepoint_flags(p)
    np.testing.assert_array_equal(c, [1.0, 0.0, 1.0, np.nan, np.nan, 0.0, 1.0])


N = 600  # 400 training rows, then 200 test rows 1 s apart
TS = list(range(N))


def _cp_scores(f: SkabFile, det_rows: list[int]) -> dict[str, skab.CpResult]:
    c = np.zeros(len(f))
    c[det_rows] = 1.0
    return skab.changepoint_scores([f], {f.name: c}, flags=True)


def test_detection_position_and_later_detections() -> None:
    f = _file(TS, [450])  # window [450 s, 510 s]
    res = _cp_scores(f, [456])["Standard"]  # r = 0.1
    assert res.raw == pytest.approx(skab.tp_weight(0.1, STD))
    assert (res.tp, res.missed, res.fp) == (1, 0, 0)
    assert res.mean_delay_s == 6.0
    # later detections in the same window count for nothing
    assert _cp_scores(f, [456, 470, 510])["Standard"].raw == res.raw
    # the window's end is included, one row later is outside
    assert _cp_scores(f, [510])["Standard"].raw == pytest.approx(-0.11)
    out = _cp_scores(f, [511])["Standard"]
    assert (out.tp, out.missed, out.fp) == (0, 1, 1)
    assert out.raw == pytest.approx(-1.0 - 0.11)


def test_fp_weight_is_constant_and_training_rows_ignored() -> None:
    f = _file(TS, [450])
    res = _cp_scores(f, [420, 449, 599, 300, 10])
    assert res["Standard"].fp == 3
    assert res["Standard"].raw == pytest.approx(-1.0 - 3 * 0.11)
    assert res["LowFP"].raw == pytest.approx(-1.0 - 3 * 0.22)
    assert res["LowFN"].raw == pytest.approx(-2.0 - 3 * 0.11)


def test_cut_window_and_shared_boundary() -> None:
    f = _file(TS, [450, 480])  # windows [450, 510] and [510, 540]
    both = _cp_scores(f, [510])["Standard"]
    assert (both.tp, both.missed, both.fp) == (2, 0, 0)
    assert both.raw == pytest.approx(-0.11 + 1.0)
    exact = _cp_scores(f, [450, 480])["Standard"]  # 480 falls in the first window
    assert (exact.tp, exact.missed, exact.fp) == (1, 1, 0)
    assert exact.score == pytest.approx(100 * (0.0 + 2) / 4)


def test_window_measured_in_wall_clock_time() -> None:
    ts = list(range(450)) + [450 + 10 * k for k in range(150)]  # 10-s steps after row 450
    f = _file(ts, [450])  # window [450 s, 510 s] = rows 450..456
    assert _cp_scores(f, [456])["Standard"].tp == 1
    assert _cp_scores(f, [457])["Standard"].fp == 1


def test_outlier_predictions_become_cp_flags() -> None:
    f = _file(TS, [450, 520], anomaly_rows=list(range(450, 520)))
    p = f.anomaly.astype(np.float64)
    res = skab.changepoint_scores([f], {f.name: p})["Standard"]
    assert (res.tp, res.missed, res.fp) == (2, 0, 0)
    assert res.score == 100.0
    # prediction already on at the first test row: a detection there (an FP here)
    p[400:420] = 1.0
    assert skab.changepoint_scores([f], {f.name: p})["Standard"].fp == 2


def test_outlier_metrics_counts_and_nan() -> None:
    f = _file(TS, [450], anomaly_rows=list(range(450, 500)))
    p = np.zeros(N)
    p[440:470] = 1.0  # 10 FP, 20 TP, 30 FN
    p[590:] = np.nan  # 10 TN rows left out
    p[:400] = 1.0  # training rows are ignored
    res = skab.outlier_metrics([f], {f.name: p})
    assert (res.tp, res.fp, res.fn, res.tn) == (20, 10, 30, 200 - 50 - 10 - 10)
    assert res.f1 == pytest.approx(40 / 80)
    assert res.far == pytest.approx(100 * 10 / 140)
    assert res.mar == pytest.approx(60.0)
    # test-row-only predictions give the same result
    assert skab.outlier_metrics([f], {f.name: p[400:]}) == res


def test_prediction_shape_is_checked() -> None:
    f = _file(TS, [450])
    with pytest.raises(ValueError, match="expected 600"):
        skab.outlier_metrics([f], {f.name: np.zeros(599)})
    with pytest.raises(KeyError):
        skab.changepoint_scores([f], {})


def test_no_windows_gives_nan_score() -> None:
    f = _file(TS, [])
    res = _cp_scores(f, [450])["Standard"]
    assert math.isnan(res.score)
    assert res.fp == 1


# --- shared SKAB data ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> list[SkabFile]:
    if not SKAB_ROOT.is_dir():
        pytest.skip(f"SKAB data not found at {SKAB_ROOT} (expected ../shared/datasets/skab)")
    return skab.load_corpus(SKAB_ROOT)


def test_corpus_layout(corpus: list[SkabFile]) -> None:
    assert len(corpus) == 34
    assert "anomaly-free/anomaly-free.csv" not in {f.name for f in corpus}
    assert corpus[0].name == "valve1/0.csv"
    assert sum(len(f) for f in corpus) == 37_401
    assert sum(int(f.anomaly.sum()) for f in corpus) == 13_067
    assert sum(int(f.changepoint.sum()) for f in corpus) == 129
    assert sum(len(f) - skab.TRAIN_ROWS for f in corpus) == 23_801
    first = corpus[0]
    assert list(first.columns) == list(skab.SENSOR_COLUMNS)
    assert first.ts_ms[0] == T0
    assert np.flatnonzero(first.changepoint).tolist() == [573, 630, 917, 974]
    for f in corpus:
        assert np.all(np.diff(f.ts_ms) > 0)


def test_perfect_outlier_predictions(corpus: list[SkabFile]) -> None:
    res = skab.outlier_metrics(corpus, {f.name: f.anomaly for f in corpus})
    assert (res.f1, res.far, res.mar) == (1.0, 0.0, 0.0)
    assert (res.tp, res.fp, res.fn, res.tn) == (12_771, 0, 0, 23_801 - 12_771)


def test_null_predictions(corpus: list[SkabFile]) -> None:
    zeros = {f.name: np.zeros(len(f)) for f in corpus}
    res = skab.outlier_metrics(corpus, zeros)
    assert (res.f1, res.far, res.mar) == (0.0, 0.0, 100.0)
    for r in skab.changepoint_scores(corpus, zeros).values():
        assert r.score == 0.0
        assert (r.tp, r.missed, r.fp) == (0, 127, 0)


def test_exact_changepoints_score_92_91(corpus: list[SkabFile]) -> None:
    flags = {f.name: f.changepoint.astype(np.float64) for f in corpus}
    res = skab.changepoint_scores(corpus, flags, flags=True)
    std = res["Standard"]
    assert round(std.score, 2) == 92.91
    assert (std.missed, std.fp, std.tp) == (9, 0, 118)
    assert (std.null, std.perfect) == (-127.0, 127.0)
    assert res["LowFN"].null == -254.0
