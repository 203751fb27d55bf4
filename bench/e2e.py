"""End-to-end throughput and latency: MQTT -> consumer -> InfluxDB 1.6 / VictoriaMetrics.

    .venv/bin/python bench/e2e.py [--quick] [--db influx,vm] [--shape single,batch]
        [--streams 1000,10000] [--consumers ingest,ingest311,naive,nodered,bare,db] [--gzip]
        [--latency-seconds 20] [--latency-warmup 10] [--soak SECONDS] [--json OUT] [--keep]

Drain, per case (db x shape x streams): a private mosquitto (unlimited queues, no
persistence) gets every consumer's persistent session, then one burst published once at
QoS 1 by bench/publish.py, so it holds an identical queued copy per session. Each consumer
in turn drains its copy into a clean target; a pre-loaded burst measures the most it can
sustain. ``ingest run``: from the first /metrics poll (50 ms) with accepted readings to the
first with every message acknowledged, CPU from /proc; ``ingest311`` is the same with
MQTT 3.1.1 (paho decodes MQTT 5 properties on every message; 3.1.1 has no Receive Maximum,
so it needs a broker that allows many unacknowledged messages, as this one does: Mosquitto's
default of 20 would throttle acknowledge-after-write). bench/naive.py (typical paho +
influxdb-client script) and bench/nodered.py (a Node-RED flow; the database count is polled
every second) are baselines; bench/bare_paho.py only receives and acknowledges (single
shape: the ceiling of a Python paho consumer). ``db`` posts the lines ingest's processor
makes for the burst itself, in bodies of ingest's influx.batch_size lines from as many
threads as its influx.write_concurrency (both as INGEST_* set them): the database's own rate.
Every reading is then counted in the database: landed, lost.

Latency: ingest on a fresh session, fed at half its drain rate, every message stamped with
its publish time in ms (batch: its newest sample has it, so latency is measured from the
newest sample's device ts). A thread polls the newest timestamp of one probe stream (d0/s0)
every 50 ms (VictoriaMetrics without force_flush: its natural visibility); a probe point's
latency is the first poll that saw it minus its stamp, so 50 ms bounds the resolution.
Only points after --latency-warmup seconds count (VictoriaMetrics makes a brand-new series
searchable seconds late; the first probe point's latency is printed on its own).
VictoriaMetrics is shared: only series of the sites ``e2e-site*`` are counted and deleted.
Soak: the same feed into VictoriaMetrics (batch) for --soak seconds, sampling ingest's RSS.
Everything shares the machine's cores: compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil  # type: ignore[import-untyped]
import urllib3

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench.publish import READINGS, SITE, burst  # noqa: E402
from tests import dbhelpers as dbh  # noqa: E402
from tests.integration.mosquitto_proc import MosquittoProcess, find_mosquitto, free_port  # noqa: E402

BROKER = ["max_queued_messages 0", "max_queued_bytes 0", "max_inflight_messages 0"]
BROKER.append("persistence false")
STALL_S = 30.0  # a consumer without progress this long is given up
HTTP = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2.0, read=60.0), retries=False)
PROBE_Q = "FROM telemetry WHERE device='d0' AND sensor='s0'"
# VictoriaMetrics is shared (tests write telemetry too): count and delete only our sites.
MINE = f'site=~"{SITE}.*"'
OURS = f'{{__name__=~"(telemetry|anomaly_events)_.*",{MINE}}}'


def ingest_lines(messages: list[tuple[str, bytes]], per_body: int) -> list[bytes]:
    """Line-protocol bodies of every point ingest's processor makes for ``messages``."""
    from devices.contract import DEFAULT_LIMITS
    from ingest.pipeline import Processor
    from ingest.processing.detectors import DetectorParams

    proc = Processor("factory", DEFAULT_LIMITS, DetectorParams(), 1_000_000)
    lines: list[str] = []
    for k in range(0, len(messages), 1000):
        now = time.time()
        lines += proc.process([(t, p, now) for t, p in messages[k : k + 1000]]).lines
    return ["\n".join(lines[k : k + per_body]).encode() for k in range(0, len(lines), per_body)]


