"""The processing step: messages -> decoded readings -> detectors -> line protocol."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from devices.contract import Limits
from ingest.decode import DecodedBatch, Decoder, Rejection
from ingest.processing import kernels as k
from ingest.processing.detectors import (
    DetectorParams,
    DetectorRule,
    Detectors,
    DetectResult,
    StreamRegistry,
    detector_names,
)
from ingest.sinks import lpformat
from ingest.sinks.base import LineBatch
from ingest.sinks.lineprotocol import event_line, event_series, status_line, telemetry_series

#: Called with (registry, rows, ts, values, anomaly) after each batch; the demo scores with it.
Arr = npt.NDArray[Any]
ReadingsHook = Callable[[StreamRegistry, Arr, Arr, Arr, Arr], None]


@dataclass(slots=True)
class Processed:
    lines: LineBatch = field(default_factory=LineBatch)
    rejections: list[Rejection] = field(default_factory=list)
    samples: int = 0
    readings: int = 0
    anomalies: int = 0
    events_opened: int = 0
    events_closed: int = 0
    gaps: int = 0


class Processor:
    """Stateful: owns the stream registry and the detectors' state."""

    def __init__(
        self,
        prefix: str,
        limits: Limits,
        params: DetectorParams,
        max_streams: int,
        on_readings: ReadingsHook | None = None,
        rules: list[DetectorRule] | None = None,
    ) -> None:
        self.registry = StreamRegistry(max_streams)
        self.decoder = Decoder(prefix, limits, self.registry)
        self.detectors = Detectors(self.registry, params, rules or [])
        self.series = lpformat.SeriesTable()
        self.event_series: dict[int, str] = {}
        self.on_readings = on_readings
        #: Streams reported silent by :meth:`sweep_silent`, with the start of the silence.
        self.silent: dict[int, int] = {}
        #: When each stream (global row) was last received, wall clock in ms.
        self.last_seen = np.zeros(0, np.float64)

    def warm_up(self) -> None:
        """Compile / load the kernels before the first message arrives."""
        self.detectors.warm_up_jit()
        lpformat.warm_up()

    def _event_series(self, row: int) -> str:
        key = self.event_series.get(row)
        if key is None:
            key = self.event_series[row] = event_series(*self.registry.keys[row])
        return key

    def _event_lines(self, rows: Arr, ts: Arr, res: DetectResult, out: list[str]) -> None:
        """Episode and gap lines for the ``anomaly_events`` measurement."""
        for i in np.flatnonzero(res.event).tolist():
            opened = int(res.event[i]) == k.EVENT_OPENED
            out.append(
                event_line(
                    self._event_series(int(rows[i])),
                    "anomaly",
                    int(res.ev_start[i]),
                    None if opened else int(res.ev_end[i]),
                    float(res.ev_peak[i]),
                    ",".join(detector_names(int(res.ev_dets[i]))),
                )
            )
        for i in np.flatnonzero(res.gap).tolist():
            row = int(rows[i])
            start = self.silent.pop(row, int(res.gap[i]))
            out.append(event_line(self._event_series(row), "gap", start, int(ts[i]), None, "gap"))

    def _close_silences(self, rows: Arr, ts: Arr, out: list[str]) -> int:
        """A stream the sweep found silent has spoken again: close its gap event."""
        back = np.flatnonzero(np.isin(rows, np.fromiter(self.silent, np.int64)))
        if not len(back):
            return 0
        last: dict[int, int] = {}
        for i in back.tolist():
            last[int(rows[i])] = max(last.get(int(rows[i]), 0), int(ts[i]))
        for row, end in last.items():
            start = self.silent.pop(row)
            out.append(event_line(self._event_series(row), "gap", start, end, None, "gap"))
        return len(last)

    def _track_streams(self, now_ms: float) -> None:
        """Give streams new to :attr:`last_seen` (registered, or restored from a
        snapshot and not heard from since) ``now_ms`` as their last arrival."""
        n, have = len(self.registry), self.last_seen.shape[0]
        if have < n:
            grown = np.full(max(n, 2 * have), now_ms, np.float64)
            grown[:have] = self.last_seen
            self.last_seen = grown

    def sweep_silent(self, now_ms: int) -> list[str]:
        """Open a ``gap`` event for every stream silent too long (once per silence), and
        end the anomaly episode it was in, if any: no sample will end it meanwhile."""
        self._track_streams(time.time() * 1000.0)
        lines = []
        for row in self.detectors.silent(now_ms, self.last_seen).tolist():
            if row in self.silent:
                continue
            series = self._event_series(row)
            episode = self.detectors.end_episode(row)
            if episode is not None:
                start, end, peak, dets = episode
                names = ",".join(detector_names(dets))
                lines.append(event_line(series, "anomaly", start, end, peak, names))
            start = self.detectors.last_ts(row)
            self.silent[row] = start
            lines.append(event_line(series, "gap", start, None, None, "gap"))
        return lines

    def process(self, messages: list[tuple[str, bytes, float]]) -> Processed:
        batch = DecodedBatch()
        self.decoder.decode(messages, batch)
        out = Processed(rejections=batch.rejections, samples=batch.samples)
        extra: list[str] = []
        if batch.rows:
            rows, ts, values = batch.arrays()
            stats = self.detectors.update(rows, ts, values)
            keys = self.registry.keys
            if len(self.series) < len(keys):
                self.series.extend([telemetry_series(*key) for key in keys[len(self.series) :]])
            body = lpformat.telemetry_body(
                self.series,
                rows,
                ts,
                values,
                stats.mean,
                stats.std,
                stats.z,
                stats.score,
                stats.anomaly,
                np.fromiter(batch.seq, np.int64, len(batch.seq)),
                np.fromiter(batch.rx_time, np.bool_, len(batch.rx_time)),
            )
            out.lines.add_body(body, len(rows))
            out.readings = len(rows)
            out.anomalies = int(stats.anomaly.sum())
            if stats.event.any() or stats.gap.any():
                opened = int((stats.event == k.EVENT_OPENED).sum())
                out.events_opened += opened
                out.events_closed += int(np.count_nonzero(stats.event)) - opened
                out.gaps += int(np.count_nonzero(stats.gap))
                self._event_lines(rows, ts, stats, extra)
            if self.silent:
                out.gaps += self._close_silences(rows, ts, extra)
            now = time.time() * 1000.0
            self._track_streams(now)
            self.last_seen[rows] = now
            if self.on_readings is not None:
                self.on_readings(self.registry, rows, ts, values, stats.anomaly)
        for st in batch.statuses:
            extra.append(status_line(st.site, st.line, st.device, st.online, st.ts_ms))
        out.lines.extend(extra)
        return out
