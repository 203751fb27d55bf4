"""Service configuration: a TOML file, overridden by ``INGEST_*`` environment variables.

Every setting ``[section] key`` can be set by ``INGEST_<SECTION>_<KEY>`` (upper
case), e.g. ``INGEST_INFLUX_BATCH_SIZE``; ``INGEST_CLIENT_ID`` and
``INGEST_TOPIC_PREFIX`` are short forms of the MQTT ones. A variable ending in
``_FILE`` (e.g. ``INGEST_INFLUX_TOKEN_FILE``) reads the value from that file,
for Docker secrets. A wrong setting raises :class:`ConfigError` with one line
that names the setting and where it came from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from devices.contract import DEFAULT_LIMITS, IDENTIFIER_RE, MIN_TS_MS, Limits
from devices.mqtt_url import parse_mqtt_url
from ingest.processing.detectors import PARAM_NAMES, DetectorParams, DetectorRule

_DP = DetectorParams()

ENV_PREFIX = "INGEST_"
ENV_ALIASES = {
    "INGEST_CLIENT_ID": ("mqtt", "client_id"),
    "INGEST_TOPIC_PREFIX": ("mqtt", "topic_prefix"),
}


class ConfigError(ValueError):
    """A setting is wrong; the message is one line meant for the operator."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttSettings(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    client_id: Annotated[str, Field(min_length=1, max_length=128)] = "factory-ingest"
    topic_prefix: str = "factory"
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive: Annotated[int, Field(ge=5, le=3600)] = 30
    #: v5: how long the broker keeps the session (and queues messages) while ingest is away.
    session_expiry: Annotated[int, Field(ge=0)] = 7 * 24 * 3600
    #: Unacknowledged messages the broker may send us (v5 Receive Maximum). With 3.1.1 the
    #: broker decides (Mosquitto: max_inflight_messages, 20 by default): set this to match.
    max_inflight: Annotated[int, Field(ge=1, le=65535)] = 10_000
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    #: Seconds without any message while connected before the subscription is renewed
    #: (then the connection); 0 disables the watchdog.
    stall_timeout: Annotated[float, Field(ge=0)] = 300.0
    reconnect_min_delay: Annotated[float, Field(gt=0)] = 0.5
    reconnect_max_delay: Annotated[float, Field(gt=0)] = 30.0
    #: Where rejected payloads go: an MQTT topic under <prefix>/_rejected/,
    #: a JSON-lines file, or nowhere.
    dead_letter: Literal["mqtt", "file", "none"] = "mqtt"
    dead_letter_file: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parse_mqtt_url(value)
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        parts = value.split("/")
        if not all(IDENTIFIER_RE.match(p) for p in parts):
            raise ValueError("topic prefix must be identifiers ([A-Za-z0-9_.-]) joined by '/'")
        return value

    @model_validator(mode="after")
    def _dead_letter_file(self) -> MqttSettings:
        if self.dead_letter == "file" and not self.dead_letter_file:
            raise ValueError("dead_letter = 'file' needs dead_letter_file")
        return self


class InfluxSettings(_Section):
    #: Empty: no database; points go to a line-protocol file (``file``).
    url: str = ""
    api: Literal["v1", "v2"] = "v1"
    database: str = "factory"
    retention_policy: str = ""
    username: str | None = None
    password: str | None = None
    bucket: str = "factory"
    org: str = ""
    token: str | None = None
    create_database: bool = True
    gzip: bool = True
    timeout: Annotated[float, Field(gt=0)] = 10.0
    #: Points per write request, and the longest a point waits before it is written.
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 5000
    flush_interval: Annotated[float, Field(gt=0, le=60)] = 1.0
    #: Write at once when no more messages wait (low latency at low rates); false: only
    #: by size and age (fewer, larger writes).
    flush_when_idle: bool = True
    #: Write requests in flight at once (acknowledgements still go in arrival order).
    write_concurrency: Annotated[int, Field(ge=1, le=16)] = 2
    retry_initial: Annotated[float, Field(gt=0)] = 0.5
    retry_max: Annotated[float, Field(gt=0)] = 30.0
    file: str = "ingest-output.lp"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _api_settings(self) -> InfluxSettings:
        if self.url and self.api == "v2":
            if not self.token:
                raise ValueError("api 'v2' needs a token (INGEST_INFLUX_TOKEN)")
            if not self.org:
                raise ValueError("api 'v2' needs an org (INGEST_INFLUX_ORG)")
        return self


