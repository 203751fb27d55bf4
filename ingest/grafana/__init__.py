"""Grafana for factory-ingest, as code: the one source of the provisioning files.

``python -m ingest.grafana`` writes, under ``grafana/provisioning``:

* ``datasources/influxdb.yml``: the InfluxDB data source, queried in InfluxQL (served by
  InfluxDB 1.x, by 2.x through a DBRP mapping, and by 3.x);
* ``dashboards/dashboards.yml`` and ``dashboards/json/<uid>.json``: three dashboards,
  Plant overview, Machine detail and Pipeline health;
* ``alerting/rules.yml``: the alert rules (anomaly score high, device silent, ingest
  stalled) in Grafana's unified-alerting provisioning format.

The committed files are this module's output, byte for byte (a test checks it): change
them here and regenerate, never by hand.

Conventions of the queries (every one of them is run against a real InfluxDB by
``tests/integration/test_grafana_queries.py``):

* Tag filters use the regex format of a variable, ``"site" =~ /^${site:regex}$/``.
  Grafana escapes the values and joins several as ``(a|b)``; "All" is ``.*``. The
  explicit ``:regex`` format behaves the same in every Grafana version, unlike the
  InfluxDB data source's own default, which has changed between releases.
* ``$timeFilter`` and ``$__interval`` / ``$__interval_ms`` are Grafana's; ``${__to}`` is
  the end of the dashboard's time range in epoch milliseconds.
* Counters of ``ingest_stats`` are cumulative: rates are
  ``non_negative_derivative(last(...), 1s)``, per-interval counts
  ``non_negative_difference(last(...))``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ingest.sinks.lineprotocol import ANOMALY_EVENTS, INGEST_STATS, TELEMETRY

__all__ = [
    "DATASOURCE_UID",
    "FOLDER",
    "alert_rules",
    "dashboard_provider",
    "dashboards",
    "datasource",
    "provisioning_files",
    "to_json",
    "to_yaml",
    "write_provisioning",
]

DATASOURCE_UID = "factory-influxql"
#: Grafana folder of the dashboards and the alert rules.
FOLDER = "factory-ingest"
#: Where Grafana reads the dashboard JSON files (the compose bind mount).
DASHBOARDS_PATH = "/etc/grafana/provisioning/dashboards/json"

PLANT_OVERVIEW = "factory-plant-overview"
MACHINE_DETAIL = "factory-machine-detail"
PIPELINE_HEALTH = "factory-pipeline-health"

_DS = {"type": "influxdb", "uid": DATASOURCE_UID}
_EXPR = {"type": "__expr__", "uid": "__expr__"}
_TAGS = ["factory-ingest"]
_SCHEMA_VERSION = 39

_T = f'"{TELEMETRY}"'
_E = f'"{ANOMALY_EVENTS}"'
_S = f'"{INGEST_STATS}"'


# --- InfluxQL pieces ------------------------------------------------------------------------


def _match(*tags: str) -> str:
    """``"site" =~ /^${site:regex}$/ AND ...``: each tag against its template variable."""
    return " AND ".join(f'"{t}" =~ /^${{{t}:regex}}$/' for t in tags)


_SITE_LINE = _match("site", "line")
_DEVICE = _match("site", "line", "device")
_STREAM = _match("site", "line", "device", "sensor")
_INSTANCE = _match("instance")
#: The ``${__to}``-anchored windows: what is true at the end of the time range.
_RECENT = "time > ${__to}ms - 5m AND time <= ${__to}ms"
_WEEK = "time > ${__to}ms - 7d AND time <= ${__to}ms"


def _rate(counter: str, alias: str | None = None) -> str:
    name = f' AS "{alias}"' if alias else ""
    return f'non_negative_derivative(last("{counter}"), 1s){name}'


def _delta(counter: str, alias: str) -> str:
    return f'non_negative_difference(last("{counter}")) AS "{alias}"'


# --- the data source ------------------------------------------------------------------------


def datasource(
    database: str = "${GRAFANA_INFLUX_DATABASE}",
    url: str = "http://influxdb:8086",
    user: str = "grafana",
    password: str = "${GRAFANA_INFLUX_PASSWORD}",
) -> dict[str, Any]:
    """The InfluxDB data source (InfluxQL, proxied by the Grafana server, basic auth).

    The defaults are what the provisioning file holds: Grafana replaces the
    ``${...}`` references with its environment variables when it reads the file.
    """
    return {
        "name": "InfluxDB (factory)",
        "uid": DATASOURCE_UID,
        "type": "influxdb",
        "access": "proxy",
        "url": url,
        "isDefault": True,
        "editable": False,
        "basicAuth": True,
        "basicAuthUser": user,
        "jsonData": {"version": "InfluxQL", "dbName": database, "httpMode": "GET"},
        "secureJsonData": {"basicAuthPassword": password},
    }


def dashboard_provider() -> dict[str, Any]:
    """``dashboards/dashboards.yml``: one file provider for the JSON files."""
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "factory-ingest",
                "orgId": 1,
                "folder": FOLDER,
                "type": "file",
                "disableDeletion": True,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 60,
                "options": {"path": DASHBOARDS_PATH},
            }
        ],
    }


# --- dashboard building blocks --------------------------------------------------------------


def _target(
    query: str, ref: str = "A", alias: str = "", fmt: str = "time_series"
) -> dict[str, Any]:
    target: dict[str, Any] = {
        "refId": ref,
        "datasource": dict(_DS),
        "rawQuery": True,
        "resultFormat": fmt,
        "query": query,
    }
    if alias:
        target["alias"] = alias
    return target


def _thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for value, color in steps],
    }


_GREEN = _thresholds((None, "green"))


def _override(name: str, **props: Any) -> dict[str, Any]:
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": key.replace("__", "."), "value": v} for key, v in props.items()],
    }


def _timeseries_defaults(
    unit: str = "short",
    *,
    bars: bool = False,
    min_: float | None = 0,
    max_: float | None = None,
    thresholds: dict[str, Any] | None = None,
    threshold_style: str = "off",
) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "lineWidth": 1,
        "fillOpacity": 60 if bars else 10,
        "pointSize": 4,
        "showPoints": "never",
        "spanNulls": False,
        "axisPlacement": "auto",
        "thresholdsStyle": {"mode": threshold_style},
    }
    out: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "custom": custom,
        "thresholds": thresholds or _GREEN,
    }
    if min_ is not None:
        out["min"] = min_
    if max_ is not None:
        out["max"] = max_
    return out


_TS_OPTIONS = {
    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
    "tooltip": {"mode": "multi", "sort": "desc"},
}


def _stat_options(graph: bool = False) -> dict[str, Any]:
    return {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "background",
        "graphMode": "area" if graph else "none",
        "justifyMode": "auto",
        "orientation": "auto",
        "textMode": "value_and_name",
    }


class _Board:
    """Collects panels, numbering them and placing them left to right, top to bottom."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self._x = 0
        self._y = 0
        self._row_h = 0

    def add(
        self,
        kind: str,
        title: str,
        description: str,
        targets: Sequence[dict[str, Any]],
        *,
        w: int,
        h: int,
        defaults: dict[str, Any] | None = None,
        overrides: Sequence[dict[str, Any]] = (),
        options: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        if self._x + w > 24:
            self._x, self._y, self._row_h = 0, self._y + self._row_h, 0
        panel: dict[str, Any] = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": dict(_DS),
            "gridPos": {"h": h, "w": w, "x": self._x, "y": self._y},
            "targets": list(targets),
            "fieldConfig": {"defaults": defaults or {}, "overrides": list(overrides)},
            "options": options or {},
        }
        panel.update(extra)
        self.panels.append(panel)
        self._x += w
        self._row_h = max(self._row_h, h)
        return panel

    def series(
        self, title: str, description: str, query: str, alias: str, *, counts: bool = False
    ) -> dict[str, Any]:
        """A half-width time series of one query: lines, or bars of whole counts."""
        defaults = _timeseries_defaults("short", bars=counts)
        return self.add(
            "timeseries",
            title,
            description,
            [_target(query, alias=alias)],
            w=12,
            h=8,
            defaults={**defaults, "decimals": 0} if counts else defaults,
            options=_TS_OPTIONS,
        )

    def stat(
        self,
        title: str,
        description: str,
        query: str,
        alias: str,
        defaults: dict[str, Any],
        *,
        graph: bool = False,
    ) -> dict[str, Any]:
        """A small stat panel of one query (with a sparkline if ``graph``)."""
        return self.add(
            "stat",
            title,
            description,
            [_target(query, alias=alias)],
            w=4,
            h=5,
            defaults=defaults,
            options=_stat_options(graph=graph),
        )


