"""The stress tool, and the daemon under memory pressure itself."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root, swap_on

from vswapfs import workload


def test_workload_verify_catches_wrong_slot_old_generation_and_corruption() -> None:
    n = 300
    mem = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    order = list(range(n))
    workload.fill(mem, order, 5, (1, 1, 1))
    assert workload.verify(mem, order, 5, (1, 1, 1)) == []
    text = next(i for i in order if workload.kind_of(i, 5) == "text")
    rnd = next(i for i in order if workload.kind_of(i, 5) == "random" and i > text)
    mem[text * 4096:(text + 1) * 4096] = workload.page(text, 4)  # an old generation
    mem[rnd * 4096:(rnd + 1) * 4096] = workload.page(rnd + 1, 5)  # another address's page
    zero = next(i for i in order if workload.kind_of(i, 5) == "zero")
    mem[zero * 4096 + 77] = 1  # one flipped byte
    assert workload.verify(mem, order, 5, (1, 1, 1)) == sorted([text, rnd, zero])


def test_workload_reports_the_machine_cpu_time_of_each_phase() -> None:
    r = workload.run(64, rounds=2)
    assert r["bad"] == 0 and r["verified"] == 2 * 64 * 256
    for phase in ("write", "verify"):
        cpu, wall = r[f"{phase}_cpu_s"], r[f"{phase}_s"]
        assert isinstance(cpu, float) and isinstance(wall, float)
        # this process's own work at least (ticks of 10 ms), no more than every CPU all along
        assert 0 < cpu <= wall * (os.cpu_count() or 1) + 0.05, (phase, cpu, wall)


@pytest.fixture
def swap() -> Iterator[Path]:
    for mnt, _ in swap_on(["--size", "2G"]):
        yield mnt


@needs_root
def test_stress_tool_verifies_every_pattern_and_returns_memory(swap: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "vswapfs", "stress", str(swap), "--workers", "2",
                        "--pattern", "mix", "--duration", "45"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "[    1s]" in r.stdout  # the progress line
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["pages_bad"] == 0 and report["errors"] == []
    assert report["pages_verified"] >= 3 * 192 * 256  # seq, random and cow rounds, 192 MiB each
    assert report["vswapfs_peak_stored_pages"] > 64 * 256  # more than the limit went through
    assert report["swap_out_per_s"] > 0 and report["swap_in_per_s"] > 0
    # vswapfs gives back every page the kernel freed; a slot the kernel still
    # uses (a swap-cache page no reclaim has dropped yet) keeps its 512-slot
    # cluster undiscarded, and only that may stay
    pinned = report["kernel_used_pages_after"]
    assert report["vswapfs_stored_after"] <= max(pinned, 1) * 512, json.dumps(report)
    if pinned <= 1:  # only the header
        assert report["returned_pct"] >= 99, json.dumps(report)


@needs_root
def test_stress_tool_refuses_a_mount_without_swap(tmp_path: Path, mnt: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "vswapfs", "stress", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 1 and "no swap is on" in r.stderr
