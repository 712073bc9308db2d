"""Busy polling on the channel threads (``vswapfs.fuse.BusyPoll``): the
window's rule, and on a real mount that polling catches requests that come
close together, shows in ``control/busy_poll`` and never keeps an idle
daemon on a CPU."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import _mount, needs_root

from vswapfs import PAGE
from vswapfs._control import BUSY_POLL
from vswapfs._fs import SERVING_THREAD
from vswapfs.fuse import BusyPoll
from vswapfs_lab.profile_daemon import thread_times

MAX = 50e-6


def test_busy_poll_starts_asleep_and_a_sleep_a_window_would_have_saved_doubles_it_to_its_max() -> None:
    poll = BusyPoll(MAX)
    assert poll.window == 0.0
    widths = []
    for _ in range(6):
        poll.came(idle=30e-6, slept=True)  # came within MAX, after the thread had slept
        widths.append(poll.window)
    assert widths == [MAX / 8, MAX / 4, MAX / 2, MAX, MAX, MAX]
    assert (poll.caught, poll.slept) == (0, 0)  # serve_thread counts the sleeps it makes


def test_busy_poll_a_request_caught_while_polling_is_counted_and_keeps_the_window() -> None:
    poll = BusyPoll(MAX)
    poll.came(idle=10e-6, slept=True)
    poll.came(idle=5e-6, slept=False)
    poll.came(idle=1e-6, slept=False)
    assert poll.window == MAX / 8 and poll.caught == 2


def test_busy_poll_idles_longer_than_its_max_halve_the_window_until_it_stops_polling() -> None:
    poll = BusyPoll(MAX)
    for _ in range(4):
        poll.came(idle=1e-6, slept=True)
    assert poll.window == MAX
    widths = []
    for _ in range(5):
        poll.came(idle=1.0, slept=True)  # nothing came for a second
        widths.append(poll.window)
    assert widths == [MAX / 2, MAX / 4, MAX / 8, 0.0, 0.0]


def test_busy_poll_of_zero_never_opens_a_window() -> None:
    poll = BusyPoll(0.0)
    for idle in (0.0, 1e-6, 1e-3, 1.0):
        poll.came(idle=idle, slept=True)
        assert poll.window == 0.0


def _busy_poll(mnt: Path) -> dict[str, int]:
    return dict(zip(BUSY_POLL, map(int, (mnt / "control" / "busy_poll").read_text().split()), strict=True))


def _serving_cpu_s(pid: int) -> float:
    return sum(user + system for name, (user, system, _, _) in thread_times(pid).items()
               if name.startswith(SERVING_THREAD + " "))


def _read_spaced(mnt: Path, reads: int, gap: float) -> None:
    """``reads`` 4 KiB reads of the image, each ``gap`` seconds after the
    last one returned (waited out on the CPU, not asleep): every request
    then finds the daemon's thread idle for about ``gap``."""
    fd = os.open(mnt / "swap", os.O_RDONLY | os.O_DIRECT)
    try:
        for i in range(reads):
            assert len(os.pread(fd, PAGE, (i % 1024) * PAGE)) == PAGE
            until = time.perf_counter() + gap
            while time.perf_counter() < until:
                pass
    finally:
        os.close(fd)


@needs_root
def test_busy_poll_catches_requests_that_come_within_its_window() -> None:
    for mnt in _mount(["--size", "64M", "--busy-poll", "1000"]):
        _read_spaced(mnt, 1000, 200e-6)
        seen = _busy_poll(mnt)
        # the window opens after a few sleeps and then catches nearly every read
        assert seen["max_us"] == 1000 and seen["caught"] > 900 and seen["slept"] < 50, seen


@needs_root
def test_busy_poll_is_on_by_default_stops_polling_for_requests_further_apart_and_sleeps_when_idle() -> None:
    for mnt in _mount(["--size", "64M"]):
        pid = int((mnt / "control" / "pid").read_text())
        _read_spaced(mnt, 1000, 200e-6)  # 200 µs apart: longer than the default 50 µs
        seen = _busy_poll(mnt)
        assert seen["max_us"] == 50 and seen["caught"] < 100 and seen["slept"] > 900, seen
        time.sleep(0.5)  # let the thread settle into its sleep
        before = _serving_cpu_s(pid)
        time.sleep(3)
        assert _serving_cpu_s(pid) - before < 0.05  # asleep in poll(2), not polling
        assert _busy_poll(mnt)["slept"] > seen["slept"]


@needs_root
def test_busy_poll_zero_is_off_the_thread_blocks_in_read() -> None:
    for mnt in _mount(["--size", "64M", "--busy-poll", "0"]):
        _read_spaced(mnt, 300, 50e-6)
        assert _busy_poll(mnt) == {"max_us": 0, "window_us": 0, "caught": 0, "slept": 0}
