"""How long swap stalls when the daemon dies, and what the supervisor costs.

    python -m vswapfs_lab.recovery [--kills 5] [--mib 320] [--limit 96M] [--size 2G]

Brings vswapfs up on a temporary mount point, then:

- *idle*: ``kill -9`` the daemon ``--kills`` times with nothing swapping;
- *loaded*: the same while a verifying hog (``--mib`` through a cgroup of
  ``--limit``) swaps in and out, at random moments;
- *restart*: ``vswapfs restart`` under the same load.

A stall is the time from the kill (or the restart's signal) to the first
request a new daemon answers: a read of ``control/pid`` sent right after
the kill waits in the kernel's queue until then.  Kills are more than
YOUNG_S apart: a daemon that dies sooner after its start makes the
supervisor pause before the next (a crash loop's back-off), which is not
the stall of one crash.  Prints each, their
medians, the pages taken over, the supervisor's memory (VmRSS, VmLck) and
a last JSON line; exits 1 if the hog found a bad page.  Tears everything
down, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from vswapfs import admin, linux
from vswapfs._supervisor import YOUNG_S
from vswapfs._units import parse_size
from vswapfs.cgroup import MemCgroup


def _control(mnt: str, name: str) -> str:
    r = subprocess.run(["timeout", "-s", "KILL", "60", "cat", os.path.join(mnt, "control", name)],
                       capture_output=True, text=True, check=True)
    return r.stdout.strip()


def _stall(mnt: str, how: str) -> tuple[float, int]:
    """Kill (``kill``) or restart (``hup``) the daemon; (seconds until a new
    one answered, pages it took over)."""
    pid = int(_control(mnt, "pid"))
    t0 = time.monotonic()
    if how == "kill":
        os.kill(pid, signal.SIGKILL)
    else:
        sup = admin.supervisor_pid(mnt)
        assert sup is not None, "no supervisor"
        os.kill(sup, signal.SIGHUP)
    new = int(_control(mnt, "pid"))
    stall = time.monotonic() - t0
    if new == pid:  # the signal had not landed yet: the old one answered
        while int(_control(mnt, "pid")) == pid:
            time.sleep(0.001)
        stall = time.monotonic() - t0
    return stall, int(_control(mnt, "recovered_pages"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--mib", type=int, default=320)
    p.add_argument("--limit", default="96M")
    p.add_argument("--size", default="2G")
    a = p.parse_args()
    rng = random.Random()
    mnt = tempfile.mkdtemp(prefix="vswapfs-recovery-")
    rows: dict[str, list[tuple[float, int]]] = {"idle": [], "loaded": [], "restart": []}
    bad = 0
    try:
        with admin.swap_up(mnt, ["--size", a.size]):
            sup = admin.supervisor_pid(mnt)
            for _ in range(a.kills):
                time.sleep(YOUNG_S + 0.5)
                rows["idle"].append(_stall(mnt, "kill"))
            with MemCgroup("vswapfs-recovery-bench", parse_size(a.limit)) as cg:
                hog = cg.popen([sys.executable, "-m", "vswapfs.workload", "--mib", str(a.mib),
                                "--pattern", "mix", "--duration", str(10 + 13 * a.kills)],
                               stdout=subprocess.PIPE)
                time.sleep(4)
                for i in range(2 * a.kills):
                    time.sleep(YOUNG_S + 0.5 + rng.random())
                    rows["loaded" if i % 2 == 0 else "restart"].append(
                        _stall(mnt, "kill" if i % 2 == 0 else "hup"))
                out, _ = hog.communicate(timeout=900)
                result = json.loads(out.decode().strip().splitlines()[-1])
                bad = int(result["bad"]) + (hog.returncode != 0)
            supervisor = {k: linux.process_status(sup, k) for k in ("VmRSS", "VmLck")} if sup else {}
            check = _control(mnt, "check")
    finally:
        os.rmdir(mnt)
    print(f"{'':8} {'stalls (s)':40} {'median':>7} {'pages taken over':>17}")
    summary: dict[str, object] = {}
    for name, vals in rows.items():
        stalls = [s for s, _ in vals]
        med = statistics.median(stalls)
        summary[f"{name}_stall_median_s"] = round(med, 3)
        summary[f"{name}_stalls_s"] = [round(s, 3) for s in stalls]
        print(f"{name:8} {' '.join(f'{s:.2f}' for s in stalls):40} {med:7.2f} "
              f"{max(n for _, n in vals):17}")
    print(f"supervisor: VmRSS {supervisor.get('VmRSS', 0) // 1024} MiB, VmLck "
          f"{supervisor.get('VmLck', 0) // 1024} MiB; hog bad pages {bad}; control/check {check}")
    summary.update({"supervisor_rss_kib": supervisor.get("VmRSS", 0),
                    "supervisor_locked_kib": supervisor.get("VmLck", 0), "bad": bad, "check": check,
                    "hog_mib": a.mib, "limit": a.limit})
    print(json.dumps(summary))
    return 1 if bad or check != "ok" else 0


if __name__ == "__main__":
    sys.exit(main())
