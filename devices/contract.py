"""The wire contract between devices and the ingest service, version 1.

Everything a firmware or gateway author needs is here and in ``docs/contract.md``:
topic layout, payload models (pydantic v2), identifier rules and default limits.
The JSON Schema in ``devices/schema/telemetry.schema.json`` is generated from
these models (``ingest schema``); a test keeps the committed file in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final

from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    TypeAdapter,
    field_validator,
)

CONTRACT_VERSION: Final = 1

#: Site, line, device and sensor names. Nothing outside this set can reach a
#: line-protocol tag, so tag values can never inject line protocol.
IDENTIFIER_PATTERN: Final = r"^[A-Za-z0-9_.-]{1,64}$"
IDENTIFIER_RE: Final = re.compile(IDENTIFIER_PATTERN)

TELEMETRY_SUFFIX: Final = "telemetry"
STATUS_SUFFIX: Final = "status"
REJECTED_SEGMENT: Final = "_rejected"

#: 2000-01-01T00:00:00Z in epoch milliseconds: the earliest timestamp accepted by default.
MIN_TS_MS: Final = 946_684_800_000
MAX_SEQ: Final = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Default limits of contract v1; the service can be configured tighter or looser."""

    max_payload_bytes: int = 1_048_576
    max_samples_per_message: int = 10_000
    max_values_per_sample: int = 256
    min_ts_ms: int = MIN_TS_MS
    max_future_ms: int = 300_000  # five minutes of clock skew


DEFAULT_LIMITS: Final = Limits()

Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]
Reading = Annotated[float, Strict(), AllowInfNan(False)]
EpochMillis = Annotated[int, Strict(), Field(description="Epoch milliseconds (UTC)")]
Rfc3339 = Annotated[
    str,
    Strict(),
    Field(
        json_schema_extra={"format": "date-time"},
        description="RFC 3339 timestamp with a UTC offset, e.g. 2024-11-26T05:46:40.123Z",
    ),
]


def parse_rfc3339_ms(text: str) -> int:
    """Parse an RFC 3339 timestamp (offset required) into epoch milliseconds."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an RFC 3339 timestamp: {text[:40]!r}") from None
    if moment.tzinfo is None:
        raise ValueError("RFC 3339 timestamp needs a UTC offset (e.g. 'Z' or '+07:00')")
    return int(moment.timestamp() * 1000)


class Sample(BaseModel):
    """One reading of one or more sensors of a device at one instant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ts: EpochMillis | Rfc3339 | None = Field(
        default=None,
        description=(
            "Sample time: epoch milliseconds (integer) or an RFC 3339 string. "
            "Without it the ingest service uses the message's receive time and "
            "flags the point (field rx_time=true); only allowed in single-sample messages."
        ),
    )
    seq: Annotated[int, Strict(), Field(ge=0, le=MAX_SEQ)] | None = Field(
        default=None, description="Optional device sequence number, written as an integer field."
    )
    # The size limits are the service's (configurable) settings; the schema states the
    # defaults so firmware authors see them.
    values: dict[Identifier, Reading] = Field(
        min_length=1,
        description=(
            "Sensor name -> finite number (JSON number; booleans and strings are rejected)."
        ),
        json_schema_extra={
            "additionalProperties": False,
            "maxProperties": DEFAULT_LIMITS.max_values_per_sample,
        },
    )

    @field_validator("ts", mode="before")
    @classmethod
    def _ts_in_64_bits(cls, value: object) -> object:
        if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > MAX_SEQ:
            raise ValueError("timestamp does not fit in 64 bits (expected epoch milliseconds)")
        return value

    @field_validator("ts")
    @classmethod
    def _ts_to_millis(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, str):
            return parse_rfc3339_ms(value)
        return value

    @property
    def ts_ms(self) -> int | None:
        """The timestamp as epoch milliseconds (the validator has already converted strings)."""
        assert not isinstance(self.ts, str)
        return self.ts


