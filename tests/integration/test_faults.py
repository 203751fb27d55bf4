"""Fault injection: a sample the broker accepted at QoS 1 ends up in InfluxDB exactly once.

Each test runs its own Mosquitto (persistence on, no queue limit) so it can restart
it, starts ``ingest run`` as a subprocess, and streams uniquely numbered samples
from a publisher thread: ``RATE`` messages per second of ``PER_MESSAGE`` samples,
each sample with its own device timestamp and ``seq``, each message published at
QoS 1. A sample counts as accepted only once the broker has sent PUBACK for its
message; a message without PUBACK is published again (a duplicate only rewrites the
same points, which are keyed by the device timestamp).

While the stream runs, a fault is injected: ingest SIGKILLed at random instants,
InfluxDB down for a long time (with and without the on-disk spool), the broker
restarted, ingest stopped by SIGTERM, ingest SIGKILLed with batches in the spool.
At the end every accepted sample must be in InfluxDB once per sensor: the number of
points equals accepted samples x sensors exactly (nothing lost, nothing doubled),
and every ``seq`` is there for every sensor.

Each test prints one ``FAULTS`` summary line (run pytest with ``-s`` to see them).
``FAULTS_SEED`` changes the seed of the random kill schedule.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import urllib3
from paho.mqtt.enums import CallbackAPIVersion

from tests.dbhelpers import INFLUX_URL, influx_count, influx_rows
from tests.integration.conftest import IngestProcess, wait_for
from tests.integration.influx_proc import InfluxProcess, require_influxd
from tests.integration.mosquitto_proc import MosquittoProcess, require_mosquitto

pytestmark = pytest.mark.services

SENSORS = ("a", "b")
PER_MESSAGE = 10  # samples per MQTT message
RATE = 20.0  # messages per second: 200 samples/s, 400 points/s
SEED = int(os.environ.get("FAULTS_SEED", "20261126"))
PUBACK_WAIT = 5.0  # publish the message again when no PUBACK came within this
SETTLE_TIMEOUT = 60.0  # after the stream: the longest we wait for every point to arrive
MB = 1024 * 1024


# --------------------------------------------------------------------------- publisher


class Publisher(threading.Thread):
    """Publishes ``messages`` messages of ``PER_MESSAGE`` samples at ``rate`` per second.

    Sample ``seq`` has the device timestamp ``base_ts + seq`` ms. Each message is
    published at QoS 1 and waited for; without PUBACK within ``PUBACK_WAIT`` (or when
    the connection is down) it is published again once connected. ``accepted`` holds
    the seqs of PUBACKed messages, and only those count. ``wind_down`` ends the stream
    early (the message being sent is still finished); ``abort`` gives up at once.
    """

    def __init__(self, port: int, topic: str, messages: int, rate: float = RATE) -> None:
        super().__init__(name="faults-publisher", daemon=True)
        self.port = port
        self.topic = topic
        self.messages = messages
        self.rate = rate
        self.base_ts = int(time.time() * 1000) - 3_600_000  # an hour ago: well inside limits
        self.sent: set[int] = set()  # seqs published at least once
        self.accepted: set[int] = set()  # seqs whose message was PUBACKed
        self.publishes = 0  # PUBLISH calls, first attempts and repeats
        self.republished = 0
        self.error: BaseException | None = None
        self.wind_down = threading.Event()
        self.abort = threading.Event()
        self.finished_at = 0.0
        self._deadline = time.monotonic() + messages / rate + 90.0

    def payload(self, k: int) -> bytes:
        samples = [
            {
                "ts": self.base_ts + seq,
                "seq": seq,
                "values": {s: round(math.sin(seq / 7.0) + i, 4) for i, s in enumerate(SENSORS)},
            }
            for seq in range(k * PER_MESSAGE, (k + 1) * PER_MESSAGE)
        ]
        return json.dumps({"samples": samples}).encode()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished_at = time.monotonic()

    def _run(self) -> None:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"faults-pub-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        client.reconnect_delay_set(1, 1)
        client.connect_async("127.0.0.1", self.port, keepalive=10)
        client.loop_start()  # reconnects by itself while the broker is down
        try:
            t0 = time.monotonic()
            for k in range(self.messages):
                due = t0 + k / self.rate
                if self.wind_down.wait(max(0.0, due - time.monotonic())):
                    return
                if not self._send(client, k):
                    return
        finally:
            client.disconnect()
            client.loop_stop()

    def _send(self, client: paho.Client, k: int) -> bool:
        payload = self.payload(k)
        seqs = range(k * PER_MESSAGE, (k + 1) * PER_MESSAGE)
        attempt = 0
        while time.monotonic() < self._deadline and not self.abort.is_set():
            if not client.is_connected():
                time.sleep(0.05)
                continue
            info = client.publish(self.topic, payload, qos=1)
            self.publishes += 1
            self.republished += attempt > 0
            attempt += 1
            self.sent.update(seqs)
            try:
                info.wait_for_publish(PUBACK_WAIT)
                if info.is_published():
                    self.accepted.update(seqs)
                    return True
            except (RuntimeError, ValueError):
                # Not handed to the broker (connection just lost): paho may still send
                # it after reconnecting, but only a PUBACK for *our* attempt counts.
                time.sleep(0.05)
        return False

    def finish(self, timeout: float) -> None:
        self.join(timeout)
        if self.is_alive():
            self.abort.set()
            self.join(10)
        assert not self.is_alive(), "publisher thread did not stop"
        assert self.error is None, f"publisher failed: {self.error!r}"


# --------------------------------------------------------------------------- RSS sampler


def read_rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in kB, or None (gone, or a zombie without memory)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class RssSampler(threading.Thread):
    """Samples the RSS of whichever ingest process is current, every ``interval`` s."""

    def __init__(self, pid: Callable[[], int | None], interval: float = 0.5) -> None:
        super().__init__(name="faults-rss", daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (monotonic time, kB)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            pid = self.pid()
            kb = read_rss_kb(pid) if pid else None
            if kb:
                self.samples.append((time.monotonic(), kb))

    def peak_kb(self, since: float = 0.0, until: float = math.inf) -> int:
        return max((kb for t, kb in self.samples if since <= t <= until), default=0)

    def close(self) -> None:
        self._halt.set()
        self.join(5)


# --------------------------------------------------------------------------- the rig


@dataclass
class Outcome:
    points: int  # rows of telemetry in the database
    counted: int  # SELECT count(value): the database's own count
    duplicates: int  # rows beyond one per (sensor, seq)
    missing: dict[str, list[int]]  # per sensor: accepted seqs not found
    unexpected: int  # (sensor, seq) found that no accepted message carried


def ranges(seqs: list[int], limit: int = 12) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"`` (at most ``limit`` runs)."""
    runs: list[str] = []
    start = prev = None
    for s in [*sorted(seqs), None]:
        if start is not None and (s is None or s != prev + 1):  # type: ignore[operator]
            runs.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = None
        if s is not None and start is None:
            start = s
        prev = s
    more = f" (+{len(runs) - limit} more runs)" if len(runs) > limit else ""
    return ", ".join(runs[:limit]) + more


