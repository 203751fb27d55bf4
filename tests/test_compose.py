"""The Docker deployment, checked without Docker.

No Docker engine is needed: docker-compose.yml is parsed and checked against the rules
of the Compose specification that this project relies on (keys, references, volumes,
healthchecks, interpolation) and against the project's own rules (secrets only from
.env, ports on 127.0.0.1 by default, ``ingest run`` as the service). The Dockerfile
is read instruction by instruction; its HEALTHCHECK and build-time warm-up commands are
run here. The shell scripts run in a scratch copy of the repository. The broker tests
(``services``) run the real mosquitto binary with mosquitto/mosquitto.conf and
mosquitto/acl, changed only in paths and port.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ingest.cli import build_parser
from ingest.config import load_settings
from ingest.metrics import HealthServer, Metrics
from ingest.sinks.lineprotocol import TELEMETRY
from tests.integration.mosquitto_proc import MosquittoProcess, free_port, require_mosquitto

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
MOSQUITTO_CONF = REPO / "mosquitto" / "mosquitto.conf"
MOSQUITTO_ACL = REPO / "mosquitto" / "acl"
INIT_SECRETS = REPO / "scripts" / "init-secrets.sh"
ADD_DEVICE = REPO / "scripts" / "add-device.sh"
GRAFANA_PROVISIONING = REPO / "grafana" / "provisioning"

#: Bind-mounted files that are generated on the deployment host, never committed.
GENERATED_FILES = {"mosquitto/passwd"}
SERVICES = {"mosquitto", "influxdb", "grafana", "ingest", "simulator"}
SERVICE_LOGINS = ("ingest", "simulator", "healthcheck")
NOT_AUTHORIZED = 135

# --- what the Compose specification allows (the parts this project uses or may mistype)

TOP_LEVEL_KEYS = {"name", "services", "networks", "volumes", "secrets", "configs", "include"}
SERVICE_KEYS = {
    "annotations", "attach", "blkio_config", "build", "cap_add", "cap_drop", "cgroup",
    "cgroup_parent", "command", "configs", "container_name", "cpu_count", "cpu_percent",
    "cpu_period", "cpu_quota", "cpu_rt_period", "cpu_rt_runtime", "cpu_shares", "cpus",
    "cpuset", "credential_spec", "depends_on", "deploy", "develop", "device_cgroup_rules",
    "devices", "dns", "dns_opt", "dns_search", "domainname", "entrypoint", "env_file",
    "environment", "expose", "extends", "external_links", "extra_hosts", "group_add",
    "healthcheck", "hostname", "image", "init", "ipc", "isolation", "labels", "links",
    "logging", "mac_address", "mem_limit", "mem_reservation", "mem_swappiness",
    "memswap_limit", "network_mode", "networks", "oom_kill_disable", "oom_score_adj", "pid",
    "pids_limit", "platform", "ports", "privileged", "profiles", "pull_policy", "read_only",
    "restart", "runtime", "scale", "secrets", "security_opt", "shm_size", "stdin_open",
    "stop_grace_period", "stop_signal", "storage_opt", "sysctls", "tmpfs", "tty", "ulimits",
    "user", "userns_mode", "uts", "volumes", "volumes_from", "working_dir",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval",
                    "disable"}  # fmt: skip
VOLUME_MOUNT_KEYS = {"type", "source", "target", "read_only", "bind", "volume", "tmpfs",
                     "consistency"}  # fmt: skip
BIND_KEYS = {"propagation", "create_host_path", "selinux"}
DEPENDS_ON_KEYS = {"condition", "restart", "required"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART_RE = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
DURATION_RE = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


# --- helpers ---------------------------------------------------------------------------


class MissingVariableError(KeyError):
    """A ``${VAR:?message}`` whose variable is unset or empty."""


_DOLLAR = re.compile(r"\$(?:(?P<esc>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_]\w*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_]\w*)(?:(?P<colon>:?)(?P<op>[-?+])(?P<arg>.*))?", re.S)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation of one string value."""

    def replace(m: re.Match[str]) -> str:
        if m["esc"]:
            return "$"
        if m["named"]:
            return env.get(m["named"], "")
        b = _BRACED.fullmatch(m["braced"])
        if b is None or "${" in m["braced"]:
            raise ValueError(f"unsupported interpolation ${{{m['braced']}}}")
        value = env.get(b["name"])
        missing = value is None or (b["colon"] == ":" and value == "")
        if b["op"] == "-":
            return b["arg"] if missing else str(value)
        if b["op"] == "?":
            if missing:
                raise MissingVariableError(f"{b['name']}: {b['arg']}")
            return str(value)
        if b["op"] == "+":
            return "" if missing else b["arg"]
        return value or ""

    return _DOLLAR.sub(replace, text)


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)


def variables(node: Any) -> dict[str, set[str]]:
    """Variable name -> the forms it is used in ('', ':-', ':?', ...)."""
    found: dict[str, set[str]] = {}
    for text in strings(node):
        for m in _DOLLAR.finditer(text):
            if m["named"]:
                found.setdefault(m["named"], set()).add("")
            elif m["braced"] is not None:
                b = _BRACED.fullmatch(m["braced"])
                assert b is not None, m["braced"]
                found.setdefault(b["name"], set()).add((b["colon"] or "") + (b["op"] or ""))
    return found


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"{path.name}:{n}: {line!r}"
        assert key not in env, f"{path.name}:{n}: {key} set twice"
        env[key] = value
    return env


def is_secret(name: str) -> bool:
    return name.endswith(("_PASSWORD", "_TOKEN"))


def filled_env() -> dict[str, str]:
    """.env.example with a dummy value for every empty secret, as init-secrets.sh would."""
    env = read_env_file(ENV_EXAMPLE)
    return {k: (v or f"dummy-{k.lower().replace('_', '-')}") for k, v in env.items()}


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    svcs: dict[str, dict[str, Any]] = load_compose()["services"]
    return svcs


