"""The checks trusted block and swap code passes, against a vswapfs device
(``python -m vswapfs_lab.checks``): fio verify and trim, stress-ng's verifying
memory stressors under a memory cgroup, swapon/swapoff churn."""

from __future__ import annotations

import json

import pytest
from conftest import needs_root

from vswapfs import admin
from vswapfs_lab import checks

pytestmark = needs_root


def no_leftovers() -> None:
    assert admin.mounts() == []


def test_fio_random_writes_verify_and_trim_reads_zero() -> None:
    r = checks.fio_verify(256)
    assert r["ok"], json.dumps(r)
    assert r["written_mib"] == 256 and r["verified_mib"] == 256
    assert r["stored_pages_after_discard"] == 0 and r["nonzero_mib_after_discard"] == 0
    no_leftovers()


def test_stress_ng_vm_and_pageswap_verify_under_a_memory_cgroup() -> None:
    r = checks.stress_ng(seconds=30)
    assert r["ok"], json.dumps(r)
    for name in ("vm", "pageswap"):
        assert r[name]["swapped_through_pages"] > 10_000, r  # type: ignore[index]
    assert r["stored_pages_after_swapoff"] <= 1
    no_leftovers()


@pytest.mark.parametrize("cycles", [50])
def test_swapon_swapoff_churn_keeps_every_page_and_leaves_nothing(cycles: int) -> None:
    r = checks.churn(cycles)
    assert r["ok"], json.dumps(r)
    assert r["bad"] == 0 and r["pages_verified"] == cycles * 48 * 256
    assert r["pages_swapped_out"] > cycles * 24 * 256 // 2  # each cycle really swapped
    assert r["stored_pages_after"] <= 1
    no_leftovers()


def test_a_same_cgroup_check_that_times_out_says_where_each_thread_waits() -> None:
    """A hang in CI must say why: when the hog is not done in time, the
    result names every thread of the daemon and the hog with the kernel
    functions it waits in, what the cgroup holds and the daemon's last log
    lines, taken before the connection is aborted; the machine is still
    recovered.  (3 s: the hog needs ~13 s to swap its 1 GiB through.)"""
    r = checks.same_cgroup(reserve_mib=0, limit_mib=320, hog_mib=512, seconds=3, rounds=2)
    assert r["hung"] and not r["ok"], json.dumps(r)
    threads = r["threads"]
    assert isinstance(threads, list)
    assert any(" vswapfs-serve " in t for t in threads), threads  # the daemon's serving thread
    assert any(" vswapfs-keeper " in t for t in threads), threads  # its housekeeping
    assert all(": " in t and t.split(": ", 1)[1] for t in threads), threads  # each says where it is
    assert len({t.split("/")[0] for t in threads}) >= 3, threads  # supervisor, daemon, hog
    assert 250 < r["cgroup_usage_mib"] <= 320  # type: ignore[operator]
    assert any("serving" in line for line in r["log_tail"]), r["log_tail"]  # type: ignore[union-attr]
    assert r["recovery"] and "umount" in r["recovery"][-1]  # type: ignore[index]
    no_leftovers()
