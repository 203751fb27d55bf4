"""A write the database partly refuses: only the refused points are dead-lettered."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import paho.mqtt.client as paho
import pytest
import urllib3
from paho.mqtt.enums import CallbackAPIVersion

from tests.dbhelpers import INFLUX_URL, influx_count, influx_rows
from tests.integration.conftest import IngestProcess, wait_for

pytestmark = pytest.mark.services


def test_type_conflict_isolates_only_the_conflicting_points(
    ingest_env: dict[str, str],
    influx_db: str,
    start_ingest: Callable[..., IngestProcess],
    unique: str,
) -> None:
    now = int(time.time() * 1000)
    # Another writer made `seq` a float field of `telemetry` in this shard: every point
    # of ours that carries an integer seq now conflicts; points without seq do not.
    resp = urllib3.request(
        "POST",
        f"{INFLUX_URL}/write?db={influx_db}&precision=ms",
        body=f"telemetry,device=other,line=x,sensor=y,site=z value=1.0,seq=1.5 {now - 60_000}",
    )
    assert resp.status == 204

    env = {**ingest_env, "INGEST_INFLUX_URL": INFLUX_URL, "INGEST_INFLUX_DATABASE": influx_db}
    ingest = start_ingest(env)
    prefix = env["INGEST_TOPIC_PREFIX"]
    dead: list[dict[str, object]] = []
    watcher = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dlq-{unique}")
    watcher.on_message = lambda c, u, m: dead.append(json.loads(m.payload))
    watcher.connect("127.0.0.1", 1883)
    watcher.subscribe(f"{prefix}/_rejected/#", qos=1)
    watcher.loop_start()
    time.sleep(0.3)

    samples = []
    for i in range(400):
        sample: dict[str, object] = {"ts": now - 30_000 + i, "values": {"a": float(i)}}
        if i % 10 == 3:
            sample["seq"] = i  # conflicts
        samples.append(sample)
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    topic = f"{prefix}/s1/l1/d1/telemetry"
    for k in range(0, 400, 100):
        client.publish(
            topic, json.dumps({"samples": samples[k : k + 100]}), qos=1
        ).wait_for_publish(10)

    conflicting = {s["ts"] for s in samples if "seq" in s}
    where = "\"device\" = 'd1'"
    assert wait_for(lambda: len(dead) >= len(conflicting), 30), (len(dead), ingest.log())
    assert wait_for(
        lambda: (
            influx_count(INFLUX_URL, influx_db, "telemetry", where=where) >= 400 - len(conflicting)
        ),
        10,
    )
    time.sleep(0.5)
    stored = {
        r["time"]
        for r in influx_rows(INFLUX_URL, influx_db, f"SELECT value FROM telemetry WHERE {where}")
    }
    assert stored == {s["ts"] for s in samples} - conflicting
    assert len(dead) == len(conflicting)
    assert all(d["reason"] == "write_refused" for d in dead)
    assert all("field type conflict" in str(d["detail"]) for d in dead)
    refused_ts = {int(str(d["payload"]).rsplit(" ", 1)[1]) for d in dead}
    assert refused_ts == conflicting
    metrics = ingest.metrics()
    assert metrics["ingest_lines_dead_lettered_total"] == len(conflicting)
    # Every telemetry point stored, plus the anomaly_events points (a ramp is a drift).
    assert (
        metrics["ingest_points_written_total"] == len(stored) + metrics["ingest_event_points_total"]
    )
    assert ingest.running and ingest.healthy()
    print(f"\n{len(conflicting)} conflicting points dead-lettered, {len(stored)} written")
    watcher.loop_stop()
    client.loop_stop()
    assert ingest.stop() == 0