def ingest_influx_settings() -> tuple[int, int]:
    """Ingest's batch size and write concurrency, as the environment sets them."""
    from ingest.config import load_settings

    influx = load_settings().influx
    return influx.batch_size, influx.write_concurrency


@dataclass
class Target:
    """A clean place to write: an InfluxDB 1.x database, or VictoriaMetrics' telemetry."""

    db: str  # "influx" | "vm"
    database: str

    def client(self) -> dict[str, str]:
        api, url = ("v1", dbh.INFLUX_URL) if self.db == "influx" else ("v2", dbh.VM_URL)
        return dict(api=api, url=url, database=self.database, bucket="b", org="o", token="t")

    def write_url(self) -> str:
        if self.db == "influx":
            return f"{dbh.INFLUX_URL}/write?db={self.database}&precision=ms"
        return f"{dbh.VM_URL}/api/v2/write?bucket=b&org=o&precision=ms"

    def reset(self) -> None:
        if self.db == "influx":
            dbh.influx_drop_db(dbh.INFLUX_URL, self.database)
            dbh.influx_create_db(dbh.INFLUX_URL, self.database)
            return
        dbh.vm_delete_series(dbh.VM_URL, OURS)
        if left := self.count():
            raise RuntimeError(f"VictoriaMetrics still holds {left} telemetry points")

    def count(self) -> int:
        if self.db == "influx":
            return dbh.influx_count(dbh.INFLUX_URL, self.database, "telemetry")
        return dbh.vm_count_points(dbh.VM_URL, f"telemetry_value{{{MINE}}}")

    def landed(self, expected: int) -> int:
        """The count, asked again for up to 20 s while short: VictoriaMetrics' export can
        miss series created a moment ago even after force_flush."""
        for _ in range(20):
            if (n := self.count()) >= expected:
                break
            time.sleep(1.0)
        return n

    def quick_count(self) -> int:
        """Cheaper count for polling (VictoriaMetrics: a query instead of an export)."""
        if self.db == "influx":
            return self.count()
        dbh.vm_flush(dbh.VM_URL)
        q = {"query": f"sum(count_over_time(telemetry_value{{{MINE}}}[400d]))", "nocache": "1"}
        q["time"] = str(time.time() + 60)
        res = json.loads(HTTP.request("GET", f"{dbh.VM_URL}/api/v1/query", fields=q).data)
        return int(float(res["data"]["result"][0]["value"][1])) if res["data"]["result"] else 0

    def probe_ts(self, since_s: float, newest: bool) -> list[int]:
        """Timestamps (ms) of the probe stream; ``newest``: a cheap poll, no flush."""
        if self.db == "influx":
            q = f"SELECT last(value) {PROBE_Q}" if newest else f"SELECT value {PROBE_Q}"
            series = dbh.influx_v1_query(dbh.INFLUX_URL, self.database, q)
            return [int(row[0]) for s in series for row in s.get("values", [])]
        match = f'telemetry_value{{site="{SITE}0",device="d0",sensor="s0"}}'
        if not newest:
            return [t for s in dbh.vm_export(dbh.VM_URL, match) for t in s["timestamps"]]
        fields = {"match[]": match, "start": str(int(since_s) - 5), "end": "4102444800"}
        data = HTTP.request("GET", f"{dbh.VM_URL}/api/v1/export", fields=fields).data
        return [t for line in data.splitlines() for t in json.loads(line)["timestamps"]]

    def drop(self) -> None:
        if self.db == "influx":
            dbh.influx_drop_db(dbh.INFLUX_URL, self.database)
        else:
            dbh.vm_delete_series(dbh.VM_URL, OURS)


