"""Publish a simulated :class:`~devices.simulator.fleet.Fleet` to an MQTT broker (contract v1).

One paho-mqtt client publishes for all devices: telemetry on
``<prefix>/<site>/<line>/<device>/telemetry`` in messages of up to ``batch`` samples,
and a retained birth/death message on ``.../status``. For accelerated runs, build the
fleet with ``start_ms`` about ``duration_s`` in the past, or the ingest service will
reject the timestamps as being in the future.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal
from uuid import uuid4

import numpy as np
import orjson
import paho.mqtt.client as mqtt

from devices.contract import status_topic, telemetry_topic
from devices.mqtt_url import make_client, parse_mqtt_url
from devices.simulator.fleet import Fleet, write_labels

BAD_KINDS: Final = (
    "not_json",
    "string_value",
    "nan_value",
    "bad_sensor_name",
    "ts_seconds",
    "unknown_field",
)
MAX_UNACKED: Final = 2000
ACK_TIMEOUT_S: Final = 60.0
CONNECT_TIMEOUT_S: Final = 10.0


class SimulatorConnectionError(ConnectionError):
    """The broker could not be reached or refused the connection."""


@dataclass(slots=True)
class SimStats:
    """What a run published. ``messages``/``samples``/``readings`` count good telemetry only."""

    messages: int = 0
    samples: int = 0
    readings: int = 0
    bad_messages: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    #: PUBACKs carrying an MQTT v5 failure reason (e.g. not authorised).
    broker_rejected: int = 0

    def snapshot(self) -> SimStats:
        return replace(self, bad_messages=dict(self.bad_messages), faults=dict(self.faults))


def encode_messages(samples: Sequence[dict[str, Any]], batch: int) -> list[bytes]:
    """Payloads: one object per sample if ``batch == 1``, else ``{"samples": [...]}`` chunks."""
    if batch == 1:
        return [orjson.dumps(s) for s in samples]
    return [
        orjson.dumps({"samples": samples[i : i + batch]}) for i in range(0, len(samples), batch)
    ]


def bad_payload(kind: str, sample: dict[str, Any]) -> bytes:
    """A malformed telemetry payload of ``kind`` (one of BAD_KINDS), made from a good sample."""
    ts, values = sample["ts"], sample["values"]
    name, value = next(iter(values.items()))
    if kind == "not_json":  # cut off mid-way, as by a broken transport
        return orjson.dumps(sample)[:-9]
    if kind == "string_value":
        return orjson.dumps({"ts": ts, "values": {**values, name: f"{value}"}})
    if kind == "nan_value":  # not valid JSON, but what some encoders emit
        return b'{"ts": %d, "values": {"%s": NaN}}' % (ts, name.encode())
    if kind == "bad_sensor_name":
        return orjson.dumps({"ts": ts, "values": {name.replace("_", " "): value}})
    if kind == "ts_seconds":
        return orjson.dumps({"ts": ts // 1000, "values": values})
    if kind == "unknown_field":
        return orjson.dumps({"ts": ts, "values": values, "unit": "metric"})
    raise ValueError(f"unknown bad message kind {kind!r}")


class _Acks:
    """Counts messages handed to paho and acknowledged by the broker."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.sent = 0
        self.acked = 0
        self.failed = 0

    def on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        with self.cond:
            self.acked += 1
            if getattr(reason, "is_failure", False):
                self.failed += 1
            self.cond.notify_all()

    def wait_below(self, limit: int) -> None:
        """Block until fewer than ``limit`` messages are unacknowledged."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.sent - self.acked < limit, ACK_TIMEOUT_S):
                raise TimeoutError(
                    f"{self.sent - self.acked} messages not acknowledged by the broker "
                    f"after {ACK_TIMEOUT_S:.0f} s"
                )


def _connect(mqtt_url: str, client_id: str, protocol: Literal["5", "3.1.1"] = "5") -> mqtt.Client:
    url = parse_mqtt_url(mqtt_url)
    client = make_client(url, client_id, protocol=protocol)
    done = threading.Event()
    result: list[Any] = []

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        result.append(reason)
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(url.host, url.port, keepalive=30)
    except OSError as exc:
        raise SimulatorConnectionError(f"cannot connect to {url.redacted()}: {exc}") from exc
    client.loop_start()
    if not done.wait(CONNECT_TIMEOUT_S) or result[0].is_failure:
        client.loop_stop()
        client.disconnect()
        reason = result[0] if result else f"no CONNACK within {CONNECT_TIMEOUT_S:.0f} s"
        raise SimulatorConnectionError(f"broker {url.redacted()} refused the connection: {reason}")
    return client


def run_fleet(
    mqtt_url: str,
    *,
    prefix: str = "factory",
    fleet: Fleet,
    duration_s: float,
    batch: int = 10,
    qos: int = 1,
    labels_path: str | None = None,
    stop: threading.Event | None = None,
    realtime: bool = True,
    client_id: str | None = None,
    bad_message_rate: float = 0.0,
    on_progress: Callable[[SimStats], None] | None = None,
    protocol: Literal["5", "3.1.1"] = "5",
) -> SimStats:
    """Publish ``duration_s`` seconds of ``fleet`` (from its ``start_ms``) and return the counts.

    In real time each device sends a message whenever ``batch`` samples are due; with
    ``realtime=False`` it publishes as fast as the broker acknowledges (at most
    MAX_UNACKED messages in flight). ``bad_message_rate`` adds that fraction of extra,
    malformed messages (see BAD_KINDS). Setting ``stop`` ends the run early; the
    offline status, the remaining acknowledgements and the label file are still handled.
    Raises SimulatorConnectionError if the broker cannot be reached, TimeoutError if
    it stops acknowledging.
    """
    if batch < 1 or qos not in (0, 1, 2) or not 0.0 <= bad_message_rate <= 1.0:
        raise ValueError("need batch >= 1, qos in 0..2 and 0 <= bad_message_rate <= 1")
    stop = stop or threading.Event()
    started = time.monotonic()
    stats = SimStats()
    bad_rng = np.random.default_rng([fleet.seed, 0xBAD])
    bad_counts: Counter[str] = Counter()
    acks = _Acks()
    client = _connect(mqtt_url, client_id or f"factory-sim-{uuid4().hex[:12]}", protocol)
    client.on_publish = acks.on_publish

    def publish(topic: str, payload: bytes, retain: bool = False) -> None:
        acks.wait_below(MAX_UNACKED)
        with acks.cond:
            acks.sent += 1
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise RuntimeError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")

    def set_status(state: str) -> None:
        now = int(time.time() * 1000)
        for ref in fleet.devices:
            topic = status_topic(prefix, ref.site, ref.line, ref.device)
            publish(topic, orjson.dumps({"state": state, "ts": now}), retain=True)

    def report() -> SimStats:
        stats.bad_messages = dict(bad_counts)
        stats.faults = dict(Counter(label.kind for label in fleet.labels))
        stats.elapsed_s = time.monotonic() - started
        stats.broker_rejected = acks.failed
        return stats.snapshot()

    try:
        set_status("online")
        end_ms = fleet.start_ms + round(duration_s * 1000)  # exclusive
        step = batch if realtime else batch * -(-50 // batch)
        last_report = time.monotonic()
        while not stop.is_set() and fleet.ts_of(fleet.next_index) < end_ms:
            target = min(fleet.ts_of(fleet.next_index + step - 1), end_ms - 1)
            if realtime and stop.wait(max(0.0, target / 1000 - time.time())):
                break
            for dev in fleet.tick(target):
                topic = telemetry_topic(prefix, dev.site, dev.line, dev.device)
                for payload in encode_messages(dev.samples, batch):
                    publish(topic, payload)
                    stats.messages += 1
                    if bad_message_rate and bad_rng.random() < bad_message_rate:
                        kind = BAD_KINDS[int(bad_rng.integers(len(BAD_KINDS)))]
                        publish(topic, bad_payload(kind, dev.samples[-1]))
                        bad_counts[kind] += 1
                stats.samples += len(dev.samples)
                stats.readings += sum(len(s["values"]) for s in dev.samples)
            if on_progress and time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                on_progress(report())
        set_status("offline")
        acks.wait_below(1)
    finally:
        client.disconnect()
        client.loop_stop()
    if labels_path:
        write_labels(labels_path, fleet.labels)
    final = report()
    if on_progress:
        on_progress(final)
    return final
