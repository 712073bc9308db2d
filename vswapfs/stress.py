"""``vswapfs stress``: prove under real memory pressure that no page is lost.

N worker processes in a child memory cgroup hold a combined working set a
chosen multiple of its limit, so the kernel swaps through vswapfs all the
time.  Every page carries its address and a generation number and every
read is checked (see :mod:`vswapfs.workload`); patterns are sequential,
random, fork with copy-on-write, or all three in turn.  A progress line
each second; a final report; exit status 0 only if nothing was bad.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from . import admin, linux
from ._consts import MiB
from ._units import human
from .cgroup import MemCgroup

GIVE_BACK_S = 20.0  # how long to wait after the workers exit for the memory to come back


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    last: dict[str, int] = field(default_factory=dict)
    final: dict[str, Any] | None = None
    buf: bytes = b""


def stress(mnt: str, *, workers: int = 2, limit: int = 64 * MiB, multiple: float = 3.0,
           pattern: str = "mix", duration: float = 60.0, rounds: int = 0, mix: str = "1:1:1",
           quiet: bool = False) -> dict[str, object]:
    """Run the stress load against the swapped-on vswapfs at ``mnt``."""
    admin.require_mount(mnt)
    devs = [d for d in admin.loops_of(mnt) if d in admin.swaps()]
    if not devs:
        raise admin.AdminError(f"{mnt}: no swap is on this vswapfs (run 'vswapfs up {mnt}' first)")
    share = max(1, int(limit * multiple / workers / MiB))
    cmd = [sys.executable, "-m", "vswapfs.workload", "--mib", str(share), "--pattern", pattern,
           "--mix", mix, "--report"]
    cmd += ["--rounds", str(rounds)] if rounds else ["--rounds", "1", "--duration", str(duration)]
    v0, t0 = linux.vmstat(), time.monotonic()
    peak_mem = peak_stored = 0
    errors: list[str] = []
    with MemCgroup(f"vswapfs-stress-{os.getpid()}", limit) as cg:
        pool = [Worker(cg.popen([*cmd, "--seed", str(i + 1)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)) for i in range(workers)]
        sel = selectors.DefaultSelector()
        for w in pool:
            assert w.proc.stdout is not None
            os.set_blocking(w.proc.stdout.fileno(), False)
            sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        next_line = t0 + 1
        while any(w.proc.poll() is None for w in pool) or sel.get_map():
            for key, _ in sel.select(timeout=0.2):
                w = key.data
                chunk = key.fileobj.read()  # type: ignore[union-attr]
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                w.buf += chunk
                *lines, w.buf = w.buf.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    if "round" in msg:
                        w.last = msg
                    else:
                        w.final = msg
            s = admin.status(mnt)
            peak_mem = max(peak_mem, s["mem_used_total"])
            peak_stored = max(peak_stored, s["stored_pages"])
            if time.monotonic() >= next_line and not quiet:
                next_line += 1
                tot = {k: sum(w.last.get(k, 0) for w in pool) for k in ("written", "verified", "bad")}
                v, dt = linux.vmstat(), time.monotonic() - t0
                print(f"[{dt:5.0f}s] written {tot['written']} verified {tot['verified']} bad {tot['bad']} | "
                      f"swap out {(v['pswpout'] - v0['pswpout']) / dt:.0f}/s in "
                      f"{(v['pswpin'] - v0['pswpin']) / dt:.0f}/s | vswapfs {s['stored_pages']} pages "
                      f"in {human(s['mem_used_total'])}", flush=True)
        for i, w in enumerate(pool):
            err = w.proc.stderr.read().decode(errors="replace").strip() if w.proc.stderr else ""
            if w.proc.returncode and w.final is None:
                errors.append(f"worker {i} ended with {w.proc.returncode}: {err[-300:] or 'no output'}")
    elapsed = time.monotonic() - t0
    v = linux.vmstat()
    # memory vswapfs gives back once the workers are gone (discards after exit).
    # A slot the kernel still keeps for a page in its swap cache is freed
    # (and its cluster discarded) only when reclaim drops that page: wait for it.
    exited = time.monotonic()
    while (s := admin.status(mnt))["stored_pages"] > 1 and time.monotonic() < exited + GIVE_BACK_S:
        time.sleep(0.1)
    gave_back_s = time.monotonic() - exited
    # slots the kernel still uses on the device (the header, swap-cache pages nobody
    # reclaimed yet): each keeps its cluster from being discarded
    kernel_used = sum(kib // 4 for dev, kib in linux.swap_areas().items() if dev in devs)
    results = [w.final or w.last for w in pool]
    report: dict[str, Any] = {
        "workers": workers, "limit_mib": limit // MiB, "working_set_mib": share * workers,
        "pattern": pattern, "seconds": round(elapsed, 1),
        "pages_written": sum(int(r.get("written", 0)) for r in results),
        "pages_verified": sum(int(r.get("verified", 0)) for r in results),
        "pages_bad": sum(int(r.get("bad", 0)) for r in results),
        "swap_out_per_s": round((v["pswpout"] - v0["pswpout"]) / elapsed),
        "swap_in_per_s": round((v["pswpin"] - v0["pswpin"]) / elapsed),
        "errors": errors, "vswapfs_peak_stored_pages": peak_stored, "vswapfs_peak_mem": peak_mem,
        "vswapfs_mem_after": s["mem_used_total"], "vswapfs_stored_after": s["stored_pages"],
        "returned_pct": round(100 * (1 - s["mem_used_total"] / peak_mem), 2) if peak_mem else 100.0,
        "returned_after_s": round(gave_back_s, 1),
        "kernel_used_pages_after": kernel_used,
    }
    report["ok"] = report["pages_bad"] == 0 and not errors and report["pages_verified"] > 0
    return report


def print_report(r: dict[str, Any]) -> None:
    print(f"\n{'PASS' if r['ok'] else 'FAIL'}: {r['pages_written']} pages written, "
          f"{r['pages_verified']} verified, {r['pages_bad']} bad, in {r['seconds']}s "
          f"({r['workers']} workers, {r['working_set_mib']} MiB in a {r['limit_mib']} MiB cgroup, "
          f"pattern {r['pattern']})")
    print(f"swap out {r['swap_out_per_s']} pages/s, swap in {r['swap_in_per_s']} pages/s")
    print(f"vswapfs peak {r['vswapfs_peak_stored_pages']} pages in {human(int(r['vswapfs_peak_mem']))}; "
          f"after exit {r['vswapfs_stored_after']} pages in {human(int(r['vswapfs_mem_after']))} "
          f"({r['returned_pct']}% returned, {r['returned_after_s']} s after exit)")
    for e in r["errors"]:
        print(f"error: {e}")
    print(json.dumps(r))