def cpu_seconds(pid: int) -> float:
    """utime + stime of all threads of ``pid`` (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_mb(pid: int, key: str) -> float:
    """A /proc/<pid>/status memory figure (VmHWM, VmRSS) in MB."""
    found = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(found.group(1)) / 1024 if found else float("nan")


def tree(pid: int) -> list[int]:
    return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_ingest(
    port: int,
    client_id: str,
    target: Target,
    tmp: Path,
    health: int,
    use_gzip: bool,
    protocol: str = "5",
) -> subprocess.Popen[bytes]:
    c = target.client()
    env = f"""MQTT_URL=mqtt://127.0.0.1:{port} MQTT_CLIENT_ID={client_id} MQTT_PROTOCOL={protocol}
        MQTT_TOPIC_PREFIX=factory MQTT_DEAD_LETTER=none INFLUX_URL={c["url"]}
        INFLUX_API={c["api"]} INFLUX_DATABASE={c["database"]} INFLUX_BUCKET={c["bucket"]}
        INFLUX_ORG={c["org"]} INFLUX_TOKEN={c["token"]} INFLUX_GZIP={str(use_gzip).lower()}
        PROCESSING_STATE_FILE= SPOOL_DIR={tmp / "spool"} SERVICE_STATS_INTERVAL=0
        SERVICE_HEALTH_LISTEN=127.0.0.1:{health} SERVICE_LOG_LEVEL=WARNING"""
    env_vars = dict(f"INGEST_{kv}".split("=", 1) for kv in env.split())
    return subprocess.Popen(
        [sys.executable, "-m", "ingest", "run"], cwd=ROOT, env=os.environ | env_vars
    )


def metrics(health: int) -> dict[str, float]:
    """ingest's /metrics as {name: value} (unlabelled lines only); {} while it is not up."""
    try:
        text = HTTP.request("GET", f"http://127.0.0.1:{health}/metrics", timeout=2.0).data
    except urllib3.exceptions.HTTPError:
        return {}
    pairs = (ln.split() for ln in text.decode().splitlines() if ln and ln[0] != "#")
    return {p[0]: float(p[1]) for p in pairs if len(p) == 2 and "{" not in p[0]}


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.05)


