#!/usr/bin/env python3
"""Benchmark the swap engine alone (no FUSE): write and read back realistic pages.

The page mix is a third zero pages, a third cut from real files on this
machine (shared libraries, executables, Python sources, text), a third random.
Every page read back is compared with what was written.  Prints write and
read MB/s (single-threaded), the compression ratio, the memory used per
stored page beyond the compressed payload, and how long freeing one whole
512-slot cluster takes (what a kernel discard asks for; afterwards the
space must hold nothing); the last line is one JSON object.

    python3 -m vswapfs_lab.bench_engine [--mib 1024] [--levels 1,3,-1] [--rounds 3]

With several levels or rounds, rounds are interleaved across levels (single
runs swing by a third on these machines) and medians are reported.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import statistics
import sys
import time

from vswapfs.engine import CLUSTER_SLOTS, PAGE, SwapSpace

SOURCES = ("/usr/lib/x86_64-linux-gnu/*.so*", "/usr/lib/*/*.so*", "/usr/bin/*", "/usr/lib/python3*/*.py",
           "/usr/share/doc/*/*", "/usr/share/common-licenses/*", "/usr/include/*.h",
           sys.prefix + "/lib/python3*/*.py")


def real_file_pages(n: int, rng: random.Random) -> list[bytes]:
    """``n`` distinct non-zero pages cut from real files."""
    files = sorted({f for pat in SOURCES for f in glob.glob(pat) if os.path.isfile(f)})
    rng.shuffle(files)
    pages: list[bytes] = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                data = fh.read(8 << 20)
        except OSError:
            continue
        for off in range(0, len(data) - PAGE + 1, PAGE):
            p = data[off:off + PAGE]
            if p.count(0) < PAGE:
                pages.append(p)
        if len(pages) >= n:
            break
    if not pages:
        raise SystemExit("no readable files found to cut pages from")
    return [pages[i % len(pages)] for i in range(n)]


def make_mix(npages: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    third = npages // 3
    real = real_file_pages(third, rng)
    mix = [bytes(PAGE)] * third + real + [rng.randbytes(PAGE) for _ in range(npages - 2 * third)]
    rng.shuffle(mix)
    return mix


def bench(pages: list[bytes], level: int, batch: int) -> dict[str, float]:
    n = len(pages)
    space = SwapSpace(n * PAGE, level=level)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        space.write(i * PAGE, b"".join(pages[i:i + batch]))
    t1 = time.perf_counter()
    bad = 0
    for i in range(0, n, batch):
        got = space.read(i * PAGE, min(batch, n - i) * PAGE)
        if bytes(got) != b"".join(pages[i:i + batch]):
            bad += 1
    t2 = time.perf_counter()
    # the read check above includes the join; time reads alone too
    t3 = time.perf_counter()
    for i in range(0, n, batch):
        space.read(i * PAGE, min(batch, n - i) * PAGE)
    t4 = time.perf_counter()
    s = space.stats()
    # free it as the kernel does with --discard=pages: one whole cluster at a time
    cluster = CLUSTER_SLOTS * PAGE
    t5 = time.perf_counter()
    for off in range(0, n * PAGE, cluster):
        space.discard(off, min(cluster, n * PAGE - off))
    t6 = time.perf_counter()
    left = space.stats()
    if left["stored_pages"] or left["mem_used_total"]:
        bad += 1
    space.close()
    mb = n * PAGE / 1e6
    overhead = (s["mem_used_total"] - s["compr_data_size"] + s["metadata_bytes"]) / s["stored_pages"]
    return {"level": level, "pages": n, "bad_batches": bad, "write_mb_s": round(mb / (t1 - t0), 1),
            "read_mb_s": round(mb / (t4 - t3), 1), "verify_s": round(t2 - t1, 2),
            "ratio": round(s["orig_data_size"] / max(s["mem_used_total"], 1), 3),
            "compr_ratio": round(s["orig_data_size"] / max(s["compr_data_size"], 1), 3),
            "overhead_bytes_per_page": round(overhead, 2), "same_pages": s["same_pages"],
            "discard_us_per_cluster": round((t6 - t5) / -(-n // CLUSTER_SLOTS) * 1e6, 1),
            "huge_pages": s["huge_pages"], "mem_used_total": s["mem_used_total"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=1024, help="data to write (default 1024)")
    p.add_argument("--levels", default=None, help="compare zstd levels, e.g. 1,3,-1 (last one is reported)")
    p.add_argument("--level", type=int, default=None, help="zstd level (default: engine default)")
    p.add_argument("--batch", type=int, default=128, help="pages per request (default 128 = 512 KiB)")
    p.add_argument("--rounds", type=int, default=1, help="rounds per level, interleaved (default 1)")
    a = p.parse_args()
    from vswapfs.engine import DEFAULT_LEVEL

    levels = [int(x) for x in a.levels.split(",")] if a.levels else [
        a.level if a.level is not None else DEFAULT_LEVEL]
    pages = make_mix(a.mib * (1 << 20) // PAGE)
    print(f"{len(pages)} pages ({a.mib} MiB): 1/3 zero, 1/3 from real files, 1/3 random; "
          f"{a.batch} pages per request, single thread; {a.rounds} interleaved round(s)")
    runs: dict[int, list[dict[str, float]]] = {lv: [] for lv in levels}
    for _ in range(a.rounds):
        for level in levels:
            runs[level].append(bench(pages, level, a.batch))
    result: dict[str, float] = {}
    for level in levels:
        rs = runs[level]
        result = {**rs[-1], **{k: round(statistics.median(r[k] for r in rs), 1)
                               for k in ("write_mb_s", "read_mb_s", "discard_us_per_cluster")},
                  "bad_batches": sum(r["bad_batches"] for r in rs), "rounds": len(rs)}
        print(f"level {level:>3}: write {result['write_mb_s']:7.1f} MB/s  "
              f"read {result['read_mb_s']:7.1f} MB/s  "
              f"ratio {result['ratio']:.2f} (payload {result['compr_ratio']:.2f})  "
              f"overhead {result['overhead_bytes_per_page']:.1f} B/page  "
              f"discard {result['discard_us_per_cluster']:.0f} µs/cluster  bad {result['bad_batches']}")
    print(json.dumps(result))
    if result["bad_batches"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
