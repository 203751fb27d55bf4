"""``ingest backtest`` and ``ingest evaluate``: replays through the live detectors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from ingest.cli import main
from ingest.config import ProcessingSettings, load_settings
from ingest.evaluation import nab, runner, skab
from ingest.processing.detectors import DetectorBank

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"


def _series(n: int = 600, spike: int = 450) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    ts = 1_700_000_000_000 + np.arange(n, dtype=np.int64) * 60_000
    values = 20.0 + np.sin(np.arange(n) / 30.0) + rng.normal(0, 0.2, n)
    values[spike] += 6.0
    return ts, values


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_backtest_writes_what_the_live_kernels_compute(tmp_path: Path) -> None:
    ts, values = _series()
    src = tmp_path / "history.csv"
    with src.open("w") as fh:
        fh.write("timestamp,value\n")
        for t, v in zip(ts, values, strict=True):
            stamp = np.datetime64(int(t), "ms").astype("datetime64[s]").astype(str)
            fh.write(f"{stamp.replace('T', ' ')},{float(v)!r}\n")
    out = tmp_path / "scored.csv"
    assert main(["backtest", str(src), "--out", str(out)]) == 0

    rows = _read(out)
    assert list(rows[0]) == ["timestamp", "value", "score", "anomaly"]
    assert len(rows) == len(ts)
    # Timestamps come back in the input's own form.
    assert rows[0]["timestamp"] == "2023-11-14 22:13:20"
    live = DetectorBank(ProcessingSettings().params()).update(
        np.zeros(len(ts), np.int64), ts, values
    )
    got_score = np.array([float(r["score"]) if r["score"] else np.nan for r in rows])
    np.testing.assert_array_equal(got_score, live.score)
    got_flag = np.array([r["anomaly"] == "1" for r in rows])
    np.testing.assert_array_equal(got_flag, live.anomaly)
    assert got_flag[450], "the spike is flagged"


def test_backtest_several_sensors_and_per_sensor_rules(tmp_path: Path) -> None:
    ts, values = _series()
    src = tmp_path / "export.csv"
    with src.open("w") as fh:
        fh.write("time;bearing_temp;motor_current\n")
        for t, v in zip(ts, values, strict=True):
            fh.write(f"{t};{float(v)!r};{float(v) * 2.0!r}\n")
    config = tmp_path / "ingest.toml"
    # Current is allowed far larger excursions: no detector fires on it.
    config.write_text(
        "[processing]\n"
        'detectors = ["zscore", "ewma"]\n'
        "[[processing.rules]]\n"
        'sensors = "motor_*"\n'
        "zscore_threshold = 1000.0\n"
        "ewma_threshold = 1000.0\n"
    )
    out = tmp_path / "scored.csv"
    assert main(["backtest", str(src), "--out", str(out), "--config", str(config)]) == 0
    rows = _read(out)
    assert list(rows[0]) == ["timestamp", "sensor", "value", "score", "anomaly"]
    flagged = {(r["sensor"], int(r["timestamp"])) for r in rows if r["anomaly"] == "1"}
    assert ("bearing_temp", int(ts[450])) in flagged
    assert not any(sensor == "motor_current" for sensor, _ in flagged)


def test_backtest_reports_a_bad_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "bad.csv"
    src.write_text("timestamp,value\n2024-01-01 00:00:00,1.5\n2024-01-01 00:01:00,oops\n")
    assert main(["backtest", str(src), "--out", str(tmp_path / "o.csv")]) == 1
    err = capsys.readouterr().err
    assert "line 3" in err and "oops" in err


def test_rules_come_from_the_config_file_only(tmp_path: Path) -> None:
    config = tmp_path / "ingest.toml"
    config.write_text('[[processing.rules]]\nsensors = "vib*"\nmad_window = 2\n')
    with pytest.raises(ValueError, match="rule 1: mad_window"):
        load_settings(config, environ={})
    with pytest.raises(ValueError, match="only be set in the config file"):
        load_settings(None, environ={"INGEST_PROCESSING_RULES": "x"})
    env = {"INGEST_PROCESSING_DETECTORS": "zscore, cusum"}
    assert load_settings(None, environ=env).processing.params().detectors == ("zscore", "cusum")
    with pytest.raises(ValueError, match="unknown detector 'magic'"):
        load_settings(None, environ={"INGEST_PROCESSING_DETECTORS": "magic"})


needs_nab = pytest.mark.skipif(
    not (SHARED / "nab" / "labels").is_dir(), reason="../shared/datasets/nab is not here"
)
needs_skab = pytest.mark.skipif(
    not (SHARED / "skab" / "valve1").is_dir(), reason="../shared/datasets/skab is not here"
)


@needs_nab
def test_evaluate_nab_prints_the_three_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "nab", str(SHARED / "nab")]) == 0
    text = capsys.readouterr().out
    report = runner.evaluate_nab(SHARED / "nab", ProcessingSettings())
    for name, r in report.results.items():
        assert f"| {name} | {r.score:.1f} |" in text
        # Better than the null detector (0), worse than a perfect one (100).
        assert 0 < r.score < 100
        assert r.tp + r.fn == 55
    # Episode onsets only: a file's alarms are a small fraction of its rows.
    files = nab.load_corpus(SHARED / "nab")
    onsets = runner.episode_onsets(
        runner.replay(files[0].ts_ms, {"value": files[0].values}, ProcessingSettings())["value"]
    )
    assert np.count_nonzero(onsets) < len(files[0]) // 20


@needs_skab
def test_evaluate_skab_prints_both_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "skab", str(SHARED / "skab")]) == 0
    text = capsys.readouterr().out
    fitted = ProcessingSettings(learn_limit=skab.TRAIN_ROWS)
    report = runner.evaluate_skab(SHARED / "skab", fitted)
    o = report.outlier
    assert f"| {o.f1:.2f} | {o.far:.2f} | {o.mar:.2f} |" in text
    assert o.tp + o.fn == 12771  # the README's count of anomalous test rows
    for name in ("Standard", "LowFP", "LowFN"):
        assert f"| {name} | {report.changepoint[name].score:.2f} |" in text
