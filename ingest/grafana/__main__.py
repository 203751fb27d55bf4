"""``python -m ingest.grafana [--out DIR]``: write the Grafana provisioning files."""

from __future__ import annotations

import argparse
from pathlib import Path

from ingest.grafana import write_provisioning

#: Relative to the working directory: run it from the repository's root.
DEFAULT_OUT = Path("grafana") / "provisioning"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.grafana",
        description="Write Grafana's data source, dashboards and alert rules (provisioning files).",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="the provisioning folder (default: grafana/provisioning)",
    )
    args = parser.parse_args(argv)
    for path in write_provisioning(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
