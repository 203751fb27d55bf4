"""``ingest run``: MQTT source -> processor -> sink, acknowledging after the write."""

from __future__ import annotations

import logging
import queue
import random
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ingest.config import Settings
from ingest.deadletter import DeadLetter, FileDeadLetter, MqttDeadLetter, NoDeadLetter
from ingest.decode import Rejection
from ingest.metrics import HealthServer, Metrics, RateLimitedLog
from ingest.mqtt_consumer import MqttSource, Received
from ingest.pipeline import Processor, ReadingsHook
from ingest.sinks.base import LineBatch, Sink, WriteError
from ingest.sinks.file import LineProtocolFileSink
from ingest.sinks.influx import InfluxV1Sink, InfluxV2Sink
from ingest.sinks.lineprotocol import stats_lines
from ingest.spool import Spool, SpoolFullError
from ingest.writer import BatchWriter, WriteResult

log = logging.getLogger(__name__)

#: Batches waiting for the writer thread (besides those being written).
WRITE_QUEUE = 2
#: Seconds between sweeps for streams that went silent (the ``gap`` events).
SWEEP_INTERVAL = 5.0
#: Python's GIL switch interval while ingest runs (the default is 5 ms). paho's network
#: thread gives the GIL up for every socket call, several per message, and then waits
#: for it while the processing thread runs Python code; a shorter interval hands it
#: back sooner. Measured with bench/e2e.py-style drains of single-reading messages.
GIL_SWITCH_INTERVAL = 0.001


def build_sink(settings: Settings) -> Sink:
    s = settings.influx
    if not s.url:
        return LineProtocolFileSink(s.file)
    if s.api == "v1":
        return InfluxV1Sink(
            s.url,
            s.database,
            retention_policy=s.retention_policy,
            username=s.username,
            password=s.password,
            use_gzip=s.gzip,
            timeout=s.timeout,
            create_database=s.create_database,
        )
    assert s.token is not None  # checked by the settings
    return InfluxV2Sink(
        s.url, bucket=s.bucket, org=s.org, token=s.token, use_gzip=s.gzip, timeout=s.timeout
    )


