#!/usr/bin/env python3
"""Put the vswapfs daemon and a hog that needs swap in ONE memory cgroup.

This is the configuration to avoid, shown on purpose.  The daemon is
mlocked, its request buffers are faulted in at start and its loop device
has no writeback throttling; still, on cgroup v1 without PR_SET_IO_FLUSHER
(refused without CAP_SYS_RESOURCE, as on our test machines) a daemon thread
that allocates while holding the engine lock enters memcg reclaim, reclaim
writes a swap page to the daemon's own loop device and waits for that
write, which only the daemon can finish.  Observed here every time:

    daemon thread: try_to_free_mem_cgroup_pages -> shrink_folio_list ->
                   swap_writeout -> submit_bio -> (waits on its own device)

The script waits --seconds for the hog, reports whether the pair hung, then
recovers with `vswapfs down --force`: it aborts the FUSE connection; swapoff
then fails while the hog lives (its full cgroup cannot take its pages back),
so `down --force` refuses to unmount under a live swap area; once the hog is
killed a second `down --force` completes.  Exits 0 if the machine was
recovered.

    python3 scripts/same_cgroup_pressure.py [--seconds 60]
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vswapfs import _admin
from vswapfs._cgroup import MemCgroup

MiB = 1 << 20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60)
    a = p.parse_args()
    mnt = tempfile.mkdtemp(prefix="vswapfs-pressure-")
    cg = None
    hung = False
    try:
        dev = _admin.up(mnt, ["--size", "2G", "--pool-limit", "48M"])
        pid = _admin.daemon_pid(mnt)
        cg = MemCgroup(f"vswapfs-pressure-{os.getpid()}", 160 * MiB)
        (cg.path / "cgroup.procs").write_text(str(pid))
        hog = cg.popen([sys.executable, "-m", "vswapfs.workload", "--mib", "320", "--mix", "1:2:0"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, _ = hog.communicate(timeout=a.seconds)
            print(f"no deadlock: hog exited {hog.returncode}: {out.decode().strip()[:200]}")
        except subprocess.TimeoutExpired:
            hung = True
            print(f"daemon {pid} and hog hung in reclaim after {a.seconds:.0f}s; recovering")
        down = [sys.executable, "-m", "vswapfs", "down", "--force", mnt]
        r = subprocess.run(down, capture_output=True, text=True, timeout=120)
        print(r.stdout.strip() or r.stderr.strip())
        hog.kill()  # after the abort it can die; its full cgroup cannot take its pages back
        hog.wait(60)
        if r.returncode:
            r = subprocess.run(down, capture_output=True, text=True, timeout=120)
            print(r.stdout.strip() or r.stderr.strip())
        ok = r.returncode == 0 and dev not in _admin.swaps() and _admin.mount_type(mnt) is None
        print(f"{'recovered' if ok else 'NOT recovered'}; hung={hung}")
        return 0 if ok else 1
    finally:
        if _admin.mount_type(mnt):
            _admin.down(mnt, force=True)
        if cg is not None:
            cg.close()
        Path(mnt).rmdir()


if __name__ == "__main__":
    sys.exit(main())
