"""Gateway store-and-forward against a real mosquitto that goes away and comes back.

Each test starts its own broker (``MosquittoProcess``) on a free loopback port,
with persistence, so that a subscriber with a persistent session loses nothing
across a broker restart: every sample the gateway publishes must reach it.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devices.gateway import GatewayAgent, SimulatedSource
from tests.integration.mosquitto_proc import MosquittoProcess, require_mosquitto

pytestmark = pytest.mark.services

PREFIX, SITE, LINE, DEVICE = "factory", "s1", "l1", "gw1"
TELEMETRY = f"{PREFIX}/{SITE}/{LINE}/{DEVICE}/telemetry"
STATUS = f"{PREFIX}/{SITE}/{LINE}/{DEVICE}/status"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


class SeqRecorder:
    """A subscriber with a persistent session (MQTT v5, clean_start=False, expiry 1 h)
    that records the ``seq`` of every telemetry sample in arrival order."""

    def __init__(self, port: int, topic: str = TELEMETRY) -> None:
        self.port = port
        self.topic = topic
        self.seqs: list[int] = []
        self.messages = 0
        self.connects = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-recorder-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connects += 1
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any
    ) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        payload = orjson.loads(msg.payload)
        samples = payload.get("samples", [payload])
        with self._lock:
            self.messages += 1
            self.seqs.extend(int(s["seq"]) for s in samples)

    def start(self, timeout: float = 10.0) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.connect(
            "127.0.0.1", self.port, keepalive=10, clean_start=False, properties=props
        )
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            raise AssertionError("subscriber got no SUBACK")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def snapshot(self) -> list[int]:
        with self._lock:
            return list(self.seqs)

    def unique(self) -> int:
        with self._lock:
            return len(set(self.seqs))


def check_delivery(seqs: list[int], n: int) -> int:
    """Every seq 0..n-1 arrived, first arrivals in order; return the duplicate count."""
    missing = sorted(set(range(n)) - set(seqs))
    assert not missing, f"{len(missing)} seqs never arrived, e.g. {missing[:20]}"
    unexpected = sorted(set(seqs) - set(range(n)))
    assert not unexpected, f"unexpected seqs {unexpected[:20]}"
    seen: set[int] = set()
    first_arrivals: list[int] = []
    for seq in seqs:
        if seq not in seen:
            seen.add(seq)
            first_arrivals.append(seq)
    backwards = [(a, b) for a, b in itertools.pairwise(first_arrivals) if b < a]
    assert not backwards, f"first arrivals out of order at {backwards[:10]}"
    return len(seqs) - n


def retained_status(port: int, timeout: float = 5.0) -> dict[str, Any]:
    got: list[bytes] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, *_: c.subscribe(STATUS, qos=1)
    client.on_message = lambda c, u, m: got.append(bytes(m.payload))
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        wait_until(lambda: bool(got), timeout, "the retained status message")
    finally:
        client.disconnect()
        client.loop_stop()
    status: dict[str, Any] = orjson.loads(got[0])
    return status


class GatewayThread:
    """``GatewayAgent.run`` in a thread, with its result or exception kept."""

    def __init__(self, agent: GatewayAgent, source: SimulatedSource) -> None:
        self.agent = agent
        self.stop = threading.Event()
        self.result: dict[str, int] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(source,), name="gateway-test")

    def _run(self, source: SimulatedSource) -> None:
        try:
            self.result = self.agent.run(source, self.stop)
        except BaseException as exc:
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> dict[str, int]:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join(10.0)
            raise AssertionError(
                f"gateway did not finish within {timeout:g} s: {self.agent.stats()}"
            )
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    proc = MosquittoProcess(tmp_path / "broker", binary=require_mosquitto())
    try:
        yield proc
    finally:
        proc.stop()


def make_agent(broker: MosquittoProcess, tmp_path: Path, **kwargs: Any) -> GatewayAgent:
    options: dict[str, Any] = {
        "batch_size": 10,
        "max_inflight": 50,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
        "linger_s": 0.2,
    }
    options.update(kwargs)
    return GatewayAgent(
        broker.url,
        prefix=PREFIX,
        site=SITE,
        line=LINE,
        device=DEVICE,
        buffer_path=tmp_path / "outbox.db",
        **options,
    )


def test_broker_restart_mid_stream_loses_nothing(broker: MosquittoProcess, tmp_path: Path) -> None:
    n = 3000
    broker.start()
    recorder = SeqRecorder(broker.port)
    recorder.start()
    agent = make_agent(broker, tmp_path)
    # 3,000 samples at 500 Hz: a 6 s stream, with a 3 s outage in the middle.
    gateway = GatewayThread(agent, SimulatedSource(rate_hz=500, seed=7, count=n, realtime=True))
    t0 = time.monotonic()
    try:
        gateway.start()
        wait_until(lambda: recorder.unique() >= 500, 15.0, "the first 500 samples")
        before = agent.stats()
        broker.stop()
        t_down = time.monotonic()
        time.sleep(3.0)
        during = agent.stats()
        broker.start()
        t_up = time.monotonic()
        stats = gateway.join(timeout=60.0)
        wait_until(lambda: recorder.unique() >= n, 30.0, f"all {n} samples at the subscriber")
        time.sleep(0.3)  # let stray duplicates land before counting
        seqs = recorder.snapshot()
        status = retained_status(broker.port)
    finally:
        gateway.stop.set()
        recorder.stop()
        agent.close()

    duplicates = check_delivery(seqs, n)
    print(
        f"\nrestart test: {n} samples, {len(seqs)} arrivals, {duplicates} duplicates, "
        f"{recorder.messages} messages; outage {t_up - t_down:.1f} s at "
        f"t={t_down - t0:.1f} s; stats before={before} during={during} end={stats}"
    )
    assert during["connected"] == 0
    assert during["buffer_rows"] >= 100, "the outbox should fill up while the broker is down"
    assert during["offline_buffered"] > before["offline_buffered"]
    assert stats["reconnects"] >= 1
    assert stats["read"] == stats["buffered"] == n
    assert stats["dropped_full"] == 0
    assert stats["buffer_rows"] == 0
    assert stats["acked"] >= n // 10
    assert stats["max_buffer_rows"] >= during["buffer_rows"]
    assert status["state"] == "offline"  # clean shutdown replaced the retained birth


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_gateway_started_while_broker_down_delivers_everything(
    broker: MosquittoProcess, tmp_path: Path, protocol: str
) -> None:
    n = 2000
    # Create the subscriber's persistent session, then take the broker down.
    broker.start()
    recorder = SeqRecorder(broker.port)
    recorder.start()
    broker.stop()

    agent = make_agent(broker, tmp_path, batch_size=25, protocol=protocol)
    gateway = GatewayThread(agent, SimulatedSource(rate_hz=1000, seed=3, count=n, realtime=False))
    try:
        gateway.start()
        wait_until(lambda: agent.stats()["buffered"] >= n, 15.0, "all samples in the outbox")
        time.sleep(1.0)  # a few failed connection attempts
        offline = agent.stats()
        broker.start()
        stats = gateway.join(timeout=60.0)
        wait_until(lambda: recorder.unique() >= n, 30.0, f"all {n} samples at the subscriber")
        time.sleep(0.3)
        seqs = recorder.snapshot()
    finally:
        gateway.stop.set()
        recorder.stop()
        agent.close()

    duplicates = check_delivery(seqs, n)
    print(f"\ncold-start test: {n} samples, {duplicates} duplicates; offline={offline} end={stats}")
    assert offline["connected"] == 0
    assert offline["published"] == 0
    assert offline["connect_failures"] >= 1
    assert offline["buffer_rows"] == n // 25
    assert offline["offline_buffered"] == n
    assert stats["connects"] == 1
    assert stats["acked"] == n // 25
    assert stats["buffer_rows"] == 0
