"""``ingest run``: MQTT source -> processor -> sink, acknowledging after the write."""

from __future__ import annotations

import logging
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
            settings.mqtt.topic_prefix, settings.limits.limits(),
            ZScoreParams(window=p.window, warmup=p.warmup, threshold=p.threshold),
            p.max_streams, on_readings,
        )  # fmt: skip
        self.sink = sink or build_sink(settings)
        self.source = MqttSource(settings.mqtt, self.metrics)
        self.dead_letter = self._build_dead_letter()
        self.writer = BatchWriter(
            self.sink, self.metrics, self._refused_line,
            retry_initial=settings.influx.retry_initial, retry_max=settings.influx.retry_max,
            stop=self._write_stop,
        )  # fmt: skip
        self.reject_log = RateLimitedLog(logging.getLogger("ingest.rejects"))
        self.health: HealthServer | None = None
        self._last_write_ok = True
        self.exit_reason = ""

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
        """Process until ``stop_event``; returns the process exit code."""
        s = self.settings
        try:
            self.start()
        except WriteError as exc:
            self.exit_reason = str(exc)
            log.error("%s", exc)
            return 1
        pending_msgs: list[Received] = []
        pending_lines: list[str] = []
        first_pending = 0.0
        flush_interval = s.influx.flush_interval
        batch_size = s.influx.batch_size
        # Flush before the broker's in-flight window is full, or it stops sending.
        ack_window = max(1, s.mqtt.max_inflight // 2)
        try:
            while not self.stop_event.is_set():
                if self.source.fatal:
                    self.exit_reason = self.source.fatal
                    log.error("%s", self.source.fatal)
                    return 2
                wait = (
                    flush_interval
                    if not pending_msgs
                    else max(0.0, first_pending + flush_interval - time.monotonic())
                )
                msgs = self.source.get_batch(s.service.max_batch_messages, min(wait, 0.5))
                if msgs:
                    if not pending_msgs:
                        first_pending = time.monotonic()
                    result = self.processor.process(
                        [(m.topic, m.payload, m.received) for m in msgs]
                    )
                    self._reject(result.rejections)
                    pending_lines.extend(result.lines)
                    pending_msgs.extend(msgs)
                    self.metrics.inc("samples_accepted", result.samples)
                    self.metrics.inc("readings_accepted", result.readings)
                    self.metrics.inc("anomalies", result.anomalies)
                    self.metrics.set("streams", len(self.processor.registry))
                self.metrics.set("pending_messages", len(pending_msgs))
                if pending_msgs and (
                    len(pending_lines) >= batch_size
                    or len(pending_msgs) >= ack_window
                    or time.monotonic() - first_pending >= flush_interval
                ):
                    if not self._flush(pending_lines, pending_msgs):
                        break
                    pending_lines, pending_msgs = [], []
            return 0
        finally:
            self._shutdown(pending_lines, pending_msgs)

    def _flush(self, lines: list[str], msgs: list[Received]) -> bool:
        """Write, then make dead letters safe, then acknowledge. False if stopped midway."""
        t0 = time.monotonic()
        ok = self.writer.write(lines)
        self._last_write_ok = ok
        if not ok:
            return False
        self.metrics.inc("points_written", len(lines))
        self.metrics.set("write_latency_seconds", time.monotonic() - t0)
        self.metrics.set("last_write_unixtime", time.time())
        if not self.dead_letter.flush(timeout=10.0):
            self.metrics.inc("dead_letters_failed")
            log.warning(
                "dead letters not confirmed by the broker; leaving %d messages "
                "unacknowledged for redelivery",
                len(msgs),
            )
            return True
        self.source.ack(msgs)
        return True

    def _shutdown(self, lines: list[str], msgs: list[Received]) -> None:
        self.request_stop()
        try:
            if msgs:
                log.info("shutting down: writing %d pending points", len(lines))
                if self._flush(lines, msgs):
                    log.info("pending points written and acknowledged")
                else:
                    log.warning(
                        "shutdown deadline: %d messages left unacknowledged; the broker "
                        "will redeliver them",
                        len(msgs),
                    )
        finally:
            self._write_stop.set()
            self.source.stop()
            self.sink.close()
            if self.health:
                self.health.stop()
