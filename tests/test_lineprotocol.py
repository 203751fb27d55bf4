"""Line protocol: structure, escaping, and NaN handling."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from devices.contract import DEFAULT_LIMITS
from ingest.pipeline import Processor
from ingest.processing.detectors import DetectorParams
from ingest.sinks.lineprotocol import escape_tag, status_line, telemetry_lines, telemetry_series


def test_escape_tag() -> None:
    assert escape_tag("a b,c=d\\e") == "a\\ b\\,c\\=d\\e"
    for bad in ("a\nb", "a\\", "a\\,b", "a\\ b", "a\\=b"):
        with pytest.raises(ValueError):
            escape_tag(bad)


def test_series_sorted_and_escaped() -> None:
    assert telemetry_series("s 1", "l1", "d1", "t") == (
        "telemetry,device=d1,line=l1,sensor=t,site=s\\ 1"
    )


def test_telemetry_lines() -> None:
    series = [telemetry_series("s", "l", "d", "a")]
    f = np.array
    lines = telemetry_lines(
        series,
        f([0, 0]),
        f([1000, 2000]),
        f([1.5, 1e-7]),
        f([np.nan, 1.5]),
        f([np.nan, 0.0]),
        f([0.0, -2.0]),
        f([0.0, 0.25]),
        f([False, True]),
        [-1, 7],
        [False, True],
    )
    assert lines == [
        "telemetry,device=d,line=l,sensor=a,site=s value=1.5,z=0.0,score=0.0,anomaly=false 1000",
        "telemetry,device=d,line=l,sensor=a,site=s value=1e-07,mean=1.5,std=0.0,z=-2.0,"
        "score=0.25,anomaly=true,seq=7i,rx_time=true 2000",
    ]


def test_status_line() -> None:
    assert (
        status_line("s", "l", "d", False, 5)
        == "device_status,device=d,line=l,site=s online=false 5"
    )


def test_field_types_never_flip() -> None:
    """An integer JSON value is written as a float: the series' type cannot change."""
    proc = Processor("f", DEFAULT_LIMITS, DetectorParams(), 10)
    now = int(time.time() * 1000)
    payloads = [
        json.dumps({"ts": now + i, "seq": i, "values": {"a": 5}}).encode() for i in range(3)
    ]
    lines = list(proc.process([("f/s/l/d/telemetry", p, time.time()) for p in payloads]).lines)
    assert " value=5.0,score=0.0,anomaly=false,seq=0i " in lines[0]
    assert " value=5.0,mean=5.0,std=0.0,z=0.0,score=0.0,anomaly=false,seq=2i " in lines[2]


def test_silent_stream_opens_one_gap_event_and_closes_it_when_back() -> None:
    proc = Processor("f", DEFAULT_LIMITS, DetectorParams(warmup=5), 10)
    now = int(time.time() * 1000)
    payload = json.dumps(
        {
            "samples": [
                {"ts": now - 10_000 + 1000 * i, "values": {"a": float(i % 3)}} for i in range(10)
            ]
        }
    ).encode()
    proc.process([("f/s/l/d/telemetry", payload, time.time())])
    assert proc.sweep_silent(now) == []  # received just now
    later = now + 60_000  # a minute without a message from a 1 Hz stream
    (opened,) = proc.sweep_silent(later)
    assert opened.startswith("anomaly_events,device=d,kind=gap,line=l,sensor=a,site=s ")
    assert 'status="open"' in opened and opened.endswith(f" {now - 1000}")
    assert proc.sweep_silent(later + 5_000) == []  # once per silence
    back = json.dumps({"ts": now + 1000, "values": {"a": 1.0}}).encode()
    lines = list(proc.process([("f/s/l/d/telemetry", back, time.time())]).lines)
    (closed,) = [line for line in lines if line.startswith("anomaly_events")]
    assert 'status="closed"' in closed and f"end={now + 1000}i" in closed
    assert closed.endswith(f" {now - 1000}")  # same point as the opening one
    assert proc.silent == {}


def test_sweep_right_after_a_restore_knows_every_stream(tmp_path: Path) -> None:
    """Streams restored from a snapshot count as heard from at the restore, not never."""
    first = Processor("f", DEFAULT_LIMITS, DetectorParams(warmup=5), 10)
    now = int(time.time() * 1000)
    payload = json.dumps(
        {"samples": [{"ts": now - 10_000 + 1000 * i, "values": {"a": 1.0 + i}} for i in range(10)]}
    ).encode()
    first.process([("f/s/l/d/telemetry", payload, time.time())])
    first.detectors.save(tmp_path / "state.npz")
    second = Processor("f", DEFAULT_LIMITS, DetectorParams(warmup=5), 10)
    assert second.detectors.load(tmp_path / "state.npz") == 1
    assert second.sweep_silent(now) == []
    assert len(second.sweep_silent(now + 3_600_000)) == 1  # an hour later: silent


def test_a_stream_gone_silent_mid_episode_ends_the_episode() -> None:
    proc = Processor("f", DEFAULT_LIMITS, DetectorParams(warmup=5, hold=50), 10)
    now = int(time.time() * 1000)
    values = [1.0, 2.0] * 10 + [500.0]  # ends on a spike: an episode opens, nothing ends it
    samples = [{"ts": now - 30_000 + 1000 * i, "values": {"a": v}} for i, v in enumerate(values)]
    lines = proc.process(
        [("f/s/l/d/telemetry", json.dumps({"samples": samples}).encode(), time.time())]
    ).lines
    spike_ts = samples[-1]["ts"]
    assert any('status="open"' in x and x.endswith(f" {spike_ts}") for x in lines)
    swept = proc.sweep_silent(now + 60_000)
    closed = [x for x in swept if "kind=anomaly" in x]
    assert len(closed) == 1 and 'status="closed"' in closed[0]
    assert f"end={spike_ts}i" in closed[0] and closed[0].endswith(f" {spike_ts}")
    assert any("kind=gap" in x and 'status="open"' in x for x in swept)
    # When the stream is back, a new anomaly opens a new episode.
    back = [{"ts": now + 1000 * i, "values": {"a": 900.0}} for i in range(1, 3)]
    again = proc.process(
        [("f/s/l/d/telemetry", json.dumps({"samples": back}).encode(), time.time())]
    ).lines
    assert any("kind=anomaly" in x and 'status="open"' in x for x in again)
