"""Fleet simulator: plausible CNC machine telemetry with labelled faults, published over MQTT.

>>> fleet = Fleet(devices=4, seed=1, start_ms=1_700_000_000_000)
>>> batches = fleet.generate(60)  # one minute of 10 Hz samples per device, offline
>>> write_labels("labels.csv", fleet.labels)  # doctest: +SKIP
>>> run_fleet("mqtt://localhost:1883", fleet=fleet, duration_s=600)  # doctest: +SKIP
"""

from devices.simulator.fleet import (
    ALL_KINDS,
    FAULT_KINDS,
    DeviceBatch,
    DeviceRef,
    FaultLabel,
    Fleet,
    read_labels,
    write_labels,
)
from devices.simulator.publisher import (
    BAD_KINDS,
    SimStats,
    SimulatorConnectionError,
    bad_payload,
    encode_messages,
    run_fleet,
)
from devices.simulator.signals import SENSORS, UNITS

__all__ = [
    "ALL_KINDS",
    "BAD_KINDS",
    "FAULT_KINDS",
    "SENSORS",
    "UNITS",
    "DeviceBatch",
    "DeviceRef",
    "FaultLabel",
    "Fleet",
    "SimStats",
    "SimulatorConnectionError",
    "bad_payload",
    "encode_messages",
    "read_labels",
    "run_fleet",
    "write_labels",
]