def _query_variable(
    name: str,
    label: str,
    query: str,
    *,
    multi: bool = True,
    include_all: bool = True,
    description: str = "",
) -> dict[str, Any]:
    var: dict[str, Any] = {
        "name": name,
        "label": label,
        "description": description,
        "type": "query",
        "datasource": dict(_DS),
        "query": query,
        "definition": query,
        "refresh": 2,  # on time range change, so new devices appear
        "regex": "",
        "sort": 1,
        "multi": multi,
        "includeAll": include_all,
        "hide": 0,
        "skipUrlSync": False,
        "options": [],
    }
    if include_all:
        var["allValue"] = ".*"
        var["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    else:
        var["current"] = {}
    return var


def _tag_values(measurement: str, key: str, *after: str) -> str:
    query = f'SHOW TAG VALUES FROM "{measurement}" WITH KEY = "{key}"'
    if after:
        query += " WHERE " + _match(*after)
    return query


def _location_variables(
    *, device_multi: bool = True, with_sensor: bool = True
) -> list[dict[str, Any]]:
    """site -> line -> device (-> sensor), each one's choices narrowed by the previous."""
    out = [
        _query_variable("site", "Site", _tag_values(TELEMETRY, "site")),
        _query_variable("line", "Line", _tag_values(TELEMETRY, "line", "site")),
        _query_variable(
            "device",
            "Device",
            _tag_values(TELEMETRY, "device", "site", "line"),
            multi=device_multi,
            include_all=device_multi,
        ),
    ]
    if with_sensor:
        out.append(
            _query_variable(
                "sensor", "Sensor", _tag_values(TELEMETRY, "sensor", "site", "line", "device")
            )
        )
    return out


def _dashboard(
    uid: str,
    title: str,
    description: str,
    board: _Board,
    variables: list[dict[str, Any]],
    annotations: Iterable[dict[str, Any]] = (),
    time_from: str = "now-6h",
) -> dict[str, Any]:
    builtin = {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": list(_TAGS),
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": time_from, "to": "now"},
        "schemaVersion": _SCHEMA_VERSION,
        "version": 1,
        "links": [
            {
                "type": "dashboards",
                "title": "factory-ingest",
                "tags": list(_TAGS),
                "asDropdown": False,
                "includeVars": False,
                "keepTime": True,
                "targetBlank": False,
                "icon": "external link",
            }
        ],
        "templating": {"list": variables},
        "annotations": {"list": [builtin, *annotations]},
        "panels": board.panels,
    }


def _machine_link(title: str = "Machine detail") -> dict[str, Any]:
    """A data link from a row with site, line and device columns to Machine detail."""
    url = (
        f"/d/{MACHINE_DETAIL}?var-site=${{__data.fields.site}}&var-line=${{__data.fields.line}}"
        "&var-device=${__data.fields.device}&${__url_time_range}"
    )
    return {"title": title, "url": url}


# --- Plant overview -------------------------------------------------------------------------


def _plant_overview() -> dict[str, Any]:
    b = _Board()
    b.add(
        "stat",
        "Samples in /s",
        "Valid samples decoded per second by ingest (all instances, all sites), from "
        "ingest_stats. A sample is one timestamp of one device, with any number of sensors.",
        [
            _target(
                f'SELECT sum("rate") FROM (SELECT {_rate("samples_accepted", "rate")} '
                f'FROM {_S} WHERE $timeFilter GROUP BY time($__interval), "instance" '
                "fill(none)) WHERE $timeFilter GROUP BY time($__interval) fill(none)",
                alias="samples/s",
            )
        ],
        w=5,
        h=6,
        defaults={"unit": "short", "decimals": 1, "color": {"mode": "fixed", "fixedColor": "blue"}},
        options=_stat_options(graph=True),
    )
    b.add(
        "stat",
        "Devices reporting / silent",
        "Reporting: devices with telemetry in the last 5 minutes of the time range. "
        "Silent: devices with a sensor stream that ingest has marked silent (an open gap "
        "event of the last 7 days, opened after processing.gap_factor usual intervals "
        "without data); the 'Device silent' alert uses the same events.",
        [
            _target(
                'SELECT count("last") FROM (SELECT last("value") FROM '
                f'{_T} WHERE {_RECENT} AND {_DEVICE} GROUP BY "site", "line", "device")',
                "A",
                "reporting",
            ),
            _target(
                'SELECT count("open") FROM (SELECT last("open") AS "open" FROM '
                f'{_E} WHERE "kind" = \'gap\' AND "open" = true AND {_WEEK} AND {_DEVICE} '
                'GROUP BY "site", "line", "device")',
                "B",
                "silent",
            ),
        ],
        w=5,
        h=6,
        defaults={"unit": "short", "decimals": 0, "noValue": "0", "thresholds": _GREEN},
        overrides=[
            _override(
                "silent",
                thresholds=_thresholds((None, "green"), (1, "red")),
                color={"mode": "thresholds"},
            )
        ],
        options=_stat_options(),
    )
    b.add(
        "stat",
        "Anomaly episodes in range",
        "Anomaly episodes that started in the time range (anomaly_events, kind=anomaly), "
        "for the selected streams.",
        [
            _target(
                f'SELECT count("detectors") FROM {_E} WHERE "kind" = \'anomaly\' AND '
                f"$timeFilter AND {_STREAM}",
                alias="episodes",
            )
        ],
        w=5,
        h=6,
        defaults={
            "unit": "short",
            "decimals": 0,
            "noValue": "0",
            "thresholds": _thresholds((None, "green"), (1, "orange")),
        },
        options=_stat_options(),
    )
    b.add(
        "bargauge",
        "Active anomalies per line",
        "Anomaly episodes still open (no closing write yet), by line: an episode closes "
        "after processing.hold quiet samples. Only episodes that started in the time range.",
        [
            _target(
                f'SELECT count("open") FROM {_E} WHERE "kind" = \'anomaly\' AND '
                f'"open" = true AND $timeFilter AND {_STREAM} GROUP BY "site", "line"',
                alias="$tag_site / $tag_line",
            )
        ],
        w=9,
        h=6,
        defaults={
            "unit": "short",
            "decimals": 0,
            "min": 0,
            "color": {"mode": "thresholds"},
            "thresholds": _thresholds((None, "green"), (1, "orange"), (5, "red")),
        },
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
            "displayMode": "gradient",
            "showUnfilled": True,
            "valueMode": "color",
            "namePlacement": "auto",
            "minVizHeight": 16,
            "maxVizHeight": 32,
        },
    )
    b.add(
        "timeseries",
        "Readings stored per second, by line",
        "Sensor readings (one sensor value of one sample) stored in telemetry per second, "
        "by the devices' timestamps.",
        [
            _target(
                f'SELECT count("value") * 1000.0 / $__interval_ms FROM {_T} WHERE $timeFilter '
                f'AND {_STREAM} GROUP BY time($__interval), "site", "line" fill(0)',
                alias="$tag_site / $tag_line",
            )
        ],
        w=24,
        h=8,
        defaults=_timeseries_defaults("short"),
        options=_TS_OPTIONS,
    )
    b.add(
        "heatmap",
        "Anomaly score per device",
        "Highest fused anomaly score (0 to 1; 0.5 is a detector's threshold) of any "
        "selected sensor of each device, per interval.",
        [
            _target(
                f'SELECT max("score") FROM {_T} WHERE $timeFilter AND {_STREAM} '
                'GROUP BY time($__interval), "site", "line", "device" fill(none)',
                alias="$tag_site/$tag_line/$tag_device",
            )
        ],
        w=24,
        h=10,
        defaults={
            "unit": "short",
            "min": 0,
            "max": 1,
            "custom": {"scaleDistribution": {"type": "linear"}},
        },
        options={
            "calculate": False,
            "cellGap": 1,
            "cellValues": {"decimals": 2},
            "color": {
                "mode": "scheme",
                "scheme": "YlOrRd",
                "fill": "dark-orange",
                "scale": "linear",
                "exponent": 0.5,
                "steps": 64,
                "reverse": False,
                "min": 0,
                "max": 1,
            },
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": False},
            "yAxis": {"axisPlacement": "left", "reverse": False},
        },
    )
    b.add(
        "table",
        "Latest anomaly events",
        "The newest 100 anomaly and gap episodes (anomaly_events) of the selected streams, "
        "newest first. Open episodes have no end yet. Click a device for Machine detail.",
        [
            _target(
                'SELECT "site", "line", "device", "sensor", "kind", "status", "detectors", '
                f'"peak_score", "duration_s", "end" FROM {_E} WHERE $timeFilter AND {_STREAM} '
                "ORDER BY time DESC LIMIT 100",
                fmt="table",
            )
        ],
        w=24,
        h=10,
        defaults={"custom": {"align": "auto", "filterable": True}, "thresholds": _GREEN},
        overrides=[
            _override("Time", displayName="Start", unit="dateTimeAsIso"),
            _override("end", displayName="End", unit="dateTimeAsIso"),
            _override("duration_s", displayName="Duration", unit="s", decimals=1),
            _override(
                "peak_score",
                displayName="Peak score",
                decimals=3,
                custom__cellOptions={"type": "color-text"},
                color={"mode": "thresholds"},
                thresholds=_thresholds((None, "green"), (0.5, "orange"), (0.9, "red")),
            ),
            _override("device", links=[_machine_link()]),
        ],
        options={"showHeader": True, "cellHeight": "sm", "footer": {"show": False}},
    )
    return _dashboard(
        PLANT_OVERVIEW,
        "Factory: plant overview",
        "Intake, reporting and silent devices, anomalies by line and device, latest events.",
        b,
        _location_variables(),
    )


