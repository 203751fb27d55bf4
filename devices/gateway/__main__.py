"""``python -m devices.gateway``: run the store-and-forward gateway agent.

Examples::

    python -m devices.gateway --mqtt-url mqtt://broker:1883 --prefix factory \\
        --site s1 --line l1 --device press-7 --buffer /var/lib/gateway/outbox.db \\
        --csv export.csv --realtime

    python -m devices.gateway --mqtt-url mqtt://localhost --prefix factory \\
        --site s1 --line l1 --device sim-1 --buffer /tmp/outbox.db --simulate --rate 50

Exit status: 0 when done (source exhausted and outbox drained, ``--duration``
elapsed, or SIGINT/SIGTERM), 1 when the source fails, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

import orjson

from devices.contract import DEFAULT_LIMITS, IDENTIFIER_RE
from devices.gateway.agent import GatewayAgent
from devices.gateway.sources import MAX_SIM_RATE_HZ, CsvSource, SimulatedSource
from devices.mqtt_url import parse_mqtt_url

PROG = "python -m devices.gateway"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _identifier(kind: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if not IDENTIFIER_RE.match(text):
            raise argparse.ArgumentTypeError(
                f"invalid {kind} {text!r}: use 1-64 of A-Z a-z 0-9 _ . -"
            )
        return text

    check.__name__ = kind
    return check


def _prefix(text: str) -> str:
    if not text or not all(IDENTIFIER_RE.match(level) for level in text.split("/")):
        raise argparse.ArgumentTypeError(
            f"invalid prefix {text!r}: '/'-separated levels of 1-64 of A-Z a-z 0-9 _ . -"
        )
    return text


def _mqtt_url(text: str) -> str:
    try:
        parse_mqtt_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    check.__name__ = "integer"
    return check


def _positive_float(limit: float | None = None) -> Callable[[str], float]:
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text} must be a positive number")
        if limit is not None and value > limit:
            raise argparse.ArgumentTypeError(f"{text} is above the maximum {limit:g}")
        return value

    check.__name__ = "number"
    return check


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "Gateway agent: read samples from a CSV file or a simulator, keep them in an "
            "on-disk outbox and publish them at QoS 1 to the factory-ingest broker, "
            "riding out broker outages without loss."
        ),
    )
    parser.add_argument(
        "--mqtt-url", required=True, type=_mqtt_url, help="mqtt://[user:pass@]host[:port]"
    )
    parser.add_argument("--prefix", required=True, type=_prefix, help="topic prefix")
    parser.add_argument("--site", required=True, type=_identifier("site"))
    parser.add_argument("--line", required=True, type=_identifier("line"))
    parser.add_argument("--device", required=True, type=_identifier("device"))
    parser.add_argument(
        "--buffer", required=True, type=Path, metavar="PATH", help="outbox SQLite file"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, metavar="FILE", help="replay this CSV file")
    source.add_argument("--simulate", action="store_true", help="generate synthetic signals")
    parser.add_argument(
        "--realtime", action="store_true", help="CSV: pace rows by their timestamps"
    )
    parser.add_argument(
        "--speed", type=_positive_float(), default=1.0, help="CSV: replay speed-up (default 1)"
    )
    parser.add_argument("--ts-column", help="CSV: timestamp column (default: auto-detect)")
    parser.add_argument(
        "--rate",
        type=_positive_float(MAX_SIM_RATE_HZ),
        default=10.0,
        metavar="HZ",
        help="simulate: samples per second (default 10)",
    )
    parser.add_argument(
        "--count", type=_int_range(0, 2**62), help="simulate: stop after this many samples"
    )
    parser.add_argument("--seed", type=int, default=0, help="simulate: random seed")
    parser.add_argument(
        "--batch",
        type=_int_range(1, DEFAULT_LIMITS.max_samples_per_message),
        default=50,
        metavar="N",
        help="samples per message (default 50; 1 sends single-sample messages)",
    )
    parser.add_argument(
        "--duration", type=_positive_float(), metavar="S", help="stop after S seconds"
    )
    parser.add_argument(
        "--max-inflight", type=_int_range(1, 65_000), default=100, help="default 100"
    )
    parser.add_argument(
        "--max-buffer-rows", type=_int_range(1, 2**62), default=1_000_000, help="default 1e6"
    )
    parser.add_argument("--client-id", help="MQTT client id (default gw-<site>-<line>-<device>)")
    parser.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    parser.add_argument("--keepalive", type=_int_range(5, 65_535), default=30)
    parser.add_argument("--ca-file", help="CA bundle for mqtts:// brokers")
    parser.add_argument(
        "--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.realtime and not args.csv:
        parser.error("--realtime applies to --csv (the simulator always runs in real time)")
    if args.csv is not None and not args.csv.is_file():
        parser.error(f"CSV file not found: {args.csv}")
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    source: CsvSource | SimulatedSource
    try:
        if args.csv is not None:
            source = CsvSource(args.csv, args.ts_column, realtime=args.realtime, speed=args.speed)
        else:
            source = SimulatedSource(args.rate, args.seed, count=args.count)
        agent = GatewayAgent(
            args.mqtt_url,
            prefix=args.prefix,
            site=args.site,
            line=args.line,
            device=args.device,
            buffer_path=args.buffer,
            batch_size=args.batch,
            max_inflight=args.max_inflight,
            client_id=args.client_id,
            keepalive=args.keepalive,
            protocol=args.protocol,
            max_buffer_rows=args.max_buffer_rows,
            ca_file=args.ca_file,
        )
    except (OSError, ValueError) as exc:
        parser.error(str(exc))

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    timer: threading.Timer | None = None
    if args.duration is not None:
        timer = threading.Timer(args.duration, stop.set)
        timer.daemon = True
        timer.start()
    status = 0
    try:
        stats = agent.run(source, stop)
    except Exception as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        stats = agent.stats()
        status = 1
    finally:
        if timer is not None:
            timer.cancel()
        agent.close()
    print(orjson.dumps(stats).decode())
    return status


if __name__ == "__main__":
    sys.exit(main())
