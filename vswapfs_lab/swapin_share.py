#!/usr/bin/env python3
"""Where a single random swap-in's time goes: the daemon's share of it.

The bench's latency workload (2 GiB of text and random pages through a
512 MiB cgroup, then 2,000 single-page swap-ins of random pages), with the
daemon's counters read just before and just after the swap-ins: the READs
and WRITEs it answered meanwhile and how long it was busy with them
(``control/fuse_stat``, from parsing a request to its reply written), its
serving thread's time on a CPU and waiting for one (schedstat), and the
pages the kernel swapped out meanwhile (pswpout, any backend).  The C
floor runs alongside (it has no counters).  Rounds alternate between the
backends.

    python3 -m vswapfs_lab.swapin_share [--rounds 3] [--only fuse-floor-c,vswapfs] [--settle]

A swap-in's READ waits for what the daemon is doing when it arrives, and
the swap-ins themselves push other pages out of the cgroup: those WRITEs
are served by the same thread.  ``--settle`` starts the swap-ins only once
the kernel has no writeback left (``Writeback`` in /proc/meminfo under
1 MiB), to tell those from the fill's writeback still in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from vswapfs import admin, linux
from vswapfs._consts import PAGE, SERVING_THREAD
from vswapfs.cgroup import MemCgroup

from . import bench
from .profile_daemon import thread_times

LIMIT = 512 << 20  # the sustained bench's cgroup
MIB = 2048  # its workload
SAMPLES = 2000  # swap-ins timed, as the bench's latency workload

# Fills, says "filled", waits for a line; times the swap-ins, prints them, waits again.
CHILD = r"""
import json, mmap, random, sys
from vswapfs import workload as W
W.use_file_corpus()
n = int(sys.argv[1]) * 256
mem = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
W.fill(mem, list(range(n)), 1, (0, 1, 1))
print("filled", flush=True)
sys.stdin.readline()
print(json.dumps(W.swapin_latency(mem, n, int(sys.argv[2]), random.Random(1))), flush=True)
sys.stdin.readline()
"""


def serving_thread(pid: int) -> tuple[float, float]:
    """The serving thread's seconds on a CPU and waiting for one (schedstat)."""
    for name, (_, _, run_s, wait_s) in thread_times(pid).items():
        if name.startswith(SERVING_THREAD + " "):
            return run_s, wait_s
    raise RuntimeError(f"no {SERVING_THREAD} thread in {pid}")


def settle(timeout: float = 120.0) -> float:
    """Wait until the kernel has (almost) no writeback in flight; the seconds waited."""
    start = time.monotonic()
    while linux.meminfo("Writeback") >= 1 << 20 and time.monotonic() - start < timeout:
        time.sleep(0.05)
    return round(time.monotonic() - start, 2)


def one(b: bench.Backend, wait: bool = False) -> dict[str, float]:
    """The latency workload on ``b`` (brought up), with the daemon's counts
    around its swap-ins; ``wait``: start them once writeback is done."""
    with MemCgroup(f"vswapfs-swapin-share-{os.getpid()}", LIMIT) as cg:
        p = cg.popen([sys.executable, "-c", CHILD, str(MIB), str(SAMPLES)], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE)
        assert p.stdin is not None and p.stdout is not None
        try:
            if p.stdout.readline().strip() != b"filled":
                raise RuntimeError(f"{b.name}: the workload did not fill")
            waited = settle() if wait else 0.0
            pid = int(str(b.state["pid"])) if b.served else 0
            s0, t0 = (b.served(), serving_thread(pid)) if b.served else ({}, (0.0, 0.0))
            out0 = linux.vmstat()["pswpout"]
            p.stdin.write(b"\n")
            p.stdin.flush()
            lat = json.loads(p.stdout.readline())
            swapped_out = linux.vmstat()["pswpout"] - out0
            s1, t1 = (b.served(), serving_thread(pid)) if b.served else ({}, (0.0, 0.0))
            p.stdin.write(b"\n")
            p.stdin.flush()
            p.wait(timeout=600)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    row = {"p50_us": float(lat["p50_us"]), "p99_us": float(lat["p99_us"]), "mean_us": float(lat["mean_us"]),
           "settled_s": waited, "swapped_out_per_swapin": round(swapped_out / SAMPLES, 1)}
    if b.served:
        reads = s1["READ"][0] - s0.get("READ", (0, 0, 0))[0]
        r0, w0 = s0.get("READ", (0, 0, 0)), s0.get("WRITE", (0, 0, 0))
        w1 = s1.get("WRITE", (0, 0, 0))
        row.update(reads=reads, pages_per_read=round((s1["READ"][1] - r0[1]) / PAGE / reads, 2),
                   daemon_us_per_read=round((s1["READ"][2] - r0[2]) / reads, 1),
                   writes=w1[0] - w0[0], pages_written=(w1[1] - w0[1]) // PAGE,
                   daemon_ms_on_writes=round((w1[2] - w0[2]) / 1000, 1),
                   thread_cpu_us_per_read=round((t1[0] - t0[0]) * 1e6 / reads, 1),
                   thread_wait_us_per_read=round((t1[1] - t0[1]) * 1e6 / reads, 1))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="fuse-floor-c,vswapfs")
    p.add_argument("--settle", action="store_true", help="start the swap-ins once writeback is done")
    a = p.parse_args(argv)
    admin.check_root()
    known = {b.name: b for b in bench.backends()}
    names = a.only.split(",")
    if unknown := [n for n in names if n not in known]:
        raise SystemExit(f"unknown backend(s): {', '.join(unknown)}")
    rows: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(a.rounds):
        for name in names:
            with bench.brought_up(known[name]):
                row = one(known[name], a.settle)
            rows[name].append(row)
            print(f"round {r + 1}/{a.rounds} {name}: {json.dumps(row)}", flush=True)
    print(json.dumps({n: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for n, rs in rows.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