def resolved_services() -> dict[str, dict[str, Any]]:
    svcs: dict[str, dict[str, Any]] = interpolate_tree(load_compose(), filled_env())["services"]
    return svcs


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Volume entries of a service in the long syntax."""
    out = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            out.append(entry)
            continue
        parts = entry.split(":")
        assert 2 <= len(parts) <= 3, f"volume entry {entry!r}"
        source, target = parts[0], parts[1]
        mode = parts[2] if len(parts) == 3 else "rw"
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        out.append({"type": kind, "source": source, "target": target,
                    "read_only": "ro" in mode.split(",")})  # fmt: skip
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    assert not pending, "Dockerfile ends in a continuation"
    return out


def dockerfile_json(instr: str) -> list[str]:
    """The exec-form (JSON) arguments of the last ``instr``; Docker silently falls back to
    a shell when they are not valid JSON, so this must parse."""
    args = [a for i, a in dockerfile_instructions() if i == instr][-1]
    if instr == "HEALTHCHECK":
        args = args[args.index("CMD ") + 4 :]
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def healthcheck_probe() -> list[str]:
    return dockerfile_json("HEALTHCHECK")


def warmup_command() -> str:
    runs = [a for i, a in dockerfile_instructions() if i == "RUN" and "warm_up_jit" in a]
    assert len(runs) == 1
    return runs[0]


def conf_directives(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            found.setdefault(key, []).append(value.strip())
    return found


# === docker-compose.yml =================================================================


def test_compose_top_level() -> None:
    data = load_compose()
    assert "version" not in data, "the Compose specification has no version key"
    unknown = {k for k in data if k not in TOP_LEVEL_KEYS and not k.startswith("x-")}
    assert not unknown
    assert NAME_RE.match(data["name"]) and data["name"] == data["name"].lower()
    assert set(data["services"]) == SERVICES


def test_service_keys_images_and_restart() -> None:
    for name, svc in services().items():
        unknown = {k for k in svc if k not in SERVICE_KEYS and not k.startswith("x-")}
        assert not unknown, f"{name}: unknown keys {unknown}"
        assert "image" in svc or "build" in svc, name
        assert RESTART_RE.match(svc["restart"]), name
        if "build" in svc:
            context = REPO / svc["build"]["context"]
            assert (context / svc["build"].get("dockerfile", "Dockerfile")).is_file()
        if "image" in svc and "build" not in svc:
            assert ":" in svc["image"] and not svc["image"].endswith(":latest"), (
                f"{name}: pin a tag"
            )
        logging_ = svc.get("logging", {})
        assert logging_.get("options", {}).get("max-size"), f"{name}: unbounded logs"


def test_healthchecks() -> None:
    for name, svc in services().items():
        hc = svc.get("healthcheck")
        if hc is None:
            # Only the image built here may rely on its own HEALTHCHECK.
            assert "build" in svc, f"{name}: no healthcheck"
            continue
        assert set(hc) <= HEALTHCHECK_KEYS, name
        if hc.get("disable"):
            continue
        test = hc["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), name
        assert len(test) >= 2 and all(isinstance(t, str) and t for t in test), name
        for key in ("interval", "timeout", "start_period", "start_interval"):
            if key in hc:
                assert DURATION_RE.match(hc[key]), f"{name}.{key}: {hc[key]!r}"
        assert isinstance(hc.get("retries", 3), int)


def has_healthcheck(svc: dict[str, Any]) -> bool:
    hc = svc.get("healthcheck")
    if hc is not None:
        return not hc.get("disable")
    return "build" in svc and any(i == "HEALTHCHECK" for i, _ in dockerfile_instructions())


def test_depends_on() -> None:
    svcs = services()
    for name, svc in svcs.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: use the long syntax with conditions"
        for dep, spec in deps.items():
            assert dep in svcs and dep != name, f"{name} -> {dep}"
            assert set(spec) <= DEPENDS_ON_KEYS and spec["condition"] in CONDITIONS
            if spec["condition"] == "service_healthy":
                assert has_healthcheck(svcs[dep]), f"{name} waits for {dep}, which has none"
            if not svc.get("profiles"):
                assert not svcs[dep].get("profiles"), f"{name} needs {dep} of a profile"


def test_volumes_declared_and_bind_sources_exist() -> None:
    data = load_compose()
    declared = set(data.get("volumes") or {})
    used = set()
    for name, svc in data["services"].items():
        targets = []
        for m in mounts(svc):
            assert set(m) <= VOLUME_MOUNT_KEYS and set(m.get("bind", {})) <= BIND_KEYS, name
            targets.append(m["target"])
            assert m["target"].startswith("/"), name
            if m["type"] == "volume":
                assert m["source"] in declared, f"{name}: volume {m['source']} not declared"
                used.add(m["source"])
                continue
            assert m["type"] == "bind", name
            # Configuration from the checkout is mounted read-only.
            assert m.get("read_only"), f"{name}: bind mount {m['source']} is writable"
            rel = Path(m["source"]).as_posix().removeprefix("./")
            assert not rel.startswith(("/", "~", "..")), f"{name}: {m['source']} outside repo"
            if rel in GENERATED_FILES:
                # Must not turn into an empty directory when missing.
                assert m.get("bind", {}).get("create_host_path") is False, rel
            else:
                assert (REPO / rel).exists(), f"{name}: {rel} missing from the repository"
        assert len(targets) == len(set(targets)), f"{name}: two mounts on one path"
    assert used == declared, f"unused volumes {declared - used}"


def test_generated_files_are_ignored_by_git() -> None:
    for rel in [*GENERATED_FILES, ".env"]:
        out = subprocess.run(
            ["git", "check-ignore", "-q", "--no-index", rel], cwd=REPO, check=False
        )
        assert out.returncode == 0, f"{rel} is not in .gitignore"
    out = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", ".env.example"], cwd=REPO, check=False
    )
    assert out.returncode == 1


def test_ports_listen_on_loopback_by_default() -> None:
    raw = services()
    for env in ({}, read_env_file(ENV_EXAMPLE)):
        for name, svc in raw.items():
            for port in svc.get("ports") or []:
                assert isinstance(port, str), f"{name}: use HOST_IP:HOST:CONTAINER strings"
                value = interpolate(port, env)
                host_ip, _, rest = value.rpartition(":")[0].partition(":")
                assert value.count(":") == 2, f"{name}: {port!r} has no host address"
                assert host_ip == "127.0.0.1", f"{name}: {port!r} -> {value!r}"
                assert rest.isdigit()
    published = {
        name: [p.split(":")[-1] for p in svc.get("ports", [])] for name, svc in raw.items()
    }
    assert published == {"mosquitto": ["1883"], "influxdb": ["8086"], "grafana": ["3000"],
                         "ingest": [], "simulator": []}  # fmt: skip


def test_every_variable_is_in_env_example() -> None:
    used = variables(load_compose())
    example = read_env_file(ENV_EXAMPLE)
    assert set(used) - set(example) == set(), "document these in .env.example"
    assert set(example) - set(used) == set(), "not used by docker-compose.yml"
    for name, forms in used.items():
        assert "" not in forms, f"write ${{{name}}} with braces"
        if is_secret(name):
            assert forms == {":?"}, f"{name}: a secret must be required, without default"


def test_env_example_has_no_secret_values() -> None:
    example = read_env_file(ENV_EXAMPLE)
    for name, value in example.items():
        if is_secret(name):
            assert value == "", f"{name} must be empty in .env.example"
        assert not re.fullmatch(r"[0-9a-fA-F]{24,}|[A-Za-z0-9+/=_-]{32,}", value), name
    # A .env copied by hand, without secrets, cannot start the stack.
    with pytest.raises(MissingVariableError):
        interpolate_tree(load_compose(), example)


def test_no_literal_secrets_in_service_environments() -> None:
    for name, svc in services().items():
        for key, value in environment(svc).items():
            if re.search(r"PASSWORD|TOKEN|SECRET", key) and key.endswith(("_FILE", "_DIR")):
                # Where a secret is kept (INGEST_INFLUX_TOKEN_FILE), not the secret.
                assert re.fullmatch(r"/[\w./-]+", value), f"{name}.{key}: {value!r}"
            elif re.search(r"PASSWORD|TOKEN|SECRET", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", value), f"{name}.{key}"
            assert not re.search(r"://[^/:@\s]+:[^$/@\s]+@", value), f"{name}.{key}: password"


def test_ingest_service_runs_ingest_run() -> None:
    svc = services()["ingest"]
    assert "entrypoint" not in svc
    assert svc.get("command", ["run"]) == ["run"]
    assert dockerfile_json("ENTRYPOINT") == ["ingest"]
    assert dockerfile_json("CMD") == ["run"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^ingest = "ingest\.cli:main"$', pyproject, re.M)
    assert build_parser().parse_args(["run"]).command == "run"
    assert svc["restart"] == "unless-stopped"
    assert svc["depends_on"] == {
        "mosquitto": {"condition": "service_healthy"},
        "influxdb": {"condition": "service_healthy"},
    }


def test_ingest_environment_is_a_valid_configuration(tmp_path: Path) -> None:
    env = filled_env()
    svc = resolved_services()["ingest"]
    environ = environment(svc)
    # The token file lives on the influx-tokens volume; here, a stand-in with a token.
    token_file = tmp_path / "ingest"
    token_file.write_text("write-only-token\n")
    assert environ["INGEST_INFLUX_TOKEN_FILE"] == "/run/influx-tokens/ingest"
    environ["INGEST_INFLUX_TOKEN_FILE"] = str(token_file)
    settings = load_settings(environ=environ)
    assert settings.mqtt.url == f"mqtt://ingest:{env['INGEST_MQTT_PASSWORD']}@mosquitto:1883"
    assert settings.mqtt.topic_prefix == "factory"
    assert settings.influx.url == "http://influxdb:8086"
    assert settings.influx.api == "v2"
    assert settings.influx.org == env["INFLUXDB_ORG"]
    assert settings.influx.bucket == env["INFLUXDB_BUCKET"]
    assert settings.influx.token == "write-only-token"
    assert settings.service.log_level == env["INGEST_LOG_LEVEL"]


def test_simulator_is_a_demo_profile_of_the_same_image() -> None:
    svcs = resolved_services()
    sim, ing = svcs["simulator"], svcs["ingest"]
    assert sim["profiles"] == ["demo"]
    assert (sim["image"], sim["build"]) == (ing["image"], ing["build"])
    assert sim["healthcheck"] == {"disable": True}
    args = build_parser().parse_args(sim["command"])
    assert args.command == "simulate" and args.duration == 86400
    env = environment(sim)
    password = filled_env()["SIMULATOR_MQTT_PASSWORD"]
    assert env["INGEST_MQTT_URL"] == f"mqtt://simulator:{password}@mosquitto:1883"
    assert env["INGEST_TOPIC_PREFIX"] == environment(ing)["INGEST_TOPIC_PREFIX"]


def test_mosquitto_service_matches_its_config() -> None:
    svc = services()["mosquitto"]
    targets = {m["target"]: m for m in mounts(svc)}
    d = conf_directives(MOSQUITTO_CONF)
    for key in ("password_file", "acl_file"):
        assert d[key][0] in targets, f"{key} {d[key][0]} is not mounted"
    assert "/mosquitto/config/mosquitto.conf" in targets
    data = targets[d["persistence_location"][0].rstrip("/")]
    assert data["type"] == "volume"
    # The healthcheck logs in as "healthcheck" with the password from the environment.
    hc = " ".join(svc["healthcheck"]["test"][1:])
    assert "-u healthcheck" in hc and '"$$MQTT_HEALTHCHECK_PASSWORD"' in hc
    assert "MQTT_HEALTHCHECK_PASSWORD" in environment(svc)


def test_influxdb_service() -> None:
    svc = resolved_services()["influxdb"]
    env = environment(svc)
    assert env["DOCKER_INFLUXDB_INIT_MODE"] == "setup"
    for key in ("USERNAME", "PASSWORD", "ORG", "BUCKET", "RETENTION", "ADMIN_TOKEN"):
        assert env[f"DOCKER_INFLUXDB_INIT_{key}"], key
    init = [
        m for m in mounts(services()["influxdb"]) if m["target"] == "/docker-entrypoint-initdb.d"
    ]
    assert len(init) == 1
    scripts = sorted((REPO / init[0]["source"]).glob("*.sh"))
    assert scripts, "no init script"
    for script in scripts:
        assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
    assert svc["healthcheck"]["test"][:3] == ["CMD", "influx", "ping"]


def test_grafana_service() -> None:
    svc = services()["grafana"]
    env = environment(svc)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    (prov,) = [m for m in mounts(svc) if m["target"] == "/etc/grafana/provisioning"]
    assert prov["read_only"] and (REPO / prov["source"]).resolve() == GRAFANA_PROVISIONING
    assert "/api/health" in " ".join(svc["healthcheck"]["test"])


# === the ingest token: write-only, never the operator token ===============================

INGEST_TOKEN_SCRIPT = REPO / "influxdb" / "init" / "20-ingest-token.sh"
ROTATE_TOKEN = REPO / "scripts" / "rotate-influx-token.sh"
TOKEN_VOLUME = "influx-tokens"


def volume_mount(service: dict[str, Any], volume: str) -> dict[str, Any]:
    (mount,) = [m for m in mounts(service) if m["type"] == "volume" and m["source"] == volume]
    return mount


def dockerfile_ingest_uid() -> str:
    ins = dockerfile_instructions()
    (uid,) = [a.split("=", 1)[1] for i, a in ins if i == "ARG" and a.startswith("INGEST_UID=")]
    return uid


def test_ingest_holds_no_admin_token() -> None:
    svcs = services()
    ingest, influxdb = svcs["ingest"], svcs["influxdb"]
    env = environment(ingest)
    assert "INGEST_INFLUX_TOKEN" not in env, "ingest must read its token from the file"
    assert "INFLUXDB_ADMIN_TOKEN" not in variables(ingest), "ingest must not see the operator token"
    # Only the influxdb service (its initial setup) knows the operator token.
    for name, svc in svcs.items():
        if name != "influxdb":
            assert "INFLUXDB_ADMIN_TOKEN" not in variables(svc), name
    # ingest reads the token file from the shared volume, which it cannot write.
    token_file = Path(env["INGEST_INFLUX_TOKEN_FILE"])
    theirs = volume_mount(ingest, TOKEN_VOLUME)
    assert theirs["read_only"] is True
    assert token_file.parent == Path(theirs["target"])
    # influxdb writes it there: same volume, writable, at the directory the init script uses.
    ours = volume_mount(influxdb, TOKEN_VOLUME)
    assert not ours.get("read_only")
    influx_env = environment(influxdb)
    assert Path(ours["target"]) == Path(influx_env["INGEST_TOKEN_DIR"]) == token_file.parent
    assert token_file.name == "ingest"  # the name 20-ingest-token.sh writes
    # ... owned by the user the ingest image runs as.
    assert influx_env["INGEST_UID"] == dockerfile_ingest_uid()
    assert [a for i, a in dockerfile_instructions() if i == "USER"][-1] == "ingest"
    # ingest starts once influxdb is healthy, which on a first start means after the init
    # scripts (they run before influxd listens on the port the healthcheck pings).
    assert ingest["depends_on"]["influxdb"] == {"condition": "service_healthy"}
    assert "8086" in " ".join(influxdb["healthcheck"]["test"])
    # The simulator does not need InfluxDB at all.
    sim = svcs["simulator"]
    assert "influxdb" not in sim.get("depends_on", {})
    assert not any(m["source"] == TOKEN_VOLUME for m in mounts(sim))
    assert not any(k.startswith("INGEST_INFLUX") for k in environment(sim))


def test_init_scripts_run_in_order() -> None:
    # The image runs them with run-parts --regex '.*sh$': in lexical order.
    names = sorted(p.name for p in (REPO / "influxdb" / "init").iterdir())
    assert names == ["10-influxql.sh", "20-ingest-token.sh"]


# A stand-in for the influx CLI: logs its arguments (JSON, one call a line) and answers
# `auth create --json`, `auth delete` and `bucket list` as the real one does.
FAKE_INFLUX = """#!{python}
import json, os, sys
from pathlib import Path
state = Path(os.environ["FAKE_INFLUX_STATE"])
with open(state / "calls.jsonl", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if os.environ.get("FAKE_INFLUX_FAIL") == " ".join(args[:2]):
    sys.exit("Error: simulated failure")
if args[:2] == ["auth", "create"]:
    n = len(list(state.glob("token-*"))) + 1
    token = f"tok{{n}}-" + "Ab0_-" * 16 + "=="
    (state / f"token-{{n}}").write_text(token)
    if os.environ.get("FAKE_INFLUX_GARBAGE"):
        print("not json")
        sys.exit(0)
    bucket = args[args.index("--write-bucket") + 1]
    print(json.dumps({{
        "id": f"{{n:016x}}", "description": args[args.index("--description") + 1],
        "token": token, "status": "active", "userName": "admin", "userID": "a" * 16,
        "permissions": [f"write:orgs/{{'b' * 16}}/buckets/{{bucket}}"],
    }}, indent=2))
elif args[:2] in (["auth", "list"], ["auth", "delete"]):
    auth_id = args[args.index("--id") + 1]
    gone = state / f"deleted-{{auth_id}}"
    if gone.exists() or not (state / f"token-{{int(auth_id, 16)}}").exists():
        sys.exit(f"Error: could not find authorization with ID {{auth_id!r}}")
    if args[1] == "delete":
        gone.touch()
    print(json.dumps({{"id": auth_id, "token": "deleted-token-value"}}))
elif args[:2] == ["bucket", "list"]:
    print("0123456789abcdef\\tplant\\t2160h0m0s\\tn/a\\t" + "b" * 16)
else:
    sys.exit(f"fake influx: unexpected {{args}}")
"""


class FakeInflux:
    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path / "influx-state"
        self.state.mkdir()
        self.bin = tmp_path / "bin"
        self.bin.mkdir(exist_ok=True)
        stub = self.bin / "influx"
        stub.write_text(FAKE_INFLUX.format(python=sys.executable))
        stub.chmod(0o755)
        self.tokens = tmp_path / "tokens"  # the influx-tokens volume
        self.tokens.mkdir()
        # The environment of the influxdb container (as compose sets it).
        self.env = {
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "FAKE_INFLUX_STATE": str(self.state),
            "DOCKER_INFLUXDB_INIT_ORG": "acme",
            "DOCKER_INFLUXDB_INIT_BUCKET": "plant",
            "DOCKER_INFLUXDB_INIT_USERNAME": "admin",
            "INGEST_TOKEN_DIR": str(self.tokens),
            "INGEST_UID": dockerfile_ingest_uid(),
        }

    def calls(self) -> list[list[str]]:
        log = self.state / "calls.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def token(self, n: int) -> str:
        return (self.state / f"token-{n}").read_text()


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the init script hands the token file to another uid: needs root")


def run_token_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(INGEST_TOKEN_SCRIPT)], env=env, capture_output=True, text=True,
                          check=False, timeout=60)  # fmt: skip


def test_ingest_token_init_script(tmp_path: Path) -> None:
    require_root()
    fake = FakeInflux(tmp_path)
    uid = int(fake.env["INGEST_UID"])
    # As the image runs it: right after the setup, with the bucket ID exported.
    out = run_token_script({**fake.env, "DOCKER_INFLUXDB_INIT_BUCKET_ID": "00000000000000b1"})
    assert out.returncode == 0, out.stderr
    ((*create, description_flag, description, json_flag),) = fake.calls()
    assert create == ["auth", "create", "--org", "acme", "--user", "admin",
                      "--write-bucket", "00000000000000b1"]  # fmt: skip
    # Exactly one permission, write on the bucket: no read, no all-access or operator.
    assert (description_flag, json_flag) == ("--description", "--json")
    assert "write-only" in description and "plant" in description
    token_file, id_file = fake.tokens / "ingest", fake.tokens / "ingest.id"
    assert token_file.read_text() == fake.token(1) + "\n"
    st = token_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o400 and (st.st_uid, st.st_gid) == (uid, uid)
    assert id_file.read_text() == f"{1:016x}\n"
    d = fake.tokens.stat()
    assert stat.S_IMODE(d.st_mode) == 0o750 and (d.st_uid, d.st_gid) == (0, uid)
    assert sorted(p.name for p in fake.tokens.iterdir()) == ["ingest", "ingest.id"]
    assert fake.token(1) not in out.stdout + out.stderr, "the token was printed"
    assert f"{1:016x}" in out.stdout
    # As the rotation runs it: no bucket ID in the environment, so it is looked up.
    out = run_token_script(fake.env)
    assert out.returncode == 0, out.stderr
    lookup, create2 = fake.calls()[1:]
    assert lookup == ["bucket", "list", "--org", "acme", "--name", "plant", "--hide-headers"]
    assert create2[create2.index("--write-bucket") + 1] == "0123456789abcdef"
    assert token_file.read_text() == fake.token(2) + "\n"
    assert id_file.read_text() == f"{2:016x}\n"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o400
    # A failure leaves the current token in place and no temporary file behind.
    for failure in ({"FAKE_INFLUX_FAIL": "auth create"}, {"FAKE_INFLUX_GARBAGE": "1"}):
        out = run_token_script({**fake.env, **failure})
        assert out.returncode != 0, failure
        assert token_file.read_text() == fake.token(2) + "\n"
        assert id_file.read_text() == f"{2:016x}\n"
        assert sorted(p.name for p in fake.tokens.iterdir()) == ["ingest", "ingest.id"]
    # Missing settings: it stops before creating anything.
    before = len(fake.calls())
    for missing in ("INGEST_UID", "INGEST_TOKEN_DIR", "DOCKER_INFLUXDB_INIT_USERNAME"):
        env = {k: v for k, v in fake.env.items() if k != missing}
        assert run_token_script(env).returncode != 0, missing
    assert run_token_script({**fake.env, "INGEST_UID": "ingest"}).returncode != 0
    assert len(fake.calls()) == before


# A stand-in for the docker CLI, as far as scripts/rotate-influx-token.sh uses it: `compose
# exec -T influxdb ...` runs the command here, in the influxdb container's environment,
# with the init directory mapped to influxdb/init; the rest is logged and answered.
FAKE_DOCKER = """#!{python}
import json, os, subprocess, sys
from pathlib import Path
state = Path(os.environ["FAKE_INFLUX_STATE"])
with open(state / "docker.jsonl", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[:4] == ["compose", "exec", "-T", "influxdb"]:
    cmd = [c.replace("/docker-entrypoint-initdb.d/", "{init}/") for c in args[4:]]
    sys.exit(subprocess.run(cmd).returncode)
if args == ["compose", "restart", "ingest"]:
    sys.exit(0)
if args == ["compose", "ps", "-q", "ingest"]:
    print("c0ffee")
    sys.exit(0)
if args[:1] == ["inspect"] and args[-1] == "c0ffee":
    print(os.environ.get("FAKE_HEALTH", "healthy"))
    sys.exit(0)
sys.exit(f"fake docker: unexpected {{args}}")
"""


def test_rotate_influx_token(tmp_path: Path) -> None:
    require_root()
    fake = FakeInflux(tmp_path)
    docker = fake.bin / "docker"
    docker.write_text(FAKE_DOCKER.format(python=sys.executable, init=INGEST_TOKEN_SCRIPT.parent))
    docker.chmod(0o755)

    def rotate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(ROTATE_TOKEN), *args], env={**fake.env, **env},
                              cwd=tmp_path, capture_output=True, text=True, check=False,
                              timeout=60)  # fmt: skip

    def docker_calls() -> list[list[str]]:
        log = fake.state / "docker.jsonl"
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        log.unlink()
        return calls

    def deletes() -> list[str]:
        return [c[c.index("--id") + 1] for c in fake.calls() if c[:2] == ["auth", "delete"]]

    token_file = fake.tokens / "ingest"
    # A stack set up before ingest had its own token: no file, nothing to revoke.
    out = rotate()
    assert out.returncode == 0, out.stderr
    assert token_file.read_text() == fake.token(1) + "\n"
    calls = docker_calls()
    init = "/docker-entrypoint-initdb.d/20-ingest-token.sh"
    assert ["compose", "exec", "-T", "influxdb", init] in calls
    assert ["compose", "restart", "ingest"] in calls
    assert deletes() == [] and "nothing to revoke" in out.stdout
    # A rotation: new token, ingest restarted (before the old one goes), old one revoked.
    out = rotate()
    assert out.returncode == 0, out.stderr
    assert token_file.read_text() == fake.token(2) + "\n"
    assert deletes() == [f"{1:016x}"]
    calls = docker_calls()
    restart = calls.index(["compose", "restart", "ingest"])
    delete = next(n for n, c in enumerate(calls) if "delete" in c)
    assert restart < delete
    for n in (1, 2):
        assert fake.token(n) not in out.stdout + out.stderr, "a token was printed"
    assert "deleted-token-value" not in out.stdout + out.stderr
    # ingest does not come back healthy: the old token stays valid, and the way to revoke
    # it later is printed.
    out = rotate("--timeout", "0", FAKE_HEALTH="unhealthy")
    assert out.returncode == 1
    assert token_file.read_text() == fake.token(3) + "\n"
    assert deletes() == [f"{1:016x}"]
    assert f"influx auth delete --id {2:016x}" in out.stderr
    # The previous authorization is gone already (a restored backup that predates it).
    (fake.state / f"deleted-{3:016x}").touch()
    out = rotate()
    assert out.returncode == 0, out.stderr
    assert "does not exist" in out.stdout and deletes() == [f"{1:016x}"]
    assert token_file.read_text() == fake.token(4) + "\n"
    # Creating the token fails: nothing restarted, nothing revoked, the file unchanged.
    docker_calls()
    out = rotate(FAKE_INFLUX_FAIL="auth create")
    assert out.returncode == 1 and "nothing changed" in out.stderr
    assert ["compose", "restart", "ingest"] not in docker_calls()
    assert token_file.read_text() == fake.token(4) + "\n"
    assert rotate("--timeout").returncode == 2
    assert rotate("--timeout", "soon").returncode == 1


def test_shell_scripts_parse_and_pass_shellcheck() -> None:
    scripts = sorted([*(REPO / "scripts").glob("*.sh"), *(REPO / "influxdb" / "init").glob("*.sh")])
    assert INGEST_TOKEN_SCRIPT in scripts and ROTATE_TOKEN in scripts
    for script in scripts:
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                             check=False)  # fmt: skip
        assert out.returncode == 0, f"{script.name}: {out.stderr}"
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    out = subprocess.run([shellcheck, "-x", *map(str, scripts)], cwd=REPO, capture_output=True,
                         text=True, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout


def test_rotate_script_is_documented() -> None:
    readme = (REPO / "README.md").read_text()
    assert "scripts/rotate-influx-token.sh" in readme
    for step in ("influx backup", "influx restore", "scripts/add-device.sh",
                 "reset-admin-password"):  # fmt: skip
        assert step in readme, step


# === Dockerfile and .dockerignore =========================================================


def test_dockerfile_structure() -> None:
    ins = dockerfile_instructions()
    names = [i for i, _ in ins]
    args = dict.fromkeys(names)  # last arguments of each instruction
    for i, a in ins:
        args[i] = a
    arg_defaults = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    froms = [a.split()[0] for i, a in ins if i == "FROM"]
    for image in froms:
        assert interpolate(image, arg_defaults) == "python:3.11-slim"
    assert any(i == "RUN" and "pip install --no-cache-dir ." in a for i, a in ins)
    for i, a in ins:
        if i == "COPY" and "--from" not in a:
            for src in a.split()[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: missing"
    user_at = max(n for n, (i, _) in enumerate(ins) if i == "USER")
    user = ins[user_at][1]
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    warm = next(n for n, (i, a) in enumerate(ins) if i == "RUN" and "warm_up_jit" in a)
    assert warm > user_at, "kernels must be compiled as the runtime user"
    assert names.index("ENTRYPOINT") > user_at
    env_text = " ".join(a for i, a in ins if i == "ENV")
    cache = re.search(r"NUMBA_CACHE_DIR=(\S+)", env_text)
    assert cache, "NUMBA_CACHE_DIR not set"
    assert any(i == "RUN" and cache[1] in a and "chown" in a for i, a in ins[:user_at])
    assert "INGEST_SERVICE_HEALTH_LISTEN=127.0.0.1:9108" in env_text
    assert warmup_command() == (
        'python -c "from ingest.processing.detectors import DetectorBank; '
        'DetectorBank().warm_up_jit()"'
    )
    probe = healthcheck_probe()
    assert probe[:2] == ["python", "-c"] and "/healthz" in probe[2]


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".git", ".venv", ".env", "mosquitto/passwd", ".services", "demo-output*",
                   ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"):  # fmt: skip
        assert needed in patterns, needed
    copied = {src for i, a in dockerfile_instructions() if i == "COPY" and "--from" not in a
              for src in a.split()[:-1]}  # fmt: skip
    assert not copied & set(patterns), "the Dockerfile copies an ignored path"


def test_dockerfile_healthcheck_probe(tmp_path: Path) -> None:
    problem: list[str | None] = [None]
    server = HealthServer(f"127.0.0.1:{free_port()}", Metrics(), lambda: problem[0])
    server.start()
    try:

        def probe(listen: str) -> int:
            cmd = [sys.executable, *healthcheck_probe()[1:]]
            env = {**os.environ, "INGEST_SERVICE_HEALTH_LISTEN": listen}
            return subprocess.run(cmd, env=env, capture_output=True, check=False).returncode

        assert probe(f"127.0.0.1:{server.port}") == 0
        assert probe(f"0.0.0.0:{server.port}") == 0  # probes loopback when listening on all
        problem[0] = "MQTT broker not connected"
        assert probe(f"127.0.0.1:{server.port}") == 1
    finally:
        server.stop()
    assert probe(f"127.0.0.1:{server.port}") == 1  # nothing listening


@pytest.mark.slow
def test_dockerfile_warmup_fills_the_numba_cache(tmp_path: Path) -> None:
    cache = tmp_path / "numba"
    cache.mkdir()
    cmd = shlex.split(warmup_command())
    out = subprocess.run(
        [sys.executable, *cmd[1:]], env={**os.environ, "NUMBA_CACHE_DIR": str(cache)},
        cwd=REPO, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert list(cache.rglob("*.nbi")), "no Numba cache index written"


# === Grafana provisioning and the InfluxDB init script ===================================


def test_grafana_datasource() -> None:
    doc = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "influxdb.yml").read_text())
    (ds,) = doc["datasources"]
    assert ds["type"] == "influxdb" and ds["url"] == "http://influxdb:8086"
    assert ds["access"] == "proxy" and ds["jsonData"]["version"] == "InfluxQL"
    assert ds["jsonData"]["dbName"] == "${GRAFANA_INFLUX_DATABASE}"
    assert ds["basicAuth"] is True and ds["basicAuthUser"] == "grafana"
    assert ds["secureJsonData"] == {"basicAuthPassword": "${GRAFANA_INFLUX_PASSWORD}"}
    # Every variable of the provisioning files is set on the grafana service. Grafana does
    # not expand variables in the queries and annotations of an alert rule: they hold
    # Grafana's own ($timeFilter, {{ $labels.device }}). It does expand the rules' labels.
    grafana_env = environment(services()["grafana"])
    for path in GRAFANA_PROVISIONING.rglob("*.y*ml"):
        doc = yaml.safe_load(path.read_text())
        for group in doc.get("groups", []):
            for rule in group["rules"]:
                assert not variables(rule["labels"]), f"{path.name}: $ in {rule['uid']} labels"
                del rule["data"], rule["annotations"]
        for name in variables(doc):
            assert name in grafana_env, f"{path.name}: ${name} is not set for grafana"


def test_grafana_dashboards() -> None:
    doc = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "dashboards.yml").read_text())
    (provider,) = doc["providers"]
    path = provider["options"]["path"]
    assert path == "/etc/grafana/provisioning/dashboards/json"
    folder = GRAFANA_PROVISIONING / Path(path).relative_to("/etc/grafana/provisioning")
    files = sorted(folder.glob("*.json"))
    assert files
    ds = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "influxdb.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    # The files are generated by ingest/grafana (tests/test_grafana_provisioning.py checks
    # they are current); tests/integration/test_grafana_queries.py runs every query.
    assert [f.stem for f in files] == [
        "factory-machine-detail", "factory-pipeline-health", "factory-plant-overview"]  # fmt: skip
    measurements = set()
    for f in files:
        dash = json.loads(f.read_text())
        assert dash["uid"] == f.stem and dash["title"] and dash["panels"]
        for panel in dash["panels"]:
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == uid
                assert target["rawQuery"] is True
                query = target["query"]
                assert "$timeFilter" in query or "${__to}" in query, query
                measurements.update(re.findall(r'FROM "(\w+)"', query))
    assert measurements == {TELEMETRY, "anomaly_events", "ingest_stats"}
    rules = yaml.safe_load((GRAFANA_PROVISIONING / "alerting" / "rules.yml").read_text())
    (group,) = rules["groups"]
    assert group["folder"] == provider["folder"]
    for rule in group["rules"]:
        assert rule["data"][0]["datasourceUid"] == uid
        assert "$timeFilter" in rule["data"][0]["model"]["query"]


def test_influxdb_init_script(tmp_path: Path) -> None:
    script = REPO / "influxdb" / "init" / "10-influxql.sh"
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "influx.log"
    (fake / "influx").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{log}"\n')
    (fake / "influx").chmod(0o755)
    env = {
        "PATH": f"{fake}:{os.environ['PATH']}",
        "DOCKER_INFLUXDB_INIT_ORG": "acme",
        "DOCKER_INFLUXDB_INIT_BUCKET": "plant",
        "DOCKER_INFLUXDB_INIT_BUCKET_ID": "0123456789abcdef",
        "GRAFANA_INFLUX_PASSWORD": "pw-123",
    }
    out = subprocess.run([str(script)], env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    dbrp, auth = log.read_text().splitlines()
    assert dbrp.split() == [
        "v1", "dbrp", "create", "--org", "acme", "--bucket-id", "0123456789abcdef",
        "--db", "plant", "--rp", "autogen", "--default",
    ]  # fmt: skip
    words = auth.split()
    assert words[:3] == ["v1", "auth", "create"]
    assert words[words.index("--username") + 1] == "grafana"
    assert words[words.index("--password") + 1] == "pw-123"
    assert words[words.index("--read-bucket") + 1] == "0123456789abcdef"
    assert "--write-bucket" not in words  # Grafana only reads
    # Without the password it stops before creating anything.
    log.unlink()
    env.pop("GRAFANA_INFLUX_PASSWORD")
    out = subprocess.run([str(script)], env=env, capture_output=True, text=True, check=False)
    assert out.returncode != 0 and not log.exists()


# === scripts/init-secrets.sh and scripts/add-device.sh ===================================


def require_mosquitto_passwd() -> str:
    binary = shutil.which("mosquitto_passwd")
    if binary is None:
        require_mosquitto()  # same skip/fail policy as the broker
        pytest.skip("mosquitto_passwd not found")
    return binary


def scratch_repo(tmp_path: Path) -> Path:
    """A copy of what the scripts touch."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "mosquitto").mkdir()
    for rel in ("scripts/init-secrets.sh", "scripts/add-device.sh", "scripts/lib-secrets.sh",
                "mosquitto/mosquitto.conf", "mosquitto/acl", ".env.example"):  # fmt: skip
        shutil.copy2(REPO / rel, root / rel)
    return root


def run_script(root: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MOSQUITTO_PASSWD": "local"}
    return subprocess.run(
        ["bash", str(root / "scripts" / name), *args], env=env, cwd=root,
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def passwd_users(path: Path) -> dict[str, str]:
    return dict(line.split(":", 1) for line in path.read_text().splitlines() if line)


def test_init_secrets(tmp_path: Path) -> None:
    require_mosquitto_passwd()
    root = scratch_repo(tmp_path)
    out = run_script(root, "init-secrets.sh")
    assert out.returncode == 0, out.stderr
    env = read_env_file(root / ".env")
    example = read_env_file(ENV_EXAMPLE)
    assert set(env) == set(example)
    secrets = {k: v for k, v in env.items() if is_secret(k)}
    assert secrets and all(re.fullmatch(r"[0-9a-f]{48}", v) for v in secrets.values())
    assert len(set(secrets.values())) == len(secrets)
    assert {k: v for k, v in env.items() if not is_secret(k)} == {
        k: v for k, v in example.items() if not is_secret(k)
    }
    for value in secrets.values():
        assert value not in out.stdout + out.stderr, "a secret was printed"
    assert stat.S_IMODE((root / ".env").stat().st_mode) == 0o600
    passwd = root / "mosquitto" / "passwd"
    assert set(passwd_users(passwd)) == set(SERVICE_LOGINS)
    assert all(h.startswith("$7$") for h in passwd_users(passwd).values())  # PBKDF2-SHA512
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o644
    assert sorted(p.name for p in root.iterdir()) == [".env", ".env.example", "mosquitto",
                                                       "scripts"]  # fmt: skip
    assert sorted(p.name for p in (root / "mosquitto").iterdir()) == ["acl", "mosquitto.conf",
                                                                      "passwd"]  # fmt: skip
    # A second run changes nothing.
    before = ((root / ".env").read_bytes(), passwd.read_bytes())
    again = run_script(root, "init-secrets.sh")
    assert again.returncode != 0 and "already exists" in again.stderr
    assert ((root / ".env").read_bytes(), passwd.read_bytes()) == before
    (root / ".env").unlink()
    again = run_script(root, "init-secrets.sh")
    assert again.returncode != 0 and "mosquitto/passwd already exists" in again.stderr
    assert not (root / ".env").exists()


def test_add_device(tmp_path: Path) -> None:
    require_mosquitto_passwd()
    root = scratch_repo(tmp_path)
    out = run_script(root, "add-device.sh", "cnc-001")
    assert out.returncode != 0 and "init-secrets.sh" in out.stderr
    assert run_script(root, "init-secrets.sh").returncode == 0
    passwd = root / "mosquitto" / "passwd"
    out = run_script(root, "add-device.sh", "cnc-001")
    assert out.returncode == 0, out.stderr
    creds = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert creds["username"] == "cnc-001" and re.fullmatch(r"[0-9a-f]{48}", creds["password"])
    first = passwd_users(passwd)["cnc-001"]
    assert run_script(root, "add-device.sh", "cnc-001").returncode == 1
    assert passwd_users(passwd)["cnc-001"] == first
    out = run_script(root, "add-device.sh", "--rotate", "cnc-001")
    assert out.returncode == 0 and passwd_users(passwd)["cnc-001"] != first
    assert run_script(root, "add-device.sh", "--rotate", "cnc-404").returncode == 1
    for bad in ("ingest", "healthcheck", "a/b", "x+", "#", "a" * 65, "", "two words"):
        assert run_script(root, "add-device.sh", bad).returncode != 0, bad
    assert run_script(root, "add-device.sh").returncode == 2
    assert set(passwd_users(passwd)) == {*SERVICE_LOGINS, "cnc-001"}


# === the broker: mosquitto.conf + acl on a real mosquitto ================================


class ComposeBroker(MosquittoProcess):
    """mosquitto with the repository's mosquitto.conf, only paths and port changed."""

    def __init__(self, tmpdir: Path, config_dir: Path) -> None:
        super().__init__(tmpdir)
        self.config_dir = config_dir

    def config_text(self) -> str:
        text = MOSQUITTO_CONF.read_text()
        replacements = [
            ("/mosquitto/config/", f"{self.config_dir}/"),
            ("/mosquitto/data/", f"{self.tmpdir}/"),
        ]
        for old, new in replacements:
            assert old in text
            text = text.replace(old, new)
        text, n = re.subn(r"^listener 1883$", f"listener {self.port} 127.0.0.1", text, flags=re.M)
        assert n == 1
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # As root, mosquitto would switch to the "mosquitto" user, who cannot read the
            # pytest temp directory; the container does the same with its own files.
            text += "user root\n"
        return text


class Client:
    """A paho MQTT 5 client with blocking connect, publish (-> PUBACK reason) and subscribe."""

    def __init__(self, port: int, username: str | None, password: str | None = None,
                 client_id: str | None = None) -> None:  # fmt: skip
        self.port = port
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:10]}",
            protocol=paho.MQTTv5,
        )  # fmt: skip
        if username is not None:
            self.client.username_pw_set(username, password)
        self.cond = threading.Condition()
        self.connack: ReasonCode | None = None
        self.acks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        with self.cond:
            self.connack = rc
            self.cond.notify_all()

    def _on_publish(self, c: Any, u: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        with self.cond:
            self.acks[mid] = rc
            self.cond.notify_all()

    def _on_subscribe(self, c: Any, u: Any, mid: int, rcs: list[ReasonCode], p: Any) -> None:
        with self.cond:
            self.subacks[mid] = rcs
            self.cond.notify_all()

    def _on_message(self, c: Any, u: Any, msg: paho.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def _wait(self, check: Callable[[], bool], timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(check, timeout)

    def connect(self, *, clean_start: bool = True, session_expiry: int = 0) -> ReasonCode:
        props = Properties(PacketTypes.CONNECT)
        if session_expiry:
            props.SessionExpiryInterval = session_expiry
        self.connack = None
        self.client.connect("127.0.0.1", self.port, clean_start=clean_start, properties=props)
        self.client.loop_start()
        assert self._wait(lambda: self.connack is not None), "no CONNACK"
        assert self.connack is not None
        return self.connack

    def publish(self, topic: str, payload: bytes = b"{}") -> ReasonCode:
        info = self.client.publish(topic, payload, qos=1)
        assert self._wait(lambda: info.mid in self.acks), f"no PUBACK for {topic}"
        return self.acks[info.mid]

    def subscribe(self, topic: str) -> list[ReasonCode]:
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        assert self._wait(lambda: mid in self.subacks), f"no SUBACK for {topic}"
        return self.subacks[mid]

    def wait_for(self, payload: bytes, timeout: float = 10.0) -> bool:
        return self._wait(lambda: any(p == payload for _, p in self.messages), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


PASSWORDS = {"ingest": "pw-ingest", "simulator": "pw-sim", "healthcheck": "pw-health",
             "cnc-001": "pw-cnc-001", "cnc-002": "pw-cnc-002"}  # fmt: skip


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ComposeBroker]:
    require_mosquitto()
    tool = require_mosquitto_passwd()
    config = tmp_path / "config"
    config.mkdir()
    shutil.copy2(MOSQUITTO_ACL, config / "acl")
    create = ["-c"]
    for user, password in PASSWORDS.items():
        subprocess.run([tool, *create, "-b", str(config / "passwd"), user, password], check=True)
        create = []
    with ComposeBroker(tmp_path / "broker", config) as b:
        yield b


@pytest.fixture
def clients(broker: ComposeBroker) -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(user: str | None, password: str | None = None, **kw: Any) -> Client:
        if user is not None and password is None:
            password = PASSWORDS[user]
        c = Client(broker.port, user, password, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def connected(make: Callable[..., Client], user: str, **kw: Any) -> Client:
    c = make(user, **kw)
    rc = c.connect()
    assert not rc.is_failure, f"{user}: {rc}"
    return c


def ingest_subscriber(make: Callable[..., Client]) -> Client:
    ingest = connected(make, "ingest")
    assert [rc.value for rc in ingest.subscribe("factory/#")] == [1]
    return ingest


@pytest.mark.services
def test_broker_refuses_anonymous_and_wrong_passwords(clients: Callable[..., Client]) -> None:
    for user, password in ((None, None), ("cnc-001", "wrong"), ("nobody", "x"), ("ingest", "")):
        rc = clients(user, password).connect()
        assert rc.is_failure and rc.value in (NOT_AUTHORIZED, 134), f"{user}: {rc}"


@pytest.mark.services
def test_device_publishes_only_under_its_own_id(clients: Callable[..., Client]) -> None:
    ingest = ingest_subscriber(clients)
    device = connected(clients, "cnc-001")
    own = "factory/plant1/line1/cnc-001/telemetry"
    assert device.publish(own, b"own-1").value == 0
    assert ingest.wait_for(b"own-1")
    assert device.publish("factory/plant1/line1/cnc-001/status", b"status-1").value == 0
    assert ingest.wait_for(b"status-1")
    # Another device's topic, and topics outside the contract: PUBACK 135, not delivered.
    for topic in ("factory/plant1/line1/cnc-002/telemetry", "factory/plant1/line1/cnc-001/x",
                  "factory/_rejected/plant1/line1/cnc-001/telemetry", "factory/cnc-001",
                  "other/plant1/line1/cnc-001/telemetry"):  # fmt: skip
        assert device.publish(topic, b"spoof").value == NOT_AUTHORIZED, topic
    # Messages from one client arrive in order: once this one is in, the others would be.
    assert device.publish(own, b"own-2").value == 0
    assert ingest.wait_for(b"own-2")
    assert [p for _, p in ingest.messages] == [b"own-1", b"status-1", b"own-2"]


@pytest.mark.services
def test_device_cannot_read(clients: Callable[..., Client]) -> None:
    ingest = ingest_subscriber(clients)
    spy = connected(clients, "cnc-002")
    spy.subscribe("factory/#")
    spy.subscribe("#")
    connected(clients, "cnc-001").publish("factory/p/l/cnc-001/telemetry", b"secret")
    assert ingest.wait_for(b"secret")
    time.sleep(0.3)
    assert spy.messages == []


@pytest.mark.services
def test_service_logins(clients: Callable[..., Client]) -> None:
    ingest = ingest_subscriber(clients)
    # ingest writes dead letters, but cannot pose as a device.
    assert ingest.publish("factory/_rejected/p/l/cnc-001/telemetry", b"dead").value == 0
    assert ingest.publish("factory/p/l/cnc-001/telemetry", b"fake").value == NOT_AUTHORIZED
    # The simulator publishes for any device, and only under factory/.
    sim = connected(clients, "simulator")
    assert sim.publish("factory/plant1/line2/cnc-042/telemetry", b"sim").value == 0
    assert sim.publish("elsewhere/x", b"no").value == NOT_AUTHORIZED
    assert ingest.wait_for(b"sim")
    assert b"fake" not in [p for _, p in ingest.messages]
    # healthcheck reads $SYS/broker/uptime and nothing else.
    health = connected(clients, "healthcheck")
    health.subscribe("$SYS/broker/uptime")
    assert health._wait(lambda: any(t == "$SYS/broker/uptime" for t, _ in health.messages))
    assert health.publish("factory/p/l/healthcheck/x", b"h").value == NOT_AUTHORIZED
    health.subscribe("factory/#")
    connected(clients, "cnc-001").publish("factory/p/l/cnc-001/telemetry", b"after")
    assert ingest.wait_for(b"after")
    time.sleep(0.3)
    assert all(t.startswith("$SYS/") for t, _ in health.messages)


@pytest.mark.services
def test_compose_healthcheck_command(broker: ComposeBroker) -> None:
    binary = shutil.which("mosquitto_sub")
    if binary is None:
        pytest.skip("mosquitto_sub not installed (package mosquitto-clients)")
    test = services()["mosquitto"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    command = interpolate(test[1], {})  # $$ -> $, as compose does
    assert "-p 1883" in command
    command = command.replace("-p 1883", f"-p {broker.port}")

    def run(password: str) -> int:
        env = {**os.environ, "MQTT_HEALTHCHECK_PASSWORD": password}
        return subprocess.run(["sh", "-c", command], env=env, timeout=30, check=False).returncode

    assert run(PASSWORDS["healthcheck"]) == 0
    assert run("wrong") != 0


@pytest.mark.services
def test_broker_queues_more_than_the_default_1000_for_ingest(
    clients: Callable[..., Client],
) -> None:
    client_id = f"ingest-{uuid.uuid4().hex[:8]}"
    ingest = clients("ingest", client_id=client_id)
    assert not ingest.connect(clean_start=True, session_expiry=300).is_failure
    ingest.subscribe("factory/#")
    ingest.close()
    device = connected(clients, "cnc-001")
    n = 1500
    infos = [
        device.client.publish("factory/p/l/cnc-001/telemetry", str(i).encode(), qos=1)
        for i in range(n)
    ]
    assert device._wait(lambda: all(i.mid in device.acks for i in infos), 30)
    back = clients("ingest", client_id=client_id)
    assert not back.connect(clean_start=False, session_expiry=300).is_failure
    assert back._wait(lambda: len(back.messages) >= n, 30), len(back.messages)
    assert sorted(int(p) for _, p in back.messages) == list(range(n))


@pytest.mark.services
def test_scripts_make_logins_the_broker_accepts(tmp_path: Path) -> None:
    require_mosquitto()
    require_mosquitto_passwd()
    root = scratch_repo(tmp_path)
    assert run_script(root, "init-secrets.sh").returncode == 0
    out = run_script(root, "add-device.sh", "cnc-001")
    device_pw = dict(line.split("=", 1) for line in out.stdout.splitlines())["password"]
    env = read_env_file(root / ".env")
    with ComposeBroker(tmp_path / "broker", root / "mosquitto") as broker:
        made = []
        try:
            ingest = Client(broker.port, "ingest", env["INGEST_MQTT_PASSWORD"])
            made.append(ingest)
            assert not ingest.connect().is_failure
            ingest.subscribe("factory/#")
            device = Client(broker.port, "cnc-001", device_pw)
            made.append(device)
            assert not device.connect().is_failure
            assert device.publish("factory/s/l/cnc-001/telemetry", b"hello").value == 0
            assert ingest.wait_for(b"hello")
            # A device added while the broker runs can log in after SIGHUP.
            out = run_script(root, "add-device.sh", "cnc-003")
            new_pw = dict(line.split("=", 1) for line in out.stdout.splitlines())["password"]
            late = Client(broker.port, "cnc-003", new_pw)
            made.append(late)
            assert late.connect().is_failure
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGHUP)
            deadline = time.monotonic() + 10
            while True:
                again = Client(broker.port, "cnc-003", new_pw)
                made.append(again)
                if not again.connect().is_failure or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert again.connack is not None and not again.connack.is_failure
            assert again.publish("factory/s/l/cnc-003/status", b"up").value == 0
            assert ingest.wait_for(b"up")
        finally:
            for c in made:
                c.close()