# --- Machine detail -------------------------------------------------------------------------


def _machine_detail() -> dict[str, Any]:
    b = _Board()
    k = {
        "name": "k",
        "label": "Band ±k·σ",  # noqa: RUF001
        "description": "Width of the band around the rolling mean, in standard deviations.",
        "type": "custom",
        "query": "2,3,4,5",
        "current": {"selected": True, "text": "3", "value": "3"},
        "options": [{"selected": v == "3", "text": v, "value": v} for v in ("2", "3", "4", "5")],
        "multi": False,
        "includeAll": False,
        "hide": 0,
        "skipUrlSync": False,
    }
    band = "#5794F2"
    b.add(
        "timeseries",
        "${sensor}: value and rolling mean ± ${k}σ",  # noqa: RUF001
        "The sensor's value with the baseline the detectors compare it with: the rolling "
        "mean and ±k standard deviations (telemetry fields mean and std, each sample's "
        "baseline before it). Averaged per interval; zoom in for single samples. One panel "
        "per selected sensor.",
        [
            _target(
                'SELECT mean("value") AS "value", mean("mean") AS "mean", '
                'mean("mean") - $k * mean("std") AS "lower", '
                'mean("mean") + $k * mean("std") AS "upper" '
                f"FROM {_T} WHERE $timeFilter AND {_STREAM} "
                'GROUP BY time($__interval), "sensor" fill(none)',
                alias="$col",
            )
        ],
        w=12,
        h=8,
        defaults=_timeseries_defaults("short", min_=None),
        overrides=[
            _override("value", color={"mode": "fixed", "fixedColor": "yellow"}),
            _override(
                "mean",
                color={"mode": "fixed", "fixedColor": band},
                custom__lineStyle={"fill": "dash", "dash": [10, 10]},
            ),
            _override(
                "upper",
                color={"mode": "fixed", "fixedColor": band},
                custom__lineWidth=0,
                custom__fillOpacity=20,
                custom__fillBelowTo="lower",
            ),
            _override(
                "lower",
                color={"mode": "fixed", "fixedColor": band},
                custom__lineWidth=0,
                custom__fillOpacity=0,
            ),
        ],
        options=_TS_OPTIONS,
        repeat="sensor",
        repeatDirection="h",
        maxPerRow=2,
    )
    b.add(
        "timeseries",
        "Anomaly score",
        "Highest fused anomaly score per interval, by sensor: 0 to 1, where 0.5 is the "
        "threshold of the detector that scores highest. Episodes are the annotations.",
        [
            _target(
                f'SELECT max("score") FROM {_T} WHERE $timeFilter AND {_STREAM} '
                'GROUP BY time($__interval), "sensor" fill(none)',
                alias="$tag_sensor",
            )
        ],
        w=24,
        h=8,
        defaults=_timeseries_defaults(
            "short",
            max_=1,
            thresholds=_thresholds((None, "green"), (0.5, "orange"), (0.9, "red")),
            threshold_style="dashed",
        ),
        options=_TS_OPTIONS,
    )
    b.series(
        "Anomalous readings",
        "Readings with the anomaly flag raised, per interval and sensor.",
        f'SELECT count("value") FROM {_T} WHERE "anomaly" = true AND $timeFilter '
        f'AND {_STREAM} GROUP BY time($__interval), "sensor" fill(none)',
        "$tag_sensor",
        counts=True,
    )
    b.add(
        "table",
        "Episodes of this machine",
        "Anomaly and gap episodes of the selected sensors, newest first.",
        [
            _target(
                'SELECT "sensor", "kind", "status", "detectors", "peak_score", "duration_s", '
                f'"end" FROM {_E} WHERE $timeFilter AND {_STREAM} ORDER BY time DESC LIMIT 100',
                fmt="table",
            )
        ],
        w=12,
        h=8,
        defaults={"custom": {"align": "auto", "filterable": True}, "thresholds": _GREEN},
        overrides=[
            _override("Time", displayName="Start", unit="dateTimeAsIso"),
            _override("end", displayName="End", unit="dateTimeAsIso"),
            _override("duration_s", displayName="Duration", unit="s", decimals=1),
            _override("peak_score", displayName="Peak score", decimals=3),
        ],
        options={"showHeader": True, "cellHeight": "sm", "footer": {"show": False}},
    )
    annotation_fields = '"end", "detectors", "status", "peak_score", "sensor", "kind"'
    annotations = [
        {
            "name": name,
            "datasource": dict(_DS),
            "enable": True,
            "hide": False,
            "iconColor": color,
            "target": {
                "refId": "Anno",
                "fromAnnotations": True,
                "rawQuery": True,
                "query": f"SELECT {annotation_fields} FROM {_E} WHERE \"kind\" = '{kind}' "
                f"AND $timeFilter AND {_STREAM}",
                "textColumn": text,
                "tagsColumn": "sensor,kind",
                "timeEndColumn": "end",
                "titleColumn": "",
            },
        }
        for name, kind, color, text in (
            ("Anomaly episodes", "anomaly", "red", "detectors"),
            ("Gaps (silent streams)", "gap", "#8F8F8F", "status"),
        )
    ]
    return _dashboard(
        MACHINE_DETAIL,
        "Factory: machine detail",
        "One machine: each sensor against its baseline band, the anomaly score, episodes.",
        b,
        [*_location_variables(device_multi=False), k],
        annotations,
        time_from="now-1h",
    )


