#!/usr/bin/env python3
"""What a swap-in's READ waits on, seen from the kernel, under redis's GETs.

Each round brings a backend up, loads redis (``vswapfs_lab.kv``: a heap
3x its 256 MiB cgroup) and records, system-wide with ``perf``, through the
random GETs: ``fuse:fuse_request_send`` (a request is queued for the
server), ``fuse:fuse_request_end`` (its reply arrived), and the serving
thread's read(2) returns and writev(2) calls.  Every READ is split in three:

- *wake*: from queued to the serving thread's read(2) returning it: waking
  the thread (on a VM an interrupt to a halted vCPU), or the request it was
  serving first;
- *own*: from there to the reply's writev(2): the server's own work;
- *reply*: from the writev(2) to the end: the copy and the kernel's
  completion of the swap-in.

READs queued while a WRITE was outstanding are counted apart (*behind a
WRITE*): they wait for it.  The floors are C servers (``fuse_floor.c``):
the raw one, and the one that stores pages as vswapfs's first store does
(``fuse-floor-c-lz4``); between them is what compressing costs, and between
that one and vswapfs what vswapfs's own code costs.  Rounds alternate
between the backends; tracing slows every backend a little.  Needs root,
``perf`` and redis (Debian's ``linux-perf``, ``redis-server``, ``redis-tools``).

    python3 -m vswapfs_lab.read_latency [--rounds 3] [--only fuse-floor-c,fuse-floor-c-lz4,vswapfs]
        [--variant NAME=ARGS]...   # vswapfs with these options too, e.g. bp50="--busy-poll 50"
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable

from vswapfs import MiB, admin, linux, workload
from vswapfs._consts import SERVING_THREAD
from vswapfs.cgroup import MemCgroup

from . import bench, kv
from .profile_daemon import thread_times

LIMIT_MIB = 256  # redis's cgroup; the heap is 3x that
OP_READ, OP_WRITE = 15, 16  # FUSE opcodes
READ_REQUEST_BYTES = 80  # a READ as read(2) returns it: fuse_in_header and fuse_read_in
SYSCALLS = {"x86_64": (0, 20), "aarch64": (63, 66)}  # read, writev

_EVENT = re.compile(r"\s*\S.*?\s+(\d+)\s+\[\d+\]\s+(\d+\.\d+):\s+(\S+):\s+(.*)")
_REQ = re.compile(r"connection (\d+) req (\d+)(?: opcode (\d+))?")


def serving_tid(b: bench.Backend) -> int:
    """The thread that reads the image's requests: vswapfs's channel thread,
    or the floor's one thread."""
    if "proc" in b.state:
        return int(b.state["proc"].pid)  # type: ignore[attr-defined]
    pid = int(str(b.state["pid"]))
    for name in thread_times(pid):
        if name.startswith(SERVING_THREAD + " ("):
            return int(name.rsplit("(", 1)[1].rstrip(")"))
    raise RuntimeError(f"{b.name}: no {SERVING_THREAD} thread in the daemon")


