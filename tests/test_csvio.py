"""CSV input for backtests and the backtest output format."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ingest.evaluation.csvio import (
    format_timestamp,
    parse_timestamp,
    read_series_csv,
    sniff_delimiter,
    write_backtest_csv,
)

T0 = 1396310400000  # 2014-04-01 00:00:00 UTC in epoch ms


def _write(tmp_path: Path, text: str, name: str = "in.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "text,expected",
    [
        ("2014-04-01 00:00:00", T0),
        ("2014-04-01T00:00:00", T0),
        ("2014-04-01T00:00:00Z", T0),
        ("2014-04-01t00:00:00z", T0),
        ("2014-04-01 00:00:00.000000", T0),
        ("2014-04-01T00:00:01.5Z", T0 + 1500),
        ("2014-04-01T00:00:00.123456789Z", T0 + 123),
        ("2014-04-01T02:00:00+02:00", T0),
        ("2014-04-01T02:00:00+0200", T0),
        ("2014-03-31T22:30:00-01:30", T0),
        ("2014-04-01 00:00:00 +00:00", T0),
        ("2014-04-01T00:00", T0),
        ("2014-04-01", T0),
        ("1396310400", T0),
        ("1396310400.25", T0 + 250),
        ("1396310400000", T0),
        ("  1396310400123 ", T0 + 123),
    ],
)
def test_parse_timestamp_forms(text: str, expected: int) -> None:
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "yesterday", "2014-13-01 00:00:00", "2014-02-30", "2014-04-01 24:00:00", "01/04/2014"],
)
def test_parse_timestamp_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(text)


def test_format_timestamp() -> None:
    assert format_timestamp(T0 + 1500) == "2014-04-01T00:00:01.500Z"
    assert parse_timestamp(format_timestamp(T0 + 7)) == T0 + 7


def test_sniff_delimiter() -> None:
    assert sniff_delimiter("timestamp,value\n") == ","
    assert sniff_delimiter("datetime;Volume Flow RateRMS;Current\n") == ";"
    assert sniff_delimiter("time\ta\tb\n") == "\t"
    assert sniff_delimiter("timestamp\n") == ","


def test_nab_style_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "timestamp,value\n2014-04-01 00:00:00,1.5\n2014-04-01 00:05:00,2\n")
    table = read_series_csv(path)
    assert table.ts_ms.dtype == np.int64
    assert table.ts_ms.tolist() == [T0, T0 + 300_000]
    assert list(table.columns) == ["value"]
    assert table.columns["value"].tolist() == [1.5, 2.0]
    assert table.raw_ts == ["2014-04-01 00:00:00", "2014-04-01 00:05:00"]
    assert table.time_column == "timestamp"
    assert len(table) == 2


def test_semicolon_multi_column_with_spaces_in_names(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "datetime;Current;Volume Flow RateRMS\n"
        "2014-04-01 00:00:00;1.25;32.0\n"
        "2014-04-01 00:00:01;;31.0\n",
    )
    table = read_series_csv(path)
    assert list(table.columns) == ["Current", "Volume Flow RateRMS"]
    assert table.columns["Current"][0] == 1.25
    assert math.isnan(table.columns["Current"][1])
    assert table.columns["Volume Flow RateRMS"].tolist() == [32.0, 31.0]


def test_tab_delimited_epoch_ms_and_named_time_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "a\tTime\tb\n1\t1396310400000\t2\n3\t1396310401000\t\n")
    table = read_series_csv(path)
    assert table.time_column == "Time"
    assert table.ts_ms.tolist() == [T0, T0 + 1000]
    assert table.columns["a"].tolist() == [1.0, 3.0]
    assert np.isnan(table.columns["b"][1])


def test_epoch_seconds_and_first_column_fallback(tmp_path: Path) -> None:
    path = _write(tmp_path, "t,x\n1396310400,1\n1396310460,2\n")
    table = read_series_csv(path)
    assert table.time_column == "t"
    assert table.ts_ms.tolist() == [T0, T0 + 60_000]


def test_aware_timestamps_converted_to_utc(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "_time,v\n2014-04-01T02:00:00+02:00,1\n2014-04-01T00:00:00.250Z,2\n",
    )
    table = read_series_csv(path)
    assert table.ts_ms.tolist() == [T0, T0 + 250]
    assert table.raw_ts == ["2014-04-01T02:00:00+02:00", "2014-04-01T00:00:00.250Z"]


def test_bad_value_names_file_line_and_column(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "# exported by hand\ntimestamp,temp,rpm\n2014-04-01 00:00:00,1,2\n\n"
        "2014-04-01 00:00:01,3,fast\n",
        name="bad.csv",
    )
    with pytest.raises(ValueError) as err:
        read_series_csv(path)
    msg = str(err.value)
    assert "bad.csv" in msg
    assert "line 5" in msg
    assert "'rpm'" in msg
    assert "'fast'" in msg


def test_bad_timestamp_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "timestamp,v\n2014-04-01 00:00:00,1\nnoon,2\n")
    with pytest.raises(ValueError, match=r"line 3, column 'timestamp'"):
        read_series_csv(path)


def test_ragged_row_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "timestamp,a,b\n2014-04-01 00:00:00,1\n")
    with pytest.raises(ValueError, match="line 2"):
        read_series_csv(path)


def test_comment_and_blank_lines_skipped(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "# comment\n\n#another\ntimestamp,value\n# mid-file\n2014-04-01 00:00:00,1\n\n"
        "2014-04-01 00:00:01,2\n",
    )
    table = read_series_csv(path)
    assert table.columns["value"].tolist() == [1.0, 2.0]


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no header"):
        read_series_csv(_write(tmp_path, "# only a comment\n"))


def test_header_only_gives_empty_table(tmp_path: Path) -> None:
    table = read_series_csv(_write(tmp_path, "timestamp,value\n"))
    assert len(table) == 0
    assert table.columns["value"].shape == (0,)


INFLUX_LONG = """\
#group,false,false,true,true,false,false,true,true,true
#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,dateTime:RFC3339,double,string,string,string
#default,_result,,,,,,,,
,result,table,_start,_stop,_time,_value,_field,_measurement,device
,,0,2024-01-01T00:00:00Z,2024-01-01T01:00:00Z,2024-01-01T00:00:10Z,21.7,temperature,telemetry,m1
,,0,2024-01-01T00:00:00Z,2024-01-01T01:00:00Z,2024-01-01T00:00:00Z,21.5,temperature,telemetry,m1

