"""``ingest_stats``: the service's own metrics, written to the database as line protocol."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from ingest.config import load_settings
from ingest.metrics import COUNTERS, Metrics
from ingest.service import IngestService
from ingest.sinks.lineprotocol import INGEST_STATS, stats_lines

_FIELD = re.compile(r"([A-Za-z_]+)=(-?[0-9][0-9.e+-]*i?)")


def parse(line: str) -> tuple[str, dict[str, str], dict[str, str], int]:
    """(measurement, tags, fields as written, timestamp) of a line without escapes."""
    series, fields, ts = line.split(" ")
    measurement, *tags = series.split(",")
    parsed = dict(_FIELD.fullmatch(f).groups() for f in fields.split(","))  # type: ignore[union-attr]
    return measurement, dict(t.split("=") for t in tags), parsed, int(ts)


def kinds(fields: dict[str, str]) -> dict[str, str]:
    return {k: "int" if v.endswith("i") else "float" for k, v in fields.items()}


class NullSink:
    name = "null"

    def open(self) -> None:
        pass

    def write(self, lines: Sequence[str]) -> None:
        pass

    def close(self) -> None:
        pass


def test_stats_lines_format() -> None:
    lines = stats_lines(
        "ingest a",
        {"messages_received": 12, "rejected": 3},
        {"pending_messages": 2, "write_latency_seconds": 0.25, "bad": float("nan")},
        {"schema": 2, "invalid_json": 1},
        1_700_000_000_123,
    )
    assert lines == [
        r"ingest_stats,instance=ingest\ a messages_received=12i,rejected=3i,"
        "pending_messages=2.0,write_latency_seconds=0.25 1700000000123",
        r"ingest_stats,instance=ingest\ a,reason=invalid_json rejected=1i 1700000000123",
        r"ingest_stats,instance=ingest\ a,reason=schema rejected=2i 1700000000123",
    ]


def test_metrics_fields_keep_their_types() -> None:
    m = Metrics()
    counters, gauges, rejects = m.stats_fields()
    assert set(counters) == {"rejected" if c == "rejected_total" else c for c in COUNTERS}
    assert all(type(v) is int for v in counters.values())
    assert all(type(v) is float for v in gauges.values())
    assert "uptime_seconds" in gauges and rejects == {}
    first = stats_lines("i", counters, gauges, rejects, 1)
    m.inc("messages_received", 5)
    m.reject("schema", 2)
    m.set("streams", 7)  # an int given to a gauge is still written as a float
    m.set("write_latency_seconds", 0.125)
    second = stats_lines("i", *m.stats_fields(), 2)
    (_, tags1, f1, _), (_, tags2, f2, _) = parse(first[0]), parse(second[0])
    assert tags1 == tags2 == {"instance": "i"}
    assert kinds(f1) == kinds(f2)  # the same fields, each always of one type
    assert f2["messages_received"] == "5i" and f2["rejected"] == "2i" and f2["streams"] == "7.0"
    assert parse(second[1])[1:3] == ({"instance": "i", "reason": "schema"}, {"rejected": "2i"})


def service(**env: str) -> IngestService:
    settings = load_settings(
        environ={
            "INGEST_CLIENT_ID": "ingest-7",
            "INGEST_PROCESSING_STATE_FILE": "",
            "INGEST_SPOOL_DIR": "",
            **env,
        }
    )
    return IngestService(settings, sink=NullSink())


def test_periodic_appends_stats_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    svc = service(INGEST_SERVICE_STATS_INTERVAL="30")
    clock = [1000.0]
    monkeypatch.setattr("ingest.service.time.monotonic", lambda: clock[0])
    svc.metrics.inc("samples_accepted", 40)
    svc.metrics.reject("invalid_json")
    lines = svc._periodic()
    stats = [parse(line) for line in lines if line.startswith(INGEST_STATS)]
    assert [s[1] for s in stats] == [
        {"instance": "ingest-7"},
        {"instance": "ingest-7", "reason": "invalid_json"},
    ]
    fields = stats[0][2]
    assert fields["samples_accepted"] == "40i" and fields["rejected"] == "1i"
    counters = "messages_received points_written write_retries write_failures reconnects"
    counters += " batches_spooled batches_replayed anomaly_episodes gaps"
    gauges = "pending_messages streams streams_silent write_latency_seconds spool_batches"
    gauges += " spool_bytes mqtt_connected"
    assert all(fields[name].endswith("i") for name in counters.split())
    assert not any(fields[name].endswith("i") for name in gauges.split())
    clock[0] += 29.0
    assert not any(line.startswith(INGEST_STATS) for line in svc._periodic())
    clock[0] += 1.5
    assert any(line.startswith(INGEST_STATS) for line in svc._periodic())


def test_stats_can_be_disabled() -> None:
    svc = service(INGEST_SERVICE_STATS_INTERVAL="0")
    assert svc.settings.service.stats_interval == 0
    assert not any(line.startswith(INGEST_STATS) for line in svc._periodic())


def test_contract_documents_every_field() -> None:
    contract = (Path(__file__).resolve().parents[1] / "docs" / "contract.md").read_text()
    counters, gauges, _ = Metrics().stats_fields()
    missing = [name for name in [*counters, *gauges] if f"`{name}`" not in contract]
    assert not missing, f"docs/contract.md does not describe ingest_stats fields {missing}"
    assert "ingest_stats,instance=<client id>,reason=<reason> rejected=<int>i" in contract
