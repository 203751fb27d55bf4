"""Helpers for integration tests that query the real InfluxDB 1.6 and VictoriaMetrics.

The services come from ``scripts/services.sh start`` (InfluxDB on 127.0.0.1:8086, VictoriaMetrics
on 127.0.0.1:8428, Mosquitto on 127.0.0.1:1883). Only ``urllib3`` is used, so these helpers
check the server's own view of the data independently of ``influxdb-client``.

Facts these helpers rely on (checked against InfluxDB 1.6.7 and VictoriaMetrics 1.79.5):

* InfluxDB ``/query`` answers HTTP 400 with ``{"error": ...}`` for a query it cannot parse, but
  HTTP 200 with ``results[i]["error"]`` for a statement that fails (unknown database, bad time
  literal). Both raise :class:`ServiceError` here.
* VictoriaMetrics names a line-protocol field ``{measurement}_{field}`` (``telemetry`` + ``value``
  -> ``telemetry_value``); tags become labels; ``?db=NAME`` adds the label ``db="NAME"``; the
  v2 ``bucket``/``org`` parameters are ignored (no label at all).
* VictoriaMetrics buffers new rows for about a second; ``/internal/force_flush`` makes them
  visible to ``/api/v1/export`` at once. Export's default ``end`` misses points stamped in the
  last second, so :func:`vm_export` always passes an explicit range.
* VictoriaMetrics keeps timestamps in milliseconds (finer precisions are truncated), keeps
  duplicate samples with the same timestamp (no dedup by default), stores string field values
  as 0 and booleans as 0/1, silently drops unparsable lines, and drops samples more than about
  two days in the future (still answering 204).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import urllib3

INFLUX_URL = os.environ.get("INFLUX_URL", "http://127.0.0.1:8086")
VM_URL = os.environ.get("VM_URL", "http://127.0.0.1:8428")
MQTT_HOSTPORT = os.environ.get("MQTT_HOSTPORT", "127.0.0.1:1883")

# Health URLs for service_available(): InfluxDB's /ping answers 204, VictoriaMetrics' /health 200.
INFLUX_PING = f"{INFLUX_URL}/ping"
VM_HEALTH = f"{VM_URL}/health"

# Export range for VictoriaMetrics: from the epoch to 2100-01-01 (seconds).
_VM_EXPORT_START_S = 0
_VM_EXPORT_END_S = 4_102_444_800

_http = urllib3.PoolManager(
    timeout=urllib3.Timeout(connect=2.0, read=30.0),
    retries=False,
)


class ServiceError(RuntimeError):
    """A database answered with an error; ``text`` is the server's own message."""

    def __init__(self, what: str, status: int, text: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {text}")
        self.status = status
        self.text = text


def _request(
    method: str, url: str, fields: dict[str, str] | None = None
) -> urllib3.BaseHTTPResponse:
    if method == "POST":
        # urlencoded body: InfluxDB 1.x wants POST for CREATE/DROP, and long queries fit.
        return _http.request_encode_body(method, url, fields=fields or {}, encode_multipart=False)
    return _http.request(method, url, fields=fields)


def _decode(resp: urllib3.BaseHTTPResponse) -> str:
    return resp.data.decode("utf-8", errors="replace")


# --- InfluxDB 1.x --------------------------------------------------------------------------


def quote_ident(name: str) -> str:
    """Quote an InfluxQL identifier (database, measurement, field, tag key)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def influx_v1_query(url: str, db: str, q: str, *, epoch: str | None = "ms") -> list[dict[str, Any]]:
    """Run InfluxQL ``q`` against ``db`` via ``POST /query``; return the series of all results.

    Each series is InfluxDB's own dict: ``name``, ``columns``, ``values`` and, with GROUP BY,
    ``tags``. Times are integers in ``epoch`` units (``None`` gives RFC3339 strings). Raises
    :class:`ServiceError` with the server's error text for a failed request or statement.
    """
    fields = {"q": q}
    if db:
        fields["db"] = db
    if epoch:
        fields["epoch"] = epoch
    resp = _request("POST", f"{url.rstrip('/')}/query", fields)
    text = _decode(resp)
    try:
        body = json.loads(text)
    except ValueError:
        raise ServiceError(f"InfluxDB query {q!r}", resp.status, text) from None
    if resp.status != 200 or "error" in body:
        raise ServiceError(f"InfluxDB query {q!r}", resp.status, str(body.get("error", text)))
    series: list[dict[str, Any]] = []
    for result in body.get("results", []):
        if "error" in result:
            raise ServiceError(f"InfluxDB query {q!r}", resp.status, str(result["error"]))
        series.extend(result.get("series", []))
    return series


def influx_create_db(url: str, db: str) -> None:
    """Create ``db`` (a no-op when it exists)."""
    influx_v1_query(url, "", f"CREATE DATABASE {quote_ident(db)}")


def influx_drop_db(url: str, db: str) -> None:
    """Drop ``db`` (a no-op when it does not exist)."""
    influx_v1_query(url, "", f"DROP DATABASE {quote_ident(db)}")


def influx_count(url: str, db: str, measurement: str, field: str = "value", where: str = "") -> int:
    """Exact number of non-null ``field`` values in ``measurement``, over all series and all time.

    ``where`` is an InfluxQL condition without the ``WHERE`` keyword, e.g. ``"machine = 'm1'"``.
    A measurement with no matching points counts 0.
    """
    q = f"SELECT count({quote_ident(field)}) FROM {quote_ident(measurement)}"
    if where:
        q += f" WHERE {where}"
    total = 0
    for series in influx_v1_query(url, db, q):
        col = series["columns"].index("count")
        total += sum(int(row[col] or 0) for row in series.get("values", []))
    return total


def influx_rows(url: str, db: str, q: str) -> list[dict[str, Any]]:
    """Run ``q`` and flatten every series into one dict per row.

    Each row holds the series' GROUP BY tags, then its columns (``time`` in epoch ms, and the
    tags that ``SELECT *`` returns as columns), plus ``_measurement``: the series name.
    """
    rows: list[dict[str, Any]] = []
    for series in influx_v1_query(url, db, q, epoch="ms"):
        base: dict[str, Any] = {"_measurement": series.get("name", "")}
        base.update(series.get("tags") or {})
        columns: list[str] = series["columns"]
        for values in series.get("values", []):
            row = dict(base)
            row.update(zip(columns, values, strict=True))
            rows.append(row)
    return rows


# --- VictoriaMetrics ------------------------------------------------------------------------


def vm_flush(url: str) -> None:
    """Make rows written so far visible to searches and exports (``/internal/force_flush``)."""
    resp = _request("GET", f"{url.rstrip('/')}/internal/force_flush")
    if resp.status != 200:
        raise ServiceError("VictoriaMetrics force_flush", resp.status, _decode(resp))


def vm_export(url: str, match: str, *, flush: bool = True) -> list[dict[str, Any]]:
    """Raw samples of every series matching the selector ``match``, via ``/api/v1/export``.

    Returns one dict per series: ``metric`` (labels, with ``__name__``), ``values`` and
    ``timestamps`` (epoch ms), as VictoriaMetrics sends them, one JSON document per line.
    ``match`` is a series selector: ``telemetry_value`` or ``{__name__=~"telemetry_.*",run="x"}``.
    Flushes first unless ``flush`` is false.
    """
    if flush:
        vm_flush(url)
    resp = _request(
        "GET",
        f"{url.rstrip('/')}/api/v1/export",
        {"match[]": match, "start": str(_VM_EXPORT_START_S), "end": str(_VM_EXPORT_END_S)},
    )
    text = _decode(resp)
    if resp.status != 200:
        raise ServiceError(f"VictoriaMetrics export {match!r}", resp.status, text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def vm_count_points(url: str, match: str, *, flush: bool = True) -> int:
    """Exact number of samples in all series matching ``match`` (duplicates included)."""
    return sum(len(series["values"]) for series in vm_export(url, match, flush=flush))


def vm_delete_series(url: str, match: str) -> None:
    """Delete every series matching ``match`` (``/api/v1/admin/tsdb/delete_series``)."""
    resp = _request(
        "POST", f"{url.rstrip('/')}/api/v1/admin/tsdb/delete_series", {"match[]": match}
    )
    if resp.status not in (200, 204):
        raise ServiceError(f"VictoriaMetrics delete_series {match!r}", resp.status, _decode(resp))


# --- availability -----------------------------------------------------------------------------


def _host_port(url_or_hostport: str) -> tuple[str, int]:
    if "://" not in url_or_hostport:
        url_or_hostport = "tcp://" + url_or_hostport
    parts = urlsplit(url_or_hostport)
    default = {"http": 80, "https": 443, "mqtt": 1883, "mqtts": 8883}.get(parts.scheme, 0)
    port = parts.port or default
    if not parts.hostname or not port:
        raise ValueError(f"no host and port in {url_or_hostport!r}")
    return parts.hostname, port


def service_available(url_or_hostport: str, timeout: float = 2.0) -> bool:
    """True when the service answers.

    An ``http(s)://`` URL with a path (``INFLUX_PING``, ``VM_HEALTH``) must answer GET with a
    2xx status; anything else (``host:port``, ``mqtt://host:port``, a URL without a path) only
    has to accept a TCP connection.
    """
    parts = urlsplit(url_or_hostport)
    if parts.scheme in ("http", "https") and parts.path not in ("", "/"):
        try:
            resp = _http.request(
                "GET", url_or_hostport, timeout=urllib3.Timeout(connect=timeout, read=timeout)
            )
        except urllib3.exceptions.HTTPError:
            return False
        return 200 <= resp.status < 300
    try:
        host, port = _host_port(url_or_hostport)
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def require_service(name: str, check: Callable[[], bool] | bool | str) -> None:
    """Skip the calling test when service ``name`` is missing; fail instead when ``CI=true``.

    ``check`` is a zero-argument callable, a bool, or a URL / ``host:port`` that is given to
    :func:`service_available`.
    """
    if isinstance(check, str):
        ok = service_available(check)
        where = f" at {check}"
    else:
        ok = check() if callable(check) else check
        where = ""
    if ok:
        return
    reason = f"{name} is not available{where}; run scripts/services.sh start"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: services are required)", pytrace=False)
    pytest.skip(reason)
