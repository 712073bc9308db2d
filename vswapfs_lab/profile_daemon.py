#!/usr/bin/env python3
"""Where the daemon's time goes under swap load: py-spy on a live daemon.

Brings vswapfs up (2 GiB image, no backing file), runs the usemem-like
workload (192 MiB of zero / real-file / random pages, 3 rounds) in a
64 MiB memory cgroup, samples the daemon with ``py-spy record --idle
--threads --format raw`` meanwhile, and prints, per thread, the share of
samples by leaf function (what the thread was doing, waiting included).
Needs root and py-spy (``pip install py-spy``).

    python3 -m vswapfs_lab.profile_daemon [--seconds 12] [--channels 1] > docs/profile-usemem.txt
"""

import argparse
import collections
import os
import subprocess
import sys
import tempfile

from vswapfs import MiB, admin
from vswapfs.cgroup import MemCgroup


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=12)
    p.add_argument("--channels", type=int, default=1)
    a = p.parse_args()
    mnt = tempfile.mkdtemp(prefix="vswapfs-profile-")
    raw = os.path.join(tempfile.mkdtemp(), "daemon.txt")
    try:
        with admin.swap_up(mnt, ["--size", "2G", "--channels", str(a.channels)]), \
                MemCgroup(f"vswapfs-profile-{os.getpid()}", 64 * MiB) as cg:
            pid = admin.daemon_pid(mnt)
            load = cg.popen([sys.executable, "-m", "vswapfs.workload", "--mib", "192", "--files",
                             "--rounds", "3"], stdout=subprocess.DEVNULL)
            subprocess.run(["py-spy", "record", "--pid", str(pid), "--format", "raw", "--idle",
                            "--threads", "-r", "200", "-d", str(a.seconds), "-o", raw],
                           check=True, capture_output=True)
            load.wait(600)
    finally:
        os.rmdir(mnt)
    threads: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            threads[frames[0]][frames[-1]] += int(count)
    print(f"py-spy record --pid <daemon> --format raw --idle --threads -r 200 -d {a.seconds}, during")
    print("python3 -m vswapfs.workload --mib 192 --files --rounds 3 in a 64 MiB cgroup "
          f"(vswapfs up --channels {a.channels}, no backing file)")
    for thread, leaves in sorted(threads.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(leaves.values())
        print(f"\n{thread}: {total} samples; share by leaf function (waiting included)")
        for fn, n in leaves.most_common(8):
            print(f"  {100 * n / total:5.1f}%  {fn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
