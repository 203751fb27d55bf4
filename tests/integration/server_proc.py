"""A server process of the tests' own: started, stopped, killed and restarted on fixed ports.

``ServerProcess`` holds what every private server needs: a temp directory with the
generated config and a log file, start-up that waits until the server answers,
SIGTERM / SIGKILL, restart on the same ports, and clean-up that never leaves a
process behind. Subclasses (``MosquittoProcess``, ``InfluxProcess``) say how to
configure, launch and probe their server.
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


class ServerProcess:
    """Lifecycle of one server process; subclasses provide the hooks below."""

    #: Used in messages and as the temp directory's prefix.
    name = "server"
    config_name = "server.conf"
    start_timeout = 10.0
    stop_timeout = 10.0

    def __init__(self, tmpdir: str | Path | None, *, host: str, binary: str | None) -> None:
        self._own_tmpdir = tmpdir is None
        self.tmpdir = (
            Path(tempfile.mkdtemp(prefix=f"{self.name}-")) if tmpdir is None else Path(tmpdir)
        )
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        if binary is None:
            raise FileNotFoundError(f"{self.name} binary not found")
        self.binary = binary
        self.config_path = self.tmpdir / self.config_name
        self.log_path = self.tmpdir / f"{self.name}.log"
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # -------------------------------------------------------------- hooks

    @property
    def main_port(self) -> int:
        """The port that is closed once the process is gone."""
        raise NotImplementedError

    def config_text(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """True once the server answers."""
        return port_open(self.host, self.main_port)

    def _prepare(self) -> None:
        """Before each start (create data directories and the like)."""

    def _close(self) -> None:
        """At clean-up, after the process is stopped."""

    # ----------------------------------------------------------------- info

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

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float | None = None) -> None:
        """Start the server and wait until it answers."""
        timeout = self.start_timeout if timeout is None else timeout
        if self.is_running():
            raise RuntimeError(f"{self.name} is already running")
        self._prepare()
        self.config_path.write_text(self.config_text())
        with self.log_path.open("ab") as log:
            log.write(f"--- start #{self.starts + 1} on port {self.main_port}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
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
                raise RuntimeError(
                    f"{self.name} exited at start-up; log:\n{self.log_text()[-4000:]}"
                )
            if self.ready():
                return
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(
            f"{self.name} did not answer on {self.host}:{self.main_port} within {timeout} s; "
            f"log:\n{self.log_text()[-4000:]}"
        )

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (a clean shutdown); SIGKILL after ``timeout``.

        Returns the exit status, or None when it was not running.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5.0)
        self._wait_port_closed(timeout=5.0)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5.0)
        self._wait_port_closed(timeout=5.0)

    def restart(self, down_s: float = 0.0, timeout: float | None = None) -> None:
        """Stop cleanly, stay down for ``down_s`` seconds, start again on the same ports."""
        self.stop(timeout=timeout)
        if down_s > 0:
            time.sleep(down_s)
        self.start(timeout=timeout)

    def _wait_port_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and port_open(self.host, self.main_port, timeout=0.05):
            time.sleep(0.02)

    def cleanup(self) -> None:
        """Stop the server and remove the temp directory if this object made it."""
        try:
            self.stop()
        finally:
            self._close()
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
        # Last resort: never leave a server behind if a test forgot to stop it.
        with contextlib.suppress(Exception):
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
