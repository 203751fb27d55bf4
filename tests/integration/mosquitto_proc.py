"""A private mosquitto broker for integration tests.

``MosquittoProcess`` starts ``mosquitto`` on a free loopback port with its own
config, persistence directory and log file, and can stop (SIGTERM: a clean
shutdown that writes the persistence database), kill (SIGKILL: a crash) and
restart it on the same port. Use it as a context manager or call ``stop`` in a
``finally``; it never outlives the test process by more than its timeouts.

    with MosquittoProcess(tmp_path / "broker") as broker:
        client.connect("127.0.0.1", broker.port)
        broker.restart(down_s=3.0)

``find_mosquitto`` / ``require_mosquitto`` locate the binary (``$MOSQUITTO_BIN``,
``/usr/sbin/mosquitto``, then ``$PATH``); the latter skips the calling test when
it is missing, or fails it when the environment variable ``CI`` is ``"true"``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tests.integration.server_proc import (
    ServerProcess,
    find_binary,
    free_port,
    port_open,
    require_binary,
)

__all__ = ["MosquittoProcess", "find_mosquitto", "free_port", "port_open", "require_mosquitto"]

DEFAULT_LOCATIONS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None."""
    return find_binary("mosquitto", "MOSQUITTO_BIN", DEFAULT_LOCATIONS)


def require_mosquitto() -> str:
    """The mosquitto binary; skip the test without it (fail instead when CI=true)."""
    return require_binary("mosquitto", "MOSQUITTO_BIN", DEFAULT_LOCATIONS, "mosquitto")


class MosquittoProcess(ServerProcess):
    """One mosquitto broker on ``host:port`` with persistence in ``tmpdir``.

    ``extra_config`` lines are appended to the generated config (later lines win
    for single-valued options). The defaults keep every queued message for a
    persistent session: ``persistence true``, ``max_queued_messages 0`` (no
    limit), ``autosave_interval 0`` (write the database only at shutdown, which
    SIGTERM triggers). ``stop`` is a clean shutdown that writes the persistence
    database; ``kill`` is a crash that writes nothing.
    """

    name = "mosquitto"
    config_name = "mosquitto.conf"

    def __init__(
        self,
        tmpdir: str | Path | None = None,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        extra_config: Sequence[str] = (),
        persistence: bool = True,
        binary: str | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(tmpdir, host=host, binary=binary or find_mosquitto())
        self.port = port if port is not None else free_port(host)
        self.extra_config = list(extra_config)
        self.persistence = persistence
        self.verbose = verbose

    @property
    def main_port(self) -> int:
        return self.port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %H:%M:%S",
            "max_queued_messages 0",
        ]
        if self.verbose:
            lines.append("log_type all")
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.tmpdir}/",
                "autosave_interval 0",
            ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # As root, mosquitto 2 drops privileges to "mosquitto"/"nobody", which
            # could not write the persistence database into our temp directory.
            lines.append("user root")
        return "\n".join([*lines, *self.extra_config]) + "\n"