def register(port: int, client_id: str, v5: bool) -> None:
    """Create the persistent session ``client_id`` subscribed to factory/# at QoS 1."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    proto, clean = (mqtt.MQTTv5, None) if v5 else (mqtt.MQTTv311, False)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id, clean, protocol=proto)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 7 * 24 * 3600
    kwargs: dict[str, Any] = dict(clean_start=False, properties=props) if v5 else {}
    done = threading.Event()
    c.on_subscribe = lambda *_: done.set()
    c.connect("127.0.0.1", port, **kwargs)
    c.loop_start()
    try:
        c.subscribe("factory/#", qos=1)
        if not done.wait(10):
            raise TimeoutError(f"no SUBACK for {client_id}")
    finally:
        c.disconnect()
        c.loop_stop()


def nodered_module() -> Any:
    """bench/nodered.py (another helper's), or None while it is not there."""
    if not (BENCH / "nodered.py").exists():
        return None
    from bench import nodered

    return nodered


@dataclass
class Row:
    case: str
    consumer: str
    readings: int
    landed: int | None = None
    rate: float | None = None  # readings/s
    cpu_per_m: float | None = None
    rss_mb: float | None = None
    ref_pct: str = "-"
    x_naive: float | None = None
    note: str = ""


@dataclass
class Case:
    db: str
    shape: str
    streams: int
    messages: int
    broker: MosquittoProcess
    tmp: Path
    args: argparse.Namespace

    @property
    def name(self) -> str:
        return f"{self.db}/{self.shape}/{self.streams}"

    @property
    def readings(self) -> int:
        return self.messages * READINGS[self.shape]


def run_ingest(case: Case, target: Target, row: Row) -> None:
    health = free_port()
    protocol = "3.1.1" if row.consumer == "ingest311" else "5"
    args = (case.broker.port, f"bench-{row.consumer}", target, case.tmp, health, case.args.gzip)
    proc = start_ingest(*args, protocol=protocol)
    try:
        t_first = cpu0 = 0.0
        seen, changed = -1.0, time.monotonic()
        while True:
            time.sleep(0.05)
            if proc.poll() is not None:
                raise RuntimeError(f"ingest exited with status {proc.returncode}")
            m, now = metrics(health), time.time()
            if not t_first and m.get("ingest_readings_accepted_total", 0) > 0:
                t_first, cpu0 = now, cpu_seconds(proc.pid)
            if (acked := m.get("ingest_messages_acked_total", 0)) >= case.messages:
                row.rate = case.readings / (now - t_first)
                row.cpu_per_m = (cpu_seconds(proc.pid) - cpu0) / case.readings * 1e6
                break
            if acked != seen:
                seen, changed = acked, time.monotonic()
            elif time.monotonic() - changed > 2 * STALL_S:
                row.note = f"stalled at {acked:.0f} of {case.messages} messages acknowledged"
                break
        row.rss_mb = status_mb(proc.pid, "VmHWM")
    finally:
        stop(proc)


def run_script(case: Case, row: Row, script: str, extra: list[str]) -> None:
    """bench/naive.py or bench/bare_paho.py; each writes a JSON report."""
    if not (BENCH / script).exists():
        row.note = f"skipped: bench/{script} is not there"
        return
    report = case.tmp / f"{script}.json"
    proc = subprocess.Popen([sys.executable, str(BENCH / script), *extra, "--report", str(report)])
    try:
        proc.wait()
    finally:
        stop(proc)
    if not report.exists():
        row.note = f"failed: bench/{script} exited with {proc.returncode}, no report"
        return
    r = json.loads(report.read_text())
    done, n = r.get("t_done", r.get("t_last", 0.0)), r.get("readings_written", r.get("count", 0))
    row.rate = n / (done - r["t_first"]) if done > r["t_first"] else None
    row.cpu_per_m, row.rss_mb = r["cpu_seconds"] / max(n, 1) * 1e6, r["max_rss_mb"]
    if script == "bare_paho.py":
        row.landed, row.note = n, "landed = messages received (it stores nothing)"
    elif r.get("errors"):
        row.note = f"{r['errors']} failed writes"


def naive_args(case: Case, target: Target) -> list[str]:
    args = ["--mqtt-host", "127.0.0.1", "--mqtt-port", str(case.broker.port), "--client-id"]
    batch = str(ingest_influx_settings()[0])
    args += ["bench-naive", "--topic", "factory/#", "--batch-size", batch, "--expect-readings"]
    args += [str(case.readings), "--idle-timeout", str(STALL_S)]
    args += [x for k, v in target.client().items() for x in (f"--{k}", v)]
    return args + (["--gzip"] if case.args.gzip else [])


def run_nodered(case: Case, target: Target, row: Row) -> None:
    """Poll the database's count every second: Node-RED has no counters."""
    if (nr := nodered_module()) is None or nr.find_nodered() is None:
        row.note = "skipped: " + (
            "bench/nodered.py is not there"
            if nr is None
            else "Node-RED not installed: run bench/install-nodered.sh"
        )
        return
    workdir = case.tmp / "nodered"
    kw = dict(mqtt_port=case.broker.port, client_id="bench-nodered", shape=case.shape)
    proc = nr.start_nodered(workdir, **kw, **target.client())
    try:
        first: tuple[float, int, float] | None = None
        count, now, changed = 0, time.time(), time.monotonic()
        while count < case.readings and time.monotonic() - changed < STALL_S:
            time.sleep(1.0)
            if proc.poll() is not None:
                row.note = f"Node-RED exited with status {proc.returncode}; "
                break
            n, now = target.quick_count(), time.time()
            if n > count:
                count, changed = n, time.monotonic()
                first = first or (now, n, sum(map(cpu_seconds, tree(proc.pid))))
        if first and proc.poll() is None and count > first[1]:
            row.rate = (count - first[1]) / (now - first[0])
            cpu = sum(map(cpu_seconds, tree(proc.pid))) - first[2]
            row.cpu_per_m = cpu / (count - first[1]) * 1e6
            row.rss_mb = sum(status_mb(p, "VmHWM") for p in tree(proc.pid))
        if count < case.readings:
            row.note += f"no progress for {STALL_S:.0f} s at {count} readings; "
        errors = len(nr.log_errors(workdir))
        row.note += f"{errors} [error] log lines; open files limit {nr.open_files_limit()}"
    finally:
        nr.stop_nodered(proc)


def run_db(case: Case, target: Target, row: Row, t_end_ms: int) -> None:
    bodies = ingest_lines(
        burst(case.shape, case.streams, case.messages, t_end_ms), ingest_influx_settings()[0]
    )
    points = sum(b.count(b"\n") + 1 for b in bodies)
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    if case.args.gzip:  # compressed here, untimed
        bodies = [gzip.compress(b, compresslevel=1) for b in bodies]
        headers["Content-Encoding"] = "gzip"
    todo: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    for b in bodies:
        todo.put(b)
    errors: list[str] = []

    def writer() -> None:
        pool = urllib3.connection_from_url(target.write_url(), maxsize=1, retries=False)
        while True:
            try:
                body = todo.get_nowait()
            except queue.Empty:
                return
            resp = pool.urlopen("POST", target.write_url(), body=body, headers=headers)
            if resp.status not in (200, 204):
                errors.append(f"HTTP {resp.status}: {resp.data[:200]!r}")

    threads = [threading.Thread(target=writer) for _ in range(case.args.writers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row.rate = case.readings / (time.perf_counter() - t0)
    row.note = f"{points} points posted ({points - case.readings} anomaly_events)"
    row.note += f"; {len(errors)} failed writes: {errors[0]}" if errors else ""


def run_case(
    args: argparse.Namespace, db: str, shape: str, streams: int, consumers: list[str]
) -> list[Row]:
    messages = args.single_messages if shape == "single" else args.batch_messages
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    broker = MosquittoProcess(tmp / "broker", extra_config=BROKER, persistence=False)
    case = Case(db, shape, streams, messages, broker, tmp, args)
    rows = [Row(case.name, c, case.readings) for c in consumers if c != "bare" or shape == "single"]
    try:
        broker.start()
        load = os.getloadavg()[0]  # other work on the machine skews every figure
        print(f"\n== {case.name}: {messages:,} messages, {case.readings:,} readings", end="")
        print(f" (load average before: {load:.2f})", flush=True)
        nr = nodered_module()
        for row in rows:
            v5 = {"ingest": "5", "nodered": getattr(nr, "MQTT_PROTOCOL", "3.1.1")}
            if row.consumer != "db":
                register(broker.port, f"bench-{row.consumer}", v5.get(row.consumer) == "5")
        t_end_ms = int(time.time() * 1000) - 2000
        report = tmp / "publish.json"
        cmd = ["--port", str(broker.port), "--shape", shape, "--streams", str(streams)]
        cmd += ["--messages", str(messages), "--t-end-ms", str(t_end_ms), "--report", str(report)]
        subprocess.run([sys.executable, str(BENCH / "publish.py"), *cmd], check=True)
        pub = json.loads(report.read_text())
        args.publisher.append(
            {"case": case.name} | {k: v for k, v in pub.items() if k != "probe_ts"}
        )
        if pub["acked"] != messages:
            raise RuntimeError(f"the broker acknowledged {pub['acked']} of {messages} messages")
        for row in rows:
            target = Target(db, f"bench_{shape}_{streams}_{row.consumer}")
            print(f"-- {row.consumer}", flush=True)
            try:
                target.reset()
                if row.consumer in ("ingest", "ingest311"):
                    run_ingest(case, target, row)
                elif row.consumer == "naive":
                    run_script(case, row, "naive.py", naive_args(case, target))
                elif row.consumer == "bare":
                    extra = ["--port", str(broker.port), "--client-id", "bench-bare"]
                    run_script(case, row, "bare_paho.py", [*extra, "--expect", str(messages)])
                elif row.consumer == "nodered":
                    run_nodered(case, target, row)
                else:
                    run_db(case, target, row, t_end_ms)
                if row.consumer != "bare" and not row.note.startswith("skipped"):
                    row.landed = target.landed(case.readings)
                    if row.landed > case.readings:
                        row.note += "; landed > readings: duplicates (VictoriaMetrics keeps them)"
            finally:
                if not args.keep:
                    target.drop()
    finally:
        broker.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    by_name = {r.consumer: r for r in rows}
    ref, naive = by_name.get("db" if shape == "batch" else "bare"), by_name.get("naive")
    for r in rows:
        if r.rate and ref and ref.rate:
            r.ref_pct = f"{100 * r.rate / ref.rate:.0f}% {ref.consumer}"
        if r.rate and naive and naive.rate:
            r.x_naive = r.rate / naive.rate
    return rows


def paced_run(
    args: argparse.Namespace, db: str, shape: str, rate: float, seconds: float, soak: bool
) -> dict[str, Any]:
    """ingest fed ``rate`` readings/s for ``seconds``: probe latencies, or RSS samples.

    Latency counts the probe points after ``args.latency_warmup`` s of feed (its series
    are new then: VictoriaMetrics makes a new series searchable seconds later), and
    reports the first probe point's latency on its own."""
    warmup = 0.0 if soak else args.latency_warmup
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    broker = MosquittoProcess(tmp / "broker", extra_config=BROKER, persistence=False)
    target = Target(db, f"bench_{'soak' if soak else 'latency'}_{shape}")
    polls: list[tuple[float, int]] = []
    rss: list[tuple[float, float]] = []
    halt = threading.Event()
    ingest = pub = None
    t0 = time.time()

    def poller() -> None:
        while not halt.wait(0.05):
            try:
                newest = max(target.probe_ts(t0, newest=True), default=0)
            except (urllib3.exceptions.HTTPError, RuntimeError, ValueError):
                continue
            polls.append((time.time(), newest))  # after the answer: an upper bound

    try:
        broker.start()
        target.reset()
        health = free_port()
        ingest = start_ingest(broker.port, "bench-ingest-paced", target, tmp, health, args.gzip)
        up = lambda: metrics(health).get("ingest_mqtt_connected") == 1  # noqa: E731
        wait_for(up, 120, "MQTT connection of ingest")
        t0 = time.time()
        if not soak:
            threading.Thread(target=poller, daemon=True).start()
        report = tmp / "publish.json"
        cmd = ["--port", str(broker.port), "--shape", shape, "--streams", "1000", "--rate"]
        cmd += [f"{rate / READINGS[shape]:.3f}", "--duration", str(warmup + seconds)]
        cmd += ["--report", str(report)]
        pub = subprocess.Popen([sys.executable, str(BENCH / "publish.py"), *cmd])
        while pub.poll() is None:
            if soak and (not rss or time.time() - rss[-1][0] >= 10):
                rss.append((time.time(), status_mb(ingest.pid, "VmRSS")))
            time.sleep(0.2)
        sent = json.loads(report.read_text())
        acked = lambda: metrics(health).get("ingest_messages_acked_total", 0) >= sent["published"]  # noqa: E731
        wait_for(acked, 120, "acknowledgement of every message by ingest")
        if probe := sent["probe_ts"]:
            seen = lambda: soak or (bool(polls) and polls[-1][1] >= probe[-1])  # noqa: E731
            wait_for(seen, 30, "last probe point")
        halt.set()
        expected = sent["published"] * READINGS[shape]
        out = dict(db=db, shape=shape, rate=rate, seconds=seconds, expected=expected)
        out |= dict(landed=target.landed(expected), msg_per_s=sent["msg_per_s"])
        if soak:
            return out | {"rss": rss}
        stored = set(target.probe_ts(t0, newest=False))
        out["probe_missing"] = sum(t not in stored for t in probe)
        newest = np.maximum.accumulate([n for _, n in polls]).tolist()
        lat = {
            t: polls[i][0] * 1000 - t
            for t in probe
            if (i := bisect.bisect_left(newest, t)) < len(polls)
        }
        steady = [v for t, v in lat.items() if t >= (t0 + warmup) * 1000]
        pct = np.percentile(steady, [50, 99, 100]) if steady else [float("nan")] * 3
        out |= dict(first=lat.get(probe[0], float("nan")), n=len(steady), warmup=warmup)
        return out | dict(p50=pct[0], p99=pct[1], max=pct[2])
    finally:
        halt.set()
        stop(pub)
        stop(ingest)
        broker.cleanup()
        if not args.keep:
            target.drop()
        shutil.rmtree(tmp, ignore_errors=True)


def machine() -> dict[str, str]:
    mosq = subprocess.run([find_mosquitto() or "mosquitto", "-h"], capture_output=True, check=False)
    influx = HTTP.request("GET", f"{dbh.INFLUX_URL}/ping").headers.get("X-Influxdb-Version")
    vm_metrics = HTTP.request("GET", f"{dbh.VM_URL}/metrics").data.decode()
    vm = re.search(r'vm_app_version\{version="([^"]*)"', vm_metrics)
    return {
        "nproc": str(os.cpu_count()),
        "python": platform.python_version(),
        "mosquitto": (mosq.stdout.decode().splitlines() or ["?"])[0],
        "influxdb": influx or "?",
        "victoriametrics": (vm.group(1) if vm else "") or "(no version in /metrics)",
    }


def print_table(rows: list[Row]) -> None:
    def f(v: float | None, spec: str = ",.0f") -> str:
        return "-" if v is None else format(v, spec)

    table = [["case", "consumer", "readings", "landed", "lost", "readings/s", "% of ref"]]
    table[0] += ["x naive", "CPU s/M", "RSS MB"]
    for r in rows:
        lost = None if r.landed is None else r.readings - r.landed
        table.append([r.case, r.consumer, f(r.readings), f(r.landed), f(lost), f(r.rate)])
        table[-1] += [r.ref_pct, f(r.x_naive, ".2f"), f(r.cpu_per_m, ".1f"), f(r.rss_mb)]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    table.insert(1, ["-" * w for w in widths])
    for line in table:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(cells))
    for r in rows:
        if r.note:
            print(f"  {r.case} {r.consumer}: {r.note}")


def report(rows: list[Row], publisher: list[dict[str, Any]], lat: list[Any], soak: Any) -> None:
    print("\n== drain of a pre-loaded burst (% of ref: of bare paho, or of the DB's own rate)")
    print_table(rows)
    print("\n== publisher: bench/publish.py, raw-socket MQTT 3.1.1, QoS 1, every PUBACK received")
    for p in publisher:
        n, s, rate = p["published"], p["seconds"], p["msg_per_s"]
        print(f"  {p['case']}: {n:,} messages in {s:.2f} s, {rate:,.0f} msg/s")
    if lat:
        print("\n== latency of ingest at half its drain rate, 1,000 streams, publish -> visible")
        print("   (from the newest sample's ts = publish time; 50 ms polls bound the resolution)")
    for r in lat:
        lost = r["expected"] - r["landed"]
        print(f"  {r['db']}/{r['shape']}: {r['rate']:,.0f} readings/s for {r['seconds']:.0f} s:")
        print(
            f"    p50 {r['p50']:,.0f} ms, p99 {r['p99']:,.0f} ms, max {r['max']:,.0f} ms,", end=""
        )
        print(f" n {r['n']}; probe points missing {r['probe_missing']}, readings lost {lost}")
        print(
            f"    first probe point (new series, before the {r['warmup']:.0f} s warm-up):", end=""
        )
        print(f" {r['first']:,.0f} ms")
    if soak:
        t, mb = np.array(soak["rss"]).T
        half = t >= (t[0] + t[-1]) / 2
        slope = np.polyfit((t[half] - t[0]) / 60, mb[half], 1)[0] if half.sum() > 1 else np.nan
        print(
            f"\n== soak: ingest -> vm, batch, 1,000 streams, {soak['rate']:,.0f} readings/s,",
            end="",
        )
        print(f" {soak['seconds']:.0f} s; readings lost {soak['expected'] - soak['landed']}")
        print(f"  RSS MB: first {mb[0]:.0f}, min {mb.min():.0f}, max {mb.max():.0f}, last", end="")
        print(f" {mb[-1]:.0f}; least-squares slope of the second half {slope:+.2f} MB/min")


def split(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="bursts / 10, latency 5 s: a smoke run")
    ap.add_argument("--db", type=split, default=["influx", "vm"])
    ap.add_argument("--shape", type=split, default=["single", "batch"])
    ap.add_argument("--streams", type=lambda s: list(map(int, split(s))), default=[1000, 10000])
    ap.add_argument(
        "--consumers",
        type=split,
        default=["ingest", "ingest311", "naive", "nodered", "bare", "db"],
        help="ingest311: ingest with MQTT 3.1.1 instead of 5",
    )
    ap.add_argument("--single-messages", type=int, help="single-shape burst (200000)")
    ap.add_argument("--batch-messages", type=int, help="batch-shape burst (20000)")
    ap.add_argument("--gzip", action="store_true", help="gzip the writes (every consumer, db)")
    ap.add_argument(
        "--writers",
        type=int,
        default=ingest_influx_settings()[1],
        help="db: concurrent writers (default: ingest's influx.write_concurrency)",
    )
    ap.add_argument("--latency-seconds", type=float, help="per db and shape (20); 0 skips")
    ap.add_argument("--latency-warmup", type=float, default=10.0, help="s of feed not counted")
    ap.add_argument("--soak", type=float, default=0.0, help="seconds (e.g. 600); 0 skips")
    ap.add_argument(
        "--keep", action="store_true", help="keep what was written (InfluxDB databases, VM series)"
    )
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    div = 10 if args.quick else 1
    args.single_messages = args.single_messages or 200_000 // div
    args.batch_messages = args.batch_messages or 20_000 // div
    if args.latency_seconds is None:
        args.latency_seconds = 5.0 if args.quick else 20.0
    settings = dict(vars(args))
    args.publisher = []
    info = machine()
    print("factory-ingest end-to-end benchmark: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    print("broker: private mosquitto 127.0.0.1:<free port>, " + "; ".join(BROKER))
    print("ingest: settings as in start_ingest(): no dead letters, no state snapshots, no")
    print("  ingest_stats points, log level WARNING, gzip as --gzip; everything else default")
    print("Draining a pre-loaded burst measures the maximum sustained rate of each consumer.")
    rows: list[Row] = []
    rates: dict[tuple[str, str], float] = {}

    def drain_rate(db: str, shape: str) -> float:
        if (db, shape) not in rates:  # not measured above: measure it now
            rows.extend(run_case(args, db, shape, 1000, ["ingest"]))
            rates[(db, shape)] = rows[-1].rate or 0.0
        return rates[(db, shape)]

    for db in args.db:
        for shape in args.shape:
            for streams in args.streams:
                rows += run_case(args, db, shape, streams, args.consumers)
                for r in rows:
                    if r.consumer == "ingest" and r.case == f"{db}/{shape}/1000" and r.rate:
                        rates[(db, shape)] = r.rate
    todo = [(db, shape) for db in args.db for shape in args.shape if args.latency_seconds > 0]
    lat = [
        paced_run(args, db, s, rate / 2, args.latency_seconds, False)
        for db, s in todo
        if (rate := drain_rate(db, s))
    ]
    soak = None
    if args.soak > 0 and (rate := drain_rate("vm", "batch")):
        soak = paced_run(args, "vm", "batch", rate / 2, args.soak, True)

    report(rows, args.publisher, lat, soak)
    if args.json:
        doc = dict(
            machine=info, settings=settings, publisher=args.publisher, latency=lat, soak=soak
        )
        args.json.write_text(
            json.dumps(doc | {"rows": [asdict(r) for r in rows]}, indent=1, default=str)
        )


if __name__ == "__main__":
    main()
