"""The typical Python MQTT -> InfluxDB consumer, kept as the end-to-end benchmark's baseline.

This is what a developer usually writes first, and what ``ingest`` is measured against:
a paho-mqtt callback, ``json.loads``, one ``influxdb_client.Point`` per reading, and a
synchronous write of the accumulated points from inside the callback once there are
``--batch-size`` of them (or once the oldest unwritten point is 1 s old). No validation,
no spooling, no retries: a failed write is counted, logged and its batch dropped. It is
deliberately left unoptimised; do not make it clever, or the comparison means nothing.

    .venv/bin/python bench/naive.py --mqtt-port 1883 --client-id naive \\
        --api v1 --url http://127.0.0.1:8086 --database bench \\
        --expect-readings 100000 --report naive.json

The MQTT session is persistent (clean session false, the given client id, QoS 1), so a
burst queued by the broker before the start is delivered on connect. ``--api v1`` posts
the points' line protocol to ``{url}/write?db=...&precision=ms`` with urllib3 (InfluxDB
1.x has no ``/api/v2/write``); ``--api v2`` uses ``InfluxDBClient.write_api(SYNCHRONOUS)``.

The run ends when ``--expect-readings`` readings have been written (or dropped by a
failed write), or when no message arrived for ``--idle-timeout`` seconds; what is left
is written first. The JSON report (``--report``) holds ``t_first`` (epoch s of the first
message), ``t_done`` (epoch s when the last write returned), ``readings_written``,
``cpu_seconds`` (process CPU time from the first message to ``t_done``), ``max_rss_mb``
and ``errors`` (failed writes).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import paho.mqtt.client as mqtt
import urllib3
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from procstat import peak_rss_mb

FLUSH_INTERVAL_S = 1.0


class NaiveConsumer:
    """Callback -> json.loads -> Point per reading -> synchronous batched write."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.points: list[Point] = []
        self.first_unwritten = 0.0
        self.lock = threading.Lock()  # the MQTT thread and the 1 s timer both write
        self.done = threading.Event()

        self.t_first: float | None = None
        self.cpu_first = 0.0
        self.t_done: float | None = None
        self.cpu_done = 0.0
        self.last_message = time.monotonic()
        self.readings_written = 0
        self.readings_dropped = 0
        self.errors = 0

        if args.api == "v2":
            self.influx = InfluxDBClient(
                url=args.url, token=args.token, org=args.org, enable_gzip=args.gzip
            )
            self.write_api = self.influx.write_api(write_options=SYNCHRONOUS)
        else:
            self.http = urllib3.PoolManager()
            query = urlencode({"db": args.database, "precision": "ms"})
            self.write_url = f"{args.url.rstrip('/')}/write?{query}"

    # ------------------------------------------------------------------ MQTT

    def on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            print(f"MQTT connect failed: {reason_code}", file=sys.stderr)
            return
        client.subscribe(self.args.topic, qos=1)

    def on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.t_first is None:
            self.t_first = time.time()
            self.cpu_first = time.process_time()
        self.last_message = time.monotonic()

        _, site, line, device, _ = msg.topic.split("/")
        data = json.loads(msg.payload)
        samples = data.get("samples", [data])
        with self.lock:
            if not self.points:
                self.first_unwritten = time.monotonic()
            for sample in samples:
                for sensor, value in sample["values"].items():
                    point = (
                        Point("telemetry")
                        .tag("site", site)
                        .tag("line", line)
                        .tag("device", device)
                        .tag("sensor", sensor)
                        .field("value", float(value))
                        .time(sample["ts"], WritePrecision.MS)
                    )
                    self.points.append(point)
            if len(self.points) >= self.args.batch_size:
                self.flush()

    # ----------------------------------------------------------------- write

    def flush(self) -> None:
        """Write the pending points (the caller holds the lock)."""
        if not self.points:
            return
        points, self.points = self.points, []
        try:
            if self.args.api == "v2":
                self.write_api.write(
                    bucket=self.args.bucket, record=points, write_precision=WritePrecision.MS
                )
            else:
                self.write_v1(points)
            self.readings_written += len(points)
        except Exception as exc:
            self.errors += 1
            self.readings_dropped += len(points)
            print(f"write of {len(points)} points failed: {exc}", file=sys.stderr)
        self.t_done = time.time()
        self.cpu_done = time.process_time()
        if self.readings_written + self.readings_dropped >= self.args.expect_readings:
            self.done.set()

    def write_v1(self, points: list[Point]) -> None:
        body = "\n".join(p.to_line_protocol() for p in points).encode()
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if self.args.gzip:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        resp = self.http.request("POST", self.write_url, body=body, headers=headers)
        if resp.status != 204:
            raise RuntimeError(f"HTTP {resp.status}: {resp.data[:200]!r}")

    def create_database(self) -> None:
        """CREATE DATABASE for the v1 API (idempotent), as a v1 user's script does first."""
        query = urlencode({"q": f'CREATE DATABASE "{self.args.database}"'})
        try:
            self.http.request("POST", f"{self.args.url.rstrip('/')}/query?{query}")
        except urllib3.exceptions.HTTPError as exc:
            print(f"CREATE DATABASE failed: {exc}", file=sys.stderr)

    # ------------------------------------------------------------------- run

    def run(self) -> None:
        if self.args.api == "v1":
            self.create_database()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.args.client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        client.on_connect = self.on_connect
        client.on_message = self.on_message
        client.connect(self.args.mqtt_host, self.args.mqtt_port)
        client.loop_start()
        try:
            while not self.done.wait(0.1):
                now = time.monotonic()
                with self.lock:
                    if self.points and now - self.first_unwritten >= FLUSH_INTERVAL_S:
                        self.flush()
                    if now - self.last_message >= self.args.idle_timeout:
                        self.flush()
                        break
        finally:
            client.disconnect()
            client.loop_stop()
            if self.args.api == "v2":
                self.influx.close()

    def report(self) -> dict[str, Any]:
        return {
            "t_first": self.t_first,
            "t_done": self.t_done,
            "readings_written": self.readings_written,
            "cpu_seconds": self.cpu_done - self.cpu_first if self.t_first is not None else 0.0,
            "max_rss_mb": peak_rss_mb(),
            "errors": self.errors,
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--mqtt-host", default="127.0.0.1")
    p.add_argument("--mqtt-port", "--port", dest="mqtt_port", type=int, default=1883)
    p.add_argument("--client-id", default="naive-consumer")
    p.add_argument("--topic", default="factory/+/+/+/telemetry")
    p.add_argument("--api", choices=("v1", "v2"), default="v1")
    p.add_argument("--url", default="http://127.0.0.1:8086")
    p.add_argument("--database", default="factory", help="v1 only")
    p.add_argument("--bucket", default="factory", help="v2 only")
    p.add_argument("--org", default="factory", help="v2 only")
    p.add_argument("--token", default="", help="v2 only")
    p.add_argument("--batch-size", type=int, default=5000)
    p.add_argument("--expect-readings", type=int, required=True)
    p.add_argument("--idle-timeout", type=float, default=10.0)
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--gzip", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    consumer = NaiveConsumer(args)
    consumer.run()
    report = consumer.report()
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
