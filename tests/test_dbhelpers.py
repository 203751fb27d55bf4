"""The test-database helpers, proved against the real servers from scripts/services.sh."""

from __future__ import annotations

import gzip
import uuid
from collections.abc import Iterator

import pytest
import urllib3
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision

from tests.dbhelpers import (
    INFLUX_PING,
    INFLUX_URL,
    MQTT_HOSTPORT,
    VM_HEALTH,
    VM_URL,
    ServiceError,
    influx_count,
    influx_create_db,
    influx_drop_db,
    influx_rows,
    influx_v1_query,
    require_service,
    service_available,
    vm_count_points,
    vm_delete_series,
    vm_export,
)

pytestmark = pytest.mark.services

T0 = 1_700_000_000_000  # epoch ms; well inside both servers' retention

_http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2.0, read=30.0), retries=False)


def _post_lines(
    url: str, path: str, lines: list[str], *, gzipped: bool = False
) -> urllib3.BaseHTTPResponse:
    body = "\n".join(lines).encode()
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    if gzipped:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return _http.request("POST", f"{url}{path}", body=body, headers=headers)


@pytest.fixture
def influx_db() -> Iterator[str]:
    require_service("InfluxDB", INFLUX_PING)
    db = f"test_dbhelpers_{uuid.uuid4().hex[:12]}"
    influx_create_db(INFLUX_URL, db)
    try:
        yield db
    finally:
        influx_drop_db(INFLUX_URL, db)


@pytest.fixture
def vm_run() -> Iterator[str]:
    """A unique ``run`` label value; its series are deleted afterwards."""
    require_service("VictoriaMetrics", VM_HEALTH)
    run = uuid.uuid4().hex[:12]
    try:
        yield run
    finally:
        vm_delete_series(VM_URL, f'{{run="{run}"}}')


def test_influx_gzip_write_count_and_rows(influx_db: str) -> None:
    lines = [f"telemetry,machine=m1,line=L1 value={i + 0.5} {T0 + i}" for i in range(5)] + [
        f"telemetry,machine=m2,line=L1 value=9 {T0 + 100}"
    ]
    resp = _post_lines(INFLUX_URL, f"/write?db={influx_db}&precision=ms", lines, gzipped=True)
    assert resp.status == 204, resp.data

    assert influx_count(INFLUX_URL, influx_db, "telemetry") == 6
    assert influx_count(INFLUX_URL, influx_db, "telemetry", where="machine = 'm1'") == 5
    assert influx_count(INFLUX_URL, influx_db, "absent") == 0

    rows = influx_rows(
        INFLUX_URL, influx_db, "SELECT value FROM telemetry WHERE machine = 'm2' GROUP BY *"
    )
    assert rows == [
        {"_measurement": "telemetry", "line": "L1", "machine": "m2", "time": T0 + 100, "value": 9.0}
    ]
    star = influx_rows(INFLUX_URL, influx_db, "SELECT * FROM telemetry WHERE machine = 'm1'")
    assert [r["time"] for r in star] == [T0 + i for i in range(5)]
    assert star[0]["machine"] == "m1" and star[0]["value"] == 0.5


def test_influx_partial_write_and_errors(influx_db: str) -> None:
    _post_lines(INFLUX_URL, f"/write?db={influx_db}&precision=ms", [f"telemetry value=1 {T0}"])
    resp = _post_lines(
        INFLUX_URL,
        f"/write?db={influx_db}&precision=ms",
        [f'telemetry value="text" {T0 + 1}', f"telemetry value=2 {T0 + 2}"],
    )
    assert resp.status == 400
    body = resp.data.decode()
    assert "partial write: field type conflict" in body and "dropped=1" in body
    assert influx_count(INFLUX_URL, influx_db, "telemetry") == 2  # the good point was kept

    with pytest.raises(ServiceError, match="error parsing query"):
        influx_v1_query(INFLUX_URL, influx_db, "SELEC nothing")
    with pytest.raises(ServiceError, match="database not found"):
        influx_v1_query(INFLUX_URL, influx_db + "_absent", "SELECT * FROM telemetry")


def test_vm_naming_precision_and_exact_count(vm_run: str) -> None:
    lines = [
        f"telemetry,machine=m1,run={vm_run} value={i},temp={20 + i}i {T0 + i}" for i in range(4)
    ]
    resp = _post_lines(VM_URL, "/write?db=factory&precision=ms", lines)
    assert resp.status == 204, resp.data

    series = vm_export(VM_URL, f'telemetry_value{{run="{vm_run}"}}')
    assert len(series) == 1
    assert series[0]["metric"] == {
        "__name__": "telemetry_value",
        "db": "factory",
        "machine": "m1",
        "run": vm_run,
    }
    assert series[0]["timestamps"] == [T0 + i for i in range(4)]
    assert series[0]["values"] == [0, 1, 2, 3]
    assert vm_count_points(VM_URL, f'{{__name__=~"telemetry_.*",run="{vm_run}"}}') == 8
    assert vm_count_points(VM_URL, f'telemetry_absent{{run="{vm_run}"}}') == 0


def test_vm_v2_write_with_influxdb_client(vm_run: str) -> None:
    with InfluxDBClient(url=VM_URL, token="unused", org="o") as client:
        client.write_api(write_options=SYNCHRONOUS).write(
            "b",
            "o",
            record=[f"telemetry,machine=m3,run={vm_run} value=1.25 {T0 + 7}"],
            write_precision=WritePrecision.MS,
        )
    series = vm_export(VM_URL, f'{{run="{vm_run}"}}')
    # bucket and org leave no trace: no db, bucket or org label
    assert [s["metric"] for s in series] == [
        {"__name__": "telemetry_value", "machine": "m3", "run": vm_run}
    ]
    assert series[0]["timestamps"] == [T0 + 7]


def test_service_available_and_require_service(monkeypatch: pytest.MonkeyPatch) -> None:
    require_service("InfluxDB", INFLUX_PING)
    require_service("VictoriaMetrics", VM_HEALTH)
    assert service_available(INFLUX_URL)  # TCP only
    assert service_available(MQTT_HOSTPORT) == service_available(f"mqtt://{MQTT_HOSTPORT}")
    assert not service_available("127.0.0.1:1")
    assert not service_available("http://127.0.0.1:1/ping")
    assert not service_available(f"{INFLUX_URL}/no-such-endpoint")

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_service("nothing", "127.0.0.1:1")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match=r"run scripts/services\.sh start"):
        require_service("nothing", lambda: False)
