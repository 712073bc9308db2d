#!/usr/bin/env python3
"""Where the daemon's time goes under swap load: py-spy on a live daemon.

Brings vswapfs up (default options but the image size), runs the
usemem-like workload (zero / real-file / random pages) in a memory cgroup,
samples the daemon with ``py-spy record --idle --threads --format raw``
meanwhile, and prints the CPU time each daemon thread used (user and
system, on a CPU and waiting for one), then, per thread, the share of
samples by leaf function (what the thread was doing, waiting included)
and, for the threads that serve, by function anywhere on the stack
(where the time of a request goes, callees included).  ``--sustained`` is the sustained bench's size:
2 GiB through 512 MiB, sampled for its whole write and verify.  Needs root
and py-spy (``pip install py-spy``).

    python3 -m vswapfs_lab.profile_daemon [--seconds 12] [--channels 1] > docs/profile-usemem.txt
    python3 -m vswapfs_lab.profile_daemon --sustained > docs/profile-sustained.txt
"""

import argparse
import collections
import os
import subprocess
import sys
import tempfile

from vswapfs import MiB, admin
from vswapfs.cgroup import MemCgroup


def thread_times(pid: int) -> dict[str, tuple[float, float, float, float]]:
    """Per thread of ``pid`` (by name and tid): seconds of user and system
    time (``stat``), on a CPU and waiting for one in the run queue
    (``schedstat``)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run, wait, _ = f.read().split()
        except OSError:  # the thread ended
            continue
        fields = st[st.rindex(")") + 2:].split()
        name = st[st.index("(") + 1:st.rindex(")")]
        out[f"{name} ({tid})"] = (int(fields[11]) / tick, int(fields[12]) / tick,
                                  int(run) / 1e9, int(wait) / 1e9)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=12)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--sustained", action="store_true",
                   help="2 GiB through a 512 MiB cgroup, one round, sampled for --seconds (default 70)")
    a = p.parse_args()
    mib, limit, rounds = (2048, 512, 1) if a.sustained else (192, 64, 3)
    if a.sustained and a.seconds == 12:
        a.seconds = 70
    mnt = tempfile.mkdtemp(prefix="vswapfs-profile-")
    raw = os.path.join(tempfile.mkdtemp(), "daemon.txt")
    try:
        with admin.swap_up(mnt, ["--size", "4G", "--channels", str(a.channels)]), \
                MemCgroup(f"vswapfs-profile-{os.getpid()}", limit * MiB) as cg:
            pid = admin.daemon_pid(mnt)
            assert pid is not None, "no daemon for the mount"
            before = thread_times(pid)
            load = cg.popen([sys.executable, "-m", "vswapfs.workload", "--mib", str(mib), "--files",
                             "--rounds", str(rounds)], stdout=subprocess.PIPE)
            subprocess.run(["py-spy", "record", "--pid", str(pid), "--format", "raw", "--idle",
                            "--threads", "-r", "200", "-d", str(a.seconds), "-o", raw],
                           check=True, capture_output=True)
            out, _ = load.communicate(timeout=900)
            after = thread_times(pid)
    finally:
        os.rmdir(mnt)
    threads: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    anywhere: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            threads[frames[0]][frames[-1]] += int(count)
            for fn in {fr.split(" (")[0] for fr in frames[1:]}:  # each function once per sample
                anywhere[frames[0]][fn] += int(count)
    print(f"py-spy record --pid <daemon> --format raw --idle --threads -r 200 -d {a.seconds}, during")
    print(f"python3 -m vswapfs.workload --mib {mib} --files --rounds {rounds} in a {limit} MiB cgroup "
          f"(vswapfs up --channels {a.channels}, no backing file)")
    last = out.decode().strip().splitlines()[-1:] or ["nothing"]
    print("the workload printed: " + last[0])
    print("\nCPU time per daemon thread over the whole workload (s): user, system, on a CPU, "
          "waiting in the run queue (/proc/<pid>/task/*/stat and schedstat)")
    for name, t1 in sorted(after.items(), key=lambda kv: -kv[1][2]):
        t0 = before.get(name, (0.0, 0.0, 0.0, 0.0))
        d = [b - a for a, b in zip(t0, t1, strict=True)]
        if d[2] >= 0.05:
            print(f"  {name:28s} user {d[0]:6.1f}  system {d[1]:5.1f}  on-cpu {d[2]:6.1f}  "
                  f"run-queue {d[3]:5.1f}")
    for thread, leaves in sorted(threads.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(leaves.values())
        print(f"\n{thread}: {total} samples; share by leaf function (waiting included)")
        for fn, n in leaves.most_common(8):
            print(f"  {100 * n / total:5.1f}%  {fn}")
        if "fuse-channel" in thread:
            print("  by function anywhere on the stack (callees included):")
            for fn, n in anywhere[thread].most_common(24):
                print(f"  {100 * n / total:5.1f}%  {fn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
