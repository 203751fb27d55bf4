"""Decoding and validation of payloads: every rejection has a reason, valid samples survive."""

from __future__ import annotations

import json
import time

import pytest

from devices.contract import DEFAULT_LIMITS, Limits
from ingest.decode import DecodedBatch, Decoder
from ingest.processing.detectors import StreamRegistry

NOW_MS = int(time.time() * 1000)
TOPIC = "factory/s1/l1/d1/telemetry"


def decode(
    payload: bytes | str,
    topic: str = TOPIC,
    limits: Limits = DEFAULT_LIMITS,
    max_streams: int = 1000,
) -> tuple[DecodedBatch, StreamRegistry]:
    registry = StreamRegistry(max_streams)
    out = DecodedBatch()
    raw = payload.encode() if isinstance(payload, str) else payload
    Decoder("factory", limits, registry).decode_one(topic, raw, time.time(), out)
    return out, registry


def sample(ts: int | str | None = NOW_MS, **values: object) -> dict[str, object]:
    d: dict[str, object] = {"values": values or {"a": 1.0}}
    if ts is not None:
        d["ts"] = ts
    return d


def test_single_sample_accepted() -> None:
    out, reg = decode(json.dumps({"ts": NOW_MS, "seq": 3, "values": {"temp": 71.3, "vib": 1}}))
    assert out.rejections == []
    assert out.samples == 1
    assert out.values == [71.3, 1.0]
    assert out.ts == [NOW_MS, NOW_MS]
    assert out.seq == [3, 3]
    assert reg.keys == [("s1", "l1", "d1", "temp"), ("s1", "l1", "d1", "vib")]


def test_rfc3339_timestamp() -> None:
    out, _ = decode(json.dumps(sample("2024-11-26T05:46:40.123Z")))
    assert out.ts == [1732600000123]
    out, _ = decode(json.dumps(sample("2024-11-26T12:46:40.123+07:00")))
    assert out.ts == [1732600000123]


def test_missing_ts_uses_receive_time_and_flags_it() -> None:
    before = int(time.time() * 1000)
    out, _ = decode(json.dumps(sample(None)))
    assert out.rejections == []
    assert out.rx_time == [True]
    assert before <= out.ts[0] <= int(time.time() * 1000)


def test_batch_keeps_valid_samples_and_rejects_each_bad_one() -> None:
    samples = [
        sample(NOW_MS - 3000, a=1.0),
        sample(NOW_MS - 2000, a="1.5"),  # string
        sample(NOW_MS - 1000, a=True),  # boolean
        sample(1732600000, a=1.0),  # seconds, not ms
        {"ts": NOW_MS - 500, "values": {"bad name": 1.0}},
        sample(None, a=2.0),  # no ts in a batch
        sample(NOW_MS, a=3.0),
    ]
    out, _ = decode(json.dumps({"samples": samples}))
    assert out.values == [1.0, 3.0]
    by_index = {r.sample_index: r for r in out.rejections}
    assert set(by_index) == {1, 2, 3, 4, 5}
    assert "valid number" in by_index[1].reason and "str" in by_index[1].reason
    assert "bool" in by_index[2].reason
    assert by_index[3].code == "ts_out_of_range" and "seconds" in by_index[3].reason
    assert "pattern" in by_index[4].reason
    assert by_index[5].code == "ts_missing"


