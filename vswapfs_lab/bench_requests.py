#!/usr/bin/env python3
"""What one request costs the daemon beyond the kernel: the serving path alone.

Feeds WRITE requests of swap's shape (2 pages each, the mean the sustained
bench sees; the workload's zero / real-file / random mix), then READs of
them, through the same code a channel thread runs
(``Session._serve_here`` on the file system over a dynamic ``SwapSpace``),
with replies written to /dev/null.  Prints the microseconds per request,
how many of them compression and decompression take (timed alone over the
same pages), and the rest: parsing, the engine's bookkeeping, replies,
tallies.  Every page read back is compared with what was written.

    python3 -m vswapfs_lab.bench_requests [--requests 40000] [--pages 2] [--profile]

``--profile`` adds a cProfile of the write and read loops, by own time.

``--instructions`` counts instead of timing: the instructions one WRITE and
one READ take, under valgrind's callgrind (the differences between a run
that only sets up, one that also writes, one that also reads back; every
page is checked in a run of its own, outside the counts).  The
count is the same on every run, where time on a shared 2-CPU VM swings
±30% from run to run: it shows a cut of a few percent that timing cannot.
It includes compression, and says nothing of caches or the kernel.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import time

from vswapfs import workload
from vswapfs._consts import PAGE
from vswapfs._fs import SWAP_INO, SwapFS
from vswapfs.engine import SwapSpace
from vswapfs.engine._codec import Codec
from vswapfs.fuse._abi import IN_HEADER, READ_IN, WRITE_IN, WRITE_IN_SIZE, Opcode
from vswapfs.fuse._session import Session, _Tally


def write_request(unique: int, offset: int, data: bytes) -> bytes:
    body = WRITE_IN.pack(0, offset, len(data), 0).ljust(WRITE_IN_SIZE, b"\0") + data
    return IN_HEADER.pack(IN_HEADER.size + len(body), Opcode.WRITE, unique, SWAP_INO, 0, 0, 1, 0, 0) + body


def read_request(unique: int, offset: int, size: int) -> bytes:
    body = READ_IN.pack(0, offset, size, 0) + bytes(16)
    return IN_HEADER.pack(IN_HEADER.size + len(body), Opcode.READ, unique, SWAP_INO, 0, 0, 1, 0, 0) + body


def _rig(pages: int) -> tuple[SwapSpace, Session, _Tally, list[int]]:
    """A dynamic space for ``pages`` pages (and room to spare), its file
    system and a session whose replies go to /dev/null; the fds to close."""
    workload.use_file_corpus()
    size = (pages * PAGE + (64 << 20)) & ~((1 << 21) - 1)
    space = SwapSpace(size, dynamic=True)
    null = os.open("/dev/null", os.O_WRONLY)
    r, w = os.pipe()
    return space, Session(r, SwapFS(space, threads=0), buffers=1), _Tally(), [null, r, w]


def _refill(space: SwapSpace) -> None:
    """Housekeeping's part: spare chunks and table pages faulted in."""
    while space.spares_wanted.is_set() or space.replenish(busy=True):
        space.spares_wanted.clear()
        space.replenish(busy=True)


