"""`ingest demo` end to end: embedded broker, simulated fleet, real consumer, file output."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_accounts_for_everything(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "ingest", "demo", "--duration", "8", "--devices", "3",
         "--out", str(out), "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    published = re.search(
        r"published\s+(\d+) samples \((\d+) readings\).*plus (\d+) malformed", text
    )
    ingested = re.search(r"ingested\s+(\d+) readings, (\d+) points written", text)
    rejected = re.search(r"rejected\s+(\d+) ", text)
    assert published and ingested and rejected, text
    readings, malformed = int(published[2]), int(published[3])
    assert readings > 0
    assert int(ingested[1]) == readings
    lines = (out / "telemetry.lp").read_text().splitlines()
    telemetry = [x for x in lines if x.startswith("telemetry,")]
    status = [x for x in lines if x.startswith("device_status,")]
    assert len(telemetry) == readings
    assert len(status) == 2 * 3  # birth and offline of each machine
    assert int(ingested[2]) == len(lines)
    assert int(rejected[1]) == malformed
    assert len((out / "rejected.jsonl").read_text().splitlines()) == malformed
    assert (out / "labels.csv").read_text().startswith("site,line,device,sensor,kind")
    assert "recall" in text and "precision" in text