# --- Pipeline health ------------------------------------------------------------------------


def _pipeline_health() -> dict[str, Any]:
    b = _Board()
    per_instance = 'GROUP BY time($__interval), "instance" fill(none)'
    where = f"WHERE $timeFilter AND {_INSTANCE}"
    b.stat(
        "MQTT connected",
        "Whether each ingest instance is connected to the broker (its latest ingest_stats).",
        f'SELECT last("mqtt_connected") FROM {_S} {where} GROUP BY "instance"',
        "$tag_instance",
        {
            "color": {"mode": "thresholds"},
            "thresholds": _thresholds((None, "red"), (1, "green")),
            "mappings": [
                {
                    "type": "value",
                    "options": {
                        "0": {"text": "disconnected", "color": "red", "index": 0},
                        "1": {"text": "connected", "color": "green", "index": 1},
                    },
                }
            ],
        },
    )
    b.stat(
        "Unacknowledged messages",
        "Messages handed to the writer and not yet acknowledged to the broker. It grows "
        "while the database is slow or down (and the spool is off or full).",
        f'SELECT last("pending_messages") FROM {_S} {where} GROUP BY "instance"',
        "$tag_instance",
        {
            "unit": "short",
            "decimals": 0,
            "color": {"mode": "thresholds"},
            "thresholds": _thresholds((None, "green"), (1000, "orange"), (5000, "red")),
        },
        graph=True,
    )
    b.stat(
        "Streams / silent streams",
        "Sensor streams (device x sensor) ingest tracks, and those silent for more than "
        "processing.gap_factor usual intervals.",
        f'SELECT last("streams") AS "streams", last("streams_silent") AS "silent" '
        f'FROM {_S} {where} GROUP BY "instance"',
        "$tag_instance $col",
        {"unit": "short", "decimals": 0, "color": {"mode": "fixed", "fixedColor": "blue"}},
    )
    b.stat(
        "Write latency (last)",
        "Duration of the latest successful database write, retries included.",
        f'SELECT last("write_latency_seconds") FROM {_S} {where} GROUP BY "instance"',
        "$tag_instance",
        {
            "unit": "s",
            "decimals": 3,
            "color": {"mode": "thresholds"},
            "thresholds": _thresholds((None, "green"), (1, "orange"), (5, "red")),
        },
        graph=True,
    )
    b.stat(
        "Spool backlog",
        "Batches waiting in the on-disk spool for the database to come back.",
        f'SELECT last("spool_batches") FROM {_S} {where} GROUP BY "instance"',
        "$tag_instance",
        {
            "unit": "short",
            "decimals": 0,
            "color": {"mode": "thresholds"},
            "thresholds": _thresholds((None, "green"), (1, "orange")),
        },
        graph=True,
    )
    b.stat(
        "Uptime",
        "Time since each ingest instance started.",
        f'SELECT last("uptime_seconds") FROM {_S} {where} GROUP BY "instance"',
        "$tag_instance",
        {"unit": "s", "color": {"mode": "fixed", "fixedColor": "text"}},
    )
    b.series(
        "Messages received and acknowledged /s",
        "MQTT messages received per second, and acknowledged once their samples are stored.",
        f"SELECT {_rate('messages_received', 'received')}, "
        f"{_rate('messages_acked', 'acknowledged')} FROM {_S} {where} {per_instance}",
        "$tag_instance $col",
    )
    b.series(
        "Samples in and points written /s",
        "Valid samples and readings decoded per second, and points stored in the database "
        "per second (telemetry, events, status and ingest_stats points).",
        f"SELECT {_rate('samples_accepted', 'samples')}, "
        f"{_rate('readings_accepted', 'readings')}, "
        f"{_rate('points_written', 'points written')} FROM {_S} {where} {per_instance}",
        "$tag_instance $col",
    )
    b.series(
        "Rejects by reason /s",
        "Messages or samples rejected per second, by reason (see docs/contract.md); each is "
        "also sent to the dead-letter topic.",
        f"SELECT {_rate('rejected')} FROM {_S} {where} AND \"reason\" != '' "
        'GROUP BY time($__interval), "instance", "reason" fill(none)',
        "$tag_reason ($tag_instance)",
    )
    b.add(
        "bargauge",
        "Rejects since start, by reason",
        "Rejections counted by each ingest instance since it started, by reason.",
        [
            _target(
                f'SELECT last("rejected") FROM {_S} {where} AND "reason" != \'\' '
                'GROUP BY "instance", "reason"',
                alias="$tag_reason ($tag_instance)",
            )
        ],
        w=12,
        h=8,
        defaults={
            "unit": "short",
            "decimals": 0,
            "min": 0,
            "color": {"mode": "thresholds"},
            "thresholds": _thresholds((None, "orange")),
        },
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
            "displayMode": "basic",
            "showUnfilled": True,
            "valueMode": "color",
            "namePlacement": "auto",
        },
    )
    b.add(
        "timeseries",
        "Write latency",
        "Duration of database writes (the latest one at each ingest_stats point), retries "
        "included.",
        [
            _target(
                f'SELECT max("write_latency_seconds") FROM {_S} {where} {per_instance}',
                alias="$tag_instance",
            )
        ],
        w=12,
        h=8,
        defaults=_timeseries_defaults(
            "s",
            thresholds=_thresholds((None, "green"), (1, "orange"), (5, "red")),
            threshold_style="dashed",
        ),
        options=_TS_OPTIONS,
    )
    b.add(
        "timeseries",
        "Retry and spool backlog",
        "Messages waiting for their acknowledgement, batches in the on-disk spool (left "
        "axis) and the spool's size (right axis).",
        [
            _target(
                f'SELECT last("pending_messages") AS "unacknowledged messages", '
                f'last("spool_batches") AS "spooled batches" FROM {_S} {where} {per_instance}',
                "A",
                "$tag_instance $col",
            ),
            _target(
                f'SELECT last("spool_bytes") AS "spool size" FROM {_S} {where} {per_instance}',
                "B",
                "$tag_instance $col",
            ),
        ],
        w=12,
        h=8,
        defaults=_timeseries_defaults("short"),
        overrides=[
            {
                "matcher": {"id": "byFrameRefID", "options": "B"},
                "properties": [
                    {"id": "unit", "value": "bytes"},
                    {"id": "custom.axisPlacement", "value": "right"},
                ],
            }
        ],
        options=_TS_OPTIONS,
    )
    b.series(
        "Write retries, failures and spooling",
        "Per interval: writes retried, writes that failed (before a retry), batches spooled "
        "to disk and spooled batches replayed to the database.",
        f"SELECT {_delta('write_retries', 'retries')}, "
        f"{_delta('write_failures', 'failures')}, "
        f"{_delta('batches_spooled', 'batches spooled')}, "
        f"{_delta('batches_replayed', 'batches replayed')} "
        f"FROM {_S} {where} {per_instance}",
        "$tag_instance $col",
        counts=True,
    )
    b.series(
        "MQTT reconnects",
        "Per interval: (re)connections to the broker, and subscriptions renewed by the stall "
        "watchdog (mqtt.stall_timeout).",
        f"SELECT {_delta('reconnects', 'reconnects')}, "
        f"{_delta('stalls', 'watchdog renewals')} FROM {_S} {where} {per_instance}",
        "$tag_instance $col",
        counts=True,
    )
    b.add(
        "table",
        "Last seen per device",
        "When each device's newest reading in the time range was taken (device clock), "
        "oldest first: the devices at the top have been quiet the longest.",
        [
            _target(
                f'SELECT last("value") AS "last value" FROM {_T} WHERE $timeFilter AND '
                f'{_DEVICE} GROUP BY "site", "line", "device"',
                fmt="table",
            )
        ],
        w=24,
        h=10,
        defaults={"custom": {"align": "auto", "filterable": True}, "thresholds": _GREEN},
        overrides=[
            _override("Time", displayName="Last seen", unit="dateTimeFromNow"),
            _override("last value", custom__hidden=True),
            _override("device", links=[_machine_link()]),
        ],
        options={
            "showHeader": True,
            "cellHeight": "sm",
            "footer": {"show": False},
            "sortBy": [{"displayName": "Last seen", "desc": False}],
        },
    )
    instance = _query_variable(
        "instance",
        "Ingest instance",
        _tag_values(INGEST_STATS, "instance"),
        description="MQTT client id of an ingest process (tag instance of ingest_stats).",
    )
    return _dashboard(
        PIPELINE_HEALTH,
        "Factory: ingest pipeline health",
        "The ingest service's own metrics (measurement ingest_stats) and per-device last seen.",
        b,
        [instance, *_location_variables(with_sensor=False)],
        time_from="now-3h",
    )


