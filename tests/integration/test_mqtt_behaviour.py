"""MQTT behaviour of ``ingest run`` against brokers the tests start and stop themselves."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.dbhelpers import INFLUX_URL, influx_count
from tests.integration.conftest import IngestProcess, wait_for
from tests.integration.mosquitto_proc import MosquittoProcess, require_mosquitto

pytestmark = pytest.mark.services


def publish_batch(
    port: int,
    topic: str,
    first: int,
    n: int,
    *,
    tls_ca: str | None = None,
    username: str | None = None,
    password: str | None = None,
) -> None:
    """n samples with timestamps first..first+n-1 ms ago-ish, as one QoS 1 message."""
    client = paho.Client(CallbackAPIVersion.VERSION2)
    if username:
        client.username_pw_set(username, password)
    if tls_ca:
        client.tls_set(ca_certs=tls_ca)
    client.connect("127.0.0.1", port)
    client.loop_start()
    base = int(time.time() * 1000) - 600_000
    samples = [{"ts": base + first + i, "values": {"a": float(i)}} for i in range(n)]
    client.publish(topic, json.dumps({"samples": samples}), qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> MosquittoProcess:
    require_mosquitto()
    return MosquittoProcess(tmp_path / "broker", persistence=False)


def _env(ingest_env: dict[str, str], influx_db: str, url: str, **extra: str) -> dict[str, str]:
    return {
        **ingest_env,
        "INGEST_MQTT_URL": url,
        "INGEST_INFLUX_URL": INFLUX_URL,
        "INGEST_INFLUX_DATABASE": influx_db,
        "INGEST_MQTT_RECONNECT_MAX_DELAY": "1",
        **extra,
    }


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_reconnects_and_resubscribes_after_broker_restart(
    broker: MosquittoProcess,
    ingest_env: dict[str, str],
    influx_db: str,
    start_ingest: Callable[..., IngestProcess],
    protocol: str,
) -> None:
    # No persistence: the restarted broker has forgotten the subscription, so only a
    # resubscription by ingest can bring the second batch in.
    with broker:
        env = _env(
            ingest_env,
            influx_db,
            broker.url,
            INGEST_MQTT_PROTOCOL=protocol,
            INGEST_MQTT_MAX_INFLIGHT="20" if protocol == "3.1.1" else "1000",
        )
        ingest = start_ingest(env)
        topic = f"{env['INGEST_TOPIC_PREFIX']}/s/l/d/telemetry"
        publish_batch(broker.port, topic, 0, 100)
        assert wait_for(lambda: influx_count(INFLUX_URL, influx_db, "telemetry") == 100, 20)
        broker.restart(down_s=2.0)
        assert wait_for(lambda: ingest.metrics().get("ingest_reconnects_total", 0) >= 2, 30), (
            ingest.log()
        )
        publish_batch(broker.port, topic, 100, 100)
        assert wait_for(lambda: influx_count(INFLUX_URL, influx_db, "telemetry") == 200, 20), (
            ingest.log()
        )
        assert ingest.healthy()
        assert ingest.stop() == 0


def test_messages_published_while_ingest_is_down_arrive_later(
    tmp_path: Path,
    ingest_env: dict[str, str],
    influx_db: str,
    start_ingest: Callable[..., IngestProcess],
) -> None:
    require_mosquitto()
    with MosquittoProcess(tmp_path / "broker") as broker:  # default: queue without limit
        env = _env(ingest_env, influx_db, broker.url)
        topic = f"{env['INGEST_TOPIC_PREFIX']}/s/l/d/telemetry"
        first = start_ingest(env)  # creates the persistent session
        assert first.stop() == 0
        for k in range(20):
            publish_batch(broker.port, topic, k * 50, 50)
        assert influx_count(INFLUX_URL, influx_db, "telemetry") == 0
        second = start_ingest(env)
        assert wait_for(lambda: influx_count(INFLUX_URL, influx_db, "telemetry") == 1000, 30), (
            second.log()
        )
        assert second.stop() == 0


def test_username_password_and_refusal(
    tmp_path: Path,
    ingest_env: dict[str, str],
    influx_db: str,
    start_ingest: Callable[..., IngestProcess],
) -> None:
    require_mosquitto()
    passwd = tmp_path / "passwd"
    mosquitto_passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([mosquitto_passwd, "-c", "-b", str(passwd), "ingest", "s3cret"], check=True)
    extra = ["allow_anonymous false", f"password_file {passwd}"]
    with MosquittoProcess(tmp_path / "broker", extra_config=extra, persistence=False) as broker:
        good = _env(ingest_env, influx_db, f"mqtt://ingest:s3cret@127.0.0.1:{broker.port}")
        ingest = start_ingest(good)
        publish_batch(
            broker.port,
            f"{good['INGEST_TOPIC_PREFIX']}/s/l/d/telemetry",
            0,
            10,
            username="ingest",
            password="s3cret",
        )
        assert wait_for(lambda: influx_count(INFLUX_URL, influx_db, "telemetry") == 10, 20)
        assert ingest.stop() == 0

        bad = {**good, "INGEST_MQTT_URL": f"mqtt://ingest:wrong@127.0.0.1:{broker.port}"}
        refused = start_ingest(bad, wait_healthy=False)
        assert refused.proc is not None
        assert refused.proc.wait(30) == 2
        last = refused.log().strip().splitlines()[-1]
        assert last.startswith("ingest: error:") and "refused" in last, last


def _make_certs(folder: Path) -> tuple[Path, Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    ca_key, ca, key, csr, cert = (
        folder / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem")
    )
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run = lambda *a: subprocess.run([openssl, *a], check=True, capture_output=True)  # noqa: E731
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    return ca, cert, key


def test_tls(
    tmp_path: Path,
    ingest_env: dict[str, str],
    influx_db: str,
    start_ingest: Callable[..., IngestProcess],
) -> None:
    require_mosquitto()
    ca, cert, key = _make_certs(tmp_path)
    extra = [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
    with MosquittoProcess(tmp_path / "broker", extra_config=extra, persistence=False) as broker:
        env = _env(
            ingest_env, influx_db, f"mqtts://127.0.0.1:{broker.port}", INGEST_MQTT_CA_FILE=str(ca)
        )
        ingest = start_ingest(env)
        publish_batch(
            broker.port, f"{env['INGEST_TOPIC_PREFIX']}/s/l/d/telemetry", 0, 10, tls_ca=str(ca)
        )
        assert wait_for(lambda: influx_count(INFLUX_URL, influx_db, "telemetry") == 10, 20)
        assert ingest.stop() == 0
