"""The decoder's fast path gives exactly what the full pydantic validation gives.

Two decoders, one with ``fast=False``, decode the same sequence of messages: valid
ones of known and new sensors, and ones broken in the ways the fast path must
hand over (wrong types, booleans, out-of-range and RFC 3339 timestamps, missing
keys, extra keys, negative or huge sequence numbers, too many values or samples).
Readings, rejections with their reasons, and the stream registry must match.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.contract import Limits
from ingest.decode import DecodedBatch, Decoder
from ingest.processing.detectors import StreamRegistry

NOW = int(time.time() * 1000)
LIMITS = Limits(max_samples_per_message=6, max_values_per_sample=3)
SENSORS = ["temp", "vib", "amps", "bad name"]
TOPICS = [f"f/s1/l1/d{i}/telemetry" for i in range(2)]

good_ts = st.integers(NOW - 10**8, NOW)
odd_ts = st.one_of(
    st.integers(0, 10**12),  # before the earliest accepted time
    st.integers(NOW + 10**7, NOW + 10**9),  # ahead of the clock
    st.just(True),
    st.just(float(NOW)),
    st.just("2024-11-26T05:46:40.123Z"),
    st.just("yesterday"),
    st.integers(2**63, 2**64),
)
good_value = st.one_of(st.floats(-1e6, 1e6), st.integers(-1000, 1000))
odd_value = st.one_of(st.booleans(), st.just("1.5"), st.none(), st.just([1.0]), st.just({}))


@st.composite
def sample(draw: st.DrawFn, odd: bool) -> Any:
    if odd and draw(st.integers(0, 20)) == 0:
        return draw(st.sampled_from([[], "x", 1, None]))
    names = draw(st.lists(st.sampled_from(SENSORS[:3]), min_size=1, max_size=3, unique=True))
    if odd and draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(SENSORS), min_size=0, max_size=4, unique=True))
    values = {
        n: draw(odd_value if odd and draw(st.integers(0, 6)) == 0 else good_value) for n in names
    }
    out: dict[str, Any] = {"values": values}
    if not (odd and draw(st.integers(0, 5)) == 0):
        out["ts"] = draw(odd_ts if odd and draw(st.integers(0, 4)) == 0 else good_ts)
    if draw(st.booleans()):
        out["seq"] = draw(
            st.one_of(st.integers(-3, 2**63 + 3), st.just("7")) if odd else st.integers(0, 2**40)
        )
    if odd and draw(st.integers(0, 8)) == 0:
        out["extra"] = 1
    if odd and draw(st.integers(0, 8)) == 0:
        out["values"] = list(values.values())
    return out


@st.composite
def message(draw: st.DrawFn) -> tuple[str, bytes]:
    odd = draw(st.booleans())
    topic = draw(st.sampled_from(TOPICS))
    samples = draw(st.lists(sample(odd), min_size=1, max_size=7))
    if len(samples) == 1 and draw(st.booleans()):
        body: Any = samples[0]
    else:
        body = {"samples": samples}
        if odd and draw(st.integers(0, 8)) == 0:
            body["device"] = "d0"
    return topic, json.dumps(body).encode()  # json: integers beyond 64 bits too


def decode(fast: bool, messages: list[tuple[str, bytes]]) -> tuple[Any, ...]:
    registry = StreamRegistry(100)
    decoder = Decoder("f", LIMITS, registry, fast=fast)
    out = DecodedBatch()
    for topic, payload in messages:
        decoder.decode_one(topic, payload, NOW / 1000, out)
    rejections = [  # the ingest clock in a reason moves on between the two runs
        (r.topic, r.code, re.sub(r"clock \(\d+\)", "clock", r.reason), r.sample_index)
        for r in out.rejections
    ]
    values = [(type(v), v) for v in out.values]
    return out.rows, out.ts, values, out.seq, out.rx_time, out.samples, rejections, registry.keys


@settings(max_examples=400, deadline=None)
@given(st.lists(message(), min_size=1, max_size=12))
def test_fast_path_equals_full_validation(messages: list[tuple[str, bytes]]) -> None:
    assert decode(True, messages) == decode(False, messages)


def test_fast_path_takes_the_common_case() -> None:
    """Known sensors, well-formed: decoded without pydantic (the full path is not called)."""
    registry = StreamRegistry(10)
    decoder = Decoder("f", LIMITS, registry)
    out = DecodedBatch()
    first = orjson.dumps({"samples": [{"ts": NOW - 1, "values": {"temp": 1.0, "vib": 2}}]})
    decoder.decode_one(TOPICS[0], first, NOW / 1000, out)  # new streams: full path

    def refuse(*args: object) -> None:
        raise AssertionError("full validation used")

    decoder._samples = refuse  # type: ignore[method-assign]
    batch = [{"ts": NOW - 1000 + i, "seq": i, "values": {"temp": 1.5, "vib": i}} for i in range(5)]
    decoder.decode_one(TOPICS[0], orjson.dumps({"samples": batch}), NOW / 1000, out)
    decoder.decode_one(TOPICS[0], orjson.dumps(batch[0]), NOW / 1000, out)
    assert out.samples == 7 and out.rejections == []
    assert out.values[2:] == [1.5, 0.0, 1.5, 1.0, 1.5, 2.0, 1.5, 3.0, 1.5, 4.0, 1.5, 0.0]
    assert all(type(v) is float for v in out.values)
    assert out.seq[2:] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 0]
