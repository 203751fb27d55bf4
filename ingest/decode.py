"""Payload decoding and validation: raw MQTT messages in, flat arrays and rejections out.

A message is validated whole first (fast path: one pydantic call); only when
that fails is it taken apart sample by sample, so that the valid samples of a
message are kept and each invalid one is rejected with its own reason.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import ValidationError

from devices.contract import (
    MAX_SEQ,
    STATUS_SUFFIX,
    Batch,
    Limits,
    Sample,
    Status,
    TopicError,
    TopicParts,
    parse_topic,
)
from ingest.processing.detectors import StreamLimitError, StreamRegistry


@dataclass(frozen=True, slots=True)
class Rejection:
    """Something that was not ingested, and why."""

    topic: str
    code: str  # short, bounded set: used as a metric label
    reason: str  # human-readable detail
    payload: bytes
    sample_index: int | None = None


@dataclass(slots=True)
class StatusUpdate:
    site: str
    line: str
    device: str
    online: bool
    ts_ms: int


@dataclass(slots=True)
class DecodedBatch:
    """The valid readings of a batch of messages, flattened in arrival order."""

    rows: list[int] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)  # -1: none given
    rx_time: list[bool] = field(default_factory=list)  # ts was missing: receive time used
    rejections: list[Rejection] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)
    samples: int = 0

    def arrays(
        self,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        return (
            np.fromiter(self.rows, dtype=np.int64, count=len(self.rows)),
            np.fromiter(self.ts, dtype=np.int64, count=len(self.ts)),
            np.fromiter(self.values, dtype=np.float64, count=len(self.values)),
        )


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    # An unknown key next to a missing one is most likely a typo of it: name it first.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        missing = [".".join(map(str, e["loc"])) for e in errors if e["type"] == "missing"]
        msg = "unknown key" + (f" (missing: {', '.join(missing)})" if missing else "")
    got = err.get("input")
    shown = ""
    if err["type"] not in ("missing", "extra_forbidden") and not isinstance(got, dict | list):
        shown = f" (got {type(got).__name__} {str(got)[:40]!r})"
    more = f"; +{exc.error_count() - 1} more" if exc.error_count() > 1 else ""
    return f"{loc}: {msg}{shown}{more}" if loc else f"{msg}{shown}{more}"


def parse_json(payload: bytes) -> Any:
    """orjson first; the standard library for what orjson refuses but we want to judge
    sample by sample (integers beyond 64 bits, NaN literals). Raises ValueError."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"payload is not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError:  # an integer literal of thousands of digits
        raise ValueError("invalid JSON: a number with too many digits") from None


_UNPARSED = object()

#: Parsed topics kept (one per device and kind: ~300 bytes each at most).
MAX_CACHED_TOPICS = 100_000


_NUMBER_TYPES = frozenset({float, int})
_INT_TYPE = frozenset({int})


