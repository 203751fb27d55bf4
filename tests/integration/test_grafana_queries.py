"""Every query of the provisioned Grafana files runs against the real InfluxDB 1.6.7.

The data is made the way production makes it: the fleet simulator publishes through the
real Mosquitto to a real ``ingest run``, which writes to a fresh InfluxDB database:
two sites (``plant1`` with six machines on two lines, ``plant2`` with one machine that
stops a minute early and so goes silent), injected faults, malformed messages of every
kind the simulator knows (rejects by reason), one spike at the very end (an episode the
silence sweep then ends), one sensor of ``plant1/line1/cnc-002`` that goes on publishing
in real time while the queries run, away from its baseline and then stuck on one value
(an anomaly episode that is open: a silent stream's episode is ended by the sweep), and
``ingest_stats`` every half second.

Then every query is read from the committed files under ``grafana/provisioning``:
each template variable, each panel target (each clone of a repeated panel), each
annotation and each alert rule query. Variables are substituted as Grafana does for
InfluxQL: ``$timeFilter`` is ``time >= <from>ms and time <= <to>ms``, ``$__interval``
is the range divided by 1000 points rounded like Grafana, ``${var:regex}`` is the
regex-escaped value or ``(a|b)`` of several, All is the variable's ``allValue``, and
an alert's relative time range becomes the explicit range ending now. Dashboard
queries run twice: with every variable on All (or its first value) and with a
specific selection (one site, two lines, two devices, two sensors). Each must
return non-empty series, grouped by exactly the tags of its GROUP BY, with the
columns it names. A query that cannot run here is a failing test.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from devices.contract import telemetry_topic
from devices.simulator import BAD_KINDS, Fleet, bad_payload, run_fleet
from ingest.grafana import DATASOURCE_UID
from tests.dbhelpers import (
    INFLUX_PING,
    INFLUX_URL,
    MQTT_HOSTPORT,
    influx_count,
    influx_create_db,
    influx_drop_db,
    influx_rows,
    influx_v1_query,
    require_service,
)
from tests.integration.conftest import MQTT_URL, REPO, IngestProcess, wait_for
from tests.integration.mosquitto_proc import free_port

pytestmark = pytest.mark.services

PROVISIONING = REPO / "grafana" / "provisioning"
SECONDS_A, SECONDS_B = 90, 30  # plant1 runs 90 s of signal, plant2 only the first 30 s
#: The specific selection of the second scenario (a variable not named here: all its
#: options, chosen one by one, not through All).
SELECTED = {
    "site": ["plant1"],
    "line": ["line1", "line2"],
    "device": ["cnc-001", "cnc-002"],
    "sensor": ["spindle_temp", "vibration_rms"],
}
SCENARIOS = ("all", "selected")
MAX_DATA_POINTS = 1000


# --- what the provisioned files hold ----------------------------------------------------------


@dataclass
class Case:
    id: str
    kind: str  # "variable", "panel", "annotation" or "alert"
    query: str
    dashboard: dict[str, Any] | None = None
    scenario: str = ""
    panel: dict[str, Any] | None = None
    target: dict[str, Any] = field(default_factory=dict)
    variable: dict[str, Any] | None = None
    rule: dict[str, Any] | None = None
    repeat_value: str | None = None  # the clone of a repeated panel


def load_dashboards() -> list[dict[str, Any]]:
    folder = PROVISIONING / "dashboards" / "json"
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def load_rules() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((PROVISIONING / "alerting" / "rules.yml").read_text())
    return doc


def short(uid: str) -> str:
    return uid.removeprefix("factory-")


def collect_cases() -> list[Case]:
    cases = []
    for dash in load_dashboards():
        name = short(dash["uid"])
        for scenario in SCENARIOS:
            for var in dash["templating"]["list"]:
                if var["type"] == "query":
                    cases.append(
                        Case(
                            f"{name}/var {var['name']}@{scenario}",
                            "variable",
                            var["query"],
                            dash,
                            scenario,
                            variable=var,
                        )
                    )
            for panel in dash["panels"]:
                for target in panel.get("targets", []):
                    if target.get("datasource", {}).get("uid") == "__expr__":
                        continue  # a server-side expression, not a query
                    label = f"{name}/{panel['id']} {panel['title']}/{target['refId']}"
                    cases.append(
                        Case(
                            f"{label}@{scenario}",
                            "panel",
                            target["query"],
                            dash,
                            scenario,
                            panel,
                            target,
                        )
                    )
            for ann in dash["annotations"]["list"]:
                if ann.get("builtIn"):
                    continue
                cases.append(
                    Case(
                        f"{name}/annotation {ann['name']}@{scenario}",
                        "annotation",
                        ann["target"]["query"],
                        dash,
                        scenario,
                        target=ann["target"],
                    )
                )
    for group in load_rules()["groups"]:
        for rule in group["rules"]:
            for item in rule["data"]:
                if item["datasourceUid"] == DATASOURCE_UID:
                    cases.append(
                        Case(
                            f"alert/{rule['uid']}/{item['refId']}",
                            "alert",
                            item["model"]["query"],
                            target=item,
                            rule=rule,
                        )
                    )
    return cases


CASES = collect_cases()


# --- the data: simulator -> Mosquitto -> ingest run -> InfluxDB ----------------------------


@dataclass
class Loaded:
    db: str
    instance: str
    from_ms: int
    to_ms: int
    ingest: IngestProcess
    options: dict[tuple[str, str], dict[str, Selection]] = field(default_factory=dict)


def publish(prefix: str, messages: list[tuple[str, str, str, bytes]]) -> None:
    """Publish (site, line, device, payload) telemetry messages at QoS 1 and wait for PUBACKs."""
    client = paho.Client(CallbackAPIVersion.VERSION2)
    host, _, port = MQTT_HOSTPORT.rpartition(":")
    client.connect(host, int(port))
    client.loop_start()
    try:
        for site, line, device, payload in messages:
            topic = telemetry_topic(prefix, site, line, device)
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


LIVE = ("plant1", "line1", "cnc-002")


def publish_live(prefix: str, stop: threading.Event) -> None:
    """One sensor at 10 Hz in real time: off its baseline, then stuck on one value."""
    client = paho.Client(CallbackAPIVersion.VERSION2)
    host, _, port = MQTT_HOSTPORT.rpartition(":")
    client.connect(host, int(port))
    client.loop_start()
    topic = telemetry_topic(prefix, *LIVE)
    try:
        i = 0
        while not stop.is_set():
            value = 20.0 + 0.1 * (i % 7) if i < 60 else 25.0
            sample = {"ts": int(time.time() * 1000), "values": {"spindle_temp": value}}
            client.publish(topic, json.dumps(sample), qos=1).wait_for_publish(10)
            i += 1
            stop.wait(0.1)
    finally:
        client.disconnect()
        client.loop_stop()


def open_episodes(db: str) -> set[str]:
    rows = influx_rows(
        INFLUX_URL,
        db,
        'SELECT "open" FROM anomaly_events WHERE "kind" = \'anomaly\' AND "open" = true '
        'GROUP BY "device"',
    )
    return {r["device"] for r in rows}


def open_gaps(db: str) -> set[tuple[str, str]]:
    rows = influx_rows(
        INFLUX_URL,
        db,
        'SELECT "open" FROM anomaly_events WHERE "kind" = \'gap\' AND "open" = true '
        'GROUP BY "site", "device"',
    )
    return {(r["site"], r["device"]) for r in rows}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    require_service("Mosquitto", MQTT_HOSTPORT)
    require_service("InfluxDB", INFLUX_PING)
    unique = uuid.uuid4().hex[:10]
    tmp = tmp_path_factory.mktemp("grafana")
    db = f"test_grafana_{unique}"
    influx_create_db(INFLUX_URL, db)
    prefix = f"test-{unique}"
    instance = f"ingest-test-{unique}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update(
        {
            "INGEST_MQTT_URL": MQTT_URL,
            "INGEST_CLIENT_ID": instance,
            "INGEST_TOPIC_PREFIX": prefix,
            "INGEST_MQTT_SESSION_EXPIRY": "300",
            "INGEST_INFLUX_URL": INFLUX_URL,
            "INGEST_INFLUX_DATABASE": db,
            "INGEST_INFLUX_FLUSH_INTERVAL": "0.2",
            "INGEST_INFLUX_RETRY_MAX": "2",
            "INGEST_SERVICE_HEALTH_LISTEN": f"127.0.0.1:{free_port()}",
            "INGEST_SERVICE_STATS_INTERVAL": "0.5",
            "INGEST_SPOOL_DIR": str(tmp / "spool"),
            "INGEST_PROCESSING_STATE_FILE": "",
        }
    )
    ingest = IngestProcess(env, tmp / "ingest.log").start()
    stop_live = threading.Event()
    live = threading.Thread(target=publish_live, args=(prefix, stop_live), daemon=True)
    try:
        start_ms = int(time.time() * 1000) - SECONDS_A * 1000 - 5000
        plant2 = Fleet(1, site="plant2", seed=11, start_ms=start_ms, fault_rate=1.0)
        plant1 = Fleet(
            6, site="plant1", devices_per_line=3, seed=7, start_ms=start_ms, fault_rate=2.0
        )
        readings = 0
        for fleet, seconds in ((plant2, SECONDS_B), (plant1, SECONDS_A)):
            stats = run_fleet(
                MQTT_URL,
                prefix=prefix,
                fleet=fleet,
                duration_s=seconds,
                batch=20,
                realtime=False,
                bad_message_rate=0.02,
            )
            readings += stats.readings
        # One malformed message of every kind, and a spike after the last sample of
        # plant1/line1/cnc-001: an anomaly episode that stays open (nothing follows it).
        last = {"ts": plant1.ts_of(plant1.next_index - 1), "values": {"spindle_temp": 20.0}}
        spike = {"ts": plant1.ts_of(plant1.next_index), "values": {"spindle_temp": 1.0e6}}
        publish(
            prefix,
            [("plant1", "line2", "cnc-004", bad_payload(kind, last)) for kind in BAD_KINDS]
            + [("plant1", "line1", "cnc-001", json.dumps(spike).encode())],
        )
        readings += 1
        assert wait_for(lambda: influx_count(INFLUX_URL, db, "telemetry") >= readings, 60), (
            f"{influx_count(INFLUX_URL, db, 'telemetry')} of {readings}\n{ingest.log()}"
        )
        live.start()
        # The sweep (every 5 s) marks the streams silent once nothing arrives.
        assert wait_for(
            lambda: {("plant2", "cnc-001"), ("plant1", "cnc-001")} <= open_gaps(db), 30
        ), f"no gap events: {open_gaps(db)}\n{ingest.log()}"
        # The live machine got stuck: its episode is open, the silent ones' are not.
        assert wait_for(lambda: open_episodes(db) == {LIVE[2]}, 30), (
            f"open episodes: {open_episodes(db)}\n{ingest.log()}"
        )
        time.sleep(1.5)  # a few more ingest_stats points after the last change
        yield Loaded(db, instance, start_ms - 1000, int(time.time() * 1000) + 1000, ingest)
    finally:
        stop_live.set()
        if live.is_alive():
            live.join(5)
        if ingest.running:
            ingest.stop(signal.SIGTERM)
        influx_drop_db(INFLUX_URL, db)


# --- Grafana's substitution ---------------------------------------------------------------


@dataclass
class Selection:
    """A variable's value: ``values`` None means All."""

    values: list[str] | None
    options: list[str]
    all_value: str | None = None


