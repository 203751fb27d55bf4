"""The gateway agent: source -> on-disk outbox -> MQTT (QoS 1) with store-and-forward.

Data path
---------
1. A reader thread iterates the sample source and hands samples over through a
   bounded queue (a slow or paced source never stalls the network side, and a
   stalled network side applies back-pressure to the source instead of memory).
2. The agent groups samples into batches of ``batch_size`` (a partial batch is
   flushed after ``linger_s``), numbers them with ``seq`` (reserved durably in
   the outbox database, so numbering continues across restarts) and appends the
   serialized contract payload to the :class:`~devices.gateway.buffer.OutboxBuffer`.
3. When connected, rows are published at QoS 1 strictly in id order with at
   most ``max_inflight`` unacknowledged messages; a row is deleted only when its
   PUBACK arrives. New rows keep being appended behind the replayed backlog.

Connections
-----------
The agent drives paho's network loop itself (``Client.loop``) from the thread
that calls :meth:`GatewayAgent.run` and makes a *fresh* client for every
connection attempt, with exponential backoff (``reconnect_min_s`` doubling up
to ``reconnect_max_s``, +-20 % jitter). This is deliberate: a paho client keeps
its own in-memory copy of unacknowledged QoS 1 messages and resends them after
an automatic reconnect. The outbox already is that store, durable and ordered,
so after a disconnect the agent forgets all in-flight message ids and replays
from the oldest row still in the outbox. A message that had reached the broker
but whose PUBACK was lost is therefore delivered twice; that is harmless
because the ingest side writes points keyed by the device timestamp.

Every connection publishes a retained birth message ``{"state": "online", "ts": ...}``
on the device's status topic and registers a retained Last Will
``{"state": "offline"}`` (QoS 1). A clean shutdown publishes a retained
``{"state": "offline", "ts": ...}`` itself and disconnects.

When the outbox is full
-----------------------
The outbox refuses new rows (``BufferFull``) and the agent drops the *newest*
batch, counting the samples in ``stats()["dropped_full"]`` and logging at ERROR
level. Keeping the oldest data means the backlog stays one contiguous, ordered
stretch of history that replays without holes, the outbox never rewrites or
deletes rows it has not delivered, and the loss shows up downstream as a
single ``seq`` gap (dropped samples keep the sequence numbers they were given).
The alternative, evicting the oldest rows, favours fresh data for dashboards
but punches holes in the history that is already queued; size ``max_buffer_rows``
for the longest outage you want to ride out instead.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from devices.contract import (
    DEFAULT_LIMITS,
    IDENTIFIER_RE,
    status_topic,
    telemetry_topic,
)
from devices.gateway.buffer import DEFAULT_MAX_ROWS, BufferFull, OutboxBuffer
from devices.gateway.sources import SampleDict, SampleSource, iterate, parse_timestamp_ms
from devices.mqtt_url import make_client, parse_mqtt_url

log = logging.getLogger("devices.gateway")

_END: Final = object()
_DROP_LOG_INTERVAL_S = 5.0
_MAX_BATCHES_PER_TURN = 20
_OFFLINE_PAYLOAD: Final = orjson.dumps({"state": "offline"})

STAT_KEYS: Final = (
    "read",  # samples taken from the source
    "buffered",  # samples written to the outbox
    "offline_buffered",  # ... of which while not connected to the broker
    "dropped_full",  # samples dropped because the outbox was full
    "dropped_invalid",  # samples without a finite reading or with an unreadable ts
    "published",  # PUBLISH packets of outbox rows (replays included)
    "acked",  # PUBACKs received for outbox rows
    "nacked",  # PUBACKs with an MQTT v5 failure reason code (row kept)
    "connects",  # successful connections (CONNACK accepted)
    "reconnects",  # successful connections after the first one
    "connect_failures",  # attempts that failed or timed out
    "max_buffer_rows",  # high-water mark of rows waiting in the outbox
)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _sample_ts(ts: object) -> int | None:
    """Epoch ms of a source sample's ``ts``; None if it is unusable.

    A sample without a time is stamped now: once buffered, the broker's receive
    time (which ingest would otherwise use) could be far off.
    """
    if ts is None:
        return _now_ms()
    if isinstance(ts, bool):
        return None
    if isinstance(ts, int):
        return ts
    if isinstance(ts, float):
        return round(ts) if math.isfinite(ts) else None
    if isinstance(ts, str):
        try:
            return parse_timestamp_ms(ts)
        except ValueError:
            return None
    return None


def _valid_prefix(prefix: str) -> bool:
    return bool(prefix) and all(IDENTIFIER_RE.match(level) for level in prefix.split("/"))


class GatewayAgent:
    """Publish a device's samples over MQTT without losing any while the broker is away.

    Parameters mirror the wire contract: telemetry goes to
    ``<prefix>/<site>/<line>/<device>/telemetry`` and status to ``.../status``.
    ``batch_size`` samples make one message (``batch_size=1`` sends single-sample
    objects). The outbox lives at ``buffer_path`` (SQLite) and holds at most
    ``max_buffer_rows`` messages. See the module docstring for the guarantees.
    """

    def __init__(
        self,
        mqtt_url: str,
        *,
        prefix: str,
        site: str,
        line: str,
        device: str,
        buffer_path: str | Path,
        batch_size: int = 50,
        max_inflight: int = 100,
        client_id: str | None = None,
        keepalive: int = 30,
        protocol: Literal["3.1.1", "5"] = "5",
        max_buffer_rows: int = DEFAULT_MAX_ROWS,
        linger_s: float = 1.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        ca_file: str | None = None,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
    ) -> None:
        self.url = parse_mqtt_url(mqtt_url)
        if not _valid_prefix(prefix):
            raise ValueError(
                f"invalid topic prefix {prefix!r}: levels separated by '/', each matching "
                "[A-Za-z0-9_.-]{1,64}"
            )
        for name, value in (("site", site), ("line", line), ("device", device)):
            if not IDENTIFIER_RE.match(value):
                raise ValueError(f"invalid {name} {value!r} (must match [A-Za-z0-9_.-]{{1,64}})")
        if not 1 <= batch_size <= DEFAULT_LIMITS.max_samples_per_message:
            raise ValueError(
                f"batch_size must be 1..{DEFAULT_LIMITS.max_samples_per_message} (contract limit)"
            )
        if not 1 <= max_inflight <= 65_000:
            raise ValueError("max_inflight must be 1..65000")
        if protocol not in ("3.1.1", "5"):
            raise ValueError("protocol must be '3.1.1' or '5'")
        if keepalive < 5:
            raise ValueError("keepalive must be at least 5 seconds")
        if not (0 < reconnect_min_s <= reconnect_max_s):
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        if not linger_s >= 0:
            raise ValueError("linger_s must be >= 0")

        self.prefix, self.site, self.line, self.device = prefix, site, line, device
        self.telemetry_topic = telemetry_topic(prefix, site, line, device)
        self.status_topic = status_topic(prefix, site, line, device)
        self.batch_size = batch_size
        self.max_inflight = max_inflight
        self.client_id = client_id or f"gw-{site}-{line}-{device}"
        self.keepalive = keepalive
        self.protocol: Literal["3.1.1", "5"] = protocol
        self.linger_s = linger_s
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.connect_timeout_s = connect_timeout_s
        self.ca_file = ca_file
        self.buffer = OutboxBuffer(buffer_path, max_buffer_rows, synchronous=synchronous)

        self._stats_lock = threading.Lock()
        self._stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._stats["max_buffer_rows"] = len(self.buffer)
        self.source_error: BaseException | None = None

        # Connection state; only touched by the thread inside run() (paho's
        # callbacks run there too, from Client.loop).
        self._client: mqtt.Client | None = None
        self._connected = False
        self._lost = False
        self._refusal: str | None = None
        self._connecting_since = 0.0
        self._next_attempt = 0.0
        self._backoff: float | None = None
        self._window = max_inflight
        self._cursor = 0  # highest outbox id published on the current connection
        self._inflight: dict[int, int] = {}  # mid -> outbox row id
        self._control_mids: set[int] = set()  # birth / offline status messages
        self._acked_ids: list[int] = []
        self._drops_unlogged = 0
        self._last_drop_log = -math.inf

    # ------------------------------------------------------------------ public

    def stats(self) -> dict[str, int]:
        """Counters (``STAT_KEYS``) plus current ``buffer_rows``, ``inflight``, ``connected``."""
        with self._stats_lock:
            out = dict(self._stats)
        out["buffer_rows"] = 0 if self.buffer.closed else len(self.buffer)
        out["inflight"] = len(self._inflight)
        out["connected"] = int(self._connected)
        return out

    @property
    def connected(self) -> bool:
        return self._connected

    def run(
        self,
        source: Iterable[SampleDict] | SampleSource,
        stop_event: threading.Event | None = None,
    ) -> dict[str, int]:
        """Forward ``source`` until it is exhausted *and* the outbox is drained, or until stop.

        On stop, samples already read are still written to the outbox (they are
        sent on the next run). Returns :meth:`stats`. If the source raised, the
        exception is re-raised after the shutdown.
        """
        stop = stop_event if stop_event is not None else threading.Event()
        reader_stop = threading.Event()
        samples: queue.Queue[object] = queue.Queue(maxsize=max(1000, 4 * self.batch_size))
        reader = threading.Thread(
            target=self._read_source,
            args=(source, samples, reader_stop, stop),
            name="gateway-reader",
            daemon=True,
        )
        self.source_error = None
        pending: list[SampleDict] = []
        pending_since = 0.0
        source_done = False
        self._next_attempt = 0.0
        reader.start()
        try:
            while True:
                # 1. samples -> outbox
                taken_batches = 0
                while not source_done and taken_batches < _MAX_BATCHES_PER_TURN:
                    try:
                        item = samples.get_nowait()
                    except queue.Empty:
                        break
                    if item is _END:
                        source_done = True
                        break
                    assert isinstance(item, dict)
                    if not pending:
                        pending_since = time.monotonic()
                    pending.append(item)
                    self._count("read")
                    if len(pending) >= self.batch_size:
                        self._flush(pending)
                        pending = []
                        taken_batches += 1
                if pending and (source_done or time.monotonic() - pending_since >= self.linger_s):
                    self._flush(pending)
                    pending = []

                # 2. network, 3. acknowledged rows, 4. publish window
                busy = taken_batches >= _MAX_BATCHES_PER_TURN
                self._service_network(0.0 if busy else 0.02)
                self._apply_acks()
                self._fill_window()

                if stop.is_set():
                    break
                if (
                    source_done
                    and not pending
                    and not self._inflight
                    and not self._acked_ids
                    and len(self.buffer) == 0
                ):
                    break
                if self._client is None and not busy:
                    # Offline: wait for samples (or the next connection attempt).
                    wait = min(0.05, max(0.0, self._next_attempt - time.monotonic()))
                    if wait > 0 and samples.empty():
                        stop.wait(wait)
        finally:
            reader_stop.set()
            # Let the reader finish its last hand-over (our sources stop promptly;
            # an arbitrary iterable blocked in next() is abandoned after 2 s), then
            # persist every sample already read: it goes out on the next run.
            reader.join(timeout=2.0)
            while True:
                try:
                    item = samples.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, dict):
                    pending.append(item)
                    self._count("read")
            if pending:
                self._flush(pending)
            self._shutdown()
        if self.source_error is not None:
            raise self.source_error
        return self.stats()

    def close(self) -> None:
        """Close the outbox (call after :meth:`run` has returned)."""
        self.buffer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------- source side

    def _read_source(
        self,
        source: Iterable[SampleDict] | SampleSource,
        out: queue.Queue[object],
        reader_stop: threading.Event,
        stop: threading.Event,
    ) -> None:
        def put(item: object) -> bool:
            while not (reader_stop.is_set() or stop.is_set()):
                try:
                    out.put(item, timeout=0.1)
                except queue.Full:
                    continue
                return True
            return False

        try:
            for sample in iterate(source, stop):
                if not put(sample):
                    return
        except Exception as exc:  # reported to the caller of run()
            log.error("sample source failed: %s", exc)
            self.source_error = exc
        put(_END)

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    def _flush(self, batch: list[SampleDict]) -> None:
        """Number ``batch``, serialize it and append it to the outbox (drop it when full)."""
        samples: list[dict[str, Any]] = []
        for sample in batch:
            raw = sample.get("values")
            values = {
                str(k): float(v)
                for k, v in (raw.items() if isinstance(raw, dict) else ())
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            }
            stamp = _sample_ts(sample.get("ts"))
            if not values or stamp is None:
                self._count("dropped_invalid")
                continue
            samples.append({"ts": stamp, "values": values})
        if not samples:
            return
        first = self.buffer.reserve_seq(len(samples))
        for i, sample in enumerate(samples):
            sample["seq"] = first + i
        for payload, chunk in self._encode(samples):
            try:
                self.buffer.append(self.telemetry_topic, payload)
            except BufferFull:
                self._dropped_full(chunk)
                continue
            with self._stats_lock:
                self._stats["buffered"] += len(chunk)
                if not self._connected:
                    self._stats["offline_buffered"] += len(chunk)
                rows = len(self.buffer)
                self._stats["max_buffer_rows"] = max(self._stats["max_buffer_rows"], rows)

    def _encode(self, samples: list[dict[str, Any]]) -> list[tuple[bytes, list[dict[str, Any]]]]:
        """Contract payloads for ``samples``, split in halves while over the payload limit."""
        if self.batch_size == 1 and len(samples) == 1:
            payload = orjson.dumps(samples[0])
        else:
            payload = orjson.dumps({"samples": samples})
        if len(payload) > DEFAULT_LIMITS.max_payload_bytes and len(samples) > 1:
            half = len(samples) // 2
            return self._encode(samples[:half]) + self._encode(samples[half:])
        return [(payload, samples)]

    def _dropped_full(self, chunk: list[dict[str, Any]]) -> None:
        self._count("dropped_full", len(chunk))
        self._drops_unlogged += len(chunk)
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
            age = self.buffer.oldest_age_ms()
            log.error(
                "OUTBOX FULL (%d rows at %s): DROPPING NEWEST DATA - %d sample(s) lost "
                "since the last report (latest seq %d), %d in total; oldest row waiting %.0f s",
                self.buffer.max_rows,
                self.buffer.path,
                self._drops_unlogged,
                chunk[-1]["seq"],
                self.stats()["dropped_full"],
                (age or 0) / 1000.0,
            )
            self._drops_unlogged = 0
            self._last_drop_log = now

    # ------------------------------------------------------------ network side

    def _service_network(self, wait_s: float) -> None:
        now = time.monotonic()
        if self._client is None:
            if now < self._next_attempt:
                return
            self._try_connect()
            if self._client is None:
                return
        client = self._client
        rc = client.loop(timeout=wait_s)
        if self._client is not client:
            return
        if self._refusal is not None:
            self._teardown(f"broker refused the connection: {self._refusal}", logging.ERROR)
        elif self._lost or rc != mqtt.MQTT_ERR_SUCCESS:
            self._teardown(f"connection lost ({mqtt.error_string(rc)})")
        elif not self._connected and now - self._connecting_since > self.connect_timeout_s:
            self._count("connect_failures")
            self._teardown(f"no CONNACK within {self.connect_timeout_s:g} s")

    def _try_connect(self) -> None:
        client = make_client(
            self.url, self.client_id, protocol=self.protocol, clean=True, ca_file=self.ca_file
        )
        client.connect_timeout = self.connect_timeout_s
        client.max_inflight_messages_set(self.max_inflight + 2)
        client.max_queued_messages_set(0)
        client.will_set(self.status_topic, _OFFLINE_PAYLOAD, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        self._lost = False
        self._refusal = None
        self._connecting_since = time.monotonic()
        try:
            host, port, keepalive = self.url.host, self.url.port, self.keepalive
            if self.protocol == "5":
                client.connect(host, port, keepalive=keepalive, clean_start=True)
            else:
                client.connect(host, port, keepalive=keepalive)
        except (OSError, ValueError) as exc:
            self._count("connect_failures")
            self._teardown(f"cannot connect to {self.url.redacted()}: {exc}")

    def _teardown(self, reason: str | None, level: int | None = None) -> None:
        """Drop the current client; forget in-flight ids; schedule the next attempt.

        ``reason`` None: final teardown at shutdown (no log, no retry scheduled).
        """
        client, was_connected = self._client, self._connected
        self._client = None
        self._connected = False
        self._lost = False
        self._refusal = None
        if client is not None:
            with contextlib.suppress(Exception):  # the socket may already be gone
                client.disconnect()
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        forgotten = len(self._inflight)
        self._inflight.clear()
        self._control_mids.clear()
        self._cursor = 0
        if reason is None:
            return
        if was_connected:
            self._backoff = self.reconnect_min_s
            log.warning(
                "%s; %d unacknowledged message(s) stay in the outbox (%d rows), retrying in %.1f s",
                reason,
                forgotten,
                len(self.buffer),
                self._backoff,
            )
        else:
            self._backoff = (
                self.reconnect_min_s
                if self._backoff is None
                else min(self._backoff * 2, self.reconnect_max_s)
            )
            # Loud on the first failure and once the backoff has reached its cap.
            first_or_capped = self._backoff in (self.reconnect_min_s, self.reconnect_max_s)
            log.log(
                level or (logging.WARNING if first_or_capped else logging.INFO),
                "%s; %d rows buffered, retrying in %.1f s",
                reason,
                len(self.buffer),
                self._backoff,
            )
        self._next_attempt = time.monotonic() + self._backoff * random.uniform(0.8, 1.2)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        if reason_code.is_failure:  # e.g. bad credentials, not authorized
            self._count("connect_failures")
            self._refusal = str(reason_code)
            return
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties else None
        if isinstance(receive_max, int) and receive_max > 0:
            # MQTT v5 flow control: stay within the broker's quota, leaving one slot
            # for the status messages. (paho's own limit cannot be changed once
            # connected, and paho does not apply Receive Maximum by itself.)
            self._window = max(1, min(self.max_inflight, receive_max - 1))
        else:
            self._window = self.max_inflight
        self._connected = True
        self._backoff = None
        with self._stats_lock:
            if self._stats["connects"]:
                self._stats["reconnects"] += 1
            self._stats["connects"] += 1
        birth = orjson.dumps({"state": "online", "ts": _now_ms()})
        info = client.publish(self.status_topic, birth, qos=1, retain=True)
        self._control_mids.add(info.mid)
        log.info(
            "connected to %s as %s; %d row(s) in the outbox, window %d",
            self.url.redacted(),
            self.client_id,
            len(self.buffer),
            self._window,
        )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is self._client:
            self._lost = True
            self._connected = False

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        if client is not self._client:
            return
        if mid in self._control_mids:
            self._control_mids.discard(mid)
            return
        row_id = self._inflight.pop(mid, None)
        if row_id is None:
            return
        if reason_code.is_failure:
            # The broker refused the message (MQTT v5 reason >= 0x80). Keep the
            # row: it is sent again on the next connection.
            self._count("nacked")
            log.error("broker rejected outbox row %d: %s", row_id, reason_code)
            return
        self._acked_ids.append(row_id)
        self._count("acked")

    def _apply_acks(self) -> None:
        if self._acked_ids:
            ids, self._acked_ids = self._acked_ids, []
            self.buffer.delete(ids)

    def _fill_window(self) -> None:
        client = self._client
        if client is None or not self._connected:
            return
        room = self._window - len(self._inflight)
        if room <= 0:
            return
        for row in self.buffer.peek(self._cursor, room):
            info = client.publish(row.topic, row.payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                # The socket went away under us; the loop notices and reconnects.
                log.debug("publish of row %d failed: %s", row.id, mqtt.error_string(info.rc))
                self._lost = True
                return
            self._inflight[info.mid] = row.id
            self._cursor = row.id
            self._count("published")

    def _shutdown(self) -> None:
        """Let in-flight messages finish, publish the offline status, disconnect."""
        client = self._client
        if client is not None and self._connected:
            deadline = time.monotonic() + 2.0
            while self._inflight and self._connected and time.monotonic() < deadline:
                client.loop(timeout=0.05)
            self._apply_acks()
            if self._connected:
                status = orjson.dumps({"state": "offline", "ts": _now_ms()})
                info = client.publish(self.status_topic, status, qos=1, retain=True)
                self._control_mids.add(info.mid)
                deadline = time.monotonic() + 2.0
                while info.mid in self._control_mids and self._connected:
                    if time.monotonic() >= deadline:
                        break
                    client.loop(timeout=0.05)
                client.disconnect()
                deadline = time.monotonic() + 1.0
                while not self._lost and time.monotonic() < deadline:
                    if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                        break
        self._teardown(None)
        self._apply_acks()
