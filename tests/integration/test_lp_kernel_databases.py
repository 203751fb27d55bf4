"""What the line-protocol kernel writes, as the real databases read it back.

A batch of readings with awkward tags (escaped characters, UTF-8), awkward values
(tiny, huge, 17 significant digits, signed zero) and undefined statistics goes
through ``telemetry_body`` and the real sinks into InfluxDB 1.6.7 (v1 API) and
VictoriaMetrics (v2 API). Every point must come back with its tags, its exact
value, its timestamp, and the statistics to 12 significant digits.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from ingest.sinks.base import LineBatch
from ingest.sinks.influx import InfluxV1Sink, InfluxV2Sink
from ingest.sinks.lineprotocol import series_key
from ingest.sinks.lpformat import SeriesTable, telemetry_body
from tests.dbhelpers import INFLUX_URL, influx_rows, vm_export

pytestmark = pytest.mark.services

TAGS = [
    ("site 1", "line,2", "dev=3", "back\\slash"),
    ("Münster", "Linie-Ä", "Gerät.7", "Δp_bar"),
]
VALUES = [
    1e-7,
    123456.789,
    0.30000000000000004,
    -0.0,
    2.0**60,
    -71.3,
    5e-324,
    1.7976931348623157e308,
]
# VictoriaMetrics 1.79 turns the values of one write into decimals with a shared exponent:
# next to 2**60 a 1e-7 comes back as 0, next to 1.8e308 everything else does. Values of
# a plant's range, then.
VM_VALUES = [123456.789, -71.3, 0.001, 42.0, -0.0, 1e9 + 0.5, 21.125]


def batch(site_prefix: str, values_: list[float]) -> tuple[LineBatch, list[dict[str, object]]]:
    """The kernel's body for ``values_`` in each stream, and what each point should read as."""
    table = SeriesTable()
    keys = [(f"{site_prefix}{a}", b, c, d) for a, b, c, d in TAGS]
    table.extend(
        [
            series_key("telemetry", {"site": a, "line": b, "device": c, "sensor": d})
            for a, b, c, d in keys
        ]
    )
    n = len(values_) * len(keys)
    rows = np.repeat(np.arange(len(keys)), len(values_))
    values = np.tile(np.array(values_), len(keys))
    now = int(time.time() * 1000) - 60_000
    ts = now + np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(1)
    mean = rng.normal(size=n) * 1e3
    mean[0] = np.nan  # a stream's first sample: no statistics
    std, z, score = np.abs(rng.normal(size=n)), rng.normal(size=n), rng.random(n)
    z[1] = np.inf
    body = telemetry_body(
        table,
        rows,
        ts,
        values,
        mean,
        std,
        z,
        score,
        np.zeros(n, bool),
        np.arange(n, dtype=np.int64),
        np.zeros(n, bool),
    )
    lines = LineBatch()
    lines.add_body(body, n)
    expect = [
        {
            "key": keys[int(rows[i])],
            "ts": int(ts[i]),
            "value": float(values[i]),
            "mean": float(mean[i]) if math.isfinite(mean[i]) else None,
            "z": float(z[i]) if math.isfinite(z[i]) else None,
        }
        for i in range(n)
    ]
    return lines, expect


def test_influxdb_reads_back_what_the_kernel_wrote(influx_db: str) -> None:
    lines, expect = batch("", VALUES)
    sink = InfluxV1Sink(INFLUX_URL, influx_db, use_gzip=True)
    sink.open()
    sink.write(lines)
    sink.close()
    rows = influx_rows(INFLUX_URL, influx_db, "SELECT * FROM telemetry GROUP BY *")
    got = {(r["site"], r["line"], r["device"], r["sensor"], r["time"]): r for r in rows}
    assert len(got) == len(expect)
    for e in expect:
        r = got[(*e["key"], e["ts"])]  # type: ignore[misc]
        # JSON from InfluxDB 1.6: 2**60 as the integer 1152921504606847000, -0.0 as 0
        assert float(r["value"]) == e["value"]
        for name in ("mean", "z"):
            if e[name] is None:
                assert r[name] is None
            else:
                assert math.isclose(r[name], e[name], rel_tol=1e-11)  # type: ignore[arg-type]


def test_victoriametrics_reads_back_what_the_kernel_wrote(victoria: str, unique: str) -> None:
    lines, expect = batch(f"t{unique}-", VM_VALUES)
    sink = InfluxV2Sink(victoria, bucket="b", org="o", token="t", use_gzip=True)
    sink.write(lines)
    sink.close()
    got: dict[tuple[str, ...], dict[int, float]] = {}
    for series in vm_export(victoria, f'telemetry_value{{site=~"t{unique}-.*"}}'):
        m = series["metric"]
        key = (m["site"], m["line"], m["device"], m["sensor"])
        got[key] = dict(zip(series["timestamps"], series["values"], strict=True))
    assert sum(map(len, got.values())) == len(expect)
    for e in expect:
        assert got[e["key"]][e["ts"]] == e["value"]  # type: ignore[index]