#group,false,false,true,true,false,false,true,true,true
#datatype,string,long,dateTime:RFC3339,dateTime:RFC3339,dateTime:RFC3339,double,string,string,string
#default,_result,,,,,,,,
,result,table,_start,_stop,_time,_value,_field,_measurement,device
,,1,2024-01-01T00:00:00Z,2024-01-01T01:00:00Z,2024-01-01T00:00:00Z,3.2,current,telemetry,m1
,,1,2024-01-01T00:00:00Z,2024-01-01T01:00:00Z,2024-01-01T00:00:20Z,3.4,current,telemetry,m1
"""

T2024 = 1704067200000


def test_influx_annotated_long_format(tmp_path: Path) -> None:
    table = read_series_csv(_write(tmp_path, INFLUX_LONG))
    assert table.time_column == "_time"
    assert table.ts_ms.tolist() == [T2024, T2024 + 10_000, T2024 + 20_000]
    assert table.raw_ts[0] == "2024-01-01T00:00:00Z"
    np.testing.assert_array_equal(table.columns["temperature"], [21.5, 21.7, np.nan])
    np.testing.assert_array_equal(table.columns["current"], [3.2, np.nan, 3.4])


def test_influx_single_field_keeps_file_order(tmp_path: Path) -> None:
    text = "\n".join(INFLUX_LONG.splitlines()[:6]) + "\n"
    table = read_series_csv(_write(tmp_path, text))
    assert list(table.columns) == ["temperature"]
    assert table.ts_ms.tolist() == [T2024 + 10_000, T2024]


def test_influx_pivoted_reads_numeric_columns_only(tmp_path: Path) -> None:
    text = (
        "#datatype,string,long,dateTime:RFC3339,double,long,string\n"
        "#group,false,false,false,false,false,true\n"
        "#default,_result,,,,,\n"
        ",result,table,_time,temperature,rpm,device\n"
        ",,0,2024-01-01T00:00:00Z,21.5,1500,m1\n"
        ",,0,2024-01-01T00:00:01Z,21.6,1510,m1\n"
    )
    table = read_series_csv(_write(tmp_path, text))
    assert list(table.columns) == ["temperature", "rpm"]
    assert table.columns["rpm"].tolist() == [1500.0, 1510.0]


def test_write_single_column(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    ts = np.array([T0, T0 + 300_000], dtype=np.int64)
    rows = {
        "value": {
            "value": np.array([1.5, np.nan]),
            "score": np.array([0.1, 0.30000000000000004]),
            "anomaly": np.array([False, True]),
        }
    }
    write_backtest_csv(out, ts, rows, raw_ts=["2014-04-01 00:00:00", "2014-04-01 00:05:00"])
    assert out.read_text(encoding="utf-8") == (
        "timestamp,value,score,anomaly\n"
        "2014-04-01 00:00:00,1.5,0.1,0\n"
        "2014-04-01 00:05:00,,0.30000000000000004,1\n"
    )
    back = read_series_csv(out)
    assert back.ts_ms.tolist() == ts.tolist()
    assert back.columns["score"][1] == 0.30000000000000004
    assert back.columns["anomaly"].tolist() == [0.0, 1.0]


def test_write_several_columns_long_format_iso_timestamps(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    ts = np.array([T0, T0 + 1500], dtype=np.int64)
    rows = {
        "temp": {
            "value": np.array([20.0, 21.0]),
            "score": np.array([0.0, 0.5]),
            "anomaly": np.array([0.0, np.nan]),
        },
        "rpm, shaft": {
            "value": np.array([1.0, 2.0]),
            "score": np.array([np.nan, 1.0]),
            "anomaly": np.array([0, 1]),
        },
    }
    write_backtest_csv(out, ts, rows)
    assert out.read_text(encoding="utf-8").splitlines() == [
        "timestamp,sensor,value,score,anomaly",
        "2014-04-01T00:00:00.000Z,temp,20.0,0.0,0",
        '2014-04-01T00:00:00.000Z,"rpm, shaft",1.0,,0',
        "2014-04-01T00:00:01.500Z,temp,21.0,0.5,0",
        '2014-04-01T00:00:01.500Z,"rpm, shaft",2.0,1.0,1',
    ]


def test_write_rejects_length_mismatch(tmp_path: Path) -> None:
    ts = np.array([T0, T0 + 1], dtype=np.int64)
    bad = {"v": {"value": np.zeros(2), "score": np.zeros(3), "anomaly": np.zeros(2)}}
    with pytest.raises(ValueError, match="score"):
        write_backtest_csv(tmp_path / "o.csv", ts, bad)
    with pytest.raises(ValueError, match="missing"):
        write_backtest_csv(tmp_path / "o.csv", ts, {"v": {"value": np.zeros(2)}})
    with pytest.raises(ValueError):
        write_backtest_csv(tmp_path / "o.csv", ts, {})