@pytest.mark.parametrize(
    ("payload", "code", "words"),
    [
        (b"\xff\xfe{", "not_utf8", "UTF-8"),
        (b"not json", "invalid_json", "invalid JSON"),
        (b"[1, 2]", "not_object", "object"),
        (b'"text"', "not_object", "object"),
        (b"{}", "schema", "values"),
        (b'{"samples": []}', "schema", "at least 1"),
        (b'{"samples": {}}', "schema", "array"),
        (b'{"values": {}}', "schema", "at least 1"),
        (b'{"values": {"a": NaN}}', "schema", "finite"),
        (b'{"values": {"a": Infinity}}', "schema", "finite"),
        (b'{"values": {"a": 1}, "extra": 1}', "schema", "unknown key"),
        (b'{"ts": 99999999999999999999999, "values": {"a": 1}}', "schema", "64 bits"),
        (b'{"ts": 4102444800000, "values": {"a": 1}}', "ts_out_of_range", "ahead"),
        (b'{"ts": 1732600000123000000, "values": {"a": 1}}', "ts_out_of_range", "nanoseconds"),
        (b'{"ts": -5, "values": {"a": 1}}', "ts_out_of_range", "before"),
        (b'{"ts": "2024-11-26 05:46:40", "values": {"a": 1}}', "schema", "offset"),
        (b'{"ts": 1.5, "values": {"a": 1}}', "schema", "integer"),
        (b'{"seq": -1, "values": {"a": 1}}', "schema", "greater than"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json", "JSON"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "invalid_json", "JSON"),
    ],
)
def test_hostile_payloads_rejected_with_reason(payload: bytes, code: str, words: str) -> None:
    out, reg = decode(payload)
    assert out.samples == 0 and out.values == [] and len(reg) == 0
    assert len(out.rejections) == 1
    rej = out.rejections[0]
    assert rej.code == code, rej.reason
    assert words.lower() in rej.reason.lower(), rej.reason


@pytest.mark.parametrize(
    "name", ["a b", "a,b", "a=b", 'a"b', "a\nb", "ä", "x" * 65, "", "a/b", "a\\b", "a\x00"]
)
def test_identifiers_that_could_break_line_protocol_are_rejected(name: str) -> None:
    out, reg = decode(json.dumps({"ts": NOW_MS, "values": {name: 1.0}}))
    assert out.values == [] and len(reg) == 0
    assert out.rejections[0].code == "schema"


@pytest.mark.parametrize(
    ("topic", "words"),
    [
        ("factory/s1/l1/telemetry", "levels"),
        ("factory/s1/l1/d1/x/telemetry", "levels"),
        ("factory/s 1/l1/d1/telemetry", "site"),
        ("factory/s1/l,1/d1/telemetry", "line"),
        ("factory/s1/l1/d=1/telemetry", "device"),
        ("factory/s1/l1/d1/metrics", "kind"),
        ("other/s1/l1/d1/telemetry", "prefix"),
    ],
)
def test_topics_outside_the_contract(topic: str, words: str) -> None:
    out, _ = decode(json.dumps(sample()), topic=topic)
    assert out.rejections[0].code == "invalid_topic"
    assert words in out.rejections[0].reason


def test_limits() -> None:
    limits = Limits(max_payload_bytes=200, max_samples_per_message=3, max_values_per_sample=2)
    out, _ = decode(json.dumps({"values": {f"s{i}": 1.0 for i in range(40)}}), limits=limits)
    assert out.rejections[0].code == "payload_too_large"
    out, _ = decode(json.dumps({"samples": [sample(NOW_MS + i) for i in range(4)]}), limits=limits)
    assert out.rejections[0].code == "too_many_samples"
    out, _ = decode(json.dumps(sample(NOW_MS, a=1, b=2, c=3)), limits=limits)
    assert out.rejections[0].code == "too_many_values"


def test_default_limit_of_samples_per_message() -> None:
    n = DEFAULT_LIMITS.max_samples_per_message + 1
    payload = json.dumps({"samples": [sample(NOW_MS - n + i) for i in range(n)]})
    out, _ = decode(payload, limits=Limits(max_payload_bytes=10**8))
    assert out.rejections[0].code == "too_many_samples"


def test_stream_limit_rejects_new_streams_only() -> None:
    out, reg = decode(
        json.dumps(
            {
                "samples": [
                    sample(NOW_MS, a=1.0),
                    sample(NOW_MS + 1, b=1.0),
                    sample(NOW_MS + 2, a=2.0),
                ]
            }
        ),
        max_streams=1,
    )
    assert out.values == [1.0, 2.0]
    assert [r.code for r in out.rejections] == ["stream_limit"]
    assert len(reg) == 1


def test_status_messages() -> None:
    out, _ = decode(b'{"state": "online", "ts": 1732600000123}', topic="factory/s1/l1/d1/status")
    assert out.statuses[0].online and out.statuses[0].ts_ms == 1732600000123
    out, _ = decode(b'{"state": "sleepy"}', topic="factory/s1/l1/d1/status")
    assert out.rejections[0].code == "schema"