@dataclass
class Rig:
    """A private broker, the ingest processes of one test, and the checks."""

    name: str
    tmp_path: Path
    env: dict[str, str]
    influx_url: str
    database: str
    broker: MosquittoProcess
    start_ingest: Callable[..., IngestProcess]
    ingest: IngestProcess | None = None
    processes: list[IngestProcess] = field(default_factory=list)
    publisher: Publisher | None = None
    rss: RssSampler | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def topic(self) -> str:
        return f"{self.env['INGEST_TOPIC_PREFIX']}/plant1/line1/dev-1/telemetry"

    @property
    def spool_dir(self) -> Path:
        return Path(self.env["INGEST_SPOOL_DIR"])

    def current_pid(self) -> int | None:
        ing = self.ingest
        return ing.proc.pid if ing is not None and ing.proc is not None and ing.running else None

    def start(self, wait_healthy: bool = True, **extra: str) -> IngestProcess:
        self.ingest = self.start_ingest({**self.env, **extra}, wait_healthy)
        self.processes.append(self.ingest)
        if self.rss is None:
            self.rss = RssSampler(self.current_pid)
            self.rss.start()
        return self.ingest

    def rss_before(self) -> int:
        """The highest RSS (kB) of the last 2 s: the baseline before a fault."""
        assert self.rss is not None
        now = time.monotonic()
        return self.rss.peak_kb(now - 2.0, now)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        assert self.ingest is not None
        assert wait_for(self.ingest.healthy, timeout), f"ingest not healthy:\n{self.logs()}"

    def metrics(self) -> dict[str, float]:
        """The current ingest's /metrics, or {} while it does not answer."""
        if self.ingest is None or not self.ingest.running:
            return {}
        try:
            return self.ingest.metrics()
        except (urllib3.exceptions.HTTPError, ValueError):
            return {}

    def publish(self, seconds: float) -> Publisher:
        # The first ingest has subscribed (healthy = connected, SUBSCRIBE sent): give the
        # broker a moment to process it, so the session exists before the first sample.
        time.sleep(0.5)
        self.publisher = Publisher(self.broker.port, self.topic, int(seconds * RATE))
        self.publisher.start()
        return self.publisher

    def logs(self, tail: int = 3000) -> str:
        parts = [
            f"--- {p.log_path.name}:\n{p.log_path.read_text(errors='replace')[-tail:]}"
            for p in self.processes
            if p.log_path.exists()
        ]
        parts.append(f"--- mosquitto:\n{self.broker.log_text()[-tail:]}")
        return "\n".join(parts)

    def count(self) -> int:
        try:
            return influx_count(self.influx_url, self.database, "telemetry")
        except Exception:  # database down or restarting: not there yet
            return -1

    def settle(self) -> None:
        """Wait for the stream to end, for every accepted sample to be counted, and for
        ingest to hold nothing (no pending message, empty spool)."""
        pub = self.publisher
        assert pub is not None
        pub.finish(timeout=pub.messages / RATE + 120.0)
        expected = len(pub.accepted) * len(SENSORS)
        wait_for(lambda: self.count() >= expected, SETTLE_TIMEOUT, interval=0.5)

        def idle() -> bool:
            m = self.metrics()
            return bool(m) and m["ingest_pending_messages"] == 0 and m["ingest_spool_batches"] == 0

        wait_for(idle, 20.0, interval=0.5)

    def outcome(self) -> Outcome:
        pub = self.publisher
        assert pub is not None
        rows = influx_rows(
            self.influx_url, self.database, 'SELECT "seq" FROM "telemetry" GROUP BY "sensor"'
        )
        pairs = Counter((r["sensor"], r["seq"]) for r in rows)
        missing = {
            s: sorted(pub.accepted - {seq for (sensor, seq) in pairs if sensor == s})
            for s in SENSORS
        }
        expected_pairs = {(s, q) for s in SENSORS for q in pub.accepted}
        return Outcome(
            points=len(rows),
            counted=self.count(),
            duplicates=sum(n - 1 for n in pairs.values()),
            missing={s: m for s, m in missing.items() if m},
            unexpected=len(set(pairs) - expected_pairs),
        )

    def check(self, fault: str) -> Outcome:
        """Print the summary line, then assert: every accepted sample exactly once."""
        self.settle()
        pub = self.publisher
        assert pub is not None and self.rss is not None
        out = self.outcome()
        expected = len(pub.accepted) * len(SENSORS)
        n_missing = sum(len(m) for m in out.missing.values())
        extra = "; ".join(self.notes)
        print(
            f"\nFAULTS {fault}: samples sent {len(pub.sent)}, accepted {len(pub.accepted)} "
            f"(publishes {pub.publishes}, repeated {pub.republished}); points found "
            f"{out.points} of {expected} expected; duplicates {max(0, out.points - expected)} "
            f"(same seq twice: {out.duplicates}); missing {n_missing}; "
            f"peak RSS {self.rss.peak_kb() / 1024:.1f} MB" + (f"; {extra}" if extra else ""),
            flush=True,
        )
        detail = (
            f"missing per sensor: "
            f"{ {s: ranges(m) for s, m in out.missing.items()} }; "
            f"unexpected (sensor, seq): {out.unexpected}; same seq twice: {out.duplicates}\n"
            f"{self.logs()}"
        )
        assert pub.accepted == pub.sent, (
            f"the broker PUBACKed only {len(pub.accepted)} of {len(pub.sent)} samples sent\n"
            f"{self.logs()}"
        )
        for proc in self.processes:
            text = proc.log_path.read_text(errors="replace")
            assert "Traceback" not in text, f"{proc.log_path.name}:\n{text[-5000:]}"

        assert out.points == expected, detail
        assert out.counted == expected, detail
        assert not out.missing, detail
        assert out.duplicates == 0, detail
        assert out.unexpected == 0, detail
        return out

    def close(self) -> None:
        if self.publisher is not None and self.publisher.is_alive():
            self.publisher.abort.set()
            self.publisher.wind_down.set()
            self.publisher.join(10)
        if self.rss is not None:
            self.rss.close()