class Batch(BaseModel):
    """Several samples of one device in one message, oldest first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: list[Sample] = Field(
        min_length=1,
        json_schema_extra={"maxItems": DEFAULT_LIMITS.max_samples_per_message},
        description="Samples in time order; each needs a ts when there is more than one.",
    )


class Status(BaseModel):
    """Birth / Last Will message on the status topic (retained)."""

    model_config = ConfigDict(extra="allow")

    state: Annotated[str, Field(pattern="^(online|offline)$")]
    ts: EpochMillis | None = None


#: A telemetry payload is one sample, or a batch (an object with a "samples" key).
TelemetryPayload = Sample | Batch
TELEMETRY_ADAPTER: Final[TypeAdapter[Sample | Batch]] = TypeAdapter(TelemetryPayload)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a telemetry payload (contract v1)."""
    schema = TELEMETRY_ADAPTER.json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://factory-ingest.dev/schema/telemetry.v1.schema.json",
        "title": "factory-ingest telemetry payload, contract v1",
        "description": (
            "Published at QoS 1 on <prefix>/<site>/<line>/<device>/telemetry. "
            "Either one sample or {'samples': [...]}. Identifiers match "
            f"{IDENTIFIER_PATTERN}. Default limits: payload "
            f"{DEFAULT_LIMITS.max_payload_bytes} bytes, "
            f"{DEFAULT_LIMITS.max_samples_per_message} samples per message, "
            f"{DEFAULT_LIMITS.max_values_per_sample} values per sample, timestamps from "
            "2000-01-01T00:00:00Z to five minutes ahead of the ingest clock."
        ),
        **schema,
    }


@dataclass(frozen=True, slots=True)
class TopicParts:
    site: str
    line: str
    device: str
    kind: str  # "telemetry" or "status"


def telemetry_topic(prefix: str, site: str, line: str, device: str) -> str:
    return f"{prefix}/{site}/{line}/{device}/{TELEMETRY_SUFFIX}"


def status_topic(prefix: str, site: str, line: str, device: str) -> str:
    return f"{prefix}/{site}/{line}/{device}/{STATUS_SUFFIX}"


def rejected_topic(prefix: str, topic: str) -> str:
    """Dead-letter topic for a message received on ``topic``.

    ``<prefix>/_rejected/<site>/<line>/<device>/<kind>``; a topic outside the
    contract goes to ``<prefix>/_rejected/_invalid_topic``.
    """
    try:
        parse_topic(prefix, topic)
    except TopicError:
        return f"{prefix}/{REJECTED_SEGMENT}/_invalid_topic"
    return f"{prefix}/{REJECTED_SEGMENT}/{topic[len(prefix) + 1 :]}"


class TopicError(ValueError):
    """A topic outside the contract."""


def parse_topic(prefix: str, topic: str) -> TopicParts:
    """Split ``<prefix>/<site>/<line>/<device>/<kind>``; raise TopicError with a reason."""
    if not topic.startswith(prefix + "/"):
        raise TopicError(f"topic outside prefix {prefix!r}")
    parts = topic[len(prefix) + 1 :].split("/")
    if len(parts) != 4:
        raise TopicError(
            f"topic has {len(parts)} levels after the prefix, expected 4 "
            "(<site>/<line>/<device>/telemetry|status)"
        )
    site, line, device, kind = parts
    if kind not in (TELEMETRY_SUFFIX, STATUS_SUFFIX):
        raise TopicError(f"unknown topic kind {kind[:64]!r}, expected 'telemetry' or 'status'")
    for name, value in (("site", site), ("line", line), ("device", device)):
        if not IDENTIFIER_RE.match(value):
            raise TopicError(
                f"invalid {name} identifier {value[:80]!r} (must match [A-Za-z0-9_.-]{{1,64}})"
            )
    return TopicParts(site, line, device, kind)
