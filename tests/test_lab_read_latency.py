"""read_latency's split of a READ's time, on lines as ``perf script`` prints
them (taken from a real recording of redis's GETs on vswapfs).  Nothing
here is timed."""

from __future__ import annotations

import platform

import pytest

from vswapfs_lab import read_latency

# a READ served alone, one queued while a WRITE was outstanding, then two queued together
TRACE = """\
 redis-benchmark 10088 [001] 19490.450369798:  raw_syscalls:sys_exit: NR 0 = 23
 kworker/u8:2-lo  4434 [000] 19490.451166991: fuse:fuse_request_send: connection 40 req 11946 opcode 15
   vswapfs-serve 10077 [000] 19490.451212539:  raw_syscalls:sys_exit: NR 0 = 80
   vswapfs-serve 10077 [000] 19490.451271577: raw_syscalls:sys_enter: NR 20 (15, 7f17ac9be640, 2, 0, 0, 0)
   vswapfs-serve 10077 [000] 19490.451278287:  fuse:fuse_request_end: connection 40 req 11946 len 4112 error 0
   vswapfs-serve 10077 [000] 19490.451313139:  raw_syscalls:sys_exit: NR 0 = -11
 kworker/u8:2-lo  4434 [001] 19490.452000000: fuse:fuse_request_send: connection 40 req 11948 opcode 16
   vswapfs-serve 10077 [000] 19490.452010000:  raw_syscalls:sys_exit: NR 0 = 163920
 kworker/u8:2-lo  4434 [001] 19490.452100000: fuse:fuse_request_send: connection 40 req 11950 opcode 15
    redis-server 10081 [001] 19490.452150000:  raw_syscalls:sys_exit: NR 0 = 80
   vswapfs-serve 10077 [000] 19490.452400000: raw_syscalls:sys_enter: NR 20 (15, 7f17ac9be640, 1, 0, 0, 0)
   vswapfs-serve 10077 [000] 19490.452405000:  fuse:fuse_request_end: connection 40 req 11948 len 16 error 0
   vswapfs-serve 10077 [000] 19490.452420000:  raw_syscalls:sys_exit: NR 0 = 80
   vswapfs-serve 10077 [000] 19490.452430000: raw_syscalls:sys_enter: NR 20 (15, 7f17ac9be640, 2, 0, 0, 0)
   vswapfs-serve 10077 [000] 19490.452433000:  fuse:fuse_request_end: connection 40 req 11950 len 4112 error 0
 kworker/u8:2-lo  4434 [001] 19490.453000000: fuse:fuse_request_send: connection 40 req 11952 opcode 15
 kworker/u8:2-lo  4434 [001] 19490.453004000: fuse:fuse_request_send: connection 40 req 11954 opcode 15
   vswapfs-serve 10077 [000] 19490.453010000:  raw_syscalls:sys_exit: NR 0 = 80
   vswapfs-serve 10077 [000] 19490.453015000: raw_syscalls:sys_enter: NR 20 (15, 7f17ac9be640, 2, 0, 0, 0)
   vswapfs-serve 10077 [000] 19490.453017000:  fuse:fuse_request_end: connection 40 req 11952 len 4112 error 0
   vswapfs-serve 10077 [000] 19490.453020000:  raw_syscalls:sys_exit: NR 0 = 80
   vswapfs-serve 10077 [000] 19490.453026000: raw_syscalls:sys_enter: NR 20 (15, 7f17ac9be640, 2, 0, 0, 0)
   vswapfs-serve 10077 [000] 19490.453027000:  fuse:fuse_request_end: connection 40 req 11954 len 4112 error 0
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the trace's syscall numbers are x86_64's")
def test_a_read_is_split_at_the_serving_threads_read_and_reply() -> None:
    parts = read_latency.split(read_latency.parse(TRACE), tid=10077)
    # the first READ: queued .451166991, read .451212539, writev .451271577, ended .451278287
    assert parts["wake"][0] == pytest.approx(45.548, abs=1e-3)
    assert parts["own"][0] == pytest.approx(59.038, abs=1e-3)
    assert parts["reply"][0] == pytest.approx(6.710, abs=1e-3)
    # the second: redis's own read of 80 bytes is not the server's; the WRITE's writev is not its reply
    assert parts["wake"][1] == pytest.approx(320.0, abs=1e-3)
    assert parts["own"][1] == pytest.approx(10.0, abs=1e-3)
    # two READs queued together: the thread reads them in that order, the second waits for the first
    assert parts["wake"][2:] == pytest.approx([10.0, 16.0], abs=1e-3)
    assert parts["own"][2:] == pytest.approx([5.0, 6.0], abs=1e-3)
    assert parts["reply"][2:] == pytest.approx([2.0, 1.0], abs=1e-3)
    assert parts["total"] == pytest.approx([111.296, 333.0, 17.0, 23.0], abs=1e-3)
    assert parts["clear"] == pytest.approx([111.296, 17.0, 23.0], abs=1e-3)
    assert parts["behind"] == pytest.approx([333.0], abs=1e-3)
    assert parts["write"] == pytest.approx([405.0], abs=1e-3)


def test_the_summary_counts_and_places_every_read() -> None:
    parts = {"total": [10.0, 20.0, 30.0, 400.0], "wake": [5.0, 6.0, 7.0], "own": [1.0, 2.0, 3.0],
             "reply": [2.0, 2.0, 2.0], "clear": [10.0, 20.0, 30.0], "behind": [400.0], "write": [500.0]}
    s = read_latency.summary(parts)
    assert s["reads"] == 4 and s["reads_matched"] == 3 and s["reads_behind_write"] == 1
    assert s["behind_write_s"] == pytest.approx(0.0004)
    assert s["total_mean_us"] == 115.0 and s["total_p50_us"] == 30.0 and s["total_p10_us"] == 10.0
    assert s["clear_p90_us"] == 30.0 and s["write_mean_us"] == 500.0
    table = read_latency.table({"vswapfs": [{"kv_rps": 10_000.0, **s}], "floor": [{"kv_rps": 12_000.0}]})
    assert "| vswapfs | 10,000 | 115 / 30.0 |" in table and "| 1.0 / 0.0004 |" in table
    assert "| floor | 12,000 | — / — |" in table