@pytest.fixture
def make_rig(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    ingest_env: dict[str, str],
    start_ingest: Callable[..., IngestProcess],
) -> Iterator[Callable[..., Rig]]:
    """``make_rig(influx_url, database, **env)``: a started private broker and a Rig."""
    require_mosquitto()
    rigs: list[Rig] = []

    def make(influx_url: str, database: str, **extra: str) -> Rig:
        broker = MosquittoProcess(tmp_path / "broker")  # persistence on, no queue limit
        env = {
            **ingest_env,
            "INGEST_MQTT_URL": broker.url,
            "INGEST_INFLUX_URL": influx_url,
            "INGEST_INFLUX_DATABASE": database,
            "INGEST_MQTT_RECONNECT_MAX_DELAY": "1",
            "INGEST_MQTT_DEAD_LETTER": "none",
            **extra,
        }
        rig = Rig(request.node.name, tmp_path, env, influx_url, database, broker, start_ingest)
        rigs.append(rig)
        broker.start()
        return rig

    yield make
    for rig in rigs:
        try:
            rig.close()
        finally:
            # Ingest first (start_ingest's teardown would only come after), then the broker.
            for proc in rig.processes:
                if proc.running:
                    proc.stop(signal.SIGKILL, timeout=10)
            rig.broker.cleanup()