class DetectorSettings(_Section):
    """One detector parameter set (see ``docs/detectors.md``); defaults as DetectorParams."""

    #: Which detectors run: any of zscore, ewma, mad, cusum, flatline, roc
    #: (comma-separated in an environment variable).
    detectors: tuple[str, ...] = _DP.detectors
    warmup: Annotated[int, Field(ge=2)] = _DP.warmup
    zscore_window: Annotated[int, Field(ge=2, le=100_000)] = _DP.zscore_window
    zscore_threshold: Annotated[float, Field(gt=0)] = _DP.zscore_threshold
    ewma_halflife: Annotated[float, Field(gt=0)] = _DP.ewma_halflife
    ewma_threshold: Annotated[float, Field(gt=0)] = _DP.ewma_threshold
    mad_window: Annotated[int, Field(ge=3, le=100_000)] = _DP.mad_window
    mad_threshold: Annotated[float, Field(gt=0)] = _DP.mad_threshold
    cusum_halflife: Annotated[float, Field(gt=0)] = _DP.cusum_halflife
    cusum_k: Annotated[float, Field(ge=0)] = _DP.cusum_k
    cusum_h: Annotated[float, Field(gt=0)] = _DP.cusum_h
    flatline_samples: Annotated[int, Field(ge=1)] = _DP.flatline_samples
    roc_threshold: Annotated[float, Field(gt=0)] = _DP.roc_threshold
    gap_factor: Annotated[float, Field(gt=1)] = _DP.gap_factor
    onset: Annotated[int, Field(ge=1)] = _DP.onset
    clear: Annotated[int, Field(ge=1)] = _DP.clear
    hold: Annotated[int, Field(ge=1)] = _DP.hold
    #: Learn baselines from this many samples per stream, then keep them fixed (0: always
    #: learn). Fixed control limits suit a machine commissioned in a known-good state.
    learn_limit: Annotated[int, Field(ge=0)] = _DP.learn_limit

    @field_validator("detectors", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _valid(self) -> DetectorSettings:
        self.params()  # raises ValueError with the reason
        return self

    def params(self) -> DetectorParams:
        return DetectorParams(**{name: getattr(self, name) for name in PARAM_NAMES})


class DetectorRuleSettings(DetectorSettings):
    """``[[processing.rules]]``: parameters for the sensors matching ``sensors`` (a glob);
    settings a rule leaves out come from ``[processing]``."""

    sensors: Annotated[str, Field(min_length=1)]


class ProcessingSettings(DetectorSettings):
    max_streams: Annotated[int, Field(ge=1)] = 100_000
    #: Detector state is saved here (and at shutdown) and restored at start, so a restart
    #: does not reset the warm-up; empty disables it.
    state_file: str = "ingest-state/detectors.npz"
    #: Seconds between state snapshots.
    snapshot_interval: Annotated[float, Field(gt=0)] = 60.0
    #: Per-sensor overrides, first match wins; TOML only (``[[processing.rules]]``).
    rules: tuple[dict[str, Any], ...] = ()

    @model_validator(mode="after")
    def _rules(self) -> ProcessingSettings:
        self.detector_rules()
        return self

    def detector_rules(self) -> list[DetectorRule]:
        base = {name: getattr(self, name) for name in PARAM_NAMES}
        out = []
        for i, raw in enumerate(self.rules):
            try:
                rule = DetectorRuleSettings.model_validate({**base, **raw})
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                raise ValueError(f"rule {i + 1}: {where}: {msg}") from None
            out.append(DetectorRule(rule.sensors, rule.params()))
        return out


class LimitSettings(_Section):
    max_payload_bytes: Annotated[int, Field(ge=64)] = DEFAULT_LIMITS.max_payload_bytes
    max_samples_per_message: Annotated[int, Field(ge=1)] = DEFAULT_LIMITS.max_samples_per_message
    max_values_per_sample: Annotated[int, Field(ge=1)] = DEFAULT_LIMITS.max_values_per_sample
    min_ts_ms: Annotated[int, Field(ge=0)] = MIN_TS_MS
    max_future_ms: Annotated[int, Field(ge=0)] = DEFAULT_LIMITS.max_future_ms

    def limits(self) -> Limits:
        return Limits(
            max_payload_bytes=self.max_payload_bytes,
            max_samples_per_message=self.max_samples_per_message,
            max_values_per_sample=self.max_values_per_sample,
            min_ts_ms=self.min_ts_ms,
            max_future_ms=self.max_future_ms,
        )


class SpoolSettings(_Section):
    #: Folder of the on-disk spool; empty disables it (a database outage then only
    #: holds acknowledgements back, and the broker's queue limit applies).
    dir: str = "ingest-spool"
    #: Spool a batch after its writes have failed for this long (s); keep it below
    #: service.shutdown_timeout so a shutdown during an outage still spools.
    after: Annotated[float, Field(ge=0)] = 5.0
    max_bytes: Annotated[int, Field(ge=1 << 20)] = 1 << 30
    segment_bytes: Annotated[int, Field(ge=4096)] = 16 << 20


class ServiceSettings(_Section):
    #: host:port of the /healthz and /metrics endpoint; empty disables it.
    health_listen: str = "127.0.0.1:9108"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: Longest a SIGTERM/SIGINT shutdown waits for the last write.
    shutdown_timeout: Annotated[float, Field(gt=0)] = 10.0
    #: Bytes of received, not yet processed messages held in memory; past it the MQTT
    #: network thread waits (TCP then pushes back on the broker).
    max_queued_bytes: Annotated[int, Field(ge=1 << 20)] = 64 << 20
    #: Messages taken from the MQTT queue per processing step.
    max_batch_messages: Annotated[int, Field(ge=1)] = 2000
    #: Seconds to let more messages arrive before a processing step that would take
    #: fewer than a full batch: fewer, larger steps (throughput) for a little latency.
    batch_linger: Annotated[float, Field(ge=0, le=1)] = 0.02
    #: Seconds between points of the service's own metrics in the measurement
    #: ``ingest_stats`` (for the Grafana pipeline-health dashboard); 0 disables them.
    stats_interval: Annotated[float, Field(ge=0)] = 10.0

    @field_validator("health_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            _, sep, port = value.rpartition(":")
            if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError("must be host:port, e.g. 0.0.0.0:9108")
        return value


class Settings(_Section):
    mqtt: MqttSettings = MqttSettings()
    influx: InfluxSettings = InfluxSettings()
    processing: ProcessingSettings = ProcessingSettings()
    limits: LimitSettings = LimitSettings()
    spool: SpoolSettings = SpoolSettings()
    service: ServiceSettings = ServiceSettings()


SECTIONS: dict[str, type[_Section]] = {
    "mqtt": MqttSettings,
    "influx": InfluxSettings,
    "processing": ProcessingSettings,
    "limits": LimitSettings,
    "spool": SpoolSettings,
    "service": ServiceSettings,
}


#: Settings that only a config file can hold (they are lists of tables).
FILE_ONLY = {("processing", "rules")}


def env_variables() -> list[tuple[str, str, str]]:
    """(variable, setting, default) for every setting: the table in the README."""
    rows = []
    for section, model in SECTIONS.items():
        for name, field in model.model_fields.items():
            if (section, name) in FILE_ONLY:
                continue
            default = field.get_default(call_default_factory=True)
            rows.append(
                (
                    f"{ENV_PREFIX}{section.upper()}_{name.upper()}",
                    f"{section}.{name}",
                    repr(default),
                )
            )
    return rows


def _is_setting(var: str) -> bool:
    """Whether ``var`` names a setting itself (``INGEST_PROCESSING_STATE_FILE``), not a
    ``_FILE`` indirection to a secret (``INGEST_INFLUX_TOKEN_FILE``)."""
    section, _, key = var[len(ENV_PREFIX) :].lower().partition("_")
    return section in SECTIONS and key in SECTIONS[section].model_fields


def _env_overrides(
    environ: Mapping[str, str],
) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], str]]:
    """Settings found in the environment, and which variable set each one."""
    found: dict[str, dict[str, Any]] = {}
    origin: dict[tuple[str, str], str] = {}
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        value = raw
        name = var
        if var.endswith("_FILE") and not _is_setting(var):
            name = var[: -len("_FILE")]
            try:
                value = Path(raw).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"{var}: cannot read {raw}: {exc.strerror}") from None
        if name in ENV_ALIASES:
            section, key = ENV_ALIASES[name]
        else:
            rest = name[len(ENV_PREFIX) :].lower()
            section, _, key = rest.partition("_")
            if (section, key) in FILE_ONLY:
                raise ConfigError(f"{var}: {section}.{key} can only be set in the config file")
            if section not in SECTIONS or key not in SECTIONS[section].model_fields:
                if section in SECTIONS:
                    raise ConfigError(f"{var}: unknown setting {section}.{key}")
                continue  # INGEST_TEST_* and the like belong to others
        found.setdefault(section, {})[key] = value
        origin[(section, key)] = var
    return found, origin


def load_settings(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read the TOML file (if any), apply environment overrides, validate."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    origin: dict[tuple[str, str], str] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for section, values in data.items():
            if isinstance(values, dict):
                for key in values:
                    origin[(section, key)] = str(path)
    env, env_origin = _env_overrides(environ)
    origin.update(env_origin)
    for section, values in env.items():
        merged = dict(data.get(section) or {})
        merged.update(values)
        data[section] = merged
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        where = ".".join(loc)
        source = origin.get((loc[0], loc[1])) if len(loc) >= 2 else None
        message = err["msg"].removeprefix("Value error, ")
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(
            f"invalid setting {where}: {message}" + (f" (from {source})" if source else "") + more
        ) from None
