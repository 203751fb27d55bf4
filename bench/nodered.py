"""The Node-RED baseline of the end-to-end benchmark: the usual do-it-yourself flow.

Many plants move MQTT telemetry into InfluxDB with a Node-RED flow rather than a
service of their own; this module builds and starts that flow so the benchmark can
compare ``ingest`` with it. The flow is what a typical user drags together, with every
node left at its defaults:

    mqtt in (factory/#, QoS 1, parsed JSON)
      -> function (topic split into site/line/device tags, one point per reading)
      -> node-red-contrib-influxdb output (1.x config for --api v1, 2.0 for v2)

The output node depends on the message ``shape`` the benchmark publishes:
``"batch"`` (``{"samples": [...]}``) uses ``influxdb batch``, which takes an array of
``{measurement, tags, fields, timestamp}``; ``"single"`` uses ``influxdb out`` with
measurement ``telemetry`` and the array-of-``[fields, tags]`` payload (``fields.time``
is the timestamp), the form its help text shows for several points. The function node
handles both message forms either way. Both output nodes write each incoming message
with its own HTTP request, as they do by default, and nothing limits how many are in
flight: a queued burst of N messages opens up to N sockets at once. Past the process's
open-files limit (``open_files_limit()``, inherited by Node-RED) the writes fail with
EMFILE; the 1.x node (the ``influx`` package) drops those messages, the 2.0 node (the
``@influxdata/influxdb-client`` write API) retries them for minutes. Each failure is an
``[error]`` line in the log (``log_errors``). Record the limit with the results.

The MQTT broker node uses MQTT 3.1.1 (``MQTT_PROTOCOL``), clean session false and the
given client id, so the benchmark can pre-register the persistent session the same way
and queue a burst before Node-RED starts. Node-RED runs headless (no editor, admin API
or HTTP server at all) with its own userDir; its log is ``<workdir>/node-red.log``.

Install Node-RED and node-red-contrib-influxdb first: ``bench/install-nodered.sh``
(into ``bench/.node-red/``, gitignored), or point ``$NODE_RED_BIN`` at a node-red.
Run it by hand (until Ctrl-C):

    .venv/bin/python bench/nodered.py --workdir /tmp/nr --mqtt-port 1883 \\
        --client-id nodered --api v1 --url http://127.0.0.1:8086 --database bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
INSTALL_DIR = HERE / ".node-red"

#: MQTT version of the flow's broker node (its ``protocolVersion`` "4").
MQTT_PROTOCOL = "3.1.1"
#: The protocol level byte of that version (paho: ``mqtt.MQTTv311``).
MQTT_PROTOCOL_LEVEL = 4
#: The broker node keeps a persistent session under the given client id.
MQTT_CLEAN_SESSION = False
MQTT_TOPIC = "factory/#"
MQTT_QOS = 1

SHAPES = ("single", "batch")
APIS = ("v1", "v2")

LOG_NAME = "node-red.log"
STARTED = "Started flows"
CONNECTED = "Connected to broker:"

# The function node: one point per reading, tags from the topic and the values key.
# For ``influxdb batch``: [{measurement, tags, fields, timestamp}, ...].
FUNCTION_BATCH = """\
const parts = msg.topic.split("/");
const tags = { site: parts[1], line: parts[2], device: parts[3] };
const samples = Array.isArray(msg.payload.samples) ? msg.payload.samples : [msg.payload];
const points = [];
for (const sample of samples) {
    for (const [sensor, value] of Object.entries(sample.values)) {
        points.push({
            measurement: "telemetry",
            tags: { ...tags, sensor: sensor },
            fields: { value: Number(value) },
            timestamp: sample.ts,
        });
    }
}
msg.payload = points;
return msg;
"""

# For ``influxdb out`` (measurement set on the node): [[fields, tags], ...], time in fields.
FUNCTION_OUT = """\
const parts = msg.topic.split("/");
const tags = { site: parts[1], line: parts[2], device: parts[3] };
const samples = Array.isArray(msg.payload.samples) ? msg.payload.samples : [msg.payload];
const points = [];
for (const sample of samples) {
    for (const [sensor, value] of Object.entries(sample.values)) {
        points.push([
            { value: Number(value), time: sample.ts },
            { ...tags, sensor: sensor },
        ]);
    }
}
msg.payload = points;
return msg;
"""

SETTINGS_JS = """\
// Written by bench/nodered.py: headless Node-RED for the end-to-end benchmark.
module.exports = {
    flowFile: "flows.json",
    // Credentials (the v2 token) sit unencrypted in flows_cred.json of this temp userDir.
    credentialSecret: false,
    flowFilePretty: true,
    // No editor, no admin API, no HTTP nodes: no HTTP server is started at all.
    httpAdminRoot: false,
    httpNodeRoot: false,
    uiHost: "127.0.0.1",
    diagnostics: { enabled: false, ui: false },
    telemetry: { enabled: false },
    logging: { console: { level: "info", metrics: false, audit: false } },
    editorTheme: { projects: { enabled: false } },
};
"""


def find_nodered() -> str | None:
    """The node-red executable: ``$NODE_RED_BIN``, else the one in bench/.node-red; or None."""
    env = os.environ.get("NODE_RED_BIN")
    if env:
        return env if os.access(env, os.X_OK) else None
    candidate = INSTALL_DIR / "node_modules" / ".bin" / "node-red"
    return str(candidate) if os.access(candidate, os.X_OK) else None


def protocol_for_flow() -> str:
    """The MQTT version the flow's broker node speaks ("3.1.1"; clean session false)."""
    return MQTT_PROTOCOL


