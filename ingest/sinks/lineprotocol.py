"""InfluxDB line protocol for the points ingest writes.

Schema (contract v1):

* ``telemetry,device=D,line=L,sensor=S,site=X value=…,mean=…,std=…,z=…,score=…,``
  ``anomaly=true|false[,seq=Ni][,rx_time=true] <ms>``
* ``device_status,device=D,line=L,site=X online=true|false <ms>``
* ``anomaly_events,device=D,kind=anomaly|gap,line=L,sensor=S,site=X``
  ``status="open"|"closed",open=true|false,detectors="…"[,peak_score=…]``
  ``[,end=Ni,duration_s=…] <start ms>``: one point per episode, at its start; the
  closing write has the same series and time, so it completes the opening one.
* ``ingest_stats,instance=I <counter>=Ni,...,<gauge>=…,... <ms>``: the service's own
  counters (cumulative, integers) and gauges (floats), every ``service.stats_interval``;
  plus ``ingest_stats,instance=I,reason=R rejected=Ni <ms>`` per rejection reason.

Timestamps are the device's, in milliseconds, so a redelivered sample
overwrites its own point instead of adding one. Tag values are validated
identifiers; they are escaped all the same, so no input can change the
structure of a line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy.typing as npt

TELEMETRY = "telemetry"
DEVICE_STATUS = "device_status"
ANOMALY_EVENTS = "anomaly_events"
INGEST_STATS = "ingest_stats"

_TAG_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
_AMBIGUOUS = re.compile(r"\\([,= ]|$)")


def escape_tag(value: str) -> str:
    """Escape a tag key or value (comma, equals sign, space).

    A backslash is written as it is: InfluxDB 1.6.7 keeps an escaped one doubled while
    VictoriaMetrics undoes it, but both read a lone backslash back as itself (tested).
    Newlines cannot be escaped, and a backslash before a comma, equals sign, space or
    the end is ambiguous: both are refused. Contract identifiers contain none of these.
    """
    if "\n" in value or "\r" in value:
        raise ValueError("line protocol tags cannot contain newlines")
    if "\\" in value and _AMBIGUOUS.search(value):
        raise ValueError("a backslash before a comma, '=', a space or the end of a tag")
    return value.translate(_TAG_ESCAPES)


def series_key(measurement: str, tags: dict[str, str]) -> str:
    """``measurement,k=v,...`` with tags sorted by key (InfluxDB's own order)."""
    body = ",".join(f"{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags.items()))
    return f"{escape_tag(measurement)},{body}"


def telemetry_series(site: str, line: str, device: str, sensor: str) -> str:
    return series_key(TELEMETRY, {"site": site, "line": line, "device": device, "sensor": sensor})


def event_series(site: str, line: str, device: str, sensor: str) -> str:
    """Series key of the ``anomaly_events`` points, without the ``kind`` tag."""
    return series_key(
        ANOMALY_EVENTS, {"site": site, "line": line, "device": device, "sensor": sensor}
    )


def event_line(
    series: str,
    kind: str,
    start_ms: int,
    end_ms: int | None,
    peak_score: float | None,
    detectors: str,
) -> str:
    """An open (``end_ms`` None) or closed episode of a stream, stamped with its start."""
    # "kind" sorts between "device" and "line": insert it where InfluxDB would.
    head, sep, rest = series.partition(",line=")
    fields = f'detectors="{detectors}"'
    if peak_score is not None and math.isfinite(peak_score):
        fields += f",peak_score={peak_score!r}"
    if end_ms is None:
        fields += ',status="open",open=true'
    else:
        duration = max(end_ms - start_ms, 0) / 1000.0
        fields += f',status="closed",open=false,end={end_ms}i,duration_s={duration!r}'
    return f"{head},kind={escape_tag(kind)}{sep}{rest} {fields} {start_ms}"


def format_float(x: float) -> str:
    """Shortest round-trip repr; InfluxDB and VictoriaMetrics both parse exponents."""
    return repr(float(x))


#: Significant digits of the statistics fields (mean, std, z, score). The reading
#: itself (``value``) is always written exactly (it reads back as the same double).
STAT_DIGITS = 12


def format_stat(x: float) -> str:
    """A statistic as :func:`telemetry_body` writes it: ``%.12g``, with ``.0`` added
    to a whole number in positional form (``3.0``, not ``3``) as ``repr`` would."""
    text = format(float(x), f".{STAT_DIGITS}g")
    if "." in text or "e" in text or "n" in text:
        return text
    return text + ".0"


def telemetry_lines(
    series: Sequence[str],
    rows: npt.NDArray[Any],
    ts: npt.NDArray[Any],
    values: npt.NDArray[Any],
    mean: npt.NDArray[Any],
    std: npt.NDArray[Any],
    z: npt.NDArray[Any],
    score: npt.NDArray[Any],
    anomaly: npt.NDArray[Any],
    seq: Sequence[int],
    rx_time: Sequence[bool],
) -> list[str]:
    """One line per reading, in plain Python: the reference that :func:`telemetry_body`
    is tested against. Statistics that are not defined (a stream's first sample,
    the z of a huge value) are left out: InfluxDB refuses NaN and infinity."""
    out: list[str] = []
    append = out.append
    for i, (row, t, v, m, s, zz, sc, an) in enumerate(
        zip(
            rows.tolist(),
            ts.tolist(),
            values.tolist(),
            mean.tolist(),
            std.tolist(),
            z.tolist(),
            score.tolist(),
            anomaly.tolist(),
            strict=True,
        )
    ):
        fields = f"value={v!r}"
        if math.isfinite(m) and math.isfinite(s):
            fields += f",mean={format_stat(m)},std={format_stat(s)}"
        if math.isfinite(zz):
            fields += f",z={format_stat(zz)}"
        if math.isfinite(sc):
            fields += f",score={format_stat(sc)}"
        fields += ",anomaly=true" if an else ",anomaly=false"
        if seq[i] >= 0:
            fields += f",seq={seq[i]}i"
        if rx_time[i]:
            fields += ",rx_time=true"
        append(f"{series[row]} {fields} {t}")
    return out


def status_line(site: str, line: str, device: str, online: bool, ts_ms: int) -> str:
    key = series_key(DEVICE_STATUS, {"site": site, "line": line, "device": device})
    return f"{key} online={'true' if online else 'false'} {ts_ms}"


def stats_lines(
    instance: str,
    counters: Mapping[str, int],
    gauges: Mapping[str, float],
    rejects: Mapping[str, int],
    ts_ms: int,
) -> list[str]:
    """The service's own metrics as ``ingest_stats`` points.

    Counters are written as integers and gauges as floats, always, so a field's
    type never changes from one write to the next (InfluxDB refuses a change).
    A gauge that is not finite is left out of that point. Each rejection reason
    gets its own series (tag ``reason``) with one integer field, ``rejected``.
    """
    key = series_key(INGEST_STATS, {"instance": instance})
    fields = [f"{escape_tag(name)}={int(n)}i" for name, n in counters.items()]
    fields += [
        f"{escape_tag(name)}={format_float(v)}" for name, v in gauges.items() if math.isfinite(v)
    ]
    out = [f"{key} {','.join(fields)} {ts_ms}"]
    for reason, n in sorted(rejects.items()):
        reason_key = series_key(INGEST_STATS, {"instance": instance, "reason": reason})
        out.append(f"{reason_key} rejected={int(n)}i {ts_ms}")
    return out
