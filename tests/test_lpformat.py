"""The batch line-protocol kernel against its plain-Python reference, and LineBatch."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ingest.sinks.base import LineBatch
from ingest.sinks.lineprotocol import format_stat, series_key, telemetry_lines
from ingest.sinks.lpformat import SeriesTable, short_decimals, telemetry_body

STATS = ("mean", "std", "z", "score")
# Values a sensor sends, and the awkward ones: tiny, huge, subnormal, signed zero,
# the edges of the exact-decimal path (1e-4, 2**53), 17-digit doubles.
EDGES = [
    0.0,
    -0.0,
    1e-4,
    9.999999999999999e-05,
    2.0**53,
    2.0**53 - 1,
    -(2.0**53) + 1,
    5e-324,
    -2.2250738585072014e-308,
    1.7976931348623157e308,
    0.1,
    0.3,
    1 / 3,
    123456.789,
    -0.000123,
    1e15,
    1e16,
    99.99999999999999,
]
finite = st.floats(allow_nan=False, allow_infinity=False)
reading = st.one_of(
    finite,
    st.sampled_from(EDGES),
    st.decimals(-1e6, 1e6, places=3, allow_nan=False).map(float),
    st.integers(-(2**60), 2**60).map(float),
)
stat = st.one_of(finite, st.sampled_from([*EDGES, math.nan, math.inf, -math.inf]))


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def split_line(line: str) -> tuple[str, dict[str, str], str]:
    series, fields, ts = line.rsplit(" ", 2)
    return series, dict(f.split("=", 1) for f in fields.split(",")), ts


def assert_same(got: list[str], ref: list[str]) -> None:
    """Equal, except that a statistic may differ in its 12th digit (relative 1e-11)."""
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        if g == r:
            continue
        g_series, g_fields, g_ts = split_line(g)
        r_series, r_fields, r_ts = split_line(r)
        assert (g_series, g_ts, list(g_fields)) == (r_series, r_ts, list(r_fields)), (g, r)
        for name, text in g_fields.items():
            if name in STATS:
                assert math.isclose(float(text), float(r_fields[name]), rel_tol=1e-11), (g, r)
            else:
                assert text == r_fields[name], (g, r)


@st.composite
def batches(draw: st.DrawFn) -> dict[str, np.ndarray]:
    n = draw(st.integers(1, 40))
    arr = {
        "values": draw(hnp.arrays(np.float64, n, elements=reading)),
        "ts": draw(hnp.arrays(np.int64, n, elements=st.integers(0, 2**63 - 1))),
        "anomaly": draw(hnp.arrays(np.bool_, n)),
        "seq": draw(hnp.arrays(np.int64, n, elements=st.integers(-1, 2**63 - 1))),
        "rx_time": draw(hnp.arrays(np.bool_, n)),
        "rows": draw(hnp.arrays(np.int64, n, elements=st.integers(0, 2))),
    }
    for name in STATS:
        arr[name] = draw(hnp.arrays(np.float64, n, elements=stat))
    return arr


TAGS = [
    ("site 1", "line,2", "dev=3", "back\\slash"),
    ("s", "l", "d", "temp"),
    ("Münster", "Linie-Ä", "Gerät.7", "Δp_bar"),  # multi-byte UTF-8 passes through
]


def table_and_series() -> tuple[SeriesTable, list[str]]:
    series = [
        series_key("telemetry", {"site": a, "line": b, "device": c, "sensor": d})
        for a, b, c, d in TAGS
    ]
    table = SeriesTable()
    table.extend(series[:1])
    table.extend(series[1:])  # grown in two steps, as the registry grows
    return table, series


def render(arr: dict[str, np.ndarray]) -> tuple[list[str], list[str]]:
    table, series = table_and_series()
    body = telemetry_body(
        table,
        arr["rows"],
        arr["ts"],
        arr["values"],
        *(arr[k] for k in STATS),
        arr["anomaly"],
        arr["seq"],
        arr["rx_time"],
    )
    assert body.endswith(b"\n")
    ref = telemetry_lines(
        series,
        arr["rows"],
        arr["ts"],
        arr["values"],
        *(arr[k] for k in STATS),
        arr["anomaly"],
        arr["seq"].tolist(),
        arr["rx_time"].tolist(),
    )
    return body.decode("utf-8").split("\n")[:-1], ref


@settings(max_examples=300, deadline=None)
@given(batches())
def test_kernel_matches_reference(arr: dict[str, np.ndarray]) -> None:
    got, ref = render(arr)
    assert_same(got, ref)
    for line, value in zip(got, arr["values"].tolist(), strict=True):
        text = split_line(line)[1]["value"]
        assert bits(float(text)) == bits(value), (text, value)  # the reading, exactly


def test_escaped_tags_are_copied_verbatim() -> None:
    arr = {
        "values": np.array([1.5, 2.5, 3.5]),
        "ts": np.array([1, 2, 3]),
        "anomaly": np.zeros(3, bool),
        "seq": np.full(3, -1),
        "rx_time": np.zeros(3, bool),
        "rows": np.array([0, 1, 2]),
        **{k: np.full(3, np.nan) for k in STATS},
    }
    got, ref = render(arr)
    assert got == ref
    assert got[0] == (
        r"telemetry,device=dev\=3,line=line\,2,sensor=back\slash,site=site\ 1 "
        "value=1.5,anomaly=false 1"
    )


@pytest.mark.parametrize(
    ("x", "decimals"),
    [
        (23.5, 1),
        (100.0, 0),
        (0.1, 1),
        (-0.001, 3),
        (1 / 3, 16),
        (0.1 + 0.2, -1),
        (1e-5, -1),
        (2.0**53, -1),
    ],
)
def test_short_decimals(x: float, decimals: int) -> None:
    assert short_decimals(x) == decimals


@given(reading)
def test_short_decimals_is_repr_where_it_applies(x: float) -> None:
    """Where the kernel writes a value itself, it writes what repr writes."""
    arr = np.array([x])
    if short_decimals(x) < 0:
        return
    table = SeriesTable()
    table.extend(["m"])
    nan = np.array([np.nan])
    one = np.ones(1, np.int64)
    body = telemetry_body(
        table, one * 0, one, arr, nan, nan, nan, nan, np.zeros(1, bool), -one, np.zeros(1, bool)
    )
    assert body == f"m value={x!r},anomaly=false 1\n".encode()


@given(finite)
def test_format_stat_reads_back_to_12_digits(x: float) -> None:
    text = format_stat(x)
    assert math.isclose(float(text), x, rel_tol=5e-12, abs_tol=0.0) or x == 0.0
    assert "." in text or "e" in text


def test_negative_timestamps_are_refused() -> None:
    table = SeriesTable()
    table.extend(["m"])
    one = np.ones(1)
    i = np.ones(1, np.int64)
    with pytest.raises(ValueError, match="negative"):
        telemetry_body(
            table, i * 0, -i, one, one, one, one, one, np.zeros(1, bool), i, np.zeros(1, bool)
        )


def test_line_batch() -> None:
    batch = LineBatch(["a 1", "b 2"])
    batch.add_body(b"c 3\nd 4\n", 2)
    other = LineBatch(["e 5"])
    batch.merge(other)
    assert len(batch) == 5 and bool(batch) and not LineBatch()
    # Encoded bodies first, then the lines added as text (the ordered part), each in
    # the order they came.
    assert batch.body() == b"c 3\nd 4\na 1\nb 2\ne 5\n"
    assert list(batch) == ["c 3", "d 4", "a 1", "b 2", "e 5"]
    first, second = batch.halves()
    assert list(first) == ["c 3", "d 4"] and list(second) == ["a 1", "b 2", "e 5"]
    assert LineBatch().body() == b"" and list(LineBatch()) == []
