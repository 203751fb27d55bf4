#!/usr/bin/env bash
# Install, then run the self-contained demo (embedded broker, simulated fleet, ingest).
# Arguments go to `ingest demo`, e.g. scripts/demo.sh --duration 60
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/install.sh"
cd "$REPO"
exec .venv/bin/ingest demo "$@"