def dashboards() -> list[dict[str, Any]]:
    """The dashboards' JSON models, in a stable order, each with a stable uid."""
    return [_plant_overview(), _machine_detail(), _pipeline_health()]


# --- alert rules ----------------------------------------------------------------------------


def _rule(
    uid: str,
    title: str,
    query: str,
    range_s: int,
    reducer: str,
    op: str,
    threshold: float,
    *,
    for_: str,
    no_data: str,
    labels: dict[str, str],
    summary: str,
    description: str,
) -> dict[str, Any]:
    """Query A (InfluxQL), B = reduce(A) per series, C = threshold(B): the condition."""
    return {
        "uid": uid,
        "title": title,
        "condition": "C",
        "data": [
            {
                "refId": "A",
                "relativeTimeRange": {"from": range_s, "to": 0},
                "datasourceUid": DATASOURCE_UID,
                "model": {
                    "refId": "A",
                    "datasource": dict(_DS),
                    "rawQuery": True,
                    "resultFormat": "time_series",
                    "query": query,
                    "intervalMs": 1000,
                    "maxDataPoints": 43200,
                },
            },
            {
                "refId": "B",
                "relativeTimeRange": {"from": 0, "to": 0},
                "datasourceUid": "__expr__",
                "model": {
                    "refId": "B",
                    "datasource": dict(_EXPR),
                    "type": "reduce",
                    "expression": "A",
                    "reducer": reducer,
                    "settings": {"mode": "dropNN"},
                },
            },
            {
                "refId": "C",
                "relativeTimeRange": {"from": 0, "to": 0},
                "datasourceUid": "__expr__",
                "model": {
                    "refId": "C",
                    "datasource": dict(_EXPR),
                    "type": "threshold",
                    "expression": "B",
                    "conditions": [{"evaluator": {"type": op, "params": [threshold]}}],
                },
            },
        ],
        "noDataState": no_data,
        "execErrState": "Error",
        "for": for_,
        "isPaused": False,
        "labels": {"service": "factory-ingest", **labels},
        "annotations": {"summary": summary, "description": description},
    }