@pytest.fixture
def private_influx(tmp_path: Path) -> Iterator[InfluxProcess]:
    require_influxd()
    influx = InfluxProcess(tmp_path / "influx")
    try:
        influx.start()
        yield influx
    finally:
        influx.cleanup()


def rss_figures(rig: Rig, since: float, until: float, baseline_kb: int) -> tuple[int, str]:
    peak = rig.rss.peak_kb(since, until) if rig.rss else 0
    return peak, (
        f"RSS before outage {baseline_kb / 1024:.1f} MB, peak during outage "
        f"{peak / 1024:.1f} MB (+{(peak - baseline_kb) / 1024:.1f} MB)"
    )


# Bound on RSS growth during a database outage. Ingest must not buffer the outage in
# memory: with the spool, batches go to disk and are acknowledged; without it, the
# broker holds what is beyond the write queue (2 batches) and the in-flight window.
# All the JSON published during a 30 s outage is ~0.7 MB (600 messages of ~1.2 kB)
# and its line protocol ~2 MB, so growth beyond 50 MB cannot come from holding this
# test's data: it would be a leak per retry/reconnect or runaway buffering. The
# baseline (interpreter, Numba/LLVM, paho, urllib3) is ~150-250 MB, so a relative
# bound such as 2x would hide far more than a whole outage's worth of data.
RSS_GROWTH_BOUND_KB = 50 * 1024


