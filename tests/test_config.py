"""Configuration: TOML + environment, and one clear line for a wrong setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.config import ConfigError, env_variables, load_settings


def test_defaults_and_env_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "ingest.toml"
    cfg.write_text('[mqtt]\nclient_id = "from-file"\n[influx]\nbatch_size = 10\n')
    s = load_settings(
        cfg,
        environ={
            "INGEST_CLIENT_ID": "from-env",
            "INGEST_TOPIC_PREFIX": "a/b",
            "INGEST_INFLUX_URL": "http://db:8086/",
        },
    )
    assert s.mqtt.client_id == "from-env"
    assert s.mqtt.topic_prefix == "a/b"
    assert s.influx.batch_size == 10
    assert s.influx.url == "http://db:8086"


def test_secret_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    s = load_settings(environ={"INGEST_INFLUX_TOKEN_FILE": str(secret)})
    assert s.influx.token == "s3cret"


@pytest.mark.parametrize(
    ("environ", "words"),
    [
        ({"INGEST_INFLUX_API": "v3"}, "influx.api"),
        ({"INGEST_MQTT_URL": "http://x"}, "mqtt://"),
        ({"INGEST_INFLUX_URL": "db:8086"}, "http://"),
        ({"INGEST_INFLUX_URL": "http://db", "INGEST_INFLUX_API": "v2"}, "token"),
        ({"INGEST_PROCESSING_WINDOWS": "3"}, "unknown setting processing.windows"),
        ({"INGEST_INFLUX_BATCH_SIZE": "many"}, "INGEST_INFLUX_BATCH_SIZE"),
        ({"INGEST_TOPIC_PREFIX": "a/+"}, "prefix"),
        ({"INGEST_PROCESSING_WARMUP": "500"}, "warmup"),
    ],
)
def test_wrong_settings_give_one_line(environ: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=environ)
    message = str(info.value)
    assert "\n" not in message
    assert words in message


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, environ={})


def test_every_setting_has_an_environment_variable() -> None:
    names = {var for var, _, _ in env_variables()}
    for required in [
        "INGEST_MQTT_URL",
        "INGEST_INFLUX_URL",
        "INGEST_INFLUX_API",
        "INGEST_INFLUX_DATABASE",
        "INGEST_INFLUX_USERNAME",
        "INGEST_INFLUX_PASSWORD",
        "INGEST_INFLUX_BUCKET",
        "INGEST_INFLUX_ORG",
        "INGEST_INFLUX_TOKEN",
    ]:
        assert required in names


REPO = Path(__file__).resolve().parent.parent


def test_example_config_loads() -> None:
    settings = load_settings(REPO / "ingest.example.toml", environ={})
    assert settings.influx.url == "http://127.0.0.1:8086"


def test_readme_documents_every_variable() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [var for var, _, _ in env_variables() if f"`{var}`" not in readme]
    assert not missing, f"README.md does not document {missing}"