def alert_rules() -> dict[str, Any]:
    """The alerting provisioning document (``alerting/rules.yml``).

    Grafana does not expand environment variables in the queries (``data``) or in the
    annotations of a provisioned rule, so ``$timeFilter`` and ``{{ $labels.x }}`` are safe
    there; labels are expanded, so they hold no ``$``.
    """
    machine = f"/d/{MACHINE_DETAIL}?var-site={{{{ $labels.site }}}}&var-line={{{{ $labels.line }}}}"
    machine += "&var-device={{ $labels.device }}"
    where = "{{ $labels.site }}/{{ $labels.line }}/{{ $labels.device }}"
    rules = [
        _rule(
            "factory-anomaly-score-high",
            "Anomaly score high on a machine",
            f'SELECT max("score") FROM {_T} WHERE $timeFilter '
            'GROUP BY time(1m), "site", "line", "device", "sensor" fill(none)',
            300,
            "mean",
            "gt",
            0.8,
            for_="2m",
            no_data="OK",
            labels={"severity": "warning"},
            summary=f"{where} {{{{ $labels.sensor }}}}: anomaly score "
            '{{ printf "%.2f" $values.B.Value }}',
            description="The highest anomaly score per minute of this sensor averaged over "
            "5 minutes is above 0.8 (0.5 is a detector's threshold): a sustained anomaly, not "
            f"a single spike. See {machine}",
        ),
        _rule(
            "factory-device-silent",
            "Device silent",
            f'SELECT count("open") FROM {_E} WHERE "kind" = \'gap\' AND "open" = true '
            'AND $timeFilter GROUP BY "site", "line", "device"',
            7 * 24 * 3600,
            "last",
            "gt",
            0,
            for_="2m",
            no_data="OK",
            labels={"severity": "warning"},
            summary=f"{where}: {{{{ $values.B.Value }}}} sensor stream(s) silent",
            description="Ingest has open gap events for this device: streams that stopped "
            "sending for more than processing.gap_factor of their usual intervals (events of "
            "the last 7 days). It resolves when the device sends again. No data means no "
            f"silent device. See {machine}",
        ),
        _rule(
            "factory-ingest-stalled",
            "Ingest stalled",
            f'SELECT spread("samples_accepted") FROM {_S} WHERE $timeFilter GROUP BY "instance"',
            300,
            "last",
            "lt",
            1,
            for_="2m",
            no_data="Alerting",
            labels={"severity": "critical"},
            summary="Ingest {{ $labels.instance }} accepted no sample in 5 minutes",
            description="ingest_stats shows no new valid sample in the last 5 minutes. No "
            "data at all means no ingest_stats point was written: ingest is down or cannot "
            f"write to the database. See /d/{PIPELINE_HEALTH}",
        ),
    ]
    return {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": 1,
                "name": "factory-ingest",
                "folder": FOLDER,
                "interval": "1m",
                "rules": rules,
            }
        ],
    }


