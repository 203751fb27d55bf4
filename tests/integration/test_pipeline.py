"""The whole path on real services: simulator -> Mosquitto -> ``ingest run`` -> InfluxDB / VM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.simulator import Fleet, run_fleet
from ingest.config import ProcessingSettings
from tests.dbhelpers import INFLUX_URL, influx_count, influx_rows, vm_count_points, vm_export
from tests.integration.conftest import REPO, IngestProcess, wait_for
from tests.naive import detect_naive

pytestmark = pytest.mark.services


def _fleet(devices: int, seconds: float, **kw: Any) -> Fleet:
    # Signal that ends a little before now, so no timestamp is in the future.
    kw.setdefault("start_ms", int(time.time() * 1000) - int(seconds * 1000) - 5_000)
    return Fleet(devices, rate_hz=10.0, **kw)


def _reference_flags(fleet: Fleet, seconds: float) -> set[tuple[str, str, int]]:
    """(device, sensor, ts) that tests/naive.py flags with the parameters the service runs
    with: the ``[processing]`` defaults (the test sets none, and there are no rules)."""
    settings = ProcessingSettings()
    assert not settings.detector_rules()
    keys: dict[tuple[str, str], int] = {}
    rows, ts, values = [], [], []
    for batch in fleet.generate(seconds):
        for sample in batch.samples:
            for sensor, value in sample["values"].items():
                rows.append(keys.setdefault((batch.device, sensor), len(keys)))
                ts.append(sample["ts"])
                values.append(value)
    out = detect_naive(
        np.array(rows, np.int64),
        np.array(ts, np.int64),
        np.array(values, np.float64),
        settings.params(),
    )
    names = {row: key for key, row in keys.items()}
    return {(*names[r], t) for r, t, a in zip(rows, ts, out["anomaly"], strict=True) if a}


def test_simulated_fleet_lands_exactly_in_influxdb(
    ingest_env: dict[str, str], influx_db: str, start_ingest: Callable[..., IngestProcess]
) -> None:
    env = {**ingest_env, "INGEST_INFLUX_URL": INFLUX_URL, "INGEST_INFLUX_DATABASE": influx_db}
    ingest = start_ingest(env)
    prefix = env["INGEST_TOPIC_PREFIX"]
    fleet = _fleet(6, 120, seed=7, fault_rate=1.0, faults=("spike",))
    t0 = time.monotonic()
    stats = run_fleet(
        "mqtt://127.0.0.1:1883",
        prefix=prefix,
        fleet=fleet,
        duration_s=120,
        batch=20,
        realtime=False,
    )
    assert stats.readings > 0
    assert wait_for(
        lambda: influx_count(INFLUX_URL, influx_db, "telemetry") >= stats.readings, 60
    ), f"{influx_count(INFLUX_URL, influx_db, 'telemetry')} of {stats.readings}\n{ingest.log()}"
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    assert influx_count(INFLUX_URL, influx_db, "telemetry") == stats.readings

    flagged = {
        (r["device"], r["sensor"], r["time"])
        for r in influx_rows(
            INFLUX_URL,
            influx_db,
            'SELECT value FROM telemetry WHERE anomaly = true GROUP BY "device", "sensor"',
        )
    }
    # The flags in the database are exactly those of the slow reference detector run
    # over the same (deterministic) signal: nothing lost, reordered or mis-keyed on the way.
    expected = _reference_flags(
        _fleet(6, 120, seed=7, fault_rate=1.0, faults=("spike",), start_ms=fleet.start_ms), 120
    )
    assert flagged == expected
    spikes = [lab for lab in fleet.labels if lab.kind == "spike"]
    found = [lab for lab in spikes if (lab.device, lab.sensor, lab.start_ms) in flagged]
    print(
        f"\n{stats.readings} readings in {elapsed:.1f} s; {len(flagged)} flagged; "
        f"spikes flagged {len(found)}/{len(spikes)}"
    )
    assert spikes and found

    # Birth and offline messages became device_status points.
    status = influx_rows(
        INFLUX_URL, influx_db, 'SELECT online FROM device_status GROUP BY "device"'
    )
    assert {r["device"] for r in status} == {d.device for d in fleet.devices}
    assert ingest.stop() == 0


def test_v2_write_path_lands_in_victoriametrics(
    ingest_env: dict[str, str],
    victoria: str,
    start_ingest: Callable[..., IngestProcess],
    unique: str,
) -> None:
    env = {
        **ingest_env,
        "INGEST_INFLUX_URL": victoria,
        "INGEST_INFLUX_API": "v2",
        "INGEST_INFLUX_BUCKET": "factory",
        "INGEST_INFLUX_ORG": "plant",
        "INGEST_INFLUX_TOKEN": "not-checked-by-victoriametrics",
    }
    ingest = start_ingest(env)
    site = f"vm{unique}"
    fleet = _fleet(3, 60, seed=3, site=site, fault_rate=0.0)
    stats = run_fleet(
        "mqtt://127.0.0.1:1883",
        prefix=env["INGEST_TOPIC_PREFIX"],
        fleet=fleet,
        duration_s=60,
        batch=50,
        realtime=False,
    )
    match = f'{{__name__="telemetry_value",site="{site}"}}'
    assert wait_for(lambda: vm_count_points(victoria, match) >= stats.readings, 60), ingest.log()
    time.sleep(0.5)
    assert vm_count_points(victoria, match) == stats.readings
    series = vm_export(victoria, f'{{__name__="telemetry_score",site="{site}"}}')
    assert {s["metric"]["sensor"] for s in series} == {
        "spindle_temp",
        "vibration_rms",
        "motor_current",
        "coolant_pressure",
    }
    assert ingest.stop() == 0


def test_sigterm_flushes_and_exits_zero(
    ingest_env: dict[str, str], influx_db: str, start_ingest: Callable[..., IngestProcess]
) -> None:
    # A long flush interval: the points are still pending when SIGTERM arrives.
    env = {
        **ingest_env,
        "INGEST_INFLUX_URL": INFLUX_URL,
        "INGEST_INFLUX_DATABASE": influx_db,
        "INGEST_INFLUX_FLUSH_INTERVAL": "30",
        "INGEST_INFLUX_FLUSH_WHEN_IDLE": "false",
        "INGEST_INFLUX_BATCH_SIZE": "100000",
    }
    ingest = start_ingest(env)
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    now = int(time.time() * 1000)
    topic = f"{env['INGEST_TOPIC_PREFIX']}/s1/l1/d1/telemetry"
    payload = json.dumps(
        {"samples": [{"ts": now - 1000 + i, "values": {"a": float(i)}} for i in range(500)]}
    )
    client.publish(topic, payload, qos=1).wait_for_publish(10)
    assert wait_for(lambda: ingest.metrics()["ingest_readings_accepted_total"] == 500, 10)
    assert influx_count(INFLUX_URL, influx_db, "telemetry") == 0
    t0 = time.monotonic()
    assert ingest.stop(signal.SIGTERM) == 0
    took = time.monotonic() - t0
    assert influx_count(INFLUX_URL, influx_db, "telemetry") == 500
    print(f"\nSIGTERM to exit with 500 pending points written: {took:.2f} s")
    client.loop_stop()


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"INGEST_INFLUX_API": "v3"}, "influx.api"),
        ({"INGEST_MQTT_URL": "mqtt://127.0.0.1:notaport"}, "port"),
        ({"INGEST_PROCESSING_WINDOW": "1"}, "processing.window"),
    ],
)
def test_wrong_setting_fails_with_one_line(env: dict[str, str], words: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ingest", "run"],
        env={**env, "PATH": "/usr/bin"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ingest: error:") and words in lines[0], lines
