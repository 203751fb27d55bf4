"""Fast QoS 1 publisher of bench/e2e.py, and the messages of a benchmark case.

Burst (pre-encoded with orjson, sent once, every PUBACK awaited):

    python bench/publish.py --port P --shape batch --streams 1000 --messages 20000 --t-end-ms T

Paced (encoded live, every sample stamped with the publish wall time in ms):

    python bench/publish.py --port P --shape single --streams 1000 --rate 5000 --duration 20

Streams are devices x 4 sensors; devices ``d<i>`` are spread over 2 sites (``e2e-site<k>``)
x 5 lines. A single message holds one reading; a batch message 25 samples x 4 sensors of
one device. Burst timestamps end at ``--t-end-ms``, one second apart per stream, so no two
readings of a stream share a timestamp. The client is a minimal MQTT 3.1.1 client on a
plain socket that pipelines PUBLISH packets and counts PUBACKs: paho-mqtt 2 peaked near
10,000 msg/s here (and slows down as its in-flight window grows), too slow to fill the
broker faster than the consumers drain it. The JSON report holds the published and
acknowledged counts, the rate and, when paced, the probe timestamps (the newest sample of
each message carrying device d0, sensor s0).
"""

from __future__ import annotations

import argparse
import math
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

SENSORS = ("s0", "s1", "s2", "s3")
SAMPLES_PER_BATCH = 25
READINGS = {"single": 1, "batch": SAMPLES_PER_BATCH * len(SENSORS)}
PERIOD_MS = 1000
SITE = "e2e-site"  # bench/e2e.py counts and deletes only the series of these sites
WINDOW = 30_000  # unacknowledged PUBLISH packets (below 65535 packet ids)


def topic(device: int) -> str:
    return f"factory/{SITE}{device % 2}/line{(device // 2) % 5}/d{device}/telemetry"


def value(stream: int, k: int) -> float:
    return round(50.0 + 10.0 * math.sin(k * 0.05 + stream) + ((k * 7919 + stream) % 13) * 0.1, 3)