# --- files ----------------------------------------------------------------------------------


def to_yaml(doc: Any, header: str = "") -> str:
    """Block-style YAML of plain data (dicts, lists, strings, numbers, booleans, None),
    deterministic, with ``header`` as ``#`` comment lines on top."""
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    body = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1 << 20)  # no folding
    return comments + body


def to_json(doc: Any) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


_GENERATED = (
    "Generated by `python -m ingest.grafana` from ingest/grafana: edit that, not this file."
)

_DATASOURCE_HEADER = f"""{_GENERATED}

Grafana data source for InfluxDB, queried with InfluxQL. With the compose InfluxDB 2,
through its 1.x-compatible API: the bucket is mapped to database ${{GRAFANA_INFLUX_DATABASE}},
retention policy "autogen", by influxdb/init/10-influxql.sh, which also creates the
read-only login "grafana" used here: Grafana never holds the operator token.

Grafana replaces $NAME / ${{NAME}} in this file with its environment variables
(docker-compose.yml sets them from .env), so no secret is written here."""

_PROVIDER_HEADER = f"""{_GENERATED}

Dashboards provisioned from JSON files; edits in the UI are not kept."""

_RULES_HEADER = f"""{_GENERATED}

Alert rules (Grafana unified alerting). Each rule: A = InfluxQL query, B = reduce, C = the
threshold that fires. Grafana does not expand environment variables in the queries or the
annotations of a provisioned rule, so $timeFilter and {{{{ $labels.device }}}} stay as they are."""


def provisioning_files() -> dict[str, str]:
    """Relative path -> content of every generated provisioning file."""
    files = {
        "datasources/influxdb.yml": to_yaml(
            {"apiVersion": 1, "datasources": [datasource()]}, _DATASOURCE_HEADER
        ),
        "dashboards/dashboards.yml": to_yaml(dashboard_provider(), _PROVIDER_HEADER),
        "alerting/rules.yml": to_yaml(alert_rules(), _RULES_HEADER),
    }
    for dash in dashboards():
        files[f"dashboards/json/{dash['uid']}.json"] = to_json(dash)
    return files


def write_provisioning(root: Path) -> list[Path]:
    """Write the provisioning files under ``root`` (``grafana/provisioning``); return them.

    Dashboard JSON files in ``dashboards/json`` that are not generated any more are
    removed, so a renamed dashboard does not linger.
    """
    root = Path(root)
    files = provisioning_files()
    json_dir = root / "dashboards" / "json"
    if json_dir.is_dir():
        for stale in sorted(json_dir.glob("*.json")):
            if stale.relative_to(root).as_posix() not in files:
                stale.unlink()
    written = []
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