# --------------------------------------------------------------------------- the tests


@pytest.mark.slow
def test_sigkill_at_random_instants(make_rig: Callable[..., Rig], influx_db: str) -> None:
    rng = random.Random(f"{SEED}-sigkill")
    rig = make_rig(INFLUX_URL, influx_db)
    rig.start()
    pub = rig.publish(seconds=60)  # ended below, 3 s after the last restart
    kills = rng.randint(3, 5)
    schedule = []
    for _ in range(kills):
        rig.wait_healthy()
        up = rng.uniform(0.0, 3.0)  # how long it has been processing when killed
        down = rng.uniform(0.0, 2.0)
        time.sleep(up)
        assert rig.ingest is not None
        rig.ingest.stop(signal.SIGKILL, timeout=10)
        time.sleep(down)
        rig.start(wait_healthy=False)
        schedule.append(f"{up:.1f}/{down:.1f}")
    rig.wait_healthy()
    time.sleep(3.0)
    assert pub.is_alive(), "the stream ended before the last kill: lengthen it"
    pub.wind_down.set()
    rig.notes.append(f"seed {SEED}, {kills} kills (up/down s: {' '.join(schedule)})")
    try:
        rig.check(f"SIGKILL x{kills}")
    finally:
        rig.close()


@pytest.mark.slow
def test_influx_down_30s_with_spool(
    make_rig: Callable[..., Rig], private_influx: InfluxProcess
) -> None:
    outage = 30.0
    rig = make_rig(private_influx.url, "faults", INGEST_SPOOL_AFTER="2")
    ingest = rig.start()
    rig.publish(seconds=6 + outage + 6)
    time.sleep(6)
    assert rig.rss is not None
    baseline = rig.rss_before()
    private_influx.stop()
    t_down = time.monotonic()
    max_spooled_batches = 0.0
    while time.monotonic() - t_down < outage:
        time.sleep(1.0)
        m = rig.metrics()
        max_spooled_batches = max(max_spooled_batches, m.get("ingest_spool_batches", 0))
    during = rig.metrics()
    t_up = time.monotonic()
    private_influx.start()
    peak, figures = rss_figures(rig, t_down, t_up, baseline)
    rig.notes.append(figures)
    rig.notes.append(
        f"spool: {during.get('ingest_batches_spooled_total', 0):.0f} batches spooled, "
        f"up to {max_spooled_batches:.0f} waiting"
    )
    try:
        rig.check(f"InfluxDB down {outage:.0f} s, spool on")
    finally:
        rig.close()
    after = rig.metrics()
    assert ingest.running, "ingest exited"
    assert during["ingest_batches_spooled_total"] > 0, rig.logs()
    assert max_spooled_batches > 0
    assert after["ingest_spool_batches"] == 0
    assert after["ingest_batches_replayed_total"] == after["ingest_batches_spooled_total"]
    assert baseline > 0 and peak > 0
    assert peak - baseline < RSS_GROWTH_BOUND_KB, figures
    assert ingest.stop() == 0


@pytest.mark.slow
def test_influx_down_without_spool_broker_holds_messages(
    make_rig: Callable[..., Rig], private_influx: InfluxProcess
) -> None:
    outage = 10.0
    rig = make_rig(private_influx.url, "faults", INGEST_SPOOL_DIR="")
    ingest = rig.start()
    rig.publish(seconds=5 + outage + 5)
    time.sleep(5)
    baseline = rig.rss_before()
    private_influx.stop()
    t_down = time.monotonic()
    # By now the writes in flight have failed: nothing more is acknowledged, processing
    # blocks behind the write queue (so "received" stops too) and the broker keeps the rest.
    time.sleep(3.0)
    m1 = rig.metrics()
    time.sleep(outage - 3.0)
    m2 = rig.metrics()
    t_up = time.monotonic()
    private_influx.start()
    peak, figures = rss_figures(rig, t_down, t_up, baseline)
    acked = (m1["ingest_messages_acked_total"], m2["ingest_messages_acked_total"])
    received = (m1["ingest_messages_received_total"], m2["ingest_messages_received_total"])
    rig.notes.append(figures)
    rig.notes.append(
        f"during outage: acked {acked[0]:.0f} -> {acked[1]:.0f}, "
        f"received {received[0]:.0f} -> {received[1]:.0f}, "
        f"pending {m2['ingest_pending_messages']:.0f}"
    )
    try:
        rig.check(f"InfluxDB down {outage:.0f} s, spool off")
    finally:
        rig.close()
    assert acked[1] == acked[0], "messages acknowledged while the database was down"
    assert m2["ingest_batches_spooled_total"] == 0
    assert peak - baseline < RSS_GROWTH_BOUND_KB, figures
    assert ingest.stop() == 0


