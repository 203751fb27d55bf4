"""Unit tests of the gateway: outbox buffer, sample sources, offline agent, CLI.

Nothing here needs a broker: the agent tests point it at a closed loopback port.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from devices.contract import TELEMETRY_ADAPTER, Batch, Sample
from devices.gateway import (
    BufferFull,
    CsvSource,
    GatewayAgent,
    OutboxBuffer,
    SimulatedSource,
    parse_timestamp_ms,
)
from devices.gateway.__main__ import main as gateway_main

APRIL_2014_MS = 1_396_310_400_000  # 2014-04-01T00:00:00Z


# ---------------------------------------------------------------- OutboxBuffer


def test_append_peek_in_id_order(tmp_path: Path) -> None:
    with OutboxBuffer(tmp_path / "o.db") as buf:
        ids = [buf.append(f"t/{i}", f"p{i}".encode()) for i in range(10)]
        assert ids == sorted(ids) and len(set(ids)) == 10
        assert len(buf) == 10
        rows = buf.peek(0, 100)
        assert [r.id for r in rows] == ids
        assert [r.topic for r in rows] == [f"t/{i}" for i in range(10)]
        assert rows[3].payload == b"p3"
        assert isinstance(rows[0].payload, bytes)
        assert [r.id for r in buf.peek(ids[4], 3)] == ids[5:8]
        assert buf.peek(ids[-1], 10) == []
        assert buf.peek(0, 0) == []


def test_delete(tmp_path: Path) -> None:
    with OutboxBuffer(tmp_path / "o.db") as buf:
        ids = [buf.append("t", b"x") for _ in range(6)]
        assert buf.delete([ids[0], ids[2], ids[4]]) == 3
        assert [r.id for r in buf.peek(0, 10)] == [ids[1], ids[3], ids[5]]
        assert len(buf) == 3
        assert buf.delete([ids[0], 999_999]) == 0  # unknown / already gone
        assert buf.delete([]) == 0
        assert buf.delete(ids) == 3
        assert len(buf) == 0
        assert buf.oldest_age_ms() is None


def test_oldest_age(tmp_path: Path) -> None:
    with OutboxBuffer(tmp_path / "o.db") as buf:
        buf.append("t", b"x")
        time.sleep(0.05)
        age = buf.oldest_age_ms()
        assert age is not None and 40 <= age < 5000


def test_persistence_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "o.db"
    buf = OutboxBuffer(path)
    ids = [buf.append("t", bytes([i])) for i in range(5)]
    assert buf.reserve_seq(7) == 0
    buf.delete(ids[:2])
    buf.close()
    buf.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        buf.append("t", b"x")

    with OutboxBuffer(path) as again:
        assert len(again) == 3
        assert [r.payload for r in again.peek(0, 10)] == [bytes([2]), bytes([3]), bytes([4])]
        assert again.next_seq() == 7
        assert again.reserve_seq(3) == 7
        again.delete(r.id for r in again.peek(0, 10))
        assert len(again) == 0
    with OutboxBuffer(path) as third:
        # AUTOINCREMENT: ids are never reused, even after the table was emptied.
        assert third.append("t", b"new") > ids[-1]
        assert third.reserve_seq(1) == 10


def test_wal_mode(tmp_path: Path) -> None:
    with OutboxBuffer(tmp_path / "o.db"):
        conn = sqlite3.connect(tmp_path / "o.db")
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()


def test_full_buffer_refuses_new_rows(tmp_path: Path) -> None:
    with OutboxBuffer(tmp_path / "o.db", max_rows=3) as buf:
        ids = [buf.append("t", bytes([i])) for i in range(3)]
        with pytest.raises(BufferFull):
            buf.append("t", b"newest")
        assert len(buf) == 3
        assert [r.payload for r in buf.peek(0, 10)] == [b"\x00", b"\x01", b"\x02"]
        buf.delete(ids[:1])
        buf.append("t", b"fits again")
        assert len(buf) == 3
    # The limit also holds for rows found on disk at open.
    with OutboxBuffer(tmp_path / "o.db", max_rows=2) as smaller, pytest.raises(BufferFull):
        smaller.append("t", b"x")
    with pytest.raises(ValueError):
        OutboxBuffer(tmp_path / "x.db", max_rows=0)


def test_thread_safety(tmp_path: Path) -> None:
    with OutboxBuffer(tmp_path / "o.db", synchronous="NORMAL") as buf:
        errors: list[BaseException] = []

        def writer(k: int) -> None:
            try:
                for i in range(100):
                    buf.append(f"t/{k}", f"{k}-{i}".encode())
                    if i % 10 == 9:
                        buf.peek(0, 5)
                        buf.reserve_seq(1)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        assert len(buf) == 800
        rows = buf.peek(0, 1000)
        assert len({r.id for r in rows}) == 800
        # Each writer's rows keep their relative order.
        for k in range(8):
            mine = [r.payload.decode() for r in rows if r.topic == f"t/{k}"]
            assert mine == [f"{k}-{i}" for i in range(100)]
        assert buf.next_seq() == 80


# ------------------------------------------------------------------- CSV source


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_epoch_ms_semicolon(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.csv",
        "ts;spindle_temp;load\n1396310400000;41.5;0.25\n1396310401000;41,75;0.5\n",
    )
    src = CsvSource(path)
    assert src.delimiter == ";"
    assert src.sensors == ["spindle_temp", "load"]
    assert list(src) == [
        {"ts": APRIL_2014_MS, "values": {"spindle_temp": 41.5, "load": 0.25}},
        {"ts": APRIL_2014_MS + 1000, "values": {"spindle_temp": 41.75, "load": 0.5}},
    ]


def test_csv_epoch_ms_comma(tmp_path: Path) -> None:
    path = write(tmp_path / "b.csv", "ts,a,b\n1396310400000,1,2\n1396310400500,3,\n")
    src = CsvSource(path)
    assert src.delimiter == ","
    assert list(src) == [
        {"ts": APRIL_2014_MS, "values": {"a": 1.0, "b": 2.0}},
        {"ts": APRIL_2014_MS + 500, "values": {"a": 3.0}},  # empty cell skipped
    ]


def test_csv_iso_datetime_comma(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.csv",
        "timestamp,value,machine_status\n"
        "2014-04-01 00:00:00,73.96,NORMAL\n"
        "2014-04-01 00:05:00,74.93,BROKEN\n",
    )
    src = CsvSource(path)
    assert src.ts_index == 0
    assert list(src) == [
        {"ts": APRIL_2014_MS, "values": {"value": 73.96}},
        {"ts": APRIL_2014_MS + 300_000, "values": {"value": 74.93}},
    ]


def test_csv_iso_datetime_semicolon_with_index_column(tmp_path: Path) -> None:
    path = write(
        tmp_path / "d.csv",
        ";Zeit;Temperatur (°C);Druck bar\n"
        "0;2014-04-01 00:00:00;20,5;1,01\n"
        "1;2014-04-01 00:00:01;20,6;1,02\n",
    )
    src = CsvSource(path)  # "Zeit" is not a known name: found from the first row
    assert src.delimiter == ";"
    assert src.sensors == ["Temperatur_C", "Druck_bar"]
    samples = list(src)
    assert samples[0] == {
        "ts": APRIL_2014_MS,
        "values": {"Temperatur_C": 20.5, "Druck_bar": 1.01},
    }
    assert samples[1]["ts"] == APRIL_2014_MS + 1000


def test_csv_explicit_ts_column_and_tab(tmp_path: Path) -> None:
    path = write(
        tmp_path / "e.tsv", "x\twhen\n5\t2014-04-01T00:00:00Z\n6\t2014-04-01T02:00:01+02:00\n"
    )
    src = CsvSource(path, ts_column="when")
    assert src.delimiter == "\t"
    assert [s["ts"] for s in src] == [APRIL_2014_MS, APRIL_2014_MS + 1000]
    with pytest.raises(ValueError, match="no column"):
        CsvSource(path, ts_column="nope")


def test_csv_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        CsvSource(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="no timestamp column"):
        CsvSource(write(tmp_path / "f.csv", "a,b\n1,2\n"))
    bad = write(tmp_path / "g.csv", "ts,a\n1396310400000,1\nyesterday,2\n")
    with pytest.raises(ValueError, match=r"g\.csv:3"):
        list(CsvSource(bad))


def test_csv_realtime_pacing_and_rebase(tmp_path: Path) -> None:
    rows = "".join(f"{APRIL_2014_MS + i * 1000},{i}\n" for i in range(4))
    path = write(tmp_path / "h.csv", "ts,v\n" + rows)
    start = time.monotonic()
    samples = list(CsvSource(path, realtime=True, speed=20.0, rebase=True))
    elapsed = time.monotonic() - start
    assert 0.12 <= elapsed < 2.0  # 3 s of data at 20x
    now_ms = time.time_ns() // 1_000_000
    assert abs(samples[0]["ts"] - now_ms) < 5_000
    assert [s["ts"] - samples[0]["ts"] for s in samples] == [0, 1000, 2000, 3000]
    stop = threading.Event()
    stop.set()
    assert list(CsvSource(path, realtime=True).iter_samples(stop)) == []


def test_parse_timestamp_forms() -> None:
    assert parse_timestamp_ms("1396310400000") == APRIL_2014_MS
    assert parse_timestamp_ms("1396310400") == APRIL_2014_MS  # epoch seconds
    assert parse_timestamp_ms("1396310400.25") == APRIL_2014_MS + 250
    assert parse_timestamp_ms("2014-04-01 00:00:00") == APRIL_2014_MS
    assert parse_timestamp_ms("2014-04-01T00:00:00.123Z") == APRIL_2014_MS + 123
    assert parse_timestamp_ms(" 2014-04-01T07:00:00+07:00 ") == APRIL_2014_MS
    for bad in ("", "soon", "-5", "nan"):
        with pytest.raises(ValueError):
            parse_timestamp_ms(bad)


# ------------------------------------------------------------ simulated source


def test_simulated_source() -> None:
    a = list(SimulatedSource(rate_hz=100, seed=5, count=50, realtime=False, start_ms=APRIL_2014_MS))
    b = list(SimulatedSource(rate_hz=100, seed=5, count=50, realtime=False, start_ms=APRIL_2014_MS))
    assert a == b and len(a) == 50
    assert [s["ts"] for s in a[:3]] == [APRIL_2014_MS, APRIL_2014_MS + 10, APRIL_2014_MS + 20]
    assert set(a[0]["values"]) == set(SimulatedSource.DEFAULT_SENSORS)
    other = list(SimulatedSource(rate_hz=100, seed=6, count=50, realtime=False))
    assert other[0]["values"] != a[0]["values"]
    # Without start_ms the series ends "now", never in the future.
    assert other[-1]["ts"] <= time.time_ns() // 1_000_000
    for sample in a:
        Sample.model_validate(sample)
    with pytest.raises(ValueError):
        SimulatedSource(rate_hz=2000)
    with pytest.raises(ValueError):
        SimulatedSource(sensors=("bad name",))


def test_simulated_source_realtime_stops() -> None:
    stop = threading.Event()
    src = SimulatedSource(rate_hz=50, count=None, realtime=True)
    got = []
    start = time.monotonic()
    for sample in src.iter_samples(stop):
        got.append(sample)
        if len(got) == 10:
            stop.set()
    assert len(got) == 10
    assert 0.12 <= time.monotonic() - start < 2.0


# ------------------------------------------------------------ agent, no broker


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def samples_then_stop(
    n: int, stop: threading.Event, start_seq_ts: int = APRIL_2014_MS
) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {"ts": start_seq_ts + i, "values": {"v": float(i)}}
    stop.set()


def offline_agent(tmp_path: Path, **kwargs: Any) -> GatewayAgent:
    return GatewayAgent(
        f"mqtt://127.0.0.1:{closed_port()}",
        prefix="factory",
        site="s1",
        line="l1",
        device="d1",
        buffer_path=tmp_path / "outbox.db",
        reconnect_min_s=5.0,
        reconnect_max_s=5.0,
        **kwargs,
    )


def payload_seqs(payload: bytes) -> list[int]:
    parsed = TELEMETRY_ADAPTER.validate_json(payload)  # also checks the wire contract
    samples = parsed.samples if isinstance(parsed, Batch) else [parsed]
    return [s.seq for s in samples if s.seq is not None]


def test_agent_buffers_offline_and_seq_continues_across_restarts(tmp_path: Path) -> None:
    stop = threading.Event()
    with offline_agent(tmp_path, batch_size=10) as agent:
        stats = agent.run(samples_then_stop(25, stop), stop)
        assert stats["read"] == stats["buffered"] == stats["offline_buffered"] == 25
        assert stats["published"] == 0 and stats["connect_failures"] >= 1
        assert stats["buffer_rows"] == 3  # 10 + 10 + a lingering 5 flushed at stop
        rows = agent.buffer.peek(0, 10)
        assert rows[0].topic == "factory/s1/l1/d1/telemetry"
        assert [payload_seqs(r.payload) for r in rows] == [
            list(range(0, 10)),
            list(range(10, 20)),
            list(range(20, 25)),
        ]
    stop = threading.Event()
    with offline_agent(tmp_path, batch_size=1) as agent:
        agent.run(samples_then_stop(3, stop), stop)
        rows = agent.buffer.peek(0, 10)
        assert len(rows) == 6
        single = orjson.loads(rows[-1].payload)
        assert "samples" not in single  # batch_size=1: single-sample objects
        assert [payload_seqs(r.payload) for r in rows[3:]] == [[25], [26], [27]]


def test_agent_drops_newest_when_outbox_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stop = threading.Event()
    with offline_agent(tmp_path, batch_size=5, max_buffer_rows=4) as agent:
        stats = agent.run(samples_then_stop(40, stop), stop)
        assert stats["read"] == 40
        assert stats["buffered"] == 20
        assert stats["dropped_full"] == 20
        assert stats["buffer_rows"] == 4
        kept = [seq for r in agent.buffer.peek(0, 10) for seq in payload_seqs(r.payload)]
        assert kept == list(range(20))  # the oldest data is kept
        # Dropped samples used up their sequence numbers: the gap is visible downstream.
        assert agent.buffer.next_seq() == 40
    assert any("OUTBOX FULL" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_agent_cleans_samples(tmp_path: Path) -> None:
    stop = threading.Event()

    def source() -> Iterator[dict[str, Any]]:
        yield {"ts": "2014-04-01T00:00:00Z", "values": {"a": 1, "flag": True, "s": "x"}}
        yield {"ts": APRIL_2014_MS, "values": {"a": float("nan")}}  # no finite reading
        yield {"ts": "garbage", "values": {"a": 1.0}}
        yield {"ts": APRIL_2014_MS, "values": "not a dict"}
        yield {"values": {"a": 2.5}}  # no ts: stamped when read
        stop.set()

    with offline_agent(tmp_path, batch_size=10) as agent:
        stats = agent.run(source(), stop)
        assert stats["buffered"] == 2 and stats["dropped_invalid"] == 3
        (row,) = agent.buffer.peek(0, 10)
        samples = orjson.loads(row.payload)["samples"]
        assert samples[0] == {"ts": APRIL_2014_MS, "values": {"a": 1.0}, "seq": 0}
        assert abs(samples[1]["ts"] - time.time_ns() // 1_000_000) < 60_000
        assert samples[1]["seq"] == 1


def test_agent_rejects_bad_configuration(tmp_path: Path) -> None:
    good: dict[str, Any] = {"prefix": "f", "site": "s", "line": "l", "device": "d"}
    with pytest.raises(ValueError, match="MQTT URL"):
        GatewayAgent("http://x", buffer_path=tmp_path / "a.db", **good)
    with pytest.raises(ValueError, match="device"):
        GatewayAgent("mqtt://x", buffer_path=tmp_path / "a.db", **{**good, "device": "a/b"})
    with pytest.raises(ValueError, match="prefix"):
        GatewayAgent("mqtt://x", buffer_path=tmp_path / "a.db", **{**good, "prefix": "f/#"})
    with pytest.raises(ValueError, match="batch_size"):
        GatewayAgent("mqtt://x", buffer_path=tmp_path / "a.db", batch_size=0, **good)


# ----------------------------------------------------------------------------- CLI

CLI_BASE = ["--mqtt-url", "mqtt://127.0.0.1:1", "--prefix", "factory"]
CLI_IDS = ["--site", "s1", "--line", "l1", "--device", "d1"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--simulate", "--rate", "0"], "--rate"),
        (["--simulate", "--rate", "5000"], "maximum"),
        (["--simulate", "--batch", "0"], "--batch"),
        (["--csv", "/nonexistent.csv"], "CSV file not found"),
        (["--simulate", "--realtime"], "--realtime"),
        ([], "one of the arguments --csv --simulate is required"),
        (["--simulate", "--csv", "x.csv"], "not allowed with"),
    ],
)
def test_cli_bad_arguments_give_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    with pytest.raises(SystemExit) as info:
        gateway_main([*CLI_BASE, *CLI_IDS, "--buffer", str(tmp_path / "o.db"), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert needle in err


def test_cli_bad_url_and_identifier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--mqtt-url", "http://broker", "--prefix", "f", *CLI_IDS, "--buffer", "o.db"]
    with pytest.raises(SystemExit):
        gateway_main([*argv, "--simulate"])
    assert "mqtt://" in capsys.readouterr().err
    argv = [*CLI_BASE, "--site", "bad site", "--line", "l", "--device", "d", "--buffer", "o.db"]
    with pytest.raises(SystemExit):
        gateway_main([*argv, "--simulate"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid site" in err


def test_cli_simulate_offline_for_a_duration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--mqtt-url",
        f"mqtt://127.0.0.1:{closed_port()}",
        "--prefix",
        "factory",
        *CLI_IDS,
        "--buffer",
        str(tmp_path / "o.db"),
        "--simulate",
        "--rate",
        "200",
        "--batch",
        "10",
        "--duration",
        "0.5",
        "--log-level",
        "ERROR",
    ]
    assert gateway_main(argv) == 0
    stats = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["buffered"] >= 50
    assert stats["buffered"] == stats["read"]
    with OutboxBuffer(tmp_path / "o.db") as buf:
        assert len(buf) == stats["buffer_rows"] >= 5