def build_flow(
    *,
    mqtt_host: str = "127.0.0.1",
    mqtt_port: int,
    client_id: str,
    api: str,
    url: str,
    database: str,
    bucket: str,
    org: str,
    token: str,
    shape: str,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """The flows.json node list and the flows_cred.json credentials."""
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, not {api!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, not {shape!r}")

    tab, broker, mqtt_in, function, influx_cfg, out = (
        "b0e1c2d3a4f50001",
        "b0e1c2d3a4f50002",
        "b0e1c2d3a4f50003",
        "b0e1c2d3a4f50004",
        "b0e1c2d3a4f50005",
        "b0e1c2d3a4f50006",
    )
    parsed = urllib.parse.urlsplit(url)
    nodes: list[dict[str, Any]] = [
        {"id": tab, "type": "tab", "label": "factory telemetry", "disabled": False, "info": ""},
        {
            "id": broker,
            "type": "mqtt-broker",
            "name": "factory broker",
            "broker": mqtt_host,
            "port": str(mqtt_port),
            "clientid": client_id,
            "autoConnect": True,
            "usetls": False,
            "protocolVersion": str(MQTT_PROTOCOL_LEVEL),
            "keepalive": "60",
            "cleansession": MQTT_CLEAN_SESSION,
            # A persistent session keeps its subscription when Node-RED stops.
            "autoUnsubscribe": False,
            "birthTopic": "",
            "closeTopic": "",
            "willTopic": "",
            "sessionExpiry": "",
        },
        {
            "id": mqtt_in,
            "type": "mqtt in",
            "z": tab,
            "name": "telemetry",
            "topic": MQTT_TOPIC,
            "qos": str(MQTT_QOS),
            "datatype": "json",
            "broker": broker,
            "nl": False,
            "rap": True,
            "rh": 0,
            "inputs": 0,
            "x": 120,
            "y": 100,
            "wires": [[function]],
        },
        {
            "id": function,
            "type": "function",
            "z": tab,
            "name": "to InfluxDB points",
            "func": FUNCTION_BATCH if shape == "batch" else FUNCTION_OUT,
            "outputs": 1,
            "timeout": 0,
            "noerr": 0,
            "initialize": "",
            "finalize": "",
            "libs": [],
            "x": 330,
            "y": 100,
            "wires": [[out]],
        },
    ]
    credentials: dict[str, dict[str, str]] = {}
    if api == "v1":
        nodes.append(
            {
                "id": influx_cfg,
                "type": "influxdb",
                "hostname": parsed.hostname or "127.0.0.1",
                "port": str(parsed.port or 8086),
                "protocol": parsed.scheme or "http",
                "database": database,
                "name": "influxdb 1.x",
                "usetls": parsed.scheme == "https",
                "tls": "",
                "influxdbVersion": "1.x",
                "url": "",
                "timeout": "10",
                "rejectUnauthorized": True,
            }
        )
    else:
        nodes.append(
            {
                "id": influx_cfg,
                "type": "influxdb",
                "hostname": "",
                "port": "",
                "protocol": "http",
                "database": "",
                "name": "influxdb 2.0",
                "usetls": False,
                "tls": "",
                "influxdbVersion": "2.0",
                "url": url,
                "timeout": "10",
                "rejectUnauthorized": True,
            }
        )
        credentials[influx_cfg] = {"token": token}
    output: dict[str, Any] = {
        "id": out,
        "type": "influxdb batch" if shape == "batch" else "influxdb out",
        "z": tab,
        "influxdb": influx_cfg,
        "name": "",
        "precision": "ms",
        "retentionPolicy": "",
        "database": database,
        "precisionV18FluxV20": "ms",
        "retentionPolicyV18Flux": "",
        "org": org,
        "bucket": bucket,
        "x": 560,
        "y": 100,
        "wires": [],
    }
    if shape != "batch":
        output["measurement"] = "telemetry"
    nodes.append(output)
    return nodes, credentials


def create_database(url: str, database: str, timeout: float = 10.0) -> None:
    """CREATE DATABASE on InfluxDB 1.x (idempotent): the influxdb nodes do not create it."""
    query = urllib.parse.urlencode({"q": f'CREATE DATABASE "{database}"'})
    req = urllib.request.Request(f"{url.rstrip('/')}/query?{query}", method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()


def start_nodered(
    workdir: Path,
    *,
    mqtt_port: int,
    client_id: str,
    api: str,
    url: str,
    database: str,
    bucket: str,
    org: str,
    token: str,
    shape: str,
    mqtt_host: str = "127.0.0.1",
    timeout: float = 60.0,
) -> subprocess.Popen[bytes]:
    """Write settings and flow into ``workdir`` (the userDir), start Node-RED, wait until up.

    "Up" means the flows started and the broker node connected (so the queued burst is
    being delivered). For ``api="v1"`` the database is created first. Raises
    ``RuntimeError`` (with the log's tail) when Node-RED exits or is not up in
    ``timeout`` seconds; stop the returned process with :func:`stop_nodered`.
    """
    binary = find_nodered()
    if binary is None:
        raise FileNotFoundError("node-red not found: run bench/install-nodered.sh")
    nodes, credentials = build_flow(
        mqtt_host=mqtt_host,
        mqtt_port=mqtt_port,
        client_id=client_id,
        api=api,
        url=url,
        database=database,
        bucket=bucket,
        org=org,
        token=token,
        shape=shape,
    )
    if api == "v1":
        create_database(url, database)

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "settings.js").write_text(SETTINGS_JS)
    (workdir / "flows.json").write_text(json.dumps(nodes, indent=2) + "\n")
    (workdir / "flows_cred.json").write_text(json.dumps(credentials, indent=2) + "\n")
    log_path = workdir / LOG_NAME

    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, "--userDir", str(workdir), "--settings", str(workdir / "settings.js")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,  # a Ctrl-C in the benchmark does not reach it
        )
    try:
        _wait_until_up(proc, log_path, timeout)
    except BaseException:
        stop_nodered(proc)
        raise
    return proc


def _wait_until_up(proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if STARTED in text and CONNECTED in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"node-red exited with {proc.returncode}:\n{_tail(log_path)}")
        time.sleep(0.05)
    raise RuntimeError(f"node-red not up after {timeout:.0f} s:\n{_tail(log_path)}")


def _tail(log_path: Path, lines: int = 30) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def stop_nodered(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM (Node-RED closes its flows), SIGKILL after ``timeout``; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def open_files_limit() -> int:
    """The soft RLIMIT_NOFILE that a Node-RED started from this process inherits."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def log_errors(workdir: Path) -> list[str]:
    """The ``[error]`` lines of Node-RED's log in ``workdir`` (failed writes show here)."""
    log_path = Path(workdir) / LOG_NAME
    if not log_path.exists():
        return []
    return [ln for ln in log_path.read_text(errors="replace").splitlines() if "[error]" in ln]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the Node-RED baseline flow until Ctrl-C.")
    p.add_argument("--workdir", type=Path, required=True, help="Node-RED userDir (written)")
    p.add_argument("--mqtt-host", default="127.0.0.1")
    p.add_argument("--mqtt-port", type=int, default=1883)
    p.add_argument("--client-id", default="nodered-baseline")
    p.add_argument("--api", choices=APIS, default="v1")
    p.add_argument("--url", default="http://127.0.0.1:8086")
    p.add_argument("--database", default="factory")
    p.add_argument("--bucket", default="factory")
    p.add_argument("--org", default="factory")
    p.add_argument("--token", default="")
    p.add_argument("--shape", choices=SHAPES, default="single")
    args = p.parse_args(argv)

    t0 = time.monotonic()
    proc = start_nodered(
        args.workdir,
        mqtt_host=args.mqtt_host,
        mqtt_port=args.mqtt_port,
        client_id=args.client_id,
        api=args.api,
        url=args.url,
        database=args.database,
        bucket=args.bucket,
        org=args.org,
        token=args.token,
        shape=args.shape,
    )
    print(
        f"node-red up in {time.monotonic() - t0:.1f} s (pid {proc.pid}, log "
        f"{args.workdir / LOG_NAME})"
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop Node-RED on SIGTERM too
    try:
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_nodered(proc)
    return proc.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
