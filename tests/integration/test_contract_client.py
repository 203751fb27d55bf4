"""A client written only from the documented contract (docs/contract.md), not the project's code.

It publishes 20 machines x 3 sensors x 1,000 samples through the real Mosquitto,
half as single-sample messages and half as batches, with +15 sigma spikes and
malformed messages mixed in, to a real ``ingest run`` writing to the real InfluxDB.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.dbhelpers import INFLUX_URL, influx_count, influx_rows, influx_v1_query
from tests.integration.conftest import IngestProcess, wait_for

pytestmark = pytest.mark.services

MACHINES, SENSORS, SAMPLES = 20, ("spindle_temp", "vibration_rms", "motor_current"), 1000
SIGMA = {"spindle_temp": 0.4, "vibration_rms": 0.05, "motor_current": 1.5}
LEVEL = {"spindle_temp": 68.0, "vibration_rms": 0.9, "motor_current": 22.0}
STEP_MS = 100


def make_signals(
    rng: random.Random,
) -> tuple[dict[str, list[dict[str, object]]], set[tuple[str, str, int]]]:
    """1,000 samples of 3 sensors per machine, and the (machine, sensor, ts) of the spikes."""
    start = int(time.time() * 1000) - SAMPLES * STEP_MS - 60_000
    machines: dict[str, list[dict[str, object]]] = {}
    spikes: set[tuple[str, str, int]] = set()
    for m in range(MACHINES):
        name = f"m{m:02d}"
        spike_at = {s: set(rng.sample(range(40, SAMPLES), 8)) for s in SENSORS}
        samples = []
        for i in range(SAMPLES):
            ts = start + i * STEP_MS
            values = {}
            for s in SENSORS:
                v = rng.gauss(LEVEL[s], SIGMA[s])
                if i in spike_at[s]:
                    v += 15 * SIGMA[s]
                    spikes.add((name, s, ts))
                values[s] = round(v, 6)
            samples.append({"ts": ts, "seq": i, "values": values})
        machines[name] = samples
    return machines, spikes


MALFORMED: list[tuple[str, bytes]] = [
    ("{site}/lineA/bad machine/telemetry", b'{"values": {"spindle_temp": 1.0}}'),
    ("{site}/lineA/bad,machine/telemetry", b'{"values": {"spindle_temp": 1.0}}'),
    ("{site}/lineA/m00/extra/telemetry", b'{"values": {"spindle_temp": 1.0}}'),
    ("{site}/lineA/m00/telemetry", b'{"values": {"bad sensor": 1.0}}'),
    ("{site}/lineA/m00/telemetry", b'{"values": {"bad=sensor": 1.0}}'),
    ("{site}/lineA/m00/telemetry", b'{"values": {"bad\\nsensor": 1.0}}'),
    ("{site}/lineA/m00/telemetry", b'{"values": {"spindle_temp": "hot"}}'),
    ("{site}/lineA/m00/telemetry", b'{"values": {"spindle_temp": NaN}}'),
    ("{site}/lineA/m00/telemetry", b'{"values": {"spindle_temp": true}}'),
    ("{site}/lineA/m00/telemetry", b"definitely not json"),
    ("{site}/lineA/m00/telemetry", b"\xff\xfe\x00garbage"),
    ("{site}/lineA/m00/telemetry", b"[]"),
    ("{site}/lineA/m00/telemetry", b'{"samples": []}'),
    ("{site}/lineA/m00/telemetry", b'{"ts": 1732600000, "values": {"spindle_temp": 1.0}}'),
    ("{site}/lineA/m00/telemetry", b'{"ts": 99999999999999, "values": {"spindle_temp": 1.0}}'),
    ("{site}/lineA/m00/telemetry", b'{"samples": [{"ts": 1, "values": {"x y": 1}}]}'),
]


def test_contract_client_end_to_end(
    ingest_env: dict[str, str],
    influx_db: str,
    start_ingest: Callable[..., IngestProcess],
    unique: str,
) -> None:
    prefix = ingest_env["INGEST_TOPIC_PREFIX"]
    env = {**ingest_env, "INGEST_INFLUX_URL": INFLUX_URL, "INGEST_INFLUX_DATABASE": influx_db}
    ingest = start_ingest(env)

    rng = random.Random(20241126)
    machines, spikes = make_signals(rng)
    site = f"site{unique}"

    rejected: list[dict[str, object]] = []
    watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dlq-{unique}")
    watcher.on_message = lambda c, u, m: rejected.append(json.loads(m.payload))
    watcher.connect("127.0.0.1", 1883)
    watcher.subscribe(f"{prefix}/_rejected/#", qos=1)
    watcher.loop_start()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"contract-{unique}")
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    infos = []
    bad_sent = 0
    t0 = time.monotonic()
    for index, (name, samples) in enumerate(machines.items()):
        topic = f"{prefix}/{site}/lineA/{name}/telemetry"
        if index % 2 == 0:  # one message per sample
            messages = [json.dumps(s).encode() for s in samples]
        else:  # batches of 50 samples
            messages = [
                json.dumps({"samples": samples[i : i + 50]}).encode() for i in range(0, SAMPLES, 50)
            ]
        for j, payload in enumerate(messages):
            infos.append(client.publish(topic, payload, qos=1))
            if j % 97 == 0:
                bad_topic, bad_payload = MALFORMED[bad_sent % len(MALFORMED)]
                infos.append(
                    client.publish(f"{prefix}/" + bad_topic.format(site=site), bad_payload, qos=1)
                )
                bad_sent += 1
    for info in infos:
        info.wait_for_publish(30)
    publish_s = time.monotonic() - t0

    expected = MACHINES * SAMPLES * len(SENSORS)
    where = f"\"site\" = '{site}'"
    landed = wait_for(
        lambda: influx_count(INFLUX_URL, influx_db, "telemetry", where=where) >= expected, 120, 0.5
    )
    ingest_s = time.monotonic() - t0
    time.sleep(1.0)  # anything extra (duplicates, junk) would have landed by now
    count = influx_count(INFLUX_URL, influx_db, "telemetry", where=where)
    assert landed and count == expected, (
        f"{count} of {expected} readings in InfluxDB\n{ingest.log()}"
    )

    flagged_spikes = 0
    normal_flagged = normal = 0
    for name in machines:
        rows = influx_rows(
            INFLUX_URL,
            influx_db,
            f"SELECT value, anomaly, score FROM telemetry WHERE \"device\" = '{name}' "
            f'AND {where} GROUP BY "sensor"',
        )
        assert len(rows) == SAMPLES * len(SENSORS)
        for row in rows:
            assert 0.0 <= (row["score"] if row["score"] is not None else 0.0) < 1.0
            if (name, row["sensor"], row["time"]) in spikes:
                flagged_spikes += bool(row["anomaly"])
            else:
                normal += 1
                normal_flagged += bool(row["anomaly"])
    print(
        f"\npublished {expected} readings + {bad_sent} malformed messages in {publish_s:.1f} s; "
        f"all in InfluxDB after {ingest_s:.1f} s; spikes flagged {flagged_spikes}/{len(spikes)}; "
        f"normal flagged {normal_flagged}/{normal} ({normal_flagged / normal:.3%})"
    )
    assert flagged_spikes == len(spikes)
    assert normal_flagged / normal < 0.01

    # Only the valid identifiers made series.
    for tag, allowed in (
        ("device", set(machines)),
        ("sensor", set(SENSORS)),
        ("site", {site}),
        ("line", {"lineA"}),
    ):
        series = influx_v1_query(INFLUX_URL, influx_db, f'SHOW TAG VALUES WITH KEY = "{tag}"')
        values = {v[1] for s in series for v in s.get("values", [])}
        assert values == allowed, (tag, values - allowed)

    # Every malformed message was dead-lettered with a reason, and ingest is still running.
    assert wait_for(lambda: len(rejected) >= bad_sent, 20), (len(rejected), bad_sent)
    assert all(r["reason"] and r["detail"] for r in rejected)
    assert ingest.running
    assert ingest.healthy()
    metrics = ingest.metrics()
    assert metrics["ingest_rejected_total_total"] == bad_sent
    # The telemetry points, plus one anomaly_events point per episode opened or closed.
    assert metrics["ingest_points_written_total"] == expected + metrics["ingest_event_points_total"]
    assert metrics["ingest_event_points_total"] >= metrics["ingest_anomaly_episodes_total"] > 0
    watcher.loop_stop()
    client.loop_stop()
    assert math.isfinite(publish_s)
    assert ingest.stop() == 0
