"""MQTT source: subscription, reconnects, and acknowledgement after the write.

paho-mqtt's network loop runs in its own thread and only appends received
messages to a queue; the service's processing thread takes them in batches and
acknowledges them (``manual_ack``) once their samples are stored. The number of
unacknowledged messages, and so the memory held here, is bounded by the
broker's in-flight window: the MQTT v5 Receive Maximum we ask for
(``mqtt.max_inflight``), or the broker's setting with MQTT 3.1.1.

A message received on an earlier connection is never acknowledged on a later
one (packet ids are per connection): the broker redelivers it instead, and
the device timestamp makes the rewrite idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from devices.contract import REJECTED_SEGMENT
from devices.mqtt_url import make_client, parse_mqtt_url
from ingest.config import MqttSettings
from ingest.metrics import Metrics

log = logging.getLogger(__name__)

#: CONNACK reasons that retrying cannot fix: the configuration is wrong.
FATAL_CONNACK = {
    "Bad user name or password",
    "Not authorized",
    "Client identifier not valid",
    "Unsupported protocol version",
    "Bad username or password",
    "Banned",
}


@dataclass(slots=True)
class Received:
    """A message until it is acknowledged; topic and payload are released once processed."""

    topic: str
    payload: bytes
    received: float  # epoch seconds
    mid: int
    qos: int
    generation: int  # connection it arrived on


class MqttSource:
    def __init__(
        self, settings: MqttSettings, metrics: Metrics, max_queued_bytes: int = 64 << 20
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.url = parse_mqtt_url(settings.url)
        self.subscription = f"{settings.topic_prefix}/#"
        self._rejected_prefix = f"{settings.topic_prefix}/{REJECTED_SEGMENT}/"
        self._queue: deque[Received] = deque()
        self._queued_bytes = 0
        self._wanted = 0  # queue length the processing thread is lingering for
        self.max_queued_bytes = max_queued_bytes
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self.generation = 0
        self.fatal: str | None = None
        self.connected_at = 0.0
        self.renewals = 0  # watchdog renewals since the last message
        self._stopping = False
        self.last_message_at = 0.0
        self.client = make_client(
            self.url,
            settings.client_id,
            protocol=settings.protocol,
            clean=False,
            ca_file=settings.ca_file,
            cert_file=settings.cert_file,
            key_file=settings.key_file,
            insecure_tls=settings.tls_insecure,
            manual_ack=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(
            max(1, int(settings.reconnect_min_delay)), max(1, int(settings.reconnect_max_delay))
        )

    # -- paho callbacks (network thread) -------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            text = str(reason)
            log.error("MQTT broker %s refused the connection: %s", self.url.redacted(), text)
            if text in FATAL_CONNACK and self.generation == 0:
                self.fatal = f"MQTT broker {self.url.redacted()} refused the connection: {text}"
                with self._cond:
                    self._cond.notify_all()
            return
        self.generation += 1
        self.connected_at = time.time()
        self.metrics.inc("reconnects")
        self._subscribe()
        log.info(
            "connected to %s (session present: %s), subscribed to %s",
            self.url.redacted(),
            flags.session_present,
            self.subscription,
        )
        self.metrics.set("mqtt_connected", 1.0)
        self._connected.set()

    def _subscribe(self) -> None:
        if self.settings.protocol == "5":
            options = SubscribeOptions(qos=1, noLocal=True)
            self.client.subscribe(self.subscription, options=options)
        else:
            self.client.subscribe(self.subscription, qos=1)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        self.metrics.set("mqtt_connected", 0.0)
        if self._stopping:
            log.info("disconnected from %s", self.url.redacted())
        else:
            log.warning("disconnected from %s: %s; reconnecting", self.url.redacted(), reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic  # paho decodes it on every access
        if topic.startswith(self._rejected_prefix):
            # Our own dead letters (MQTT 3.1.1 has no "no local"): not telemetry.
            if msg.qos:
                client.ack(msg.mid, msg.qos)
            return
        now = time.time()
        self.last_message_at = now
        self.renewals = 0
        item = Received(topic, bytes(msg.payload), now, msg.mid, msg.qos, self.generation)
        size = len(item.payload) + len(item.topic)
        with self._cond:
            # Hold paho's network thread (and so the socket: TCP pushes back on the broker)
            # while the messages waiting here exceed the byte bound.
            while self._queued_bytes > self.max_queued_bytes and not self._stopping:
                self._cond.wait(1.0)
            self._queue.append(item)
            self._queued_bytes += size
            n = len(self._queue)
            if n in (1, self._wanted):  # what the processing thread may wait for
                self._cond.notify_all()

    # -- service side --------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        props = None
        if s.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = s.session_expiry
            props.ReceiveMaximum = s.max_inflight
        self.client.connect_async(
            self.url.host, self.url.port, keepalive=s.keepalive, clean_start=False, properties=props
        )
        self.client.loop_start()

    def resubscribe(self) -> None:
        self.renewals += 1
        self.connected_at = time.time()
        self._subscribe()

    def reconnect(self) -> None:
        """Drop the connection and open a new one (the session is kept)."""
        self.renewals += 1
        self.connected_at = time.time()
        self.client.loop_stop()
        try:
            self.client.disconnect()
        finally:
            self._connected.clear()
            self.start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def pending(self) -> int:
        return len(self._queue)

    def get_batch(self, max_messages: int, timeout: float, linger: float = 0.0) -> list[Received]:
        """Up to ``max_messages`` received messages; waits up to ``timeout`` for the first,
        then, while fewer than ``max_messages`` are there, ``linger`` seconds for more."""
        with self._cond:
            if not self._queue and self.fatal is None:
                self._cond.wait(timeout)
            if linger and 0 < len(self._queue) < max_messages and self.fatal is None:
                self._wanted = max_messages
                self._cond.wait(linger)  # woken early once max_messages are there
                self._wanted = 0
            n = min(max_messages, len(self._queue))
            batch = [self._queue.popleft() for _ in range(n)]
            self._queued_bytes -= sum(len(m.payload) + len(m.topic) for m in batch)
            self._cond.notify_all()
        self.metrics.inc("messages_received", len(batch))
        return batch

    def ack(self, messages: list[Received]) -> int:
        """Acknowledge, in arrival order, what arrived on the current connection."""
        acked = 0
        generation = self.generation
        for m in messages:
            if m.qos and m.generation == generation:
                self.client.ack(m.mid, m.qos)
                acked += 1
        self.metrics.inc("messages_acked", acked)
        return acked

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos)

    def stop(self) -> None:
        self._stopping = True
        with self._cond:
            self._cond.notify_all()
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
