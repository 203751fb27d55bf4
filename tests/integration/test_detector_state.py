"""A restart of ``ingest run`` keeps each stream's detector state (real Mosquitto and InfluxDB)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.contract import telemetry_topic
from ingest.config import ProcessingSettings
from ingest.processing.detectors import DetectorBank
from ingest.sinks.lineprotocol import STAT_DIGITS
from tests.dbhelpers import INFLUX_URL, influx_count, influx_rows
from tests.integration.conftest import IngestProcess, wait_for

pytestmark = pytest.mark.services

SITE, LINE, DEVICE, SENSOR = "plant1", "line1", "press7", "spindle_temp"


def _publish(prefix: str, ts: np.ndarray, values: np.ndarray) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    topic = telemetry_topic(prefix, SITE, LINE, DEVICE)
    for start in range(0, len(ts), 50):
        samples = [
            {"ts": int(t), "values": {SENSOR: float(v)}}
            for t, v in zip(ts[start : start + 50], values[start : start + 50], strict=True)
        ]
        client.publish(topic, json.dumps({"samples": samples}), qos=1).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


def _signal(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    ts = int(time.time() * 1000) - 600_000 + np.arange(n, dtype=np.int64) * 1000
    values = 60.0 + rng.normal(0.0, 0.5, n)
    values[n - 5] += 8.0  # a +16 sigma spike after the restart
    return ts, values


def _stored(db: str) -> dict[int, dict[str, object]]:
    rows = influx_rows(INFLUX_URL, db, "SELECT value, mean, score, anomaly FROM telemetry")
    return {int(r["time"]): r for r in rows}


@pytest.mark.parametrize("keep_state", [True, False], ids=["state-file", "no-state-file"])
def test_restart_keeps_detector_state(
    keep_state: bool,
    ingest_env: dict[str, str],
    influx_db: str,
    start_ingest: Callable[..., IngestProcess],
    tmp_path: Path,
) -> None:
    state = tmp_path / "state" / "detectors.npz"
    env = {
        **ingest_env,
        "INGEST_INFLUX_URL": INFLUX_URL,
        "INGEST_INFLUX_DATABASE": influx_db,
        "INGEST_PROCESSING_STATE_FILE": str(state) if keep_state else "",
    }
    prefix = env["INGEST_TOPIC_PREFIX"]
    n, cut = 400, 380
    ts, values = _signal(n)

    first = start_ingest(env)
    _publish(prefix, ts[:cut], values[:cut])
    assert wait_for(lambda: influx_count(INFLUX_URL, influx_db, "telemetry") >= cut, 30), (
        first.log()
    )
    assert first.stop() == 0
    assert state.exists() == keep_state

    second = start_ingest(env)
    _publish(prefix, ts[cut:], values[cut:])
    assert wait_for(lambda: influx_count(INFLUX_URL, influx_db, "telemetry") >= n, 30), second.log()
    assert second.stop() == 0

    # What one uninterrupted process computes over the whole signal.
    bank = DetectorBank(ProcessingSettings().params())
    whole = bank.update(np.zeros(n, np.int64), ts, values)
    stored = _stored(influx_db)
    after = [stored[int(t)] for t in ts[cut:]]
    got_mean = np.array([r["mean"] for r in after], dtype=float)
    got_score = np.array([r["score"] for r in after], dtype=float)
    got_flag = np.array([r["anomaly"] for r in after], dtype=bool)
    if keep_state:
        # The restarted process carries on exactly where the first one stopped (the
        # statistics are written with STAT_DIGITS significant digits).
        rtol = 10.0 ** (1 - STAT_DIGITS)
        np.testing.assert_allclose(got_mean, whole.mean[cut:], rtol=rtol)
        np.testing.assert_allclose(got_score, whole.score[cut:], rtol=rtol)
        np.testing.assert_array_equal(got_flag, whole.anomaly[cut:])
        assert got_flag[n - 5 - cut], "the spike after the restart is flagged"
        # ... and opened an episode in anomaly_events, stamped with the spike's time.
        events = influx_rows(
            INFLUX_URL, influx_db, "SELECT * FROM anomaly_events WHERE \"kind\" = 'anomaly'"
        )
        opened = [e for e in events if e["time"] == int(ts[n - 5])]
        assert len(opened) == 1, events
        assert opened[0]["status"] == "open" and opened[0]["open"] is True
        assert opened[0]["sensor"] == SENSOR and opened[0]["device"] == DEVICE
        assert "zscore" in str(opened[0]["detectors"]).split(",")
        assert opened[0]["peak_score"] > 0.5
    else:
        # Without the state file the stream starts cold: still warming up, nothing flagged.
        assert not got_flag.any()
        assert not np.allclose(got_score, whole.score[cut:])
