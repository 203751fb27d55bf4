"""Bare paho-mqtt drain rate: the reference of bench/e2e.py's single-reading cases.

    python bench/bare_paho.py --port P --client-id ID --expect N --report OUT.json

An MQTT 3.1.1 client (paho-mqtt 2) resumes the persistent session ``ID`` (clean_session
False), subscribes ``factory/#`` at QoS 1 and only counts messages; paho acknowledges each
one itself. It exits once it has N messages, or after ``--idle-timeout`` seconds without
one, and writes JSON: t_first / t_last (epoch s of the first and last message), count,
cpu_seconds (process CPU between them) and max_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from procstat import peak_rss_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--topic", default="factory/#")
    ap.add_argument("--expect", type=int, required=True)
    ap.add_argument("--idle-timeout", type=float, default=30.0)
    ap.add_argument("--report", type=Path, required=True)
    a = ap.parse_args()
    st: dict[str, Any] = {"count": 0, "t_first": 0.0, "t_last": 0.0, "cpu0": 0.0, "cpu1": 0.0}

    def on_connect(c: mqtt.Client, *_: Any) -> None:
        c.subscribe(a.topic, qos=1)

    def on_message(c: mqtt.Client, _u: Any, _m: mqtt.MQTTMessage) -> None:
        st["count"] += 1
        st["t_last"], st["cpu1"] = time.time(), time.process_time()
        if st["count"] == 1:
            st["t_first"], st["cpu0"] = st["t_last"], st["cpu1"]
        if st["count"] >= a.expect:
            c.disconnect()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, a.client_id, clean_session=False, protocol=mqtt.MQTTv311
    )
    client.on_connect, client.on_message = on_connect, on_message
    client.connect(a.host, a.port, keepalive=60)
    started = time.time()
    while st["count"] < a.expect:
        if client.loop(timeout=0.5) != mqtt.MQTT_ERR_SUCCESS:
            break
        if time.time() - (st["t_last"] or started) > a.idle_timeout:
            break
    client.disconnect()
    rss_mb = peak_rss_mb()
    out = {k: st[k] for k in ("t_first", "t_last", "count")}
    out |= {"cpu_seconds": st["cpu1"] - st["cpu0"], "max_rss_mb": rss_mb}
    a.report.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