class IngestService:
    def __init__(
        self,
        settings: Settings,
        *,
        sink: Sink | None = None,
        on_readings: ReadingsHook | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.stop_event = threading.Event()
        self._write_stop = threading.Event()  # set at the shutdown deadline: abandon retries
        p = settings.processing
        self.processor = Processor(
            settings.mqtt.topic_prefix,
            settings.limits.limits(),
            p.params(),
            p.max_streams,
            on_readings,
            p.detector_rules(),
        )
        self._state_file = Path(p.state_file) if p.state_file else None
        self._next_snapshot = 0.0
        self._next_sweep = 0.0
        self._next_stats = 0.0
        self.sink = sink or build_sink(settings)
        self.source = MqttSource(settings.mqtt, self.metrics, settings.service.max_queued_bytes)
        self.dead_letter = self._build_dead_letter()
        self.writer = BatchWriter(
            self.sink,
            self.metrics,
            self._refused_line,
            retry_initial=settings.influx.retry_initial,
            retry_max=settings.influx.retry_max,
            stop=self._write_stop,
        )
        self.reject_log = RateLimitedLog(logging.getLogger("ingest.rejects"))
        self.health: HealthServer | None = None
        self._last_write_ok = True
        self._spool_full = False
        self.spool: Spool | None = None  # opened in start()
        self.exit_reason = ""
        self._write_queue: queue.Queue[tuple[LineBatch, list[Received]] | None] = queue.Queue(
            WRITE_QUEUE
        )
        self._spool_lock = threading.Lock()  # writes in flight may spool at the same time
        self._spooled = threading.Event()  # a write gave up and spooled: start draining
        # Messages handed to the writer (processing thread) and settled by it (writer thread).
        self._handed = 0
        self._done = 0

    def request_stop(self) -> None:
        """Stop taking messages; the last write gets ``service.shutdown_timeout`` seconds."""
        if self.stop_event.is_set():
            return
        self.stop_event.set()
        timer = threading.Timer(self.settings.service.shutdown_timeout, self._write_stop.set)
        timer.daemon = True
        timer.start()

    def _build_dead_letter(self) -> DeadLetter:
        m = self.settings.mqtt
        if m.dead_letter == "mqtt":
            return MqttDeadLetter(self.source.publish, m.topic_prefix)
        if m.dead_letter == "file":
            assert m.dead_letter_file
            return FileDeadLetter(m.dead_letter_file)
        return NoDeadLetter()

    def _refused_line(self, line: str, reason: str) -> None:
        self.metrics.reject("write_refused")
        self.dead_letter.send(Rejection("", "write_refused", reason, line.encode()))

    def health_problem(self) -> str | None:
        """None when healthy, else why not (for /healthz)."""
        if not self.source.connected:
            return "MQTT broker not connected"
        if self._spool_full:
            return "spool full: acknowledgements held back until the database answers"
        if not self._last_write_ok and not self.spool:
            return "database writes failing"
        return None

    def _reject(self, rejections: list[Rejection]) -> None:
        for rej in rejections:
            self.metrics.reject(rej.code)
            self.reject_log.warning(
                rej.code, "rejected message on %s: %s: %s", rej.topic[:200], rej.code, rej.reason
            )
            self.dead_letter.send(rej)

    # ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the sink, compile kernels, connect. Raises WriteError if the sink cannot open."""
        svc = self.settings.service
        self.processor.warm_up()
        self._restore_state()
        sp = self.settings.spool
        if sp.dir:
            self.spool = Spool(sp.dir, max_bytes=sp.max_bytes, segment_bytes=sp.segment_bytes)
            self._spool_gauges()
        self.sink.open()
        if svc.health_listen:
            self.health = HealthServer(svc.health_listen, self.metrics, self.health_problem)
            self.health.start()
            log.info(
                "health and metrics on http://%s:%d/healthz and /metrics",
                svc.health_listen.rpartition(":")[0] or "0.0.0.0",
                self.health.port,
            )
        self.source.start()

    def run(self) -> int:
        """Process until ``stop_event``; returns the process exit code.

        The processing thread (this one) decodes, scores and formats; a writer
        thread writes each batch and then acknowledges its messages, in order.
        At most ``WRITE_QUEUE`` batches wait for the writer: when the database is
        slow, processing blocks, acknowledgements stop, and the broker holds
        the rest (its in-flight window bounds what ingest keeps in memory).
        """
        s = self.settings
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        try:
            self.start()
        except WriteError as exc:
            self.exit_reason = str(exc)
            log.error("%s", exc)
            return 1
        writer = threading.Thread(target=self._write_loop, name="writer", daemon=True)
        writer.start()
        pending_msgs: list[Received] = []
        pending_lines = LineBatch()
        first_pending = 0.0
        flush_interval = s.influx.flush_interval
        flush_idle = s.influx.flush_when_idle
        batch_size = s.influx.batch_size
        # Hand a batch over well before the broker's in-flight window is full.
        ack_window = max(1, s.mqtt.max_inflight // 4)
        per_message = 1.0  # lines per message, moving average
        code = 0
        try:
            while not self.stop_event.is_set():
                if self.source.fatal:
                    self.exit_reason = self.source.fatal
                    log.error("%s", self.source.fatal)
                    code = 2
                    break
                if not writer.is_alive():
                    break
                self._watchdog()
                wait = flush_interval
                if pending_msgs:
                    wait = max(0.0, first_pending + flush_interval - time.monotonic())
                room = max(1, batch_size - len(pending_lines))
                take = min(s.service.max_batch_messages, max(1, int(room / max(per_message, 1.0))))
                msgs = self.source.get_batch(take, min(wait, 0.5), s.service.batch_linger)
                if msgs:
                    if not pending_msgs and not pending_lines:
                        first_pending = time.monotonic()
                    lines = self._process(msgs)
                    # Readings per message, to take about a write's worth at a time:
                    # 2,000 messages of 100 readings would be 40 writes' worth at once,
                    # in memory and in front of every newer message (latency).
                    per_message += 0.2 * (len(lines) / len(msgs) - per_message)
                    pending_lines.merge(lines)
                    pending_msgs.extend(msgs)
                events = self._periodic()
                if events:
                    if not pending_msgs and not pending_lines:
                        first_pending = time.monotonic()
                    pending_lines.extend(events)
                if (pending_msgs or pending_lines) and (
                    len(pending_lines) >= batch_size
                    or len(pending_msgs) >= ack_window
                    or time.monotonic() - first_pending >= flush_interval
                    or (flush_idle and not self.source.pending())  # none waiting: write now
                ):
                    self._hand_over(pending_lines, pending_msgs)
                    pending_lines, pending_msgs = LineBatch(), []
        finally:
            self.request_stop()
            if pending_msgs or pending_lines:
                self._hand_over(pending_lines, pending_msgs)
            self._save_state()
            while writer.is_alive():
                try:
                    self._write_queue.put(None, timeout=0.5)
                    break
                except queue.Full:
                    continue
            writer.join(self.settings.service.shutdown_timeout + 5.0)
            if self._handed - self._done:
                log.warning(
                    "shutdown: %d messages left unacknowledged; the broker will redeliver them",
                    self._handed - self._done,
                )
            self.source.stop()
            self.sink.close()
            if self.spool is not None:
                self.spool.close()
            if self.health:
                self.health.stop()
        return code

    def _restore_state(self) -> None:
        path = self._state_file
        if path is None or not path.exists():
            return
        try:
            n = self.processor.detectors.load(path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("detector state %s not restored (%s): starting afresh", path, exc)
            return
        log.info("detector state of %d streams restored from %s", n, path)

    def _save_state(self) -> None:
        path = self._state_file
        if path is None:
            return
        t0 = time.monotonic()
        try:
            n = self.processor.detectors.save(path)
        except OSError as exc:
            self.metrics.inc("state_save_errors")
            log.warning("detector state not saved to %s: %s", path, exc)
            return
        self.metrics.set("state_save_seconds", time.monotonic() - t0)
        log.debug("detector state of %d streams saved to %s", n, path)

    def _periodic(self) -> list[str]:
        """Snapshots of the detector state, the sweep for silent streams, and the
        ``ingest_stats`` points; returns the lines to write."""
        now = time.monotonic()
        lines: list[str] = []
        if now >= self._next_snapshot:
            if self._next_snapshot:
                self._save_state()
            self._next_snapshot = now + self.settings.processing.snapshot_interval
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            events = self.processor.sweep_silent(int(time.time() * 1000))
            self.metrics.inc("event_points", len(events))
            self.metrics.set("streams_silent", len(self.processor.silent))
            lines.extend(events)
        interval = self.settings.service.stats_interval
        if interval and now >= self._next_stats:
            self._next_stats = now + interval
            lines.extend(self.stats_lines())
        return lines

    def stats_lines(self, ts_ms: int | None = None) -> list[str]:
        """The service's metrics now, as ``ingest_stats`` points tagged with the client id."""
        counters, gauges, rejects = self.metrics.stats_fields()
        when = int(time.time() * 1000) if ts_ms is None else ts_ms
        return stats_lines(self.settings.mqtt.client_id, counters, gauges, rejects, when)

    def _watchdog(self) -> None:
        """Renew a subscription that has gone quiet while connected (a broker that lost
        it, a half-open connection): resubscribe first, reconnect if that did not help."""
        timeout = self.settings.mqtt.stall_timeout
        src = self.source
        if not timeout or not src.connected:
            return
        quiet = time.time() - max(src.last_message_at, src.connected_at)
        if quiet < timeout:
            return
        self.metrics.inc("stalls")
        if src.renewals == 0:
            log.warning("no message for %.0f s while connected: resubscribing", quiet)
            src.resubscribe()
        else:
            log.warning("still no message %.0f s after resubscribing: reconnecting", quiet)
            src.reconnect()

    def _process(self, msgs: list[Received]) -> LineBatch:
        result = self.processor.process([(m.topic, m.payload, m.received) for m in msgs])
        for m in msgs:  # only the packet id is needed until the acknowledgement
            m.topic, m.payload = "", b""
        self._reject(result.rejections)
        self.metrics.inc("samples_accepted", result.samples)
        self.metrics.inc("readings_accepted", result.readings)
        self.metrics.inc("anomalies", result.anomalies)
        self.metrics.inc("anomaly_episodes", result.events_opened)
        self.metrics.inc("gaps", result.gaps)
        self.metrics.inc("event_points", result.events_opened + result.events_closed + result.gaps)
        self.metrics.set("streams_silent", len(self.processor.silent))
        self.metrics.set("streams", len(self.processor.registry))
        return result.lines

    def _hand_over(self, lines: LineBatch, msgs: list[Received]) -> None:
        self._handed += len(msgs)
        self.metrics.set("pending_messages", self._handed - self._done)
        while True:  # blocks while the writer is behind: backpressure
            try:
                self._write_queue.put((lines, msgs), timeout=0.5)
                return
            except queue.Full:
                if self._write_stop.is_set():
                    return

    def _write_loop(self) -> None:
        """Writer thread: write each batch, make its dead letters safe, then acknowledge.

        Up to ``influx.write_concurrency`` writes are in flight at once (a pool of
        threads); their messages are acknowledged in arrival order all the same. The
        lines that update earlier points (:meth:`LineBatch.parts`) go through one more
        thread, in the order they were made.
        While batches wait in the spool, new batches go behind them (order is kept),
        the oldest spooled batch is retried with backoff, and nothing is in flight.
        """
        spool = self.spool
        concurrency = self.settings.influx.write_concurrency
        pool = ThreadPoolExecutor(concurrency, "write") if concurrency > 1 else None
        # Lines that must reach the database in order go through one thread, in turn.
        serial = ThreadPoolExecutor(1, "write-ordered") if pool is not None else None
        inflight: deque[tuple[list[Future[WriteResult]], list[Received]]] = deque()
        retry_initial, retry_max = (
            self.settings.influx.retry_initial,
            self.settings.influx.retry_max,
        )
        delay, next_drain = retry_initial, 0.0

        def settle(limit: int) -> bool:
            """Acknowledge finished writes in order, waiting while more than ``limit``
            are in flight; False when one was abandoned."""
            while inflight and (len(inflight) > limit or all(f.done() for f in inflight[0][0])):
                futures, msgs = inflight.popleft()
                if any(f.result() is WriteResult.STOPPED for f in futures):
                    log.warning("writes abandoned at the shutdown deadline")
                    return False  # later batches must not be acknowledged before this one
                self._settle(msgs)
            return True

        try:
            while True:
                wait = 0.5 if not inflight else 0.05
                if spool:
                    wait = min(wait, max(0.0, next_drain - time.monotonic()))
                try:
                    item = self._write_queue.get(timeout=wait)
                except queue.Empty:
                    item, idle = None, True
                else:
                    idle = False
                if not settle(0 if item is None and not idle else concurrency):
                    return
                if item is None and not idle:
                    return  # shutdown; whatever is spooled stays on disk for the next start
                if item is not None:
                    lines, msgs = item
                    if spool or pool is None or serial is None:  # one at a time
                        if not settle(0):
                            return
                        done: Future[WriteResult] = Future()
                        done.set_result(self._write_or_spool(lines))
                        inflight.append(([done], msgs))
                    else:
                        # Telemetry in parallel; episode and gap updates in order, or
                        # an episode's closing write could land before its opening.
                        plain, ordered = lines.parts()
                        futures = [pool.submit(self._write_or_spool, plain)]
                        if ordered:
                            futures.append(serial.submit(self._write_or_spool, ordered))
                        inflight.append((futures, msgs))
                    if not settle(concurrency - 1):
                        return
                if self._spooled.is_set():
                    self._spooled.clear()
                    delay, next_drain = retry_initial, time.monotonic() + retry_initial
                if spool and not inflight and time.monotonic() >= next_drain:
                    if self._drain_one() is WriteResult.WRITTEN:
                        delay, next_drain = retry_initial, 0.0
                        if not spool:
                            log.info("spool drained: writing directly again")
                    else:
                        next_drain = time.monotonic() + delay * random.uniform(0.8, 1.2)
                        delay = min(delay * 2, retry_max)
        finally:
            for executor in (pool, serial):
                if executor is not None:
                    executor.shutdown(wait=False, cancel_futures=True)

    def _write_or_spool(self, lines: LineBatch) -> WriteResult:
        """Write a batch; spool it after ``spool.after`` seconds of failure (at once when
        shutting down); while the spool holds batches, append behind them."""
        spool = self.spool
        if spool:
            return self._to_spool(lines)
        give_up = None
        if spool is not None:
            give_up = 0.0 if self.stop_event.is_set() else self.settings.spool.after
        result = self._timed_write(lines, give_up)
        if result is WriteResult.GAVE_UP:
            log.warning(
                "database unavailable for %.0f s: spooling to disk", self.settings.spool.after
            )
            result = self._to_spool(lines)
            self._spooled.set()
        return result

    def _timed_write(self, lines: LineBatch, give_up_after: float | None) -> WriteResult:
        t0 = time.monotonic()
        result, refused = self.writer.write_counted(lines, give_up_after)
        self._last_write_ok = result is WriteResult.WRITTEN
        if self._last_write_ok:
            self.metrics.inc("points_written", len(lines) - refused)
            self.metrics.set("write_latency_seconds", time.monotonic() - t0)
            self.metrics.set("last_write_unixtime", time.time())
        return result

    def _to_spool(self, lines: LineBatch) -> WriteResult:
        """Durably spool a batch; when the spool is full, fall back to waiting for the database."""
        assert self.spool is not None
        try:
            with self._spool_lock:
                self.spool.append(list(lines))
        except SpoolFullError as exc:
            self._spool_full = True
            self.metrics.set("spool_full", 1.0)
            self.reject_log.warning(
                "spool_full", "%s: holding acknowledgements until the database answers", exc
            )
            return self._timed_write(lines, None)
        self._spool_full = False
        self.metrics.set("spool_full", 0.0)
        self.metrics.inc("batches_spooled")
        self._spool_gauges()
        return WriteResult.WRITTEN

    def _drain_one(self) -> WriteResult:
        assert self.spool is not None
        with self._spool_lock:
            lines = self.spool.peek()
        if lines is None:
            return WriteResult.WRITTEN
        result = self._timed_write(LineBatch(lines), 0.0)
        if result is WriteResult.WRITTEN:
            with self._spool_lock:
                self.spool.consume()
            self.metrics.inc("batches_replayed")
            self._spool_gauges()
        return result

    def _spool_gauges(self) -> None:
        assert self.spool is not None
        self.metrics.set("spool_batches", self.spool.pending)
        self.metrics.set("spool_bytes", self.spool.size_bytes)

    def _settle(self, msgs: list[Received]) -> None:
        """Acknowledge a stored batch once its dead letters are safe with the broker."""
        if self.dead_letter.flush(timeout=10.0):
            self.source.ack(msgs)
        else:
            self.metrics.inc("dead_letters_failed")
            log.warning(
                "dead letters not confirmed by the broker; leaving %d messages "
                "unacknowledged for redelivery",
                len(msgs),
            )
        self._done += len(msgs)
        self.metrics.set("pending_messages", self._handed - self._done)