class Decoder:
    """Turns messages into readings for the detectors, keeping a stream registry.

    ``fast``: try :meth:`_fast` first (the default). It takes the common case, a
    well-formed message whose device and sensors are already known, without
    pydantic, and hands everything else to the full validation, which alone
    explains rejections. The two give the same readings (tested).
    """

    def __init__(
        self, prefix: str, limits: Limits, registry: StreamRegistry, *, fast: bool = True
    ) -> None:
        self.fast = fast
        self.prefix = prefix
        self.limits = limits
        self.registry = registry
        self._topics: dict[str, TopicParts] = {}
        # (site, line, device) -> {sensor: row}, to skip building tuples per reading.
        self._rows: dict[tuple[str, str, str], dict[str, int]] = {}

    def _topic(self, topic: str) -> TopicParts | str:
        """Parsed topic, or the reason it is outside the contract. Only valid topics are
        cached (their length is bounded by the identifier rules), and only so many."""
        parts = self._topics.get(topic)
        if parts is None:
            try:
                parts = parse_topic(self.prefix, topic)
            except TopicError as exc:
                return str(exc)
            if len(self._topics) < MAX_CACHED_TOPICS:
                self._topics[topic] = parts
        return parts

    def decode(self, messages: list[tuple[str, bytes, float]], out: DecodedBatch) -> None:
        """Decode ``(topic, payload, receive time in s)`` messages into ``out``."""
        for topic, payload, received in messages:
            self.decode_one(topic, payload, received, out)

    def decode_one(self, topic: str, payload: bytes, received: float, out: DecodedBatch) -> None:
        parts = self._topic(topic)
        if isinstance(parts, str):
            out.rejections.append(Rejection(topic, "invalid_topic", parts, payload))
            return
        if len(payload) > self.limits.max_payload_bytes:
            out.rejections.append(
                Rejection(
                    topic,
                    "payload_too_large",
                    f"payload of {len(payload)} bytes exceeds the limit of "
                    f"{self.limits.max_payload_bytes} bytes",
                    payload,
                )
            )
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            obj = _UNPARSED
        else:
            if (
                self.fast
                and type(obj) is dict
                and parts.kind != STATUS_SUFFIX
                and self._fast(parts, obj, out)
            ):
                return
        if obj is _UNPARSED:
            try:
                obj = parse_json(payload)
            except ValueError as exc:
                code = "not_utf8" if "UTF-8" in str(exc) else "invalid_json"
                out.rejections.append(Rejection(topic, code, str(exc), payload))
                return
        if not isinstance(obj, dict):
            out.rejections.append(
                Rejection(
                    topic,
                    "not_object",
                    f"payload must be a JSON object, got {type(obj).__name__}",
                    payload,
                )
            )
            return
        if parts.kind == STATUS_SUFFIX:
            self._status(parts, topic, payload, obj, received, out)
            return
        samples = self._samples(topic, payload, obj, out)
        if not samples:
            return
        raw = obj.get("samples")
        single = not isinstance(raw, list) or len(raw) == 1
        self._flatten(parts, topic, payload, samples, received, single, out)

    def _fast(self, parts: TopicParts, obj: dict[str, Any], out: DecodedBatch) -> bool:
        """Decode a valid message of known sensors without pydantic; False, with ``out``
        untouched, for anything else (rejections, new streams, missing or RFC 3339
        timestamps): the full path then decides. Checks per sample what the contract
        requires, and the types and ranges of all timestamps and values at once."""
        sensor_rows = self._rows.get((parts.site, parts.line, parts.device))
        if sensor_rows is None:
            return False
        limits = self.limits
        raw = obj.get("samples")
        if raw is None:
            samples: list[Any] = [obj]
        elif type(raw) is list and len(obj) == 1 and raw:
            if len(raw) > limits.max_samples_per_message:
                return False
            samples = raw
        else:
            return False
        max_values = limits.max_values_per_sample
        ts: list[Any] = []
        seqs: list[int] = []
        counts: list[int] = []
        rows: list[int] = []
        values: list[Any] = []
        try:
            for sample in samples:
                if type(sample) is not dict:
                    return False
                vals = sample["values"]
                ts.append(sample["ts"])
                if len(sample) == 2:
                    seqs.append(-1)
                else:
                    seq = sample["seq"]
                    if len(sample) != 3 or type(seq) is not int or not 0 <= seq <= MAX_SEQ:
                        return False
                    seqs.append(seq)
                if type(vals) is not dict or not 0 < len(vals) <= max_values:
                    return False
                counts.append(len(vals))
                rows.extend(map(sensor_rows.__getitem__, vals))
                values.extend(vals.values())
        except KeyError:  # no ts, no values, or a sensor not seen before
            return False
        value_types = set(map(type, values))
        if not set(map(type, ts)) <= _INT_TYPE or not value_types <= _NUMBER_TYPES:
            return False
        now_ms = int(time.time() * 1000)
        if min(ts) < limits.min_ts_ms or max(ts) > now_ms + limits.max_future_ms:
            return False
        if int in value_types:  # a JSON integer is a float reading, as the contract says
            values = [float(v) for v in values]
        out.rows.extend(rows)
        out.values.extend(values)
        out.ts.extend(itertools.chain.from_iterable(map(itertools.repeat, ts, counts)))
        out.seq.extend(itertools.chain.from_iterable(map(itertools.repeat, seqs, counts)))
        out.rx_time.extend(itertools.repeat(False, len(rows)))
        out.samples += len(samples)
        return True

    def _status(
        self,
        parts: TopicParts,
        topic: str,
        payload: bytes,
        obj: dict[str, Any],
        received: float,
        out: DecodedBatch,
    ) -> None:
        try:
            status = Status.model_validate(obj)
        except ValidationError as exc:
            out.rejections.append(Rejection(topic, "schema", _first_error(exc), payload))
            return
        ts = status.ts if status.ts is not None else int(received * 1000)
        now_ms = int(time.time() * 1000)
        if ts < self.limits.min_ts_ms or ts > now_ms + self.limits.max_future_ms:
            reason = _ts_reason(0, ts, self.limits, now_ms).replace("samples.0.ts", "ts")
            out.rejections.append(Rejection(topic, "ts_out_of_range", reason, payload))
            return
        out.statuses.append(
            StatusUpdate(parts.site, parts.line, parts.device, status.state == "online", ts)
        )

    def _samples(
        self, topic: str, payload: bytes, obj: dict[str, Any], out: DecodedBatch
    ) -> list[tuple[int, Sample]]:
        """Validated samples with their index in the message (None-free)."""
        if "samples" not in obj:
            try:
                return [(0, Sample.model_validate(obj))]
            except ValidationError as exc:
                out.rejections.append(Rejection(topic, "schema", _first_error(exc), payload, 0))
                return []
        raw = obj["samples"]
        if not isinstance(raw, list):
            out.rejections.append(
                Rejection(topic, "schema", "samples: must be a JSON array", payload)
            )
            return []
        if len(raw) > self.limits.max_samples_per_message:
            out.rejections.append(
                Rejection(
                    topic,
                    "too_many_samples",
                    f"{len(raw)} samples in one message exceeds the limit of "
                    f"{self.limits.max_samples_per_message}",
                    payload,
                )
            )
            return []
        try:
            batch = Batch.model_validate(obj)
            return list(enumerate(batch.samples))
        except ValidationError as exc:
            whole = exc
        extra = set(obj) - {"samples"}
        if extra or not raw:
            out.rejections.append(Rejection(topic, "schema", _first_error(whole), payload))
            return []
        good: list[tuple[int, Sample]] = []
        for index, item in enumerate(raw):
            try:
                good.append((index, Sample.model_validate(item)))
            except ValidationError as exc:
                out.rejections.append(
                    Rejection(
                        topic, "schema", f"samples.{index}.{_first_error(exc)}", payload, index
                    )
                )
        return good

    def _flatten(
        self,
        parts: TopicParts,
        topic: str,
        payload: bytes,
        samples: list[tuple[int, Sample]],
        received: float,
        single: bool,
        out: DecodedBatch,
    ) -> None:
        """``single``: the message holds one sample (the only case where ts may be missing)."""
        limits = self.limits
        now_ms = int(time.time() * 1000)
        latest = now_ms + limits.max_future_ms
        device = (parts.site, parts.line, parts.device)
        # Registered in self._rows only once it holds a stream (see _new_row), so
        # messages that create no stream leave no state behind.
        sensor_rows = self._rows.get(device) or {}
        for index, sample in samples:
            ts = sample.ts_ms
            rx = ts is None
            if ts is None:
                if not single:
                    out.rejections.append(
                        Rejection(
                            topic,
                            "ts_missing",
                            f"samples.{index}.ts: required when a message has several samples",
                            payload,
                            index,
                        )
                    )
                    continue
                ts = int(received * 1000)
            elif ts < limits.min_ts_ms or ts > latest:
                out.rejections.append(
                    Rejection(
                        topic,
                        "ts_out_of_range",
                        _ts_reason(index, ts, limits, now_ms),
                        payload,
                        index,
                    )
                )
                continue
            if len(sample.values) > limits.max_values_per_sample:
                out.rejections.append(
                    Rejection(
                        topic,
                        "too_many_values",
                        f"samples.{index}.values: {len(sample.values)} values exceeds the limit of "
                        f"{limits.max_values_per_sample}",
                        payload,
                        index,
                    )
                )
                continue
            seq = -1 if sample.seq is None else sample.seq
            try:
                rows = [sensor_rows.get(sensor) for sensor in sample.values]
                if None in rows:
                    rows = [self._new_row(sensor_rows, device, s) for s in sample.values]
            except StreamLimitError as exc:
                out.rejections.append(Rejection(topic, "stream_limit", str(exc), payload, index))
                continue
            n = len(rows)
            out.rows.extend(rows)  # type: ignore[arg-type]
            out.values.extend(sample.values.values())
            out.ts.extend([ts] * n)
            out.seq.extend([seq] * n)
            out.rx_time.extend([rx] * n)
            out.samples += 1

    def _new_row(
        self, sensor_rows: dict[str, int], device: tuple[str, str, str], sensor: str
    ) -> int:
        row = sensor_rows.get(sensor)
        if row is None:
            row = sensor_rows[sensor] = self.registry.row((*device, sensor))
            self._rows[device] = sensor_rows
        return row


def _ts_reason(index: int, ts: int, limits: Limits, now_ms: int) -> str:
    where = f"samples.{index}.ts"
    if ts < limits.min_ts_ms:
        hint = " (looks like seconds, expected milliseconds)" if 0 < ts < 10**10 else ""
        return f"{where}: {ts} is before the earliest accepted time {limits.min_ts_ms}{hint}"
    hint = " (looks like micro- or nanoseconds, expected milliseconds)" if ts > 10**14 else ""
    return (
        f"{where}: {ts} is more than {limits.max_future_ms} ms ahead of the ingest clock "
        f"({now_ms}){hint}"
    )
