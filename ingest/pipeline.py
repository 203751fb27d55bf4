"""The processing step: messages -> decoded readings -> detectors -> line protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from devices.contract import Limits
from ingest.decode import DecodedBatch, Decoder, Rejection
from ingest.processing.detectors import RollingZScore, StreamRegistry, ZScoreParams
from ingest.sinks.lineprotocol import status_line, telemetry_lines, telemetry_series

#: Called with (registry, rows, ts, values, anomaly) after each batch; the demo scores with it.
Arr = npt.NDArray[Any]
ReadingsHook = Callable[[StreamRegistry, Arr, Arr, Arr, Arr], None]


@dataclass(slots=True)
class Processed:
    lines: list[str] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    samples: int = 0
    readings: int = 0
    anomalies: int = 0


class Processor:
    """Stateful: owns the stream registry and the detectors' state."""

    def __init__(
        self,
        prefix: str,
        limits: Limits,
        params: ZScoreParams,
        max_streams: int,
        on_readings: ReadingsHook | None = None,
    ) -> None:
        self.registry = StreamRegistry(max_streams)
        self.decoder = Decoder(prefix, limits, self.registry)
        self.zscore = RollingZScore(params)
        self.series: list[str] = []
        self.on_readings = on_readings

    def warm_up(self) -> None:
        """Compile / load the kernels before the first message arrives."""
        self.zscore.warm_up_jit()

    def process(self, messages: list[tuple[str, bytes, float]]) -> Processed:
        batch = DecodedBatch()
        self.decoder.decode(messages, batch)
        out = Processed(rejections=batch.rejections, samples=batch.samples)
        if batch.rows:
            rows, ts, values = batch.arrays()
            stats = self.zscore.update(rows, ts, values)
            keys = self.registry.keys
            while len(self.series) < len(keys):
                self.series.append(telemetry_series(*keys[len(self.series)]))
            out.lines = telemetry_lines(
                self.series,
                rows,
                ts,
                values,
                stats.mean,
                stats.std,
                stats.z,
                stats.score,
                stats.anomaly,
                batch.seq,
                batch.rx_time,
            )
            out.readings = len(rows)
            out.anomalies = int(stats.anomaly.sum())
            if self.on_readings is not None:
                self.on_readings(self.registry, rows, ts, values, stats.anomaly)
        for st in batch.statuses:
            out.lines.append(status_line(st.site, st.line, st.device, st.online, st.ts_ms))
        return out
