"""The ``ingest`` command: run, demo, simulate, backtest, evaluate, grafana, schema."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ingest.config import ConfigError, load_settings


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from ingest.service import IngestService

    settings = load_settings(args.config)
    _setup_logging(settings.service.log_level)
    service = IngestService(settings)

    def _stop(signum: int, frame: Any) -> None:
        logging.getLogger("ingest").info("received %s, shutting down", signal.Signals(signum).name)
        service.request_stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    s = settings
    target = s.influx.url or f"file {s.influx.file}"
    logging.getLogger("ingest").info(
        "ingest starting: mqtt %s (client id %s, prefix %s) -> %s (%s)",
        service.source.url.redacted(),
        s.mqtt.client_id,
        s.mqtt.topic_prefix,
        target,
        s.influx.api if s.influx.url else "line protocol",
    )
    code = service.run()
    if code and service.exit_reason:
        print(f"ingest: error: {service.exit_reason}", file=sys.stderr)
    return code


def cmd_schema(args: argparse.Namespace) -> int:
    from devices.contract import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=False) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from devices.simulator import Fleet, run_fleet

    _setup_logging("INFO")
    fleet = Fleet(
        devices=args.devices, rate_hz=args.rate, seed=args.seed, fault_rate=args.fault_rate
    )
    stats = run_fleet(
        args.mqtt_url,
        prefix=args.prefix,
        fleet=fleet,
        duration_s=args.duration,
        batch=args.batch,
        labels_path=args.labels,
        realtime=not args.fast,
        bad_message_rate=args.bad_rate,
    )
    print(json.dumps(_as_dict(stats), indent=2, default=str))
    return 0


def _as_dict(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _as_dict(getattr(obj, k)) for k in obj.__dataclass_fields__}
    return obj


def cmd_demo(args: argparse.Namespace) -> int:
    from ingest.demo import run_demo

    code: int = run_demo(args)
    return code


def cmd_backtest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ingest.evaluation.runner import backtest

    settings = load_settings(args.config)
    try:
        flagged = backtest(Path(args.input), Path(args.out), settings.processing)
    except (OSError, ValueError) as exc:
        print(f"ingest: error: {exc}", file=sys.stderr)
        return 1
    for name, count in flagged.items():
        print(f"{name}: {count} anomalous rows")
    print(f"wrote {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ingest.evaluation import runner

    processing = load_settings(args.config).processing
    root = Path(args.dir)
    if not root.is_dir():
        print(f"ingest: error: {root} is not a folder", file=sys.stderr)
        return 1
    if args.benchmark == "nab":
        print(runner.format_nab(runner.evaluate_nab(root, processing)))
    else:
        if args.fit_rows:
            processing = processing.model_copy(update={"learn_limit": args.fit_rows})
        print(runner.format_skab(runner.evaluate_skab(root, processing)))
    return 0


def cmd_grafana_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ingest.grafana import write_provisioning

    for path in write_provisioning(Path(args.out)):
        print(path)
    return 0


def cmd_grafana_push(args: argparse.Namespace) -> int:
    from ingest.grafana.push import PushError, push

    token = args.token or os.environ.get("GRAFANA_TOKEN", "")
    password = args.influx_password or os.environ.get("GRAFANA_INFLUX_PASSWORD", "")
    try:
        result = push(
            args.url,
            token,
            database=args.database,
            influx_url=args.influx_url,
            influx_user=args.influx_user,
            influx_password=password,
        )
    except (PushError, ValueError) as exc:
        print(f"ingest: error: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("factory-ingest")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ingest", description=__doc__)
    parser.add_argument("--version", action="version", version=f"factory-ingest {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the ingest service")
    run.add_argument("--config", help="TOML file; INGEST_* environment variables override it")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="a self-contained demo: broker, simulated fleet, ingest")
    demo.add_argument("--mqtt-url", help="use this broker instead of starting one")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds (default 30)")
    demo.add_argument("--devices", type=int, default=12)
    demo.add_argument("--rate", type=float, default=10.0, help="samples/s per device")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument(
        "--out",
        default="demo-output",
        help="folder for the line-protocol file, labels and dead letters",
    )
    demo.add_argument("--config", help="TOML file for the ingest side (e.g. an InfluxDB)")
    demo.add_argument("--quiet", action="store_true", help="no live progress line")
    demo.set_defaults(func=cmd_demo)

    sim = sub.add_parser("simulate", help="publish a simulated fleet with injected faults")
    sim.add_argument(
        "--mqtt-url", default=os.environ.get("INGEST_MQTT_URL", "mqtt://127.0.0.1:1883")
    )
    sim.add_argument("--prefix", default=os.environ.get("INGEST_TOPIC_PREFIX", "factory"))
    sim.add_argument("--devices", type=int, default=12)
    sim.add_argument("--rate", type=float, default=10.0, help="samples/s per device")
    sim.add_argument("--duration", type=float, default=60.0, help="seconds of signal")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--batch", type=int, default=10, help="samples per message")
    sim.add_argument(
        "--fault-rate", type=float, default=0.5, help="faults per sensor per simulated minute"
    )
    sim.add_argument(
        "--bad-rate", type=float, default=0.0, help="fraction of extra malformed messages"
    )
    sim.add_argument("--labels", default="labels.csv", help="ground-truth CSV of injected faults")
    sim.add_argument("--fast", action="store_true", help="as fast as possible, not in real time")
    sim.set_defaults(func=cmd_simulate)

    bt = sub.add_parser(
        "backtest", help="replay a CSV file through the detectors (tune them on history)"
    )
    bt.add_argument("input", help="CSV: timestamp,value or one column per sensor")
    bt.add_argument("--out", required=True, help="CSV to write: timestamp,value,score,anomaly")
    bt.add_argument("--config", help="TOML file whose [processing] section configures detectors")
    bt.set_defaults(func=cmd_backtest)

    ev = sub.add_parser("evaluate", help="score the detectors on the NAB or SKAB benchmark")
    ev.add_argument("benchmark", choices=["nab", "skab"])
    ev.add_argument("dir", help="the benchmark's folder (NAB: data/, labels/; SKAB: valve1/ ...)")
    ev.add_argument("--config", help="TOML file whose [processing] section configures detectors")
    ev.add_argument(
        "--fit-rows",
        type=int,
        default=400,
        help="SKAB: learn from each file's first N rows, then keep the baselines fixed, as "
        "the benchmark's protocol fits on them (default 400; 0 keeps learning)",
    )
    ev.set_defaults(func=cmd_evaluate)

    graf = sub.add_parser("grafana", help="Grafana dashboards and alerts, provisioned as code")
    gsub = graf.add_subparsers(dest="grafana_command", required=True)
    export = gsub.add_parser("export", help="write the provisioning files (the compose stack's)")
    export.add_argument("--out", default="grafana/provisioning", help="provisioning folder")
    export.set_defaults(func=cmd_grafana_export)
    gpush = gsub.add_parser(
        "push", help="put the data source, dashboards and alert rules into a running Grafana"
    )
    gpush.add_argument("--url", required=True, help="Grafana's base URL")
    gpush.add_argument(
        "--token", help="service account token (default: $GRAFANA_TOKEN; keeps it out of ps)"
    )
    gpush.add_argument("--database", default="factory", help="InfluxQL database (v2: bucket)")
    gpush.add_argument("--influx-url", default="http://influxdb:8086", help="as Grafana sees it")
    gpush.add_argument("--influx-user", default="grafana", help="read-only InfluxQL login")
    gpush.add_argument("--influx-password", help="its password (default: $GRAFANA_INFLUX_PASSWORD)")
    gpush.set_defaults(func=cmd_grafana_push)

    schema = sub.add_parser("schema", help="print the JSON Schema of the telemetry payload")
    schema.add_argument("--out", help="write to this file instead of stdout")
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"ingest: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
