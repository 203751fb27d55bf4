"""The committed JSON Schema is the one generated from the models, and it agrees with them."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from devices.contract import TELEMETRY_ADAPTER, json_schema, parse_topic, rejected_topic

SCHEMA_FILE = Path(__file__).parent.parent / "devices" / "schema" / "telemetry.schema.json"


def test_committed_schema_is_current() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema(), "run: ingest schema --out " + str(
        SCHEMA_FILE.relative_to(SCHEMA_FILE.parent.parent.parent)
    )


@pytest.mark.parametrize(
    ("doc", "valid"),
    [
        ({"ts": 1732600000123, "values": {"a": 1.5}}, True),
        ({"ts": "2024-11-26T05:46:40Z", "seq": 1, "values": {"a": 1}}, True),
        ({"samples": [{"ts": 1, "values": {"a": 1}}]}, True),
        ({"values": {"a": "1"}}, False),
        ({"values": {"a b": 1}}, False),
        ({"values": {}}, False),
        ({"samples": []}, False),
        ({"values": {"a": 1}, "x": 1}, False),
    ],
)
def test_schema_and_models_agree(doc: dict[str, object], valid: bool) -> None:
    validator = jsonschema.Draft202012Validator(json_schema())
    assert validator.is_valid(doc) is valid
    try:
        TELEMETRY_ADAPTER.validate_python(doc)
        model_valid = True
    except ValueError:
        model_valid = False
    assert model_valid is valid


def test_topics() -> None:
    parts = parse_topic("a/b", "a/b/s/l/d/telemetry")
    assert (parts.site, parts.line, parts.device, parts.kind) == ("s", "l", "d", "telemetry")
    assert (
        rejected_topic("factory", "factory/s/l/d/telemetry") == "factory/_rejected/s/l/d/telemetry"
    )
    assert (
        rejected_topic("factory", "factory/s 1/l/d/telemetry") == "factory/_rejected/_invalid_topic"
    )