def run(requests: int, pages: int, profile: bool = False, distinct: int = 0) -> dict[str, float]:
    """``distinct``: that many different page contents, cycled (0: every page
    its own), so that a run the size of the sustained bench fits in memory."""
    n = requests * pages
    space, session, tally, fds = _rig(n)
    null = fds[0]
    kinds = distinct or n
    page_data = [workload.page(i, 1) for i in range(kinds)]

    def data_of(k: int) -> bytes:
        return b"".join(page_data[i % kinds] for i in range(k * pages, (k + 1) * pages))

    reads = [memoryview(read_request(k + 1, k * pages * PAGE, pages * PAGE)) for k in range(requests)]

    def write_all() -> float:
        t = 0.0
        step = max(1, 512 // pages)  # requests between top-ups: about 2 MiB of pages
        for lo in range(0, requests, step):
            _refill(space)  # outside the timed loop
            batch = [memoryview(write_request(k + 1, k * pages * PAGE, data_of(k)))
                     for k in range(lo, min(lo + step, requests))]
            t0 = time.perf_counter()
            for req in batch:
                if not session._serve_here(tally, null, req):
                    raise RuntimeError("a WRITE was handed over")
            t += time.perf_counter() - t0
        return t

    def read_all() -> float:
        t0 = time.perf_counter()
        for req in reads:
            session._serve_here(tally, null, req)
        return time.perf_counter() - t0

    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    wt = write_all()
    rt = read_all()
    if prof:
        prof.disable()
    if space.stats()["failed_writes"]:
        raise RuntimeError(f"{space.stats()['failed_writes']} writes failed")
    bad = sum(bytes(space.read(i * PAGE, PAGE)) != page_data[i % kinds] for i in range(n))
    if bad:
        raise RuntimeError(f"{bad} pages read back wrong")
    codec = Codec()
    t0 = time.perf_counter()
    blobs = [codec.encode(page_data[i % kinds]) for i in range(n)]
    enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _, b in blobs:
        if b is not None:
            codec.decode(b)
    dec = time.perf_counter() - t0
    space.close()
    for fd in fds:
        os.close(fd)
    if prof:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(40)
    us = 1e6 / requests
    return {"pages_per_request": pages, "write_us": round(wt * us, 2), "read_us": round(rt * us, 2),
            "encode_us": round(enc * us, 2), "decode_us": round(dec * us, 2),
            "write_rest_us": round((wt - enc) * us, 2), "read_rest_us": round((rt - dec) * us, 2)}


PHASES = ("setup", "write", "read", "verify")


def serve_phase(requests: int, pages: int, phase: str) -> None:
    """Set up ``requests`` WRITEs of ``pages`` of the workload's pages each
    and as many READs of them, then serve the WRITEs (``phase`` "write") and
    the READs too ("read"), or nothing ("setup"): one run of
    :func:`instructions`.  "verify" serves both and compares every page
    read back with what was written (counted by no phase)."""
    space, session, tally, fds = _rig(requests * pages)
    _refill(space)  # enough for the whole run: refills would count as requests' work
    data = [b"".join(workload.page(k * pages + i, 1) for i in range(pages)) for k in range(requests)]
    writes = [memoryview(write_request(k + 1, k * pages * PAGE, d)) for k, d in enumerate(data)]
    reads = [memoryview(read_request(k + 1, k * pages * PAGE, pages * PAGE)) for k in range(requests)]
    for todo in ([writes] if phase == "write" else [writes, reads] if phase in ("read", "verify") else []):
        for req in todo:
            session._serve_here(tally, fds[0], req)
    if space.stats()["failed_writes"]:
        raise SystemExit("writes were refused: fewer requests (one refill must hold them all)")
    if phase == "verify" and bytes(space.read(0, requests * pages * PAGE)) != b"".join(data):
        raise RuntimeError("pages read back wrong")


def instructions(requests: int, pages: int) -> dict[str, int]:
    """Instructions per WRITE and per READ, counted by callgrind (see the
    module docstring)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind (apt install valgrind)")
    serve_phase(requests, pages, "verify")  # the counted runs below serve exactly this
    total = {}
    for phase in ("setup", "write", "read"):
        done = subprocess.run(
            [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
             "vswapfs_lab.bench_requests", "--phase", phase, "--requests", str(requests),
             "--pages", str(pages)], capture_output=True, text=True)
        m = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode or m is None:
            raise SystemExit(f"callgrind run ({phase}) failed:\n{done.stderr[-2000:]}")
        total[phase] = int(m.group(1))
    return {"pages_per_request": pages,
            "write_instructions": (total["write"] - total["setup"]) // requests,
            "read_instructions": (total["read"] - total["write"]) // requests}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, help="default 40000; 1000 with --instructions")
    p.add_argument("--pages", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--distinct", type=int, default=0,
                   help="different page contents, cycled (default: every page its own)")
    p.add_argument("--instructions", action="store_true",
                   help="count instructions per request under callgrind instead of timing")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.requests is None:
        a.requests = 1000 if a.instructions else 40000
    if a.phase:
        serve_phase(a.requests, a.pages, a.phase)
        return 0
    if a.instructions:
        print(json.dumps(instructions(a.requests, a.pages)))
        return 0
    rows = [run(a.requests, a.pages, a.profile, a.distinct) for _ in range(a.rounds)]
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