def record(out: str) -> subprocess.Popen[bytes]:
    """Start perf on the events this tool reads; stop it with SIGINT."""
    rd, wv = SYSCALLS[platform.machine()]
    p = subprocess.Popen(["perf", "record", "-a", "-q", "-o", out,
                          "-e", "fuse:fuse_request_send", "-e", "fuse:fuse_request_end",
                          "-e", "raw_syscalls:sys_exit", "--filter", f"id == {rd}",
                          "-e", "raw_syscalls:sys_enter", "--filter", f"id == {wv}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # perf has its buffers mapped before the first GET
    if p.poll() is not None:
        raise RuntimeError(f"perf record exited ({p.returncode}): does this kernel have the "
                           "fuse:fuse_request_send tracepoint (perf list fuse)?")
    return p


def stop(p: subprocess.Popen[bytes]) -> None:
    """Stop a recording: SIGINT, so perf writes its file out; killed if it hangs."""
    p.send_signal(signal.SIGINT)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise


def events(data: str) -> Iterable[tuple[float, int, str, str]]:
    """(seconds, tid, event, its fields) of a recording, in time order."""
    text = subprocess.run(["perf", "script", "--ns", "-F", "comm,tid,cpu,time,event,trace", "-i", data],
                          check=True, capture_output=True, text=True).stdout
    return parse(text)


def parse(text: str) -> Iterable[tuple[float, int, str, str]]:
    """(seconds, tid, event, its fields) of ``perf script`` lines."""
    for line in text.splitlines():
        m = _EVENT.match(line)
        if m:
            yield float(m.group(2)), int(m.group(1)), m.group(3), m.group(4)


def split(evs: Iterable[tuple[float, int, str, str]], tid: int) -> dict[str, list[float]]:
    """Per READ, in µs: ``wake``, ``own``, ``reply``, ``total``; and
    ``behind`` (the totals of READs queued while a WRITE was outstanding),
    ``clear`` (the others' totals), ``write`` (WRITEs' totals).

    The kernel hands requests out in the order they were queued, so the
    serving thread's next read(2) of a READ's size takes the oldest READ
    not yet taken, and its next writev(2) is that READ's reply (one thread
    serves a request at a time).  A READ another thread took (a control
    file's, on the event loop) is dropped when it ends."""
    rd, wv = SYSCALLS[platform.machine()]
    sent: dict[tuple[str, str], tuple[float, int]] = {}
    done: list[tuple[float, float, int]] = []  # (queued, ended, opcode)
    parts: dict[str, list[float]] = {"wake": [], "own": [], "reply": []}
    waiting: dict[tuple[str, str], float] = {}  # READs queued, not yet read: when queued (in order)
    taken: dict[tuple[str, str], list[float]] = {}  # READs read: [queued, read, writev]
    last: tuple[str, str] | None = None  # the READ the thread read last, until its reply
    for t, who, ev, rest in evs:
        if ev == "fuse:fuse_request_send" or ev == "fuse:fuse_request_end":
            m = _REQ.search(rest)
            if m is None:
                continue
            req = (m.group(1), m.group(2))
            if ev.endswith("send"):
                op = int(m.group(3) or 0)
                sent[req] = (t, op)
                if op == OP_READ:
                    waiting[req] = t
            elif req in sent:
                t0, op = sent.pop(req)
                done.append((t0, t, op))
                waiting.pop(req, None)
                times = taken.pop(req, None)
                if times is not None and len(times) == 3:
                    parts["wake"].append((times[1] - times[0]) * 1e6)
                    parts["own"].append((times[2] - times[1]) * 1e6)
                    parts["reply"].append((t - times[2]) * 1e6)
        elif who == tid:
            if ev == "raw_syscalls:sys_exit" and rest.startswith(f"NR {rd} "):
                last = None
                if rest.endswith(f"= {READ_REQUEST_BYTES}") and waiting:
                    last = next(iter(waiting))
                    taken[last] = [waiting.pop(last), t]
            elif ev == "raw_syscalls:sys_enter" and rest.startswith(f"NR {wv} ") and last in taken:
                taken[last].append(t)
                last = None
    done.sort()
    writes = [(a, b) for a, b, op in done if op == OP_WRITE]
    starts = [a for a, _ in writes]
    behind: list[float] = []
    clear: list[float] = []
    for a, b, op in done:
        if op != OP_READ:
            continue
        i = bisect.bisect_right(starts, a)
        # WRITEs are few and short next to the gaps between them: the last few started suffice
        queued = any(ws <= a < we for ws, we in writes[max(0, i - 4):i])
        (behind if queued else clear).append((b - a) * 1e6)
    return {**parts, "total": [(b - a) * 1e6 for a, b, op in done if op == OP_READ],
            "behind": behind, "clear": clear, "write": [(b - a) * 1e6 for a, b, op in done if op == OP_WRITE]}


def summary(parts: dict[str, list[float]]) -> dict[str, float]:
    """Means and percentiles of :func:`split`'s lists, flat."""
    out: dict[str, float] = {"reads": float(len(parts["total"])), "reads_matched": float(len(parts["own"])),
                             "reads_behind_write": float(len(parts["behind"])),
                             "behind_write_s": round(sum(parts["behind"]) / 1e6, 4)}
    for k in ("total", "wake", "own", "reply", "clear", "write"):
        x = sorted(parts[k])
        if not x:
            continue
        out[f"{k}_mean_us"] = round(sum(x) / len(x), 1)
        if k in ("total", "wake", "own", "clear"):
            for q in (10, 50, 90):
                out[f"{k}_p{q}_us"] = round(x[min(len(x) - 1, len(x) * q // 100)], 1)
    return out


def one(b: bench.Backend, work: str) -> dict[str, float]:
    """One round on a backend that is up: load, then the traced GETs."""
    workload.use_file_corpus()
    keys = kv.keys_for(3 * LIMIT_MIB)
    data = os.path.join(work, f"{b.name}.data")
    with MemCgroup(f"vswapfs-readlat-{os.getpid()}", LIMIT_MIB * MiB) as cg, kv.server(cg):
        kv.load(kv.PORT, keys)
        tid = serving_tid(b)
        perf = record(data)
        try:
            c0 = linux.cpu_busy_s()
            row = kv.bench_gets(kv.PORT, keys, kv.REQUESTS, 4)
            row["kv_get_cpu_s"] = round(linux.cpu_busy_s() - c0, 2)
        finally:
            stop(perf)
        bad = kv.check(kv.PORT, keys, 2000)
    if bad:
        raise RuntimeError(f"{b.name}: {bad} values read back wrong")
    try:
        row.update(summary(split(events(data), tid)))
    finally:
        os.unlink(data)
    return row


COLUMNS = (("GETs/s", "kv_rps"), ("READ µs mean / p50", "total_mean_us", "total_p50_us"),
           ("wake mean / p50", "wake_mean_us", "wake_p50_us"),
           ("own mean / p50", "own_mean_us", "own_p50_us"),
           ("reply mean", "reply_mean_us"), ("clear READs mean / p50", "clear_mean_us", "clear_p50_us"),
           ("READs behind a WRITE (s waited)", "reads_behind_write", "behind_write_s"),
           ("WRITE µs mean", "write_mean_us"), ("machine CPU-s", "kv_get_cpu_s"))


def _number(v: float) -> str:
    """``v`` to the digits a table of these figures needs."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 1 else f"{v:.2g}"


def table(rows: dict[str, list[dict[str, float]]]) -> str:
    """Medians over the rounds, a row per backend."""
    head = "| | " + " | ".join(c[0] for c in COLUMNS) + " |"
    out = [head, "|" + " --- |" * (len(COLUMNS) + 1)]
    for name, rs in rows.items():
        cells = []
        for _, *keys in COLUMNS:
            vals = [statistics.median(r[k] for r in rs) if all(k in r for r in rs) else None for k in keys]
            cells.append(" / ".join("—" if v is None else _number(v) for v in vals))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="fuse-floor-c,fuse-floor-c-lz4,vswapfs")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="vswapfs with these options as well (e.g. bp50='--busy-poll 50')")
    a = p.parse_args(argv)
    admin.check_root()
    if platform.machine() not in SYSCALLS:
        raise SystemExit(f"read_latency knows the syscall numbers of {', '.join(SYSCALLS)} only")
    for tool in ("perf", "redis-server", "redis-benchmark"):
        if shutil.which(tool) is None:
            raise SystemExit(f"read_latency needs {tool}")
    known = {b.name: b for b in bench.backends()}
    for v in a.variant:
        name, _, args = v.partition("=")
        if not name or not args:
            raise SystemExit(f"--variant {v!r}: NAME=ARGS")
        known[name] = bench.vswapfs_backend(name, ["--size", "4G", *shlex.split(args)])
    names = a.only.split(",") + [v.partition("=")[0] for v in a.variant]
    if unknown := [n for n in names if n not in known]:
        raise SystemExit(f"unknown backend(s): {', '.join(unknown)}")
    if why := next((f"{n}: {w}" for n in names if (w := known[n].available())), None):
        raise SystemExit(why)
    rows: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="vswapfs-readlat-") as work:
        for r in range(a.rounds):
            for name in names:
                with bench.brought_up(known[name]):
                    row = one(known[name], work)
                rows[name].append(row)
                print(f"round {r + 1}/{a.rounds} {name}: {json.dumps(row)}", flush=True)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