def escape_regex(value: str) -> str:
    """@grafana/data escapeRegex, which the ``regex`` variable format applies."""
    return re.sub(r"([\\^$*+?.()|\[\]{}/])", r"\\\1", value)


def regex_format(sel: Selection) -> str:
    if sel.values is None and sel.all_value is not None:
        return sel.all_value  # a custom all value is not formatted
    values = sel.options if sel.values is None else sel.values
    escaped = [escape_regex(v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


_ROUND_MS = [  # (at most, becomes): Grafana's interval rounding
    (10, 1),
    (15, 10),
    (35, 20),
    (75, 50),
    (150, 100),
    (350, 200),
    (750, 500),
    (1500, 1000),
    (3500, 2000),
    (7500, 5000),
    (12500, 10_000),
    (17500, 15_000),
    (25000, 20_000),
    (45000, 30_000),
    (90_000, 60_000),
    (210_000, 120_000),
    (450_000, 300_000),
    (1_050_000, 600_000),
    (2_100_000, 900_000),
    (4_500_000, 1_800_000),
]


def interval_ms(range_ms: int, min_ms: int = 1) -> int:
    raw = range_ms / MAX_DATA_POINTS
    rounded = next((ms for limit, ms in _ROUND_MS if raw <= limit), 3_600_000)
    return max(rounded, min_ms)


def format_interval(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def parse_interval(text: str) -> int:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", text)
    assert m, text
    return int(m[1]) * {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}[m[2]]


_VARIABLE = re.compile(
    r"\$\{(?P<braced>\w+)(?::(?P<fmt>\w+))?\}|\[\[(?P<old>\w+)\]\]|\$(?P<plain>\w+)"
)


def render(
    query: str,
    selections: dict[str, Selection],
    from_ms: int,
    to_ms: int,
    interval: int | None = None,
) -> str:
    """``query`` with every Grafana variable replaced; an unknown variable raises KeyError."""
    step = interval if interval is not None else interval_ms(to_ms - from_ms)
    builtins = {
        "timeFilter": f"time >= {from_ms}ms and time <= {to_ms}ms",
        "__interval": format_interval(step),
        "__interval_ms": str(step),
        "__from": str(from_ms),
        "__to": str(to_ms),
    }

    def replace(m: re.Match[str]) -> str:
        name = m["braced"] or m["old"] or m["plain"]
        if name in builtins:
            return builtins[name]
        sel = selections[name]
        if m["fmt"] == "regex":
            return regex_format(sel)
        assert m["fmt"] is None, f"format {m['fmt']} not emulated"
        # The data source's own default: a number as it is; text only through :regex,
        # which behaves the same in every Grafana version.
        (value,) = sel.values or [""]
        assert re.fullmatch(r"-?[0-9.]+", value), f"${name} outside a regex must be a number"
        return value

    return _VARIABLE.sub(replace, query)


def choose(var: dict[str, Any], options: list[str], scenario: str) -> Selection:
    if var["type"] == "custom":
        current = var["current"]["value"]
        return Selection([current], [o["value"] for o in var["options"]])
    assert options, f"variable {var['name']} has no options"
    all_value = var.get("allValue") or None
    if scenario == "all":
        if var.get("includeAll"):
            return Selection(None, options, all_value)
        return Selection([options[0]], options, all_value)
    wanted = SELECTED.get(var["name"], options)
    assert set(wanted) <= set(options), f"{var['name']}: {wanted} not all among {options}"
    return Selection(wanted if var.get("multi") else wanted[:1], options, all_value)


def resolve(loaded: Loaded, dash: dict[str, Any], scenario: str) -> dict[str, Selection]:
    """Each variable's options (its query, with the earlier variables substituted) and the
    scenario's choice among them, in dashboard order, as Grafana chains them."""
    key = (dash["uid"], scenario)
    if key not in loaded.options:
        chosen: dict[str, Selection] = {}
        for var in dash["templating"]["list"]:
            options: list[str] = []
            if var["type"] == "query":
                q = render(var["query"], chosen, loaded.from_ms, loaded.to_ms)
                for series in influx_v1_query(INFLUX_URL, loaded.db, q):
                    options += [str(v[1]) for v in series["values"]]
                options = sorted(set(options))
            chosen[var["name"]] = choose(var, options, scenario)
        loaded.options[key] = chosen
    return loaded.options[key]


# --- what a query's result must look like ------------------------------------------------


def _top_level(query: str) -> list[tuple[int, str]]:
    """(index, character) of the query outside parentheses and string/regex literals."""
    out, depth, quote = [], 0, ""
    for i, ch in enumerate(query):
        if quote:
            if ch == quote and query[i - 1] != "\\":
                quote = ""
            continue
        if ch in "'\"" or (ch == "/" and query[:i].rstrip().endswith(("=~", "!~"))):
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0:
            out.append((i, ch))
    return out


def outer(query: str) -> str:
    """The query with subqueries, strings and regexes blanked out."""
    chars = [" "] * len(query)
    for i, ch in _top_level(query):
        chars[i] = ch
    return "".join(chars)


def group_by_tags(query: str) -> set[str]:
    m = re.search(r"GROUP BY(.*?)(?:fill|ORDER|LIMIT|SLIMIT|$)", outer(query))
    if not m:
        return set()
    start, end = m.span(1)
    items = [s.strip() for s in query[start:end].split(",")]
    return {s.strip('"') for s in items if s.startswith('"')}


def select_columns(query: str) -> set[str]:
    """Columns the outer SELECT names: ``AS "x"`` aliases, and plain ``"field"`` items."""
    text = outer(query)
    m = re.match(r"\s*SELECT(.*?)FROM", text)
    assert m, query
    start, end = m.span(1)
    columns = set()
    for raw in query[start:end].split(","):
        item = raw.strip()
        alias = re.search(r'\bAS "([^"]+)"$', item)
        if alias:
            columns.add(alias[1])
        elif re.fullmatch(r'"[^"]+"', item):
            columns.add(item.strip('"'))
    return columns


def check_result(case: Case, series: list[dict[str, Any]]) -> None:
    assert series, "no series"
    rows = [row for s in series for row in s.get("values", [])]
    assert rows, "series without rows"
    if case.kind == "variable":
        assert all(s["columns"] == ["key", "value"] for s in series)
        return
    tags = group_by_tags(case.query)
    for s in series:
        assert set(s.get("tags") or {}) == tags, f"tags {s.get('tags')} but GROUP BY {tags}"
        cols = s["columns"]
        assert cols[0] == "time"
        missing = select_columns(case.query) - set(cols)
        assert not missing, f"columns {missing} missing from {cols}"
    values = [v for s in series for row in s["values"] for v in row[1:]]
    assert any(v is not None for v in values), "only nulls"
    if case.kind == "annotation":
        cols = set(series[0]["columns"])
        t = case.target
        named = [t["textColumn"], t["timeEndColumn"], *t["tagsColumn"].split(",")]
        assert {c for c in named if c} <= cols, f"annotation columns {named} not in {cols}"
    alias = case.target.get("alias", "")
    for tag in re.findall(r"\$tag_(\w+)", alias):
        assert tag in tags, f"alias {alias} uses tag {tag} the query does not group by"


# --- alert rules: reduce and threshold, as Grafana's expressions do ----------------------------


def evaluate(
    rule: dict[str, Any], series: list[dict[str, Any]]
) -> dict[tuple[tuple[str, str], ...], bool]:
    """Series labels -> whether the rule's condition holds (reduce B, threshold C)."""
    models = {d["refId"]: d["model"] for d in rule["data"]}
    reduce, threshold = models["B"], models["C"]
    assert reduce["type"] == "reduce" and reduce["expression"] == "A"
    assert threshold["type"] == "threshold" and threshold["expression"] == "B"
    (cond,) = threshold["conditions"]
    op, (limit,) = cond["evaluator"]["type"], cond["evaluator"]["params"]
    reducers: dict[str, Callable[[list[float]], float]] = {
        "last": lambda v: v[-1],
        "mean": lambda v: sum(v) / len(v),
        "max": max,
        "min": min,
        "sum": sum,
        "count": len,
    }
    out = {}
    for s in series:
        values = [row[1] for row in s["values"] if row[1] is not None]  # dropNN
        if not values:
            continue
        reduced = reducers[reduce["reducer"]](values)
        assert math.isfinite(reduced)
        fires = reduced > limit if op == "gt" else reduced < limit
        out[tuple(sorted((s.get("tags") or {}).items()))] = fires
    return out


# --- the tests -------------------------------------------------------------------------------


def run_case(loaded: Loaded, case: Case) -> list[dict[str, Any]]:
    if case.kind == "alert":
        assert case.target is not None and case.rule is not None
        rng = case.target["relativeTimeRange"]
        to_ms = loaded.to_ms - rng["to"] * 1000
        from_ms = loaded.to_ms - rng["from"] * 1000
        q = render(case.query, {}, from_ms, to_ms, case.target["model"].get("intervalMs", 1000))
        return influx_v1_query(INFLUX_URL, loaded.db, q)
    assert case.dashboard is not None
    selections = resolve(loaded, case.dashboard, case.scenario)
    min_interval = case.panel.get("interval") if case.panel else None
    min_ms = parse_interval(min_interval) if min_interval else 1
    step = interval_ms(loaded.to_ms - loaded.from_ms, min_ms)
    repeat = case.panel.get("repeat") if case.panel else None
    clones: list[dict[str, Selection]] = [selections]
    if repeat:  # one clone per selected value, each with that single value
        sel = selections[repeat]
        values = sel.options if sel.values is None else sel.values
        clones = [{**selections, repeat: Selection([v], sel.options)} for v in values]
    series: list[dict[str, Any]] = []
    for clone in clones:
        q = render(case.query, clone, loaded.from_ms, loaded.to_ms, step)
        assert not re.search(r"\$\w|\$\{|\[\[", q.replace("$/", "")), f"unresolved: {q}"
        found = influx_v1_query(INFLUX_URL, loaded.db, q)
        if repeat:
            assert found, f"clone {repeat}={clone[repeat].values} has no data: {q}"
        series += found
    return series


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_query_returns_expected_series(loaded: Loaded, case: Case) -> None:
    series = run_case(loaded, case)
    try:
        check_result(case, series)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nquery: {case.query}\nresult: {str(series)[:2000]}") from None
    check_semantics(loaded, case, series)


def check_semantics(loaded: Loaded, case: Case, series: list[dict[str, Any]]) -> None:
    """What some queries must show with this data set."""
    title = case.panel["title"] if case.panel else ""
    ref = case.target.get("refId")
    if title == "Devices reporting / silent" and case.scenario == "all":
        ((_, count),) = series[0]["values"]
        # Seven devices sent data within the last 5 minutes; at least plant2's is silent.
        assert count == 7 if ref == "A" else count >= 1, count
    if title == "Latest anomaly events":
        kinds = {row[series[0]["columns"].index("kind")] for row in series[0]["values"]}
        assert kinds == {"anomaly", "gap"}
    if case.kind == "alert" and case.rule is not None:
        firing = evaluate(case.rule, series)
        uid = case.rule["uid"]
        if uid == "factory-device-silent":
            key = (("device", "cnc-001"), ("line", "line1"), ("site", "plant2"))
            assert firing.get(key) is True, firing
        if uid == "factory-ingest-stalled":
            assert firing == {(("instance", loaded.instance),): False}


def test_variables_chain(loaded: Loaded) -> None:
    """site -> line -> device -> sensor: each variable's choices follow the earlier ones."""
    (dash,) = [d for d in load_dashboards() if d["uid"] == "factory-plant-overview"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}

    def options(name: str, **chosen: list[str]) -> list[str]:
        sel = {k: Selection(v, v) for k, v in chosen.items()}
        q = render(variables[name]["query"], sel, loaded.from_ms, loaded.to_ms)
        return sorted(v[1] for s in influx_v1_query(INFLUX_URL, loaded.db, q) for v in s["values"])

    assert options("site") == ["plant1", "plant2"]
    assert options("line", site=["plant2"]) == ["line1"]
    assert options("line", site=["plant1"]) == ["line1", "line2"]
    assert options("device", site=["plant1"], line=["line2"]) == ["cnc-004", "cnc-005", "cnc-006"]
    assert options("device", site=["plant1", "plant2"], line=["line1"]) == [
        "cnc-001",
        "cnc-002",
        "cnc-003",
    ]
    assert options("sensor", site=["plant2"], line=["line1"], device=["cnc-001"]) == [
        "coolant_pressure",
        "motor_current",
        "spindle_temp",
        "vibration_rms",
    ]


def test_every_query_was_collected() -> None:
    """The parametrisation covers each variable, target, annotation and rule query."""
    kinds = {c.kind for c in CASES}
    assert kinds == {"variable", "panel", "annotation", "alert"}
    rules = [r for g in load_rules()["groups"] for r in g["rules"]]
    assert len([c for c in CASES if c.kind == "alert"]) == len(rules) == 3
    per_scenario = len([c for c in CASES if c.kind == "panel"]) // len(SCENARIOS)
    targets = sum(len(p["targets"]) for d in load_dashboards() for p in d["panels"])
    assert per_scenario == targets


def test_interval_rounding() -> None:
    assert format_interval(interval_ms(3 * 60_000)) == "200ms"
    assert format_interval(interval_ms(6 * 3_600_000)) == "20s"
    assert format_interval(interval_ms(60_000, 10_000)) == "10s"
    assert escape_regex("a.b/c(d)") == r"a\.b\/c\(d\)"
    sel = Selection(["x.y", "z"], ["x.y", "z"])
    assert render('"t" =~ /^${t:regex}$/ AND $timeFilter', {"t": sel}, 1, 2, 1000) == (
        '"t" =~ /^(x\\.y|z)$/ AND time >= 1ms and time <= 2ms'
    )
    assert regex_format(Selection(None, ["a", "b"], ".*")) == ".*"
    assert regex_format(Selection(None, ["a", "b"])) == "(a|b)"
