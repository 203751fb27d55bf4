"""Unit tests of the fleet simulator (no broker), plus one publish test against Mosquitto."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from devices.contract import (
    IDENTIFIER_RE,
    MIN_TS_MS,
    TELEMETRY_ADAPTER,
    Batch,
    Sample,
    Status,
    parse_topic,
    telemetry_topic,
)
from devices.mqtt_url import make_client, parse_mqtt_url
from devices.simulator import (
    BAD_KINDS,
    FAULT_KINDS,
    SENSORS,
    DeviceBatch,
    FaultLabel,
    Fleet,
    bad_payload,
    encode_messages,
    read_labels,
    run_fleet,
    write_labels,
)

T0 = 1_700_000_000_000
Table = dict[str, dict[int, dict[str, float]]]  # device -> ts -> values


def table(batches: list[DeviceBatch]) -> Table:
    out: Table = defaultdict(dict)
    for b in batches:
        for s in b.samples:
            out[b.device][s["ts"]] = s["values"]
    return out


def as_tuples(batches: list[DeviceBatch]) -> list[tuple[str, str, str, list[dict[str, Any]]]]:
    return [(b.site, b.line, b.device, b.samples) for b in batches]


@pytest.fixture(scope="module")
def faulty() -> tuple[Fleet, Table, Table]:
    """Ten minutes of 4 devices with many faults, and the same fleet without faults."""
    fleet = Fleet(4, seed=7, fault_rate=3.0, start_ms=T0)
    clean = Fleet(4, seed=7, fault_rate=0.0, start_ms=T0)
    return fleet, table(fleet.generate(600)), table(clean.generate(600))


def test_deterministic_for_a_seed() -> None:
    a, b, c = (Fleet(6, seed=s, start_ms=T0) for s in (3, 3, 4))
    first = as_tuples(a.generate(300))
    assert first == as_tuples(b.generate(300))
    assert a.labels == b.labels and a.labels
    assert first != as_tuples(c.generate(300))


def test_devices_lines_and_contract() -> None:
    fleet = Fleet(10, seed=1, start_ms=T0, devices_per_line=4)
    batches = fleet.generate(120)
    assert [b.device for b in batches] == [f"cnc-{i:03d}" for i in range(1, 11)]
    assert Counter(b.line for b in batches) == {"line1": 4, "line2": 4, "line3": 2}
    samples = 0
    for b in batches:
        assert all(IDENTIFIER_RE.match(x) for x in (b.site, b.line, b.device))
        assert parse_topic("factory", telemetry_topic("factory", b.site, b.line, b.device))
        for s in b.samples:
            sample = Sample.model_validate(s)
            assert sample.ts_ms == s["ts"] and set(sample.values) <= set(SENSORS)
        Batch.model_validate({"samples": b.samples})
        for size in (1, 7):
            for payload in encode_messages(b.samples, size):
                parsed = TELEMETRY_ADAPTER.validate_json(payload)
                assert isinstance(parsed, Sample if size == 1 else Batch)
        samples += len(b.samples)
    assert samples == fleet.samples_emitted == 10 * 1200
    assert fleet.readings_emitted == sum(len(s["values"]) for b in batches for s in b.samples)


@pytest.mark.parametrize("rate_hz", [10.0, 3.0, 1.0])
def test_timestamps_and_seq(rate_hz: float) -> None:
    fleet = Fleet(3, rate_hz=rate_hz, seed=2, start_ms=T0, fault_rate=0.0)
    for b in fleet.generate(200):
        ts = np.array([s["ts"] for s in b.samples])
        seq = np.array([s["seq"] for s in b.samples])
        assert (seq == np.arange(len(seq))).all()
        assert (ts == T0 + np.rint(seq * 1000 / rate_hz)).all()
        assert (np.diff(ts) > 0).all() and ts[-1] < T0 + 200_000 <= ts[-1] + 1000 / rate_hz
        if rate_hz == 10.0:
            assert (np.diff(ts) == 100).all()


def test_signal_ranges() -> None:
    fleet = Fleet(8, seed=5, fault_rate=0.0, start_ms=T0)
    values = np.array([list(s["values"].values()) for b in fleet.generate(1200) for s in b.samples])
    lo, hi = np.percentile(values, 1, axis=0), np.percentile(values, 99, axis=0)
    expected = {
        "spindle_temp": (57, 77),
        "vibration_rms": (0.3, 2.0),
        "motor_current": (3, 20),
        "coolant_pressure": (3.8, 6),
    }
    for i, name in enumerate(SENSORS):
        assert expected[name][0] <= lo[i] < hi[i] <= expected[name][1], name
    assert (values[:, 1] > 0).all()
    current = values[:, 2]  # load cycles: clearly separated idle and cutting levels
    assert (current < 6).mean() > 0.1 and (current > 9).mean() > 0.4


def test_fault_schedule(faulty: tuple[Fleet, Table, Table]) -> None:
    fleet, _, _ = faulty
    kinds = Counter(label.kind for label in fleet.labels)
    assert set(kinds) == set(FAULT_KINDS) and min(kinds.values()) >= 5
    period = 100
    by_stream: dict[tuple[str, str], list[FaultLabel]] = defaultdict(list)
    for label in fleet.labels:
        by_stream[label.device, label.sensor].append(label)
        assert label.start_ms >= T0 + fleet.warmup * period
        assert label.end_ms >= label.start_ms
        size = abs(label.magnitude)
        bounds = {"spike": (8, 20), "level_shift": (4, 8), "drift": (6, 10), "noise_burst": (5, 10)}
        low, high = bounds.get(label.kind, (0, 0))
        assert low <= size <= high, label
        if label.kind == "spike":
            assert label.end_ms - label.start_ms in (0, period)
    for labels in by_stream.values():
        for before, after in itertools.pairwise(labels):
            assert before.end_ms < after.start_ms
    assert [(x.start_ms, x.device) for x in fleet.labels] == sorted(
        (x.start_ms, x.device) for x in fleet.labels
    )
    # about fault_rate faults per stream per minute
    assert 0.6 * 3.0 < len(fleet.labels) / (4 * 4 * 10) < 1.2 * 3.0


def test_faults_are_where_the_labels_say(faulty: tuple[Fleet, Table, Table]) -> None:
    fleet, data, clean = faulty
    for d, ref in enumerate(fleet.devices):
        assert set(data[ref.device]) <= set(clean[ref.device])
        for s, sensor in enumerate(SENSORS):
            sigma = float(fleet.sigma[d, s])
            ts = np.array(sorted(clean[ref.device]))
            got = np.array([data[ref.device].get(t, {}).get(sensor, np.nan) for t in ts])
            ref_values = np.array([clean[ref.device][t][sensor] for t in ts])
            in_fault = np.zeros(len(ts), dtype=bool)
            for label in fleet.labels:
                if (label.device, label.sensor) != (ref.device, sensor):
                    continue
                w = (ts >= label.start_ms) & (ts <= label.end_ms)
                in_fault |= w
                x, y, m = got[w], ref_values[w], label.magnitude
                if label.kind == "level_shift":
                    np.testing.assert_allclose(x - y, m * sigma, atol=2e-4)
                elif label.kind == "drift":
                    length = (label.end_ms - label.start_ms) // 100 + 1  # may outlast the data
                    ramp = m * sigma * np.arange(1, len(x) + 1) / length
                    np.testing.assert_allclose(x - y, ramp, atol=2e-4)
                elif label.kind == "stuck":
                    assert len(x) >= 3 and (x == got[np.argmax(w) - 1]).all()
                elif label.kind == "noise_burst":
                    assert np.std(x - y) > 2 * sigma and len(x) >= 30
                elif label.kind == "dropout":
                    assert np.isnan(x).all()
                    assert all(sensor not in data[ref.device].get(t, {}) for t in ts[w])
                elif label.kind == "spike":
                    i, j = np.flatnonzero(w)[[0, -1]]
                    neighbours = (got[i - 1] + got[j + 1]) / 2
                    deviation = np.abs(x - neighbours)
                    assert (deviation >= (abs(m) - 0.01) * sigma).all() and abs(m) >= 8
            # outside the labelled windows the stream is untouched
            assert (got[~in_fault] == ref_values[~in_fault]).all()


def test_only_selected_kinds_and_no_faults() -> None:
    spikes = Fleet(3, seed=1, faults=("spike", "stuck"), fault_rate=2.0, start_ms=T0)
    spikes.generate(300)
    assert {label.kind for label in spikes.labels} == {"spike", "stuck"}
    for quiet in (Fleet(3, seed=1, fault_rate=0.0), Fleet(3, seed=1, faults=())):
        quiet.generate(300)
        assert quiet.labels == []
    with pytest.raises(ValueError, match="unknown fault kinds"):
        Fleet(faults=("explosion",))


def test_labels_round_trip(faulty: tuple[Fleet, Table, Table], tmp_path: Any) -> None:
    path = tmp_path / "labels.csv"
    write_labels(path, faulty[0].labels)
    assert path.read_text().splitlines()[0] == (
        "site,line,device,sensor,kind,start_ms,end_ms,magnitude"
    )
    assert read_labels(path) == faulty[0].labels


def test_tick_in_pieces_equals_generate() -> None:
    whole = Fleet(5, seed=11, fault_rate=2.0, start_ms=T0)
    expected = as_tuples(whole.generate(400))
    pieces = Fleet(5, seed=11, fault_rate=2.0, start_ms=T0)
    rng = np.random.default_rng(0)
    got: dict[str, list[dict[str, Any]]] = defaultdict(list)
    now = T0 - 500
    assert pieces.tick(now) == []
    while now < T0 + 400_000 - 1:
        now = min(now + int(rng.choice([0, 1, 37, 99, 100, 250, 6_000, 70_000])), T0 + 399_999)
        for b in pieces.tick(now):
            assert all(s["ts"] <= now for s in b.samples)
            got[b.device] += b.samples
    assert [(site, line, dev, got[dev]) for site, line, dev, _ in expected] == expected
    assert pieces.labels == whole.labels
    assert pieces.readings_emitted == whole.readings_emitted
    assert pieces.generate(400) == []


def is_valid(payload: bytes) -> bool:
    """Contract v1 check as the ingest service does it: models plus the default limits."""
    try:
        parsed = TELEMETRY_ADAPTER.validate_json(payload)
    except ValidationError:
        return False
    samples = parsed.samples if isinstance(parsed, Batch) else [parsed]
    return all((s.ts_ms or MIN_TS_MS) >= MIN_TS_MS for s in samples)


def test_bad_payloads_are_rejected() -> None:
    sample = Fleet(1, seed=0, start_ms=T0).generate(1)[0].samples[0]
    assert is_valid(encode_messages([sample], 1)[0])
    for kind in BAD_KINDS:
        assert not is_valid(bad_payload(kind, sample)), kind


@pytest.mark.services
def test_publish_to_mosquitto() -> None:
    try:
        socket.create_connection(("127.0.0.1", 1883), timeout=2).close()
    except OSError:
        if os.environ.get("CI") == "true":
            pytest.fail("MQTT broker not reachable on 127.0.0.1:1883")
        pytest.skip("MQTT broker not reachable on 127.0.0.1:1883")

    prefix = f"test-sim-{uuid.uuid4().hex}"
    url = "mqtt://127.0.0.1:1883"
    counts: Counter[str] = Counter()
    status: dict[str, list[str]] = defaultdict(list)
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        with lock:
            if msg.topic.endswith("/status"):
                if msg.payload:  # not our own clean-up of the retained message
                    status[msg.topic].append(Status.model_validate_json(msg.payload).state)
                return
            if not is_valid(msg.payload):
                counts["bad"] += 1
                return
            parsed = TELEMETRY_ADAPTER.validate_json(msg.payload)
            counts["messages"] += 1
            samples = parsed.samples if isinstance(parsed, Batch) else [parsed]
            counts["samples"] += len(samples)
            counts["readings"] += sum(len(s.values) for s in samples)

    sub = make_client(parse_mqtt_url(url), f"{prefix}-sub")
    sub.on_message = on_message
    sub.on_subscribe = lambda *args: subscribed.set()
    sub.connect("127.0.0.1", 1883)
    sub.loop_start()
    try:
        sub.subscribe(f"{prefix}/#", qos=1)
        assert subscribed.wait(5)
        duration = 30.0
        fleet = Fleet(2, seed=3, fault_rate=1.0, start_ms=int(time.time() * 1000) - 30_000)
        stats = run_fleet(
            url,
            prefix=prefix,
            fleet=fleet,
            duration_s=duration,
            batch=7,
            realtime=False,
            bad_message_rate=0.3,
        )
        assert stats.samples == 2 * 300 == fleet.samples_emitted
        assert stats.messages == 2 * 43 and sum(stats.bad_messages.values()) > 0
        expected = {
            "messages": stats.messages,
            "samples": stats.samples,
            "readings": stats.readings,
            "bad": sum(stats.bad_messages.values()),
        }
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and counts != expected:
            time.sleep(0.05)
        assert counts == expected
        assert stats.faults == dict(Counter(label.kind for label in fleet.labels))
        assert len(status) == 2 and all(s == ["online", "offline"] for s in status.values())
    finally:
        for topic in status:  # clear the retained status messages
            sub.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        sub.disconnect()
        sub.loop_stop()
