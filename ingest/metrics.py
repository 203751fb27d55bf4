"""Counters of the service, a rate-limited logger, and the /healthz + /metrics endpoint."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COUNTERS = {
    "messages_received": "MQTT messages received",
    "messages_acked": "MQTT messages acknowledged after their samples were stored",
    "samples_accepted": "valid samples decoded",
    "readings_accepted": "valid readings (sample x sensor) decoded",
    "points_written": "points stored in the sink",
    "anomalies": "readings inside an anomaly episode",
    "anomaly_episodes": "anomaly episodes opened",
    "event_points": "anomaly_events points written: episodes opened and closed, gaps",
    "gaps": "streams that spoke again after a silence longer than processing.gap_factor intervals",
    "state_save_errors": "detector state snapshots that could not be written",
    "rejected_total": "messages or samples rejected, all reasons",
    "write_retries": "sink writes retried after a transient failure",
    "write_failures": "sink writes that failed (before a retry)",
    "lines_dead_lettered": "points the database refused, sent to the dead letter",
    "reconnects": "MQTT (re)connections",
    "dead_letters_failed": "dead letters that could not be delivered",
    "batches_spooled": "batches written to the on-disk spool while the database was unavailable",
    "batches_replayed": "spooled batches written to the database",
    "stalls": "subscriptions renewed by the stall watchdog",
}


class Metrics:
    """Thread-safe counters and gauges, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.rejects: defaultdict[str, int] = defaultdict(int)
        self.gauges: dict[str, float] = {
            "mqtt_connected": 0.0,
            "pending_messages": 0.0,
            "streams": 0.0,
            "last_write_unixtime": 0.0,
            "write_latency_seconds": 0.0,
            "spool_batches": 0.0,
            "spool_bytes": 0.0,
            "spool_full": 0.0,
            "streams_silent": 0.0,
            "state_save_seconds": 0.0,
        }
        self.started = time.time()

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def reject(self, code: str, n: int = 1) -> None:
        with self._lock:
            self.rejects[code] += n
            self.counters["rejected_total"] += n

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counters, "rejects": dict(self.rejects), **self.gauges}

    def stats_fields(self) -> tuple[dict[str, int], dict[str, float], dict[str, int]]:
        """Counters, gauges and rejects by reason, as the ``ingest_stats`` fields.

        ``rejected_total`` is named ``rejected``, and ``uptime_seconds`` is added.
        """
        with self._lock:
            counters = {
                ("rejected" if name == "rejected_total" else name): n
                for name, n in self.counters.items()
            }
            rejects = dict(self.rejects)
            gauges = {name: float(v) for name, v in list(self.gauges.items())}
        gauges["uptime_seconds"] = time.time() - self.started
        return counters, gauges, rejects

    def render(self) -> str:
        snap = self.snapshot()
        out = []
        for name, help_text in COUNTERS.items():
            out += [
                f"# HELP ingest_{name}_total {help_text}",
                f"# TYPE ingest_{name}_total counter",
                f"ingest_{name}_total {snap[name]}",
            ]
        out += [
            "# HELP ingest_rejects_total rejections by reason",
            "# TYPE ingest_rejects_total counter",
        ]
        out += [
            f'ingest_rejects_total{{reason="{code}"}} {n}'
            for code, n in sorted(snap["rejects"].items())
        ]
        for name in self.gauges:
            out += [f"# TYPE ingest_{name} gauge", f"ingest_{name} {snap[name]}"]
        return "\n".join(out) + "\n"


class RateLimitedLog:
    """At most ``burst`` lines per key per ``period`` seconds, then a count of the rest."""

    def __init__(self, logger: logging.Logger, burst: int = 5, period: float = 60.0) -> None:
        self.logger = logger
        self.burst = burst
        self.period = period
        self._state: dict[
            str, list[float]
        ] = {}  # key -> [window start, lines in window, suppressed]
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            start, count, suppressed = self._state.get(key, [now, 0, 0])
            if now - start >= self.period:
                if suppressed:
                    self.logger.warning(
                        "%d more %r messages were not logged in the last %.0f s",
                        suppressed,
                        key,
                        now - start,
                    )
                start, count, suppressed = now, 0, 0
            if count < self.burst:
                count += 1
                self.logger.warning(msg, *args)
            else:
                suppressed += 1
            self._state[key] = [start, count, suppressed]


class HealthServer:
    """``GET /healthz`` (200 when healthy, 503 with the reason otherwise) and ``GET /metrics``."""

    def __init__(self, listen: str, metrics: Metrics, health: Any) -> None:
        host, _, port = listen.rpartition(":")
        metrics_ref = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    body, code, ctype = (
                        metrics_ref.render().encode(),
                        200,
                        "text/plain; version=0.0.4",
                    )
                elif self.path.startswith("/healthz"):
                    problem = health()
                    body = (problem or "ok").encode() + b"\n"
                    code, ctype = (503 if problem else 200), "text/plain"
                else:
                    body, code, ctype = b"not found\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="health", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
