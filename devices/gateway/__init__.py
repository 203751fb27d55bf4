"""Gateway agent for a Raspberry Pi / PLC gateway: store-and-forward MQTT publishing.

Samples from a source (a CSV replay, a simulator, a PLC driver) are written to an
on-disk outbox first and published at QoS 1 from there; rows leave the outbox
only when the broker has acknowledged them. Run it with ``python -m devices.gateway``.
"""

from devices.gateway.agent import STAT_KEYS, GatewayAgent
from devices.gateway.buffer import BufferFull, OutboxBuffer, Row
from devices.gateway.sources import (
    CsvSource,
    SampleDict,
    SampleSource,
    SimulatedSource,
    parse_timestamp_ms,
)

__all__ = [
    "STAT_KEYS",
    "BufferFull",
    "CsvSource",
    "GatewayAgent",
    "OutboxBuffer",
    "Row",
    "SampleDict",
    "SampleSource",
    "SimulatedSource",
    "parse_timestamp_ms",
]
