"""Offline evaluation: benchmark scorers (NAB, SKAB) and CSV input/output for backtests."""
