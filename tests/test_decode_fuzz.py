"""Property tests of ``Decoder.decode_one``: hostile input never raises, every sample is
accounted for with a documented reason, and what is accepted is safe to write.

No services: the decoder is driven directly. The reason codes are read from the table
in ``docs/contract.md``, so a code the documentation does not list fails here.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from devices.contract import DEFAULT_LIMITS, IDENTIFIER_RE, MIN_TS_MS, Limits
from ingest.decode import DecodedBatch, Decoder
from ingest.processing.detectors import StreamRegistry

PREFIX = "factory"
TOPIC = f"{PREFIX}/s1/l1/d1/telemetry"
STATUS_TOPIC = f"{PREFIX}/s1/l1/d1/status"
CONTRACT = Path(__file__).resolve().parents[1] / "docs" / "contract.md"


def documented_reasons() -> set[str]:
    """The codes in the reasons table of docs/contract.md (the `| reason | meaning |` table)."""
    text = CONTRACT.read_text(encoding="utf-8")
    table = text.split("| reason | meaning |", 1)[1].split("\n\n", 1)[0]
    codes = set()
    for row in table.splitlines():
        first_cell = row.split("|")[1] if row.startswith("|") else ""
        codes.update(re.findall(r"`([a-z_0-9]+)`", first_cell))
    return codes


REASONS = documented_reasons()
#: FUZZ_EXAMPLES=20000 for a longer hunt; the default keeps this file at a few seconds.
FAST = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_reason_table_parsed() -> None:
    assert {"schema", "invalid_json", "not_utf8", "ts_out_of_range", "write_refused"} <= REASONS
    assert len(REASONS) == 12, sorted(REASONS)


# --- strategies --------------------------------------------------------------------------

identifiers = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
hostile_names = st.one_of(
    identifiers,
    st.text(max_size=70),
    st.sampled_from(["a b", "a,b", "a=b", 'a"b', "a\nb", "ä", "x" * 65, "", "a/b", "\ud800"]),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and infinities included: json.dumps writes NaN / Infinity literals
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(
            st.one_of(st.sampled_from(["ts", "seq", "values", "samples", "state"]), hostile_names),
            inner,
            max_size=5,
        ),
    ),
    max_leaves=20,
)
readings = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.integers(min_value=2**63, max_value=2**80),  # finite as floats: accepted as floats
)


#: Fixed at import so that generation does not depend on the clock (hypothesis replays).
NOW_MS = int(time.time() * 1000)


def ts_in_range() -> st.SearchStrategy[int]:
    return st.integers(min_value=MIN_TS_MS, max_value=NOW_MS)


@st.composite
def valid_samples(draw: st.DrawFn, need_ts: bool = True) -> dict[str, Any]:
    sample: dict[str, Any] = {
        "values": draw(st.dictionaries(identifiers, readings, min_size=1, max_size=4))
    }
    if need_ts or draw(st.booleans()):
        ts = draw(ts_in_range())
        sample["ts"] = ts
    if draw(st.booleans()):
        sample["seq"] = draw(st.integers(min_value=0, max_value=2**63 - 1))
    return sample


@st.composite
def mutated_samples(draw: st.DrawFn) -> Any:
    """A valid sample with one field broken (or left alone)."""
    sample = draw(valid_samples(need_ts=False))
    how = draw(
        st.sampled_from(["none", "ts", "seq", "value", "name", "extra", "drop", "replace", "empty"])
    )
    if how == "ts":
        sample["ts"] = draw(
            st.one_of(
                json_scalars,
                st.sampled_from([1732600000, 1732600000123000, 1732600000123000000, -1, 2**63]),
                st.sampled_from(["2024-11-26T05:46:40", "2024-11-26T05:46:40Z", "yesterday"]),
            )
        )
    elif how == "seq":
        sample["seq"] = draw(json_scalars)
    elif how == "value":
        sample["values"][draw(identifiers)] = draw(json_values)
    elif how == "name":
        sample["values"][draw(hostile_names)] = 1.0
    elif how == "extra":
        sample[draw(st.sampled_from(["valeus", "Ts", "sample", "x"]))] = draw(json_values)
    elif how == "drop":
        del sample["values"]
    elif how == "replace":  # anything at all, but not a batch in disguise
        return draw(json_values.filter(lambda v: not (isinstance(v, dict) and "samples" in v)))
    elif how == "empty":
        sample["values"] = {}
    return sample


@st.composite
def near_valid_payloads(draw: st.DrawFn) -> tuple[bytes, int]:
    """(payload, number of samples it holds); a batch or a single sample."""
    if draw(st.booleans()):
        sample = draw(mutated_samples())
        return json.dumps(sample).encode(), 1
    samples = draw(st.lists(mutated_samples(), min_size=1, max_size=12))
    return json.dumps({"samples": samples}).encode(), len(samples)


limits_strategy = st.one_of(
    st.just(DEFAULT_LIMITS),
    st.builds(
        Limits,
        max_payload_bytes=st.integers(min_value=64, max_value=4096),
        max_samples_per_message=st.integers(min_value=1, max_value=5),
        max_values_per_sample=st.integers(min_value=1, max_value=3),
    ),
)


# --- checks -----------------------------------------------------------------------------


def run(
    payload: bytes,
    topic: str = TOPIC,
    limits: Limits = DEFAULT_LIMITS,
    max_streams: int = 1000,
) -> tuple[DecodedBatch, StreamRegistry]:
    registry = StreamRegistry(max_streams)
    out = DecodedBatch()
    Decoder(PREFIX, limits, registry).decode_one(topic, payload, time.time(), out)
    check_invariants(out, registry, limits)
    return out, registry


def check_invariants(out: DecodedBatch, registry: StreamRegistry, limits: Limits) -> None:
    n = len(out.values)
    assert len(out.rows) == len(out.ts) == len(out.seq) == len(out.rx_time) == n
    for rej in out.rejections:
        assert rej.code in REASONS, rej
        assert rej.reason, rej
    for value in out.values:
        assert type(value) is float and math.isfinite(value), value
    latest = int(time.time() * 1000) + limits.max_future_ms
    for ts, rx in zip(out.ts, out.rx_time, strict=True):
        assert type(ts) is int
        assert rx or limits.min_ts_ms <= ts <= latest, ts
    for seq in out.seq:
        assert -1 <= seq <= 2**63 - 1
    for row in out.rows:
        assert 0 <= row < len(registry)
    for key in registry.keys:
        assert all(IDENTIFIER_RE.match(part) for part in key), key


def check_accounting(out: DecodedBatch, n_samples: int) -> None:
    """Each sample is accepted or rejected once; a whole-message rejection stands alone."""
    whole = [r for r in out.rejections if r.sample_index is None]
    if whole:
        assert len(out.rejections) == 1 and out.samples == 0 and not out.values, out
        return
    indices = [r.sample_index for r in out.rejections]
    assert len(set(indices)) == len(indices), indices
    assert all(i is not None and 0 <= i < n_samples for i in indices), indices
    assert out.samples + len(indices) == n_samples, (out.samples, out.rejections)


# --- properties -----------------------------------------------------------------------------


@FAST
@given(payload=st.binary(max_size=300), limits=limits_strategy, status=st.booleans())
def test_arbitrary_bytes_never_raise(payload: bytes, limits: Limits, status: bool) -> None:
    out, _ = run(payload, STATUS_TOPIC if status else TOPIC, limits)
    if not status:
        assert out.samples or out.rejections


@FAST
@given(value=json_values, limits=limits_strategy, status=st.booleans())
def test_arbitrary_json_never_raises(value: Any, limits: Limits, status: bool) -> None:
    payload = json.dumps(value).encode()
    out, _ = run(payload, STATUS_TOPIC if status else TOPIC, limits)
    if not status:
        assert out.samples or out.rejections
        if not isinstance(value, dict):
            assert [r.code for r in out.rejections] in (["not_object"], ["payload_too_large"])


@FAST
@given(payload=near_valid_payloads(), limits=limits_strategy, max_streams=st.integers(1, 6))
def test_near_valid_payloads_every_sample_accounted_for(
    payload: tuple[bytes, int], limits: Limits, max_streams: int
) -> None:
    raw, n_samples = payload
    out, _ = run(raw, TOPIC, limits, max_streams)
    check_accounting(out, n_samples)


@FAST
@given(topic=st.one_of(st.text(max_size=120), st.lists(hostile_names, max_size=6).map("/".join)))
def test_arbitrary_topics_never_raise(topic: str) -> None:
    topic = f"{PREFIX}/{topic}" if not topic.startswith(PREFIX) else topic
    out, reg = run(json.dumps({"ts": NOW_MS, "values": {"a": 1.0}}).encode(), topic)
    if out.samples:
        assert len(reg) == 1
    else:
        assert [r.code for r in out.rejections] == ["invalid_topic"]


@FAST
@given(sample=valid_samples())
def test_valid_sample_is_accepted_exactly(sample: dict[str, Any]) -> None:
    out, reg = run(json.dumps(sample).encode())
    assert out.rejections == []
    assert out.samples == 1
    assert out.values == [float(v) for v in sample["values"].values()]
    assert [k[3] for k in reg.keys] == list(sample["values"])
    assert out.ts == [sample["ts"]] * len(sample["values"])
    assert out.seq == [sample.get("seq", -1)] * len(sample["values"])


def readings_of(out: DecodedBatch, registry: StreamRegistry) -> list[tuple[Any, ...]]:
    return [
        (registry.keys[row], ts, value, seq, rx)
        for row, ts, value, seq, rx in zip(
            out.rows, out.ts, out.values, out.seq, out.rx_time, strict=True
        )
    ]


@FAST
@given(
    samples=st.lists(valid_samples(), min_size=1, max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=20), max_size=6),
    single_form=st.booleans(),
)
def test_splitting_a_batch_keeps_the_readings_in_order(
    samples: list[dict[str, Any]], cuts: list[int], single_form: bool
) -> None:
    whole_out, whole_reg = run(json.dumps({"samples": samples}).encode())
    assert whole_out.rejections == [] and whole_out.samples == len(samples)

    bounds = sorted({0, len(samples), *(c for c in cuts if c < len(samples))})
    registry = StreamRegistry(1000)
    decoder = Decoder(PREFIX, DEFAULT_LIMITS, registry)
    split_out = DecodedBatch()
    for lo, hi in itertools.pairwise(bounds):
        part = samples[lo:hi]
        doc: Any = part[0] if single_form and len(part) == 1 else {"samples": part}
        decoder.decode_one(TOPIC, json.dumps(doc).encode(), time.time(), split_out)
    assert split_out.rejections == []
    assert split_out.samples == whole_out.samples
    assert readings_of(split_out, registry) == readings_of(whole_out, whole_reg)


# --- regressions of bugs these properties found ------------------------------------------


@FAST
@example(samples=[{"ts": "bad", "values": {"a": 1.0}}, {"values": {"a": 2.0}}])
@given(samples=st.lists(mutated_samples(), min_size=2, max_size=6))
def test_no_receive_time_in_a_message_of_several_samples(samples: list[Any]) -> None:
    out, _ = run(json.dumps({"samples": samples}).encode())
    assert not any(out.rx_time), out.rejections


def test_values_per_sample_follow_the_limit() -> None:
    values = {f"s{i}": 1.0 for i in range(257)}
    out, _ = run(json.dumps({"ts": NOW_MS, "values": values}).encode())
    assert [r.code for r in out.rejections] == ["too_many_values"], out.rejections[0].reason
    out, _ = run(
        json.dumps({"ts": NOW_MS, "values": values}).encode(),
        limits=Limits(max_values_per_sample=300),
    )
    assert out.rejections == [] and out.samples == 1, out.rejections[0].reason