def burst(shape: str, streams: int, messages: int, t_end_ms: int) -> list[tuple[str, bytes]]:
    """The (topic, payload) of every message of a burst, in publish order."""
    out: list[tuple[str, bytes]] = []
    devices = max(1, streams // len(SENSORS))
    if shape == "single":
        per_stream = -(-messages // streams)
        for i in range(messages):
            j, k = i % streams, i // streams
            ts = t_end_ms - (per_stream - 1 - k) * PERIOD_MS
            body = {"ts": ts, "values": {SENSORS[j % 4]: value(j, k)}, "seq": k}
            out.append((topic(j // 4), orjson.dumps(body)))
        return out
    per_device = -(-messages // devices) * SAMPLES_PER_BATCH
    for i in range(messages):
        d, m = i % devices, i // devices
        samples = []
        for q in range(m * SAMPLES_PER_BATCH, (m + 1) * SAMPLES_PER_BATCH):
            ts = t_end_ms - (per_device - 1 - q) * PERIOD_MS
            vals = {s: value(d * 4 + n, q) for n, s in enumerate(SENSORS)}
            samples.append({"ts": ts, "values": vals, "seq": q})
        out.append((topic(d), orjson.dumps({"samples": samples})))
    return out


def paced(shape: str, streams: int, probe: list[int]) -> Iterator[tuple[str, bytes]]:
    """Endless messages stamped now; appends the probe stream's stamps to ``probe``."""
    devices = max(1, streams // len(SENSORS))
    last: dict[int, int] = {}
    i = 0
    while True:
        j = i % (streams if shape == "single" else devices)
        step = 1 if shape == "single" else SAMPLES_PER_BATCH  # no overlap within a stream
        now = max(int(time.time() * 1000), last.get(j, 0) + step)
        last[j] = now
        if shape == "single":
            body: dict[str, object] = {"ts": now, "values": {SENSORS[j % 4]: value(j, i)}}
            d = j // 4
        else:  # newest sample = publish time, older ones 1 ms apart
            d = j
            body = {
                "samples": [
                    {
                        "ts": now - q,
                        "values": {s: value(d * 4 + n, i + q) for n, s in enumerate(SENSORS)},
                    }
                    for q in range(SAMPLES_PER_BATCH - 1, -1, -1)
                ]
            }
        if j == 0:
            probe.append(now)
        yield topic(d), orjson.dumps(body)
        i += 1


class RawClient:
    """MQTT 3.1.1, QoS 1 publishes only; a reader thread counts PUBACKs."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = client_id.encode()
        var = b"\x00\x04MQTT\x04\x02\x00\x00" + struct.pack("!H", len(cid)) + cid
        self.sock.sendall(b"\x10" + _varint(len(var)) + var)
        if self.sock.recv(4) != b"\x20\x02\x00\x00":
            raise ConnectionError("broker refused the connection")
        self.sent = self.acked = 0
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        buf = b""
        while data := self.sock.recv(1 << 16):  # b"" once close() shuts the socket down
            buf += data
            n = len(buf) // 4  # the broker sends only PUBACKs (4 bytes each)
            if any(buf[k * 4] != 0x40 for k in range(n)):
                raise ConnectionError("unexpected packet from the broker")
            buf = buf[n * 4 :]
            with self.cond:
                self.acked += n
                self.cond.notify_all()

    def publish(self, messages: list[tuple[str, bytes]]) -> None:
        chunk = []
        for t, payload in messages:
            tb = t.encode()
            pid = self.sent % 65535 + 1
            head = struct.pack("!H", len(tb)) + tb + struct.pack("!H", pid)
            chunk.append(b"\x32" + _varint(len(head) + len(payload)) + head + payload)
            self.sent += 1
        with self.cond:
            if not self.cond.wait_for(lambda: self.sent - self.acked <= WINDOW, 60.0):
                raise TimeoutError("no PUBACK from the broker for 60 s")
        self.sock.sendall(b"".join(chunk))

    def wait_acked(self, timeout: float) -> int:
        with self.cond:
            self.cond.wait_for(lambda: self.acked >= self.sent, timeout)
            return self.acked

    def close(self) -> None:
        self.sock.sendall(b"\xe0\x00")
        self.sock.shutdown(socket.SHUT_RDWR)
        self.reader.join(5.0)
        self.sock.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--client-id", default="bench-publisher")
    ap.add_argument("--shape", choices=tuple(READINGS), required=True)
    ap.add_argument("--streams", type=int, required=True)
    ap.add_argument("--messages", type=int, default=0, help="burst size")
    ap.add_argument("--t-end-ms", type=int, default=0, help="burst: newest timestamp")
    ap.add_argument("--rate", type=float, default=0.0, help="paced: messages/s")
    ap.add_argument("--duration", type=float, default=0.0, help="paced: seconds")
    ap.add_argument("--report", type=Path)
    a = ap.parse_args()
    client = RawClient(a.host, a.port, a.client_id)
    probe: list[int] = []
    if a.rate > 0:
        gen = paced(a.shape, a.streams, probe)
        t0 = time.monotonic()
        while (now := time.monotonic()) < t0 + a.duration:
            due = int((now - t0) * a.rate) - client.sent
            client.publish([next(gen) for _ in range(max(0, due))])
            time.sleep(0.005)
    else:
        messages = burst(a.shape, a.streams, a.messages, a.t_end_ms or int(time.time() * 1000))
        t0 = time.monotonic()
        for k in range(0, len(messages), 2000):
            client.publish(messages[k : k + 2000])
    acked = client.wait_acked(timeout=60.0)
    elapsed = time.monotonic() - t0
    client.close()
    report: dict[str, object] = {"published": client.sent, "acked": acked, "seconds": elapsed}
    report |= {"msg_per_s": client.sent / elapsed, "probe_ts": probe}
    if a.report:
        a.report.write_bytes(orjson.dumps(report))
    rate = client.sent / elapsed
    print(f"published {client.sent} messages ({acked} acked) in {elapsed:.2f} s: {rate:,.0f} msg/s")


if __name__ == "__main__":
    main()
