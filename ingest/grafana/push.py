"""Provision the data source, dashboards and alert rules into a running Grafana.

The compose stack loads them from files (``grafana/provisioning/``); this pushes the
same objects, from the same generator (:mod:`ingest.grafana`), into a Grafana that
already exists, over its HTTP API with a service account token (role Admin: data
sources and alert rules need it).

Everything is addressed by uid, so pushing again updates what the last push made:

- the data source (uid :data:`ingest.grafana.DATASOURCE_UID`): created, or updated in
  place;
- the folder (uid ``folder``, titled the same): created when missing;
- each dashboard: saved into that folder with ``overwrite``, replacing the one with
  its uid;
- each alert rule group: replaced whole through the alerting provisioning API
  (``PUT /api/v1/provisioning/folder/<folder>/rule-groups/<group>``), which creates
  the group and its rules the first time.

Objects that the generator no longer makes are left in Grafana. What Grafana itself
provisions from files (the compose stack's Grafana does, from ``grafana/provisioning``)
is read-only through the API and refuses the update: push into a Grafana that does not
load these files. The data source is pushed as generated, ``isDefault`` included, so it
becomes that Grafana's default data source.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaException

from ingest.grafana import DATASOURCE_UID, FOLDER, alert_rules, dashboards, datasource

__all__ = ["PushError", "PushResult", "push"]

#: Keys of the provisioning-file form of a data source that the HTTP API has no use for;
#: ``version`` would even make Grafana refuse an update of a newer data source.
_FILE_ONLY_DATASOURCE_KEYS = frozenset({"orgId", "version", "editable"})
_UID_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_DURATION_RE = re.compile(r"(\d+)(ms|s|m|h|d|w)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MESSAGE = "factory-ingest: ingest.grafana.push"


class PushError(RuntimeError):
    """Grafana could not be reached or refused a request; the message says which and why."""


@dataclass(frozen=True)
class PushResult:
    """What one push did."""

    url: str
    datasource: Literal["created", "updated"]
    folder: Literal["created", "updated", "unchanged"]
    #: uids of the dashboards saved
    dashboards: tuple[str, ...]
    #: names of the alert rule groups saved, all in ``folder``
    rule_groups: tuple[str, ...]

    def summary(self) -> str:
        return (
            f"{self.url}: data source {DATASOURCE_UID} {self.datasource}, "
            f"folder {self.folder}, {len(self.dashboards)} dashboard(s) and "
            f"{len(self.rule_groups)} alert rule group(s) saved"
        )


def push(
    url: str,
    token: str,
    *,
    database: str,
    influx_url: str,
    influx_user: str,
    influx_password: str,
    folder: str = FOLDER,
    timeout: float = 10.0,
) -> PushResult:
    """Create or update the data source, folder, dashboards and alert rules in Grafana.

    ``url`` is Grafana's base URL (``https://grafana.example:3000``, a sub-path allowed),
    ``token`` a service account token (sent as a bearer token). ``database``,
    ``influx_url``, ``influx_user`` and ``influx_password`` describe the InfluxQL data
    source as :func:`ingest.grafana.datasource` does. ``folder`` is the uid and title of
    the folder that holds the dashboards and the alert rules.

    Raises :class:`PushError` when Grafana is unreachable or refuses a step (a wrong
    token: 401), :class:`ValueError` for arguments that cannot work.
    """
    if not token:
        raise ValueError("a Grafana service account token is required")
    if not _UID_RE.match(folder):
        raise ValueError(f"folder {folder!r} is not a Grafana uid: 1-40 of A-Z a-z 0-9 _ -")
    api = _client(url, token, timeout)

    ds = {
        k: v
        for k, v in datasource(
            database=database, url=influx_url, user=influx_user, password=influx_password
        ).items()
        if k not in _FILE_ONLY_DATASOURCE_KEYS
    }
    ds_uid = str(ds.setdefault("uid", DATASOURCE_UID))
    ds_state: Literal["created", "updated"]
    if _exists(url, f"data source {ds_uid}", partial(api.datasource.get_datasource_by_uid, ds_uid)):
        _call(url, f"update data source {ds_uid}",
              partial(api.datasource.update_datasource_by_uid, ds_uid, ds))  # fmt: skip
        ds_state = "updated"
    else:
        _call(url, f"create data source {ds_uid}", partial(api.datasource.create_datasource, ds))
        ds_state = "created"

    folder_state: Literal["created", "updated", "unchanged"] = "unchanged"
    current = _exists(url, f"folder {folder}", partial(api.folder.get_folder, folder))
    if current is None:
        _call(url, f"create folder {folder}", partial(api.folder.create_folder, folder, uid=folder))
        folder_state = "created"
    elif current.get("title") != folder:
        _call(url, f"rename folder {folder}",
              partial(api.folder.update_folder, folder, title=folder, overwrite=True))  # fmt: skip
        folder_state = "updated"

    saved: list[str] = []
    for dash in dashboards():
        body = {k: v for k, v in dash.items() if k != "id"}  # Grafana matches on the uid
        uid = str(body["uid"])
        payload = {"dashboard": body, "folderUid": folder, "overwrite": True, "message": _MESSAGE}
        _call(url, f"save dashboard {uid}", partial(api.dashboard.update_dashboard, payload))
        saved.append(uid)

    groups: list[str] = []
    for group in alert_rules().get("groups") or []:
        name = str(group["name"])
        save = partial(api.alertingprovisioning.update_rule_group,
                       folder, quote(name, safe=""), _rule_group(group, folder))  # fmt: skip
        _call(url, f"save alert rule group {name!r}", save)
        groups.append(name)

    return PushResult(url=url, datasource=ds_state, folder=folder_state,
                      dashboards=tuple(saved), rule_groups=tuple(groups))  # fmt: skip


def _client(url: str, token: str, timeout: float) -> Any:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Grafana URL {url!r} must be http(s)://host[:port][/path]")
    path = parts.path.strip("/")
    return GrafanaApi(
        auth=token,  # a str: sent as "Authorization: Bearer <token>"
        host=parts.hostname,
        port=parts.port,
        url_path_prefix=f"{path}/" if path else "",
        protocol=parts.scheme,
        timeout=timeout,
    )


def _error(url: str, step: str, exc: Exception) -> PushError:
    if isinstance(exc, GrafanaException):
        if exc.status_code == 401:
            return PushError(
                f"Grafana at {url} refused the token (401 Unauthorized) at: {step}; "
                "check the service account token"
            )
        if exc.status_code == 403:
            return PushError(
                f"Grafana at {url} denied {step} (403 Forbidden): "
                "the service account needs the Admin role"
            )
        return PushError(f"Grafana at {url}: {step} failed: {exc.message}")
    return PushError(f"cannot reach Grafana at {url} ({step}): {exc}")


def _call(url: str, step: str, request: Callable[[], Any]) -> Any:
    """Run one API request; what goes wrong becomes a :class:`PushError`."""
    try:
        return request()
    # requests' connection errors and timeouts are OSErrors.
    except (GrafanaException, OSError) as exc:
        raise _error(url, step, exc) from None


def _exists(url: str, step: str, request: Callable[[], Any]) -> dict[str, Any] | None:
    """The object a GET returns, or None when Grafana answers 404."""
    try:
        found = request()
    except (GrafanaException, OSError) as exc:
        if isinstance(exc, GrafanaException) and exc.status_code == 404:
            return None
        raise _error(url, f"look up {step}", exc) from None
    return dict(found) if isinstance(found, Mapping) else {}


def _seconds(value: object) -> int:
    """A group interval: seconds, or a duration such as "1m" or "1m30s"."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip()
        if not re.fullmatch(r"(\d+(ms|s|m|h|d|w))+", text):
            raise ValueError(f"alert rule group interval {value!r} is not a duration")
        seconds = sum(int(n) * _DURATION_UNITS[u] for n, u in _DURATION_RE.findall(text))
    if seconds < 1 or seconds != int(seconds):
        raise ValueError(f"alert rule group interval {value!r} is not a whole number of seconds")
    return int(seconds)


def _rule_group(group: Mapping[str, Any], folder: str) -> dict[str, Any]:
    """A group of the provisioning file format (``groups:`` of an alerting file) in the
    form of the provisioning HTTP API: interval in seconds, and on every rule the
    folder, group and org it belongs to; dashboardUid/panelId become the annotations
    the API keeps them in."""
    name = str(group["name"])
    org_id = int(group.get("orgId", 1))
    rules = []
    for rule in group.get("rules") or []:
        out = {k: v for k, v in rule.items() if k not in ("dashboardUid", "panelId")}
        annotations = {str(k): str(v) for k, v in (rule.get("annotations") or {}).items()}
        if rule.get("dashboardUid"):
            annotations["__dashboardUid__"] = str(rule["dashboardUid"])
        if rule.get("panelId") is not None:
            annotations["__panelId__"] = str(rule["panelId"])
        if annotations:
            out["annotations"] = annotations
        out.update(folderUID=folder, ruleGroup=name, orgID=org_id)
        rules.append(out)
    return {
        "title": name,
        "folderUid": folder,
        "interval": _seconds(group.get("interval", "1m")),
        "rules": rules,
    }
