"""InfluxDB sinks: the v1 HTTP API (``/write``) and the v2 API (``/api/v2/write``)."""

from __future__ import annotations

import gzip
import logging
from urllib.parse import urlencode

import urllib3

from ingest.sinks.base import LineBatch, WriteError, parse_retry_after

log = logging.getLogger(__name__)

#: The server refused the content itself: retrying the same body cannot help, splitting it can.
#: Every other failure (network, 5xx, 429, and 401/403/404, which an operator fixes) is retried.
CONTENT_ERRORS = {400, 413, 422}


def _body(lines: LineBatch, use_gzip: bool) -> tuple[bytes, dict[str, str]]:
    raw = lines.body()
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    if use_gzip:
        headers["Content-Encoding"] = "gzip"
        return gzip.compress(raw, compresslevel=1), headers
    return raw, headers


class InfluxV1Sink:
    """InfluxDB 1.x ``/write`` (also InfluxDB 3's v1 compatibility endpoint)."""

    name = "influxdb-v1"

    def __init__(
        self,
        url: str,
        database: str,
        *,
        retention_policy: str = "",
        username: str | None = None,
        password: str | None = None,
        use_gzip: bool = True,
        timeout: float = 10.0,
        create_database: bool = True,
    ) -> None:
        self.url = url.rstrip("/")
        self.database = database
        self.retention_policy = retention_policy
        self.use_gzip = use_gzip
        self.create_database = create_database
        self._auth = (
            urllib3.make_headers(basic_auth=f"{username}:{password or ''}") if username else {}
        )
        self._http = urllib3.PoolManager(
            num_pools=2,
            maxsize=4,
            timeout=urllib3.Timeout(connect=min(timeout, 5.0), read=timeout),
            retries=False,
        )
        params = {"db": database, "precision": "ms"}
        if retention_policy:
            params["rp"] = retention_policy
        self._write_url = f"{self.url}/write?{urlencode(params)}"

    def open(self) -> None:
        if self.create_database:
            self._create()

    def _create(self) -> None:
        """CREATE DATABASE (idempotent in InfluxDB 1.x). Without admin rights it fails,
        which is fine when the database exists. An unreachable server is not fatal here:
        ingest starts anyway (and spools), and the database is created on the first
        write that finds it missing."""
        query = urlencode({"q": f'CREATE DATABASE "{self.database}"'})
        try:
            resp = self._http.request("POST", f"{self.url}/query?{query}", headers=self._auth)
        except urllib3.exceptions.HTTPError as exc:
            log.warning(
                "InfluxDB at %s unreachable at start (%s): writes will retry", self.url, exc
            )
            return
        if resp.status >= 300:
            log.warning(
                "could not create database %r (%s): %s",
                self.database,
                resp.status,
                resp.data[:200].decode("utf-8", "replace"),
            )

    def write(self, lines: LineBatch) -> None:
        body, headers = _body(lines, self.use_gzip)
        headers.update(self._auth)
        try:
            resp = self._http.request("POST", self._write_url, body=body, headers=headers)
        except urllib3.exceptions.HTTPError as exc:
            raise WriteError(f"InfluxDB write failed: {exc}", retryable=True) from None
        if resp.status in {200, 204}:
            return
        text = resp.data[:2000].decode("utf-8", "replace").strip()
        if resp.status == 404 and self.create_database and "database not found" in text:
            self._create()  # the retry that follows finds it
        raise WriteError(
            f"InfluxDB refused the write ({resp.status}): {text}",
            retryable=resp.status not in CONTENT_ERRORS,
            status=resp.status,
            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
        )

    def close(self) -> None:
        self._http.clear()


class InfluxV2Sink:
    """``/api/v2/write`` through the official ``influxdb-client`` (InfluxDB 2.x, 3.x, 1.8+)."""

    name = "influxdb-v2"

    def __init__(
        self,
        url: str,
        *,
        bucket: str,
        org: str,
        token: str,
        use_gzip: bool = True,
        timeout: float = 10.0,
    ) -> None:
        from influxdb_client import InfluxDBClient, WritePrecision
        from influxdb_client.client.write_api import SYNCHRONOUS

        self.url = url.rstrip("/")
        self.bucket = bucket
        self.org = org
        self._precision = WritePrecision.MS
        self._client = InfluxDBClient(
            url=self.url, token=token, org=org, enable_gzip=use_gzip, timeout=int(timeout * 1000)
        )
        self._api = self._client.write_api(write_options=SYNCHRONOUS)

    def open(self) -> None:
        pass

    def write(self, lines: LineBatch) -> None:
        from influxdb_client.rest import ApiException

        try:
            self._api.write(
                bucket=self.bucket,
                org=self.org,
                record=lines.body(),
                write_precision=self._precision,
            )
        except ApiException as exc:
            status = int(exc.status) if exc.status else None
            body = exc.body or b""
            text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
            headers: dict[str, str] = exc.headers or {}
            raise WriteError(
                f"InfluxDB refused the write ({status}): {text[:2000].strip()}",
                retryable=status not in CONTENT_ERRORS,
                status=status,
                retry_after=parse_retry_after(headers.get("Retry-After")),
            ) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise WriteError(f"InfluxDB write failed: {exc}", retryable=True) from None

    def close(self) -> None:
        self._api.close()
        self._client.close()
