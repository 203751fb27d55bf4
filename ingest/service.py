"""``ingest run``: MQTT source -> processor -> sink, acknowledging after the write."""

from __future__ import annotations

import logging
import queue
import threading
import time

from ingest.config import Settings
from ingest.deadletter import DeadLetter, FileDeadLetter, MqttDeadLetter, NoDeadLetter
from ingest.decode import Rejection
from ingest.metrics import HealthServer, Metrics, RateLimitedLog
from ingest.mqtt_consumer import MqttSource, Received
from ingest.pipeline import Processor, ReadingsHook
from ingest.processing.detectors import ZScoreParams
from ingest.sinks.base import Sink, WriteError
from ingest.sinks.file import LineProtocolFileSink
from ingest.sinks.influx import InfluxV1Sink, InfluxV2Sink
from ingest.writer import BatchWriter

log = logging.getLogger(__name__)

#: Batches waiting for the writer thread (one more is being written).
WRITE_QUEUE = 2


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
            ZScoreParams(window=p.window, warmup=p.warmup, threshold=p.threshold),
            p.max_streams,
            on_readings,
        )
        self.sink = sink or build_sink(settings)
        self.source = MqttSource(settings.mqtt, self.metrics)
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
        self.exit_reason = ""
        self._write_queue: queue.Queue[tuple[list[str], list[Received]] | None] = queue.Queue(
            WRITE_QUEUE
        )
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
        if not self._last_write_ok:
            return "database writes failing"
        return None

    def _reject(self, rejections: list[Rejection]) -> None:
        for rej in rejections:
            self.metrics.reject(rej.code)
            self.reject_log.warning(
                rej.code, "rejected message on %s: %s: %s", rej.topic, rej.code, rej.reason
            )
            self.dead_letter.send(rej)

    # ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the sink, compile kernels, connect. Raises WriteError if the sink cannot open."""
        svc = self.settings.service
        self.processor.warm_up()
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
        try:
            self.start()
        except WriteError as exc:
            self.exit_reason = str(exc)
            log.error("%s", exc)
            return 1
        writer = threading.Thread(target=self._write_loop, name="writer", daemon=True)
        writer.start()
        pending_msgs: list[Received] = []
        pending_lines: list[str] = []
        first_pending = 0.0
        flush_interval = s.influx.flush_interval
        batch_size = s.influx.batch_size
        # Hand a batch over well before the broker's in-flight window is full.
        ack_window = max(1, s.mqtt.max_inflight // 4)
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
                wait = flush_interval
                if pending_msgs:
                    wait = max(0.0, first_pending + flush_interval - time.monotonic())
                msgs = self.source.get_batch(s.service.max_batch_messages, min(wait, 0.5))
                if msgs:
                    if not pending_msgs:
                        first_pending = time.monotonic()
                    pending_lines.extend(self._process(msgs))
                    pending_msgs.extend(msgs)
                if pending_msgs and (
                    len(pending_lines) >= batch_size
                    or len(pending_msgs) >= ack_window
                    or time.monotonic() - first_pending >= flush_interval
                ):
                    self._hand_over(pending_lines, pending_msgs)
                    pending_lines, pending_msgs = [], []
        finally:
            self.request_stop()
            if pending_msgs:
                self._hand_over(pending_lines, pending_msgs)
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
            if self.health:
                self.health.stop()
        return code

    def _process(self, msgs: list[Received]) -> list[str]:
        result = self.processor.process([(m.topic, m.payload, m.received) for m in msgs])
        self._reject(result.rejections)
        self.metrics.inc("samples_accepted", result.samples)
        self.metrics.inc("readings_accepted", result.readings)
        self.metrics.inc("anomalies", result.anomalies)
        self.metrics.set("streams", len(self.processor.registry))
        return result.lines

    def _hand_over(self, lines: list[str], msgs: list[Received]) -> None:
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
        """Writer thread: write each batch, make its dead letters safe, then acknowledge."""
        while True:
            item = self._write_queue.get()
            if item is None:
                return
            lines, msgs = item
            t0 = time.monotonic()
            ok = self.writer.write(lines)
            self._last_write_ok = ok
            if not ok:
                log.warning("writes abandoned at the shutdown deadline")
                return  # later batches must not be acknowledged before this one
            self.metrics.inc("points_written", len(lines))
            self.metrics.set("write_latency_seconds", time.monotonic() - t0)
            self.metrics.set("last_write_unixtime", time.time())
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
