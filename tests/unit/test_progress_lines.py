"""Plain progress lines (a log or a pipe, no terminal bar): work that finishes in a burst is one line, slow
work reports as it happens, and the last line is always written."""
from __future__ import annotations

import logging

from flows.progress import PLAIN_INTERVAL_S, progress


def lines(caplog, clock_step: float, total: int = 16) -> list[str]:
    now = [0.0]

    def clock() -> float:
        now[0] += clock_step
        return now[0]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="snapgen.progress"):
        assert list(progress(range(total), "writing shards", total, clock=clock)) == list(range(total))
    return [r.getMessage() for r in caplog.records if r.name == "snapgen.progress"]


def test_a_burst_of_finished_items_is_one_line(caplog):
    assert lines(caplog, clock_step=0.001) == ["writing shards: 16/16"]


def test_slow_items_are_reported_as_they_finish(caplog):
    reported = lines(caplog, clock_step=PLAIN_INTERVAL_S)
    assert reported[0] == "writing shards: 1/16" and reported[-1] == "writing shards: 16/16"
    assert len(reported) == 16  # a tenth of 16 items is one item: each comes an interval after the last