def test_broker_restart(make_rig: Callable[..., Rig], influx_db: str) -> None:
    rig = make_rig(INFLUX_URL, influx_db)
    ingest = rig.start()
    rig.publish(seconds=14)
    time.sleep(5)
    rig.broker.stop()  # SIGTERM: the persistence database is written
    time.sleep(3.0)
    rig.broker.start()
    try:
        rig.check("Mosquitto restart (3 s down)")
    finally:
        rig.close()
    assert rig.metrics()["ingest_reconnects_total"] >= 2
    assert ingest.stop() == 0


def test_sigterm_then_restart(make_rig: Callable[..., Rig], influx_db: str) -> None:
    shutdown_timeout = 5.0
    rig = make_rig(
        INFLUX_URL, influx_db, INGEST_SERVICE_SHUTDOWN_TIMEOUT=str(int(shutdown_timeout))
    )
    first = rig.start()
    rig.publish(seconds=12)
    time.sleep(4)
    t0 = time.monotonic()
    code = first.stop(signal.SIGTERM, timeout=shutdown_timeout + 10)
    took = time.monotonic() - t0
    rig.notes.append(f"exit {code} after {took:.1f} s")
    assert code == 0, first.log()
    assert took <= shutdown_timeout + 3.0, f"SIGTERM took {took:.1f} s"
    time.sleep(1.0)
    second = rig.start()
    try:
        rig.check("SIGTERM + restart")
    finally:
        rig.close()
    assert second.stop() == 0


@pytest.mark.slow
def test_sigkill_with_spooled_batches(
    make_rig: Callable[..., Rig], private_influx: InfluxProcess
) -> None:
    rig = make_rig(private_influx.url, "faults", INGEST_SPOOL_AFTER="2")
    first = rig.start()
    rig.publish(seconds=22)
    time.sleep(4)
    private_influx.stop()
    assert wait_for(lambda: rig.metrics().get("ingest_spool_batches", 0) >= 3, 20), rig.logs()
    first.stop(signal.SIGKILL, timeout=10)
    left = sorted(rig.spool_dir.glob("*.spool"))
    left_bytes = sum(p.stat().st_size for p in left)
    assert left and left_bytes > 0, "nothing on disk in the spool after the kill"
    time.sleep(1.0)
    # Restart ingest while the database is still down (a crash loop during an outage):
    # it starts all the same (CREATE DATABASE is only attempted) and spools.
    second = rig.start()
    reopened = rig.metrics().get("ingest_spool_batches", 0)
    assert "from before: replaying them first" in second.log(), second.log()
    assert reopened >= 3
    time.sleep(3.0)
    private_influx.start()
    rig.notes.append(
        f"spool after kill: {len(left)} segment(s), {left_bytes} bytes, "
        f"{reopened:.0f} batches found at restart"
    )
    try:
        rig.check("SIGKILL with spooled batches, InfluxDB down")
    finally:
        rig.close()
    after = rig.metrics()
    assert after["ingest_batches_replayed_total"] >= reopened
    assert after["ingest_spool_batches"] == 0
    assert not list(rig.spool_dir.glob("*.spool")), "spool segments left after the replay"
    assert second.stop() == 0
