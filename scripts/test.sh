#!/usr/bin/env bash
# Install, start the real services (InfluxDB 1.6, VictoriaMetrics, Mosquitto), lint, test.
# Needs root on Debian for the packages; extra arguments go to pytest.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
scripts/install.sh --dev
scripts/services.sh start
echo "== lint (ruff, mypy)"
.venv/bin/ruff check ingest devices tests bench
.venv/bin/mypy ingest devices
echo "== tests"
set +e
CI="${CI:-}" .venv/bin/pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$rc"
