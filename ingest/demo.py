"""``ingest demo``: broker, simulated fleet and the real ingest path in one command.

Nothing needs to run beforehand: an embedded MQTT broker (amqtt) starts on a
free loopback port unless ``--mqtt-url`` is given. The simulated fleet
publishes over real MQTT, the real consumer and kernels process it, and points
go to InfluxDB when one is configured (``INGEST_INFLUX_URL`` or ``--config``),
otherwise to a line-protocol file. The summary compares the anomaly flags with
the faults the simulator injected.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from devices.simulator import FaultLabel, Fleet, SimStats, run_fleet, write_labels
from ingest.config import Settings, load_settings
from ingest.processing.detectors import StreamRegistry
from ingest.service import IngestService

log = logging.getLogger("ingest.demo")

#: A flag this long after a fault's last sample still counts as finding it
#: (a rolling window notices a level shift or a stuck sensor's release late).
MATCH_TOLERANCE_MS = 2000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedBroker:
    """amqtt in a background thread with its own event loop, on 127.0.0.1."""

    def __init__(self) -> None:
        self.port = _free_port()
        self._loop = asyncio.new_event_loop()
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="amqtt", daemon=True)

    def _run(self) -> None:
        from amqtt.broker import Broker

        asyncio.set_event_loop(self._loop)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        try:
            self._broker = Broker(config, loop=self._loop)
            self._loop.run_until_complete(self._broker.start())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> str:
        for name in ("amqtt", "transitions", "passlib"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("embedded MQTT broker did not start within 20 s")
        if self._error is not None:
            raise RuntimeError(f"embedded MQTT broker failed: {self._error}")
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        with contextlib.suppress(Exception):
            future.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@dataclass
class Flags:
    """Readings the detectors flagged, per stream, in time order."""

    by_stream: dict[tuple[str, str, str, str], list[int]] = field(
        default_factory=lambda: defaultdict(list)
    )
    total: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hook(
        self,
        registry: StreamRegistry,
        rows: npt.NDArray[Any],
        ts: npt.NDArray[Any],
        values: npt.NDArray[Any],
        anomaly: npt.NDArray[Any],
    ) -> None:
        idx = anomaly.nonzero()[0]
        with self.lock:
            for i in idx.tolist():
                self.by_stream[registry.keys[int(rows[i])]].append(int(ts[i]))
            self.total += len(idx)


@dataclass(frozen=True)
class Score:
    recall_by_kind: dict[str, tuple[int, int]]  # kind -> (found, injected)
    flagged: int
    flagged_in_faults: int

    @property
    def precision(self) -> float:
        return self.flagged_in_faults / self.flagged if self.flagged else float("nan")

    @property
    def recall(self) -> float:
        found = sum(f for f, _ in self.recall_by_kind.values())
        injected = sum(n for _, n in self.recall_by_kind.values())
        return found / injected if injected else float("nan")


def score_flags(
    labels: list[FaultLabel], flags: Flags, tolerance_ms: int = MATCH_TOLERANCE_MS
) -> Score:
    """Event recall per fault kind, and the share of flagged readings inside a fault.

    A fault is found when its stream has a flag between its first sample and
    ``tolerance_ms`` after its last. A flag is a true positive when it lies in
    such an interval of any fault on its stream.
    """
    windows: dict[tuple[str, str, str, str], list[tuple[int, int]]] = defaultdict(list)
    recall: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for lab in labels:
        key = (lab.site, lab.line, lab.device, lab.sensor)
        lo, hi = lab.start_ms, lab.end_ms + tolerance_ms
        windows[key].append((lo, hi))
        ts = flags.by_stream.get(key, [])
        i = bisect.bisect_left(ts, lo)
        recall[lab.kind][1] += 1
        recall[lab.kind][0] += int(i < len(ts) and ts[i] <= hi)
    inside = 0
    for key, ts_list in flags.by_stream.items():
        spans = windows.get(key, [])
        inside += sum(any(lo <= t <= hi for lo, hi in spans) for t in ts_list)
    return Score({k: (v[0], v[1]) for k, v in sorted(recall.items())}, flags.total, inside)


def _demo_settings(args: argparse.Namespace, mqtt_url: str, embedded: bool) -> Settings:
    base = load_settings(args.config)
    out = os.path.abspath(args.out)
    mqtt = base.mqtt.model_copy(
        update={
            "url": mqtt_url,
            "client_id": f"ingest-demo-{os.getpid()}",
            "session_expiry": 60,
            "dead_letter": "file",
            "dead_letter_file": os.path.join(out, "rejected.jsonl"),
            **({"protocol": "3.1.1"} if embedded else {}),  # amqtt speaks MQTT 3.1.1
        }
    )
    influx = base.influx.model_copy(
        update={"file": os.path.join(out, "telemetry.lp"), "flush_interval": 0.5}
    )
    service = base.service.model_copy(update={"health_listen": "127.0.0.1:0"})
    # Each demo starts with cold detectors: its precision/recall must not depend on the last.
    processing = base.processing.model_copy(update={"state_file": ""})
    return base.model_copy(
        update={"mqtt": mqtt, "influx": influx, "service": service, "processing": processing}
    )


def run_demo(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    logging.getLogger("ingest.rejects").setLevel(logging.ERROR)  # counted in the summary
    os.makedirs(args.out, exist_ok=True)
    for name in ("telemetry.lp", "rejected.jsonl"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(args.out, name))
    broker: EmbeddedBroker | None = None
    if args.mqtt_url:
        mqtt_url = args.mqtt_url
    else:
        broker = EmbeddedBroker()
        mqtt_url = broker.start()
    settings = _demo_settings(args, mqtt_url, embedded=broker is not None)
    target = settings.influx.url or settings.influx.file
    print(
        f"factory-ingest demo: broker {mqtt_url}{' (embedded)' if broker else ''}, "
        f"{args.devices} machines x 4 sensors at {args.rate:g} Hz for {args.duration:g} s "
        f"-> {target}"
    )

    flags = Flags()
    service = IngestService(settings, on_readings=flags.hook)
    ingest_thread = threading.Thread(target=service.run, name="ingest", daemon=True)
    ingest_thread.start()
    if not service.source.wait_connected(30):
        print("ingest could not connect to the broker", file=sys.stderr)
        service.request_stop()
        return 1

    fleet = Fleet(args.devices, rate_hz=args.rate, seed=args.seed, fault_rate=1.0)
    latest = SimStats()
    stop = threading.Event()

    def progress(stats: SimStats) -> None:
        nonlocal latest
        latest = stats

    sim_result: list[SimStats] = []
    sim = threading.Thread(
        target=lambda: sim_result.append(
            run_fleet(
                mqtt_url,
                fleet=fleet,
                duration_s=args.duration,
                batch=10,
                bad_message_rate=0.02,
                stop=stop,
                on_progress=progress,
                protocol=settings.mqtt.protocol,
            )
        ),
        name="simulator",
        daemon=True,
    )
    started = time.monotonic()
    sim.start()
    tty = sys.stdout.isatty() and not args.quiet
    last_print = 0.0
    try:
        while sim.is_alive():
            sim.join(0.5)
            now = time.monotonic()
            if args.quiet or (not tty and now - last_print < 5):
                continue
            last_print = now
            m = service.metrics.snapshot()
            line = (
                f"  t={now - started:5.1f}s  published {latest.readings:7d} readings  "
                f"written {m['points_written']:7d}  rejected {m['rejected_total']:4d}  "
                f"anomalies {m['anomalies']:5d}"
            )
            print("\r" + line if tty else line, end="" if tty else "\n", flush=True)
    except KeyboardInterrupt:
        stop.set()
        sim.join(10)
    if tty:
        print()
    stats = sim_result[0] if sim_result else latest
    # Let ingest take and write everything published (telemetry, malformed messages, and
    # each device's birth and offline status), then stop it.
    published = stats.messages + sum(stats.bad_messages.values()) + 2 * len(fleet.devices)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = service.metrics.snapshot()
        if m["messages_received"] >= published and m["pending_messages"] == 0:
            break
        time.sleep(0.2)
    service.request_stop()
    ingest_thread.join(settings.service.shutdown_timeout + 10)
    if broker:
        broker.stop()
    labels_path = os.path.join(args.out, "labels.csv")
    write_labels(labels_path, fleet.labels)
    _summary(stats, service, score_flags(fleet.labels, flags), args, labels_path, target)
    return 0


def _summary(
    stats: SimStats,
    service: IngestService,
    score: Score,
    args: argparse.Namespace,
    labels_path: str,
    target: str,
) -> None:
    m = service.metrics.snapshot()
    bad_sent = sum(stats.bad_messages.values())
    print("\nSummary")
    print(
        f"  published      {stats.samples} samples ({stats.readings} readings) in "
        f"{stats.messages} messages, plus {bad_sent} malformed messages"
    )
    print(
        f"  ingested       {m['readings_accepted']} readings, {m['points_written']} points "
        f"written to {target}"
    )
    rejects = ", ".join(f"{k} {v}" for k, v in sorted(m["rejects"].items())) or "none"
    print(
        f"  rejected       {m['rejected_total']} ({rejects}); details in "
        f"{os.path.join(args.out, 'rejected.jsonl')}"
    )
    print(
        f"  anomalies      {score.flagged} readings flagged; "
        f"{score.flagged_in_faults} of them inside an injected fault"
    )
    print(
        f"  faults         {sum(n for _, n in score.recall_by_kind.values())} injected "
        f"(ground truth: {labels_path})"
    )
    print("  detection by fault kind (found / injected), default detectors:")
    for kind, (found, n) in score.recall_by_kind.items():
        print(f"    {kind:12s} {found:3d} / {n:3d}")
    print(
        f"  precision      {score.precision:.1%} of flagged readings lie in a fault "
        f"(+{MATCH_TOLERANCE_MS / 1000:g} s)"
    )
    print(f"  recall         {score.recall:.1%} of injected faults flagged at least once")
