"""A private InfluxDB 1.x (``influxd``) for integration tests that stop and start the database.

``InfluxProcess`` writes a config into its own temp directory (meta, data and WAL
there too), with the HTTP API and the RPC ``bind-address`` on free loopback ports
and usage reporting off. ``stop`` sends SIGTERM, ``kill`` SIGKILL, and ``start``
brings it back on the same ports with the same data. Use it as a context manager
or call ``cleanup`` in a ``finally``.

    with InfluxProcess(tmp_path / "influx") as influx:
        influx.url          # http://127.0.0.1:<port>
        influx.stop()       # an outage
        influx.start()      # same ports, same data

``find_influxd`` / ``require_influxd`` locate the binary (``$INFLUXD_BIN``,
``/usr/bin/influxd``, then ``$PATH``); the latter skips the calling test when it is
missing, or fails it when the environment variable ``CI`` is ``"true"``.
"""

from __future__ import annotations

from pathlib import Path

import urllib3

from tests.integration.server_proc import ServerProcess, find_binary, free_port, require_binary

REPO = Path(__file__).resolve().parents[2]
DEFAULT_LOCATIONS = ("/usr/bin/influxd", "/usr/local/bin/influxd")


def find_influxd() -> str | None:
    """Path of the influxd binary, or None."""
    return find_binary("influxd", "INFLUXD_BIN", DEFAULT_LOCATIONS)


def require_influxd() -> str:
    """The influxd binary; skip the test without it (fail instead when CI=true)."""
    return require_binary("influxd", "INFLUXD_BIN", DEFAULT_LOCATIONS, "influxdb 1.x")


class InfluxProcess(ServerProcess):
    """One ``influxd`` with its data in ``tmpdir``, HTTP on ``host:http_port``."""

    name = "influxd"
    config_name = "influxdb.conf"
    start_timeout = 30.0
    stop_timeout = 15.0

    def __init__(
        self,
        tmpdir: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        rpc_port: int | None = None,
        binary: str | None = None,
    ) -> None:
        super().__init__(tmpdir, host=host, binary=binary or find_influxd())
        self.http_port = http_port if http_port is not None else free_port(host)
        rpc = rpc_port if rpc_port is not None else free_port(host)
        while rpc == self.http_port:
            rpc = free_port(host)
        self.rpc_port = rpc
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=0.5, read=2.0), retries=False
        )

    @property
    def main_port(self) -> int:
        return self.http_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def command(self) -> list[str]:
        return [self.binary, "-config", str(self.config_path)]

    def ready(self) -> bool:
        return self.ping()

    def ping(self) -> bool:
        """True when ``/ping`` answers 204."""
        try:
            return self._http.request("GET", f"{self.url}/ping").status == 204
        except urllib3.exceptions.HTTPError:
            return False

    def _prepare(self) -> None:
        for sub in ("meta", "data", "wal"):
            (self.tmpdir / sub).mkdir(exist_ok=True)

    def _close(self) -> None:
        self._http.clear()

    def config_text(self) -> str:
        template = (REPO / "scripts" / "influxdb.conf.template").read_text()
        values = {
            "DIR": str(self.tmpdir),
            "HOST": self.host,
            "HTTP_PORT": str(self.http_port),
            "RPC_PORT": str(self.rpc_port),
            "LOG_LEVEL": "warn",
        }
        for key, value in values.items():
            template = template.replace(f"@{key}@", value)
        return template
