"""ingest.grafana.push against a fake Grafana.

Grafana cannot be installed here, so a small HTTP server in the test process plays it:
it answers the endpoints the push uses as Grafana's HTTP API does (404 for what does not
exist, 401 for a wrong token, the provisioning API's replace-whole-group semantics),
keeps what it was sent, and records every request. The tests check the requests (paths,
payloads, the bearer token) and what the fake Grafana holds afterwards.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from ingest.grafana import DATASOURCE_UID, alert_rules, dashboards, datasource
from ingest.grafana.push import PushError, PushResult, push
from tests.integration.mosquitto_proc import free_port

TOKEN = "glsa_test-token"
INFLUX: dict[str, Any] = {
    "database": "plant",
    "influx_url": "http://influxdb:8086",
    "influx_user": "grafana",
    "influx_password": "pw-influx",
}


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeGrafana:
    """What the fake Grafana holds, and what it was asked."""

    token: str = TOKEN
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    rule_groups: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    #: (method, path regex) -> status, to make one endpoint refuse
    refuse: dict[tuple[str, str], int] = field(default_factory=dict)
    next_id: int = 1

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        for (m, pattern), status in self.refuse.items():
            if m == method and re.fullmatch(pattern, path):
                return status, {"message": "refused by the test"}
        routes: list[tuple[str, str, Callable[..., tuple[int, Any]]]] = [
            ("GET", r"/api/datasources/uid/([^/]+)", self.get_datasource),
            ("POST", r"/api/datasources", self.create_datasource),
            ("PUT", r"/api/datasources/uid/([^/]+)", self.update_datasource),
            ("GET", r"/api/folders/([^/]+)", self.get_folder),
            ("POST", r"/api/folders", self.create_folder),
            ("PUT", r"/api/folders/([^/]+)", self.update_folder),
            ("POST", r"/api/dashboards/db", self.save_dashboard),
            ("PUT", r"/api/v1/provisioning/folder/([^/]+)/rule-groups/([^/]+)",
             self.put_rule_group),
        ]  # fmt: skip
        for m, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                args = [unquote(g) for g in match.groups()]
                return handler(*args, body) if body is not None else handler(*args)
        return 404, {"message": "Not found"}

    # --- data sources: /api/datasources -------------------------------------------------

    def get_datasource(self, uid: str) -> tuple[int, Any]:
        if uid not in self.datasources:
            return 404, {"message": "Data source not found"}
        return 200, self.datasources[uid]

    def create_datasource(self, body: dict[str, Any]) -> tuple[int, Any]:
        if any(d["name"] == body["name"] for d in self.datasources.values()):
            return 409, {"message": "data source with the same name already exists"}
        uid = body.get("uid") or f"gen{self.next_id}"
        stored = {**body, "uid": uid, "id": self.new_id(), "version": 1}
        self.datasources[uid] = stored
        return 200, {"datasource": stored, "id": stored["id"], "message": "Datasource added",
                     "name": body["name"]}  # fmt: skip

    def update_datasource(self, uid: str, body: dict[str, Any]) -> tuple[int, Any]:
        if uid not in self.datasources:
            return 404, {"message": "Data source not found"}
        old = self.datasources[uid]
        stored = {**body, "uid": uid, "id": old["id"], "version": old["version"] + 1}
        self.datasources[uid] = stored
        return 200, {"datasource": stored, "id": stored["id"], "message": "Datasource updated",
                     "name": body["name"]}  # fmt: skip

    # --- folders: /api/folders ------------------------------------------------------------

    def get_folder(self, uid: str) -> tuple[int, Any]:
        if uid not in self.folders:
            return 404, {"message": "folder not found", "status": "not-found"}
        return 200, self.folders[uid]

    def create_folder(self, body: dict[str, Any]) -> tuple[int, Any]:
        uid = body["uid"]
        if uid in self.folders:
            return 409, {"message": "a folder with the same uid already exists"}
        self.folders[uid] = {"uid": uid, "title": body["title"], "id": self.new_id(), "version": 1}
        return 200, self.folders[uid]

    def update_folder(self, uid: str, body: dict[str, Any]) -> tuple[int, Any]:
        if uid not in self.folders:
            return 404, {"message": "folder not found"}
        self.folders[uid] = {**self.folders[uid], "title": body["title"]}
        return 200, self.folders[uid]

    # --- dashboards: POST /api/dashboards/db ------------------------------------------------

    def save_dashboard(self, body: dict[str, Any]) -> tuple[int, Any]:
        dash = body["dashboard"]
        uid = dash["uid"]
        if body.get("folderUid") not in self.folders:
            return 400, {"message": "folder not found"}
        if uid in self.dashboards and not body.get("overwrite"):
            return 412, {"message": "A dashboard with the same uid already exists",
                         "status": "name-exists"}  # fmt: skip
        version = self.dashboards[uid]["version"] + 1 if uid in self.dashboards else 1
        self.dashboards[uid] = {"dashboard": dash, "folderUid": body["folderUid"],
                                "version": version}  # fmt: skip
        return 200, {"id": self.new_id(), "uid": uid, "status": "success", "version": version,
                     "url": f"/d/{uid}/x"}  # fmt: skip

    # --- alert rules: the provisioning API ----------------------------------------------------

    def put_rule_group(self, folder: str, group: str, body: dict[str, Any]) -> tuple[int, Any]:
        if folder not in self.folders:
            return 404, {"message": "folder does not exist"}
        if body.get("folderUid") != folder or body.get("title") != group:
            return 400, {"message": "group in the body differs from the path"}
        if not isinstance(body.get("interval"), int):
            return 400, {"message": "interval must be an integer number of seconds"}
        for rule in body["rules"]:
            missing = {"orgID", "folderUID", "ruleGroup", "title", "condition", "data",
                       "noDataState", "execErrState", "for"} - set(rule)  # fmt: skip
            if missing or rule["folderUID"] != folder or rule["ruleGroup"] != group:
                return 400, {"message": f"invalid rule: missing {sorted(missing)}"}
        self.rule_groups[(folder, group)] = body  # the group is replaced whole
        return 200, body


@dataclass
class Server:
    grafana: FakeGrafana
    url: str

    def requests(self, method: str | None = None) -> list[Request]:
        return [r for r in self.grafana.requests if method in (None, r.method)]

    def clear(self) -> None:
        self.grafana.requests.clear()


def make_handler(grafana: FakeGrafana, prefix: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            path = urlsplit(self.path).path
            grafana.requests.append(Request(self.command, path, dict(self.headers), body))
            if not path.startswith(prefix):
                status, answer = 404, {"message": "Not found"}
            elif self.headers.get("Authorization") != f"Bearer {grafana.token}":
                status, answer = 401, {"message": "invalid API key"}
            else:
                status, answer = grafana.handle(self.command, path[len(prefix) :], body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def do_PUT(self) -> None:
            self._serve()

    return Handler


def serve(prefix: str = "") -> Iterator[Server]:
    grafana = FakeGrafana()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(grafana, prefix))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(grafana, f"http://127.0.0.1:{httpd.server_address[1]}{prefix}")
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    yield from serve()


def do_push(server: Server, **kw: Any) -> PushResult:
    return push(server.url, kw.pop("token", TOKEN), **{**INFLUX, **kw})


# --- tests ------------------------------------------------------------------------------


def test_first_push_creates_everything(server: Server) -> None:
    result = do_push(server)
    g = server.grafana
    # Every request carries the service account token as a bearer token.
    assert server.requests()
    assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in server.requests())
    # The data source: created under its fixed uid, as the generator makes it.
    expected = datasource(database="plant", url="http://influxdb:8086", user="grafana",
                          password="pw-influx")  # fmt: skip
    (create,) = [r for r in server.requests("POST") if r.path == "/api/datasources"]
    assert create.body["uid"] == DATASOURCE_UID
    for key in ("name", "type", "url", "access", "jsonData", "secureJsonData"):
        if key in expected:
            assert create.body[key] == expected[key], key
    assert "version" not in create.body and "editable" not in create.body
    assert set(g.datasources) == {DATASOURCE_UID}
    # The folder, then the dashboards in it, saved with overwrite and without an id.
    assert [(f["uid"], f["title"]) for f in g.folders.values()] == [("factory-ingest",) * 2]
    saves = [r for r in server.requests("POST") if r.path == "/api/dashboards/db"]
    generated = dashboards()
    assert [s.body["dashboard"]["uid"] for s in saves] == [d["uid"] for d in generated]
    for save, dash in zip(saves, generated, strict=True):
        assert save.body["overwrite"] is True and save.body["folderUid"] == "factory-ingest"
        assert "id" not in save.body["dashboard"]
        assert save.body["dashboard"] == {k: v for k, v in dash.items() if k != "id"}
    # The alert rule groups, through the provisioning API, in the form it takes.
    doc = alert_rules()
    assert doc["apiVersion"] == 1
    names = [grp["name"] for grp in doc["groups"]]
    assert sorted(g.rule_groups) == sorted(("factory-ingest", n) for n in names)
    for grp in doc["groups"]:
        body = g.rule_groups[("factory-ingest", grp["name"])]
        assert isinstance(body["interval"], int) and body["interval"] > 0
        assert [r["uid"] for r in body["rules"]] == [r["uid"] for r in grp["rules"]]
        for sent, made in zip(body["rules"], grp["rules"], strict=True):
            assert sent["data"] == made["data"] and sent["condition"] == made["condition"]
            assert sent["folderUID"] == "factory-ingest" and sent["ruleGroup"] == grp["name"]
            assert "dashboardUid" not in sent and "panelId" not in sent
            if made.get("dashboardUid"):
                assert sent["annotations"]["__dashboardUid__"] == made["dashboardUid"]
    assert result == PushResult(url=server.url, datasource="created", folder="created",
                                dashboards=tuple(d["uid"] for d in generated),
                                rule_groups=tuple(names))  # fmt: skip
    assert "created" in result.summary()
    # Order: the folder exists before anything is put in it.
    paths = [r.path for r in server.requests() if r.method != "GET"]
    first_save = next(n for n, p in enumerate(paths) if p.startswith(("/api/dash", "/api/v1")))
    assert paths.index("/api/folders") < first_save


def test_second_push_updates_in_place(server: Server) -> None:
    do_push(server)
    g = server.grafana
    before = (dict(g.datasources), dict(g.folders), set(g.dashboards), set(g.rule_groups))
    server.clear()
    result = do_push(server, influx_password="pw-rotated")
    # The data source is updated by uid (not created again), with the new password.
    assert not [r for r in server.requests("POST") if r.path == "/api/datasources"]
    (update,) = [r for r in server.requests("PUT") if r.path.startswith("/api/datasources/")]
    assert update.path == f"/api/datasources/uid/{DATASOURCE_UID}"
    assert "pw-rotated" in json.dumps(update.body["secureJsonData"])
    assert g.datasources[DATASOURCE_UID]["version"] == 2
    # The folder exists with its title: left alone.
    assert not [r for r in server.requests() if r.path.startswith("/api/folders") and
                r.method != "GET"]  # fmt: skip
    # Dashboards are overwritten (new version), groups replaced; nothing is duplicated.
    assert all(d["version"] == 2 for d in g.dashboards.values())
    assert (set(g.datasources), set(g.folders), set(g.dashboards), set(g.rule_groups)) == (
        set(before[0]), set(before[1]), before[2], before[3])  # fmt: skip
    assert (result.datasource, result.folder) == ("updated", "unchanged")
    # A folder renamed in the UI gets its title back.
    g.folders["factory-ingest"]["title"] = "renamed"
    assert do_push(server).folder == "updated"
    assert g.folders["factory-ingest"]["title"] == "factory-ingest"


def test_wrong_token_is_a_clear_error(server: Server) -> None:
    with pytest.raises(PushError, match=r"refused the token \(401 Unauthorized\)"):
        do_push(server, token="glsa_wrong")
    g = server.grafana
    assert not (g.datasources or g.folders or g.dashboards or g.rule_groups)
    assert len(server.requests()) == 1  # stopped at the first refusal


def test_refusals_name_the_step(server: Server) -> None:
    server.grafana.refuse[("PUT", r"/api/v1/provisioning/.*")] = 403
    with pytest.raises(PushError, match=r"denied save alert rule group .*403.*Admin role"):
        do_push(server)
    server.grafana.refuse = {("POST", "/api/dashboards/db"): 500}
    with pytest.raises(PushError, match=r"save dashboard \S+ failed: .*500: refused by the test"):
        do_push(server)


def test_grafana_under_a_sub_path() -> None:
    for srv in serve("/grafana"):
        result = do_push(srv)
        assert result.datasource == "created"
        assert all(r.path.startswith("/grafana/api/") for r in srv.requests())


def test_unreachable_grafana() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PushError, match="cannot reach Grafana"):
        push(url, TOKEN, timeout=2, **INFLUX)


def test_arguments_are_checked(server: Server) -> None:
    with pytest.raises(ValueError, match="token"):
        do_push(server, token="")
    with pytest.raises(ValueError, match="uid"):
        do_push(server, folder="a folder/with slash")
    with pytest.raises(ValueError, match="URL"):
        push("grafana:3000", TOKEN, **INFLUX)
    assert server.requests() == []
