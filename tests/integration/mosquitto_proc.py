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

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

DEFAULT_LOCATIONS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_binary(name: str, env_var: str, locations: Sequence[str]) -> str | None:
    """Path of a server binary: ``$env_var``, then ``locations``, then ``$PATH``; or None."""
    env = os.environ.get(env_var)
    if env:
        return env if os.access(env, os.X_OK) else None
    for candidate in locations:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which(name)


def require_binary(name: str, env_var: str, locations: Sequence[str], package: str) -> str:
    """The binary; skip the calling test without it (fail instead when CI=true)."""
    import pytest  # imported here so the module stays usable outside pytest

    binary = find_binary(name, env_var, locations)
    if binary is None:
        reason = f"{name} binary not found (install {package} or set {env_var})"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI=true requires it", pytrace=False)
        pytest.skip(reason)
    return binary


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None."""
    return find_binary("mosquitto", "MOSQUITTO_BIN", DEFAULT_LOCATIONS)


def require_mosquitto() -> str:
    """The mosquitto binary; skip the test without it (fail instead when CI=true)."""
    return require_binary("mosquitto", "MOSQUITTO_BIN", DEFAULT_LOCATIONS, "mosquitto")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class MosquittoProcess:
    """One mosquitto broker on ``host:port`` with persistence in ``tmpdir``.

    ``extra_config`` lines are appended to the generated config (later lines win
    for single-valued options). The defaults keep every queued message for a
    persistent session: ``persistence true``, ``max_queued_messages 0`` (no
    limit), ``autosave_interval 0`` (write the database only at shutdown, which
    SIGTERM triggers).
    """

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
        self._own_tmpdir = tmpdir is None
        self.tmpdir = (
            Path(tempfile.mkdtemp(prefix="mosquitto-")) if tmpdir is None else Path(tmpdir)
        )
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.extra_config = list(extra_config)
        self.persistence = persistence
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise FileNotFoundError("mosquitto binary not found")
        self.verbose = verbose
        self.config_path = self.tmpdir / "mosquitto.conf"
        self.log_path = self.tmpdir / "mosquitto.log"
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # ----------------------------------------------------------------- info

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

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

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until it accepts TCP connections."""
        if self.is_running():
            raise RuntimeError("mosquitto is already running")
        assert self.binary is not None
        self.config_path.write_text(self.config_text())
        with self.log_path.open("ab") as log:
            log.write(f"--- start #{self.starts + 1} on port {self.port}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"mosquitto exited at start-up; log:\n{self.log_text()[-4000:]}")
            if port_open(self.host, self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(
            f"mosquitto did not listen on {self.host}:{self.port} within {timeout} s; "
            f"log:\n{self.log_text()[-4000:]}"
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (clean shutdown, persistence written); SIGKILL after ``timeout``.

        Returns the exit status, or None when it was not running.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5.0)
        self._wait_port_closed(timeout=5.0)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash; nothing is written to the persistence database."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5.0)

    def restart(self, down_s: float = 0.0, timeout: float = 10.0) -> None:
        """Stop cleanly, stay down for ``down_s`` seconds, start again on the same port."""
        self.stop(timeout=timeout)
        if down_s > 0:
            time.sleep(down_s)
        self.start(timeout=timeout)

    def _wait_port_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and port_open(self.host, self.port, timeout=0.05):
            time.sleep(0.02)

    def cleanup(self) -> None:
        """Stop the broker and remove the temp directory if this object made it."""
        try:
            self.stop()
        finally:
            if self._own_tmpdir:
                shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> Self:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __del__(self) -> None:
        # Last resort: never leave a broker behind if a test forgot to stop it.
        with contextlib.suppress(Exception):
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
