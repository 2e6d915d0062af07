"""The heartbeat overhead benchmark's on/off timetable (``heartbeat.monitor.ab_window_active``)."""
from __future__ import annotations

import os
import subprocess
import time
import sys
from pathlib import Path

import pytest

from ds_checkfree.elastic.heartbeat.monitor import HeartbeatThread, ab_window_active

ROOT = Path(__file__).resolve().parents[1]


def test_each_pair_has_one_on_and_one_off_window_in_a_drawn_order():
    w = 1.5
    firsts = []
    for pair in range(200):
        a = ab_window_active((2 * pair) * w + 0.1, w)
        b = ab_window_active((2 * pair + 1) * w + 0.1, w)
        assert a[1] == b[1] == pair
        assert a[0] != b[0]
        firsts.append(a[0])
    # the order is drawn per pair, not fixed: both orders occur, roughly half each
    assert 70 < sum(firsts) < 130


def test_timetable_is_the_same_in_every_process_and_tells_the_time_left():
    on, pair, left = ab_window_active(1000.25, 0.5)
    assert (on, pair, left) == ab_window_active(1000.25, 0.5)
    assert pair == 1000 and left == pytest.approx(0.25)
    # another process (another hash seed) draws the same order: the job's ranks and the benchmark agree
    code = ("from ds_checkfree.elastic.heartbeat.monitor import ab_window_active as f; "
            "print([f(t * 0.5 + 0.2, 0.5)[0] for t in range(64)])")
    for seed in ("1", "777"):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))).stdout
        assert out.strip() == str([ab_window_active(t * 0.5 + 0.2, 0.5)[0] for t in range(64)])


def test_windows_longer_than_the_timeout_allows_are_refused():
    with pytest.raises(ValueError, match="heartbeat timeout"):
        HeartbeatThread(0, [1], interval_s=0.5, timeout_s=10.0, ab_window_s=5.0)
    HeartbeatThread(0, [1], interval_s=0.5, timeout_s=10.0, ab_window_s=1.5)  # 2 x 1.5 + 0.5 < 10


class _CountingBeat(HeartbeatThread):
    """A transport that only records when the thread beat."""
    transport = "test"

    def __init__(self, **kw):
        super().__init__(0, [1], **kw)
        self.sent_at: list[float] = []

    def _send_all(self, now: float) -> None:
        self.sent_at.append(time.time())

    def _drain(self, now: float) -> None:
        pass


def test_the_thread_beats_only_in_on_windows_and_accounts_its_cpu():
    w = 0.2
    hb = _CountingBeat(interval_s=0.05, timeout_s=1.0, ab_window_s=w).start()
    time.sleep(2.0)
    hb.stop()
    assert len(hb.sent_at) >= 8
    for t in hb.sent_at:
        on, _, left = ab_window_active(t, w)
        assert on or left > w - 0.02, t  # a beat may finish the 1-2 ms it started in an on window
    summary = hb.summary()
    assert summary["wakeups"] == len(hb.sent_at)
    assert summary["thread_cpu_s"] >= 0 and summary["cpu_per_wakeup_s"] is not None
