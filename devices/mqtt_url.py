"""``mqtt://user:pass@host:port`` URLs, shared by the service, the simulator and the gateway."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

DEFAULT_PORTS = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}


@dataclass(frozen=True, slots=True)
class MqttUrl:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    def redacted(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}:***@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttUrl:
    """Parse ``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://…``.

    Raises ValueError with a reason."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(
            f"MQTT URL must start with mqtt:// or mqtts://, got {url.split('://', maxsplit=1)[0]!r}"
        )
    if not parts.hostname:
        raise ValueError("MQTT URL has no host")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise ValueError(f"MQTT URL has an invalid port: {exc}") from None
    if parts.path not in ("", "/"):
        raise ValueError("MQTT URL takes no path")
    return MqttUrl(
        host=parts.hostname,
        port=port,
        tls=scheme in ("mqtts", "ssl"),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def make_client(
    url: MqttUrl,
    client_id: str,
    *,
    protocol: Literal["3.1.1", "5"] = "5",
    clean: bool = True,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    insecure_tls: bool = False,
    manual_ack: bool = False,
) -> mqtt.Client:
    """A paho-mqtt 2.x client set up for ``url`` (credentials, TLS); not yet connected.

    ``clean=False`` asks for a persistent session (3.1.1 clean_session=0; for v5 the
    caller passes clean_start=False and a session expiry to ``connect``).
    """
    v5 = protocol == "5"
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else clean,
        manual_ack=manual_ack,
    )
    if url.username:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        context = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
        if insecure_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        client.tls_set_context(context)
    return client
