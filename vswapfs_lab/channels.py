#!/usr/bin/env python3
"""How many FUSE channel threads?  Interleaved rounds of the same workload
on vswapfs served with each channel count.

Each round, for each count: ``vswapfs up --channels N`` (2 GiB image), a
process in a 64 MiB memory cgroup writes 192 MiB of zero / real-file /
random pages, times 3,000 random swap-ins of swapped-out pages, verifies
every page; then ``down``.  Prints p50/p99 swap-in and write/verify times,
then the medians per count.

    python3 -m vswapfs_lab.channels [--counts 0,1,2,3] [--rounds 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from vswapfs import MiB, admin
from vswapfs.cgroup import MemCgroup


def one(channels: int) -> dict[str, float]:
    mnt = tempfile.mkdtemp(prefix="vswapfs-channels-")
    try:
        with admin.swap_up(mnt, ["--size", "2G", "--channels", str(channels)]), \
                MemCgroup(f"vswapfs-channels-{os.getpid()}", 64 * MiB) as cg:
            p = cg.popen([sys.executable, "-m", "vswapfs.workload", "--mib", "192", "--files",
                          "--latency", "3000"], stdout=subprocess.PIPE)
            r = json.loads(p.communicate(timeout=600)[0].decode().strip().splitlines()[-1])
    finally:
        os.rmdir(mnt)
    if r["bad"]:
        raise RuntimeError(f"{r['bad']} bad pages with {channels} channels")
    return {"p50_us": r["latency"]["p50_us"], "p99_us": r["latency"]["p99_us"],
            "write_s": r["write_s"], "verify_s": r["verify_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="0,1,2,3")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    counts = [int(c) for c in a.counts.split(",")]
    runs: dict[int, list[dict[str, float]]] = {c: [] for c in counts}
    for rnd in range(a.rounds):
        for c in counts[rnd % len(counts):] + counts[:rnd % len(counts)]:
            runs[c].append(one(c))
            print(f"round {rnd + 1} channels {c}: {runs[c][-1]}", flush=True)
    print("\nmedians of", a.rounds, "rounds")
    print("| channels | swap-in p50 (µs) | p99 (µs) | write (s) | verify (s) |")
    print("| --- | --- | --- | --- | --- |")
    for c in counts:
        m = {k: statistics.median(r[k] for r in runs[c]) for k in runs[c][0]}
        print(f"| {c} | {m['p50_us']:.1f} | {m['p99_us']:.0f} | {m['write_s']:.2f} | {m['verify_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
