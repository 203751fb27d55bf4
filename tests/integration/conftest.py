"""Fixtures for tests against the real services: Mosquitto, InfluxDB 1.6, VictoriaMetrics.

Every test gets its own topic prefix, client id and database, so tests never see
each other's data. ``ingest run`` is started as a real subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import urllib3

from tests.dbhelpers import (
    INFLUX_PING,
    INFLUX_URL,
    MQTT_HOSTPORT,
    VM_HEALTH,
    VM_URL,
    influx_create_db,
    influx_drop_db,
    require_service,
)
from tests.integration.mosquitto_proc import free_port

MQTT_URL = f"mqtt://{MQTT_HOSTPORT}"
REPO = Path(__file__).resolve().parents[2]


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


class IngestProcess:
    """``python -m ingest run`` in a subprocess, configured through INGEST_* variables."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.health_port = int(env["INGEST_SERVICE_HEALTH_LISTEN"].rpartition(":")[2])
        self.proc: subprocess.Popen[bytes] | None = None
        self._http = urllib3.PoolManager(timeout=2.0, retries=False)

    def start(self, wait_healthy: bool = True) -> IngestProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ingest", "run"],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if wait_healthy:
            assert wait_for(self.healthy, 60), f"ingest did not become healthy:\n{self.log()}"
        return self

    def healthy(self) -> bool:
        try:
            return self._http.request("GET", self.url("/healthz")).status == 200
        except urllib3.exceptions.HTTPError:
            return False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.health_port}{path}"

    def metrics(self) -> dict[str, float]:
        text = self._http.request("GET", self.url("/metrics")).data.decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def mqtt_broker() -> str:
    require_service("Mosquitto", MQTT_HOSTPORT)
    return MQTT_URL


@pytest.fixture
def influx_db(unique: str) -> Iterator[str]:
    require_service("InfluxDB", INFLUX_PING)
    db = f"test_{unique}"
    influx_create_db(INFLUX_URL, db)
    yield db
    influx_drop_db(INFLUX_URL, db)


@pytest.fixture
def victoria() -> str:
    require_service("VictoriaMetrics", VM_HEALTH)
    return VM_URL


@pytest.fixture
def ingest_env(unique: str, mqtt_broker: str, tmp_path: Path) -> dict[str, str]:
    """Environment for an ingest process with this test's own prefix and client id."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update(
        {
            "INGEST_MQTT_URL": mqtt_broker,
            "INGEST_CLIENT_ID": f"ingest-test-{unique}",
            "INGEST_TOPIC_PREFIX": f"test-{unique}",
            "INGEST_MQTT_SESSION_EXPIRY": "300",
            "INGEST_INFLUX_FLUSH_INTERVAL": "0.2",
            "INGEST_INFLUX_RETRY_MAX": "2",
            "INGEST_SERVICE_HEALTH_LISTEN": f"127.0.0.1:{free_port()}",
            "INGEST_SERVICE_LOG_LEVEL": "INFO",
            "INGEST_SPOOL_DIR": str(tmp_path / "spool"),
            "INGEST_PROCESSING_STATE_FILE": str(tmp_path / "state" / "detectors.npz"),
            # No ingest_stats points: tests count exactly the points and measurements they
            # expect (test_grafana_queries.py turns them on).
            "INGEST_SERVICE_STATS_INTERVAL": "0",
        }
    )
    return env


@pytest.fixture
def start_ingest(tmp_path: Path) -> Iterator[Callable[..., IngestProcess]]:
    started: list[IngestProcess] = []

    def start(env: dict[str, str], wait_healthy: bool = True) -> IngestProcess:
        proc = IngestProcess(env, tmp_path / f"ingest-{len(started)}.log")
        started.append(proc)
        return proc.start(wait_healthy)

    yield start
    for proc in started:
        if proc.running:
            proc.stop(signal.SIGKILL)
