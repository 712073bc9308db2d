"""What a swap write costs the engine, part by part, in one process (no FUSE).

``vswapfs_lab.engine_bound`` showed the engine takes 9-12% of a sustained
write on one host's usemem, on top of the compression.  A daemon cannot say
which part of the engine that is: its profile is spread over the
interpreter's allocations and lookups.  This runs the engine's parts alone,
on what the daemon is sent in that workload, and prints what each costs a
page written:

- the pages: the bench's usemem with text cut from real files
  (``vswapfs.workload``), minus its zero pages, which the kernel keeps in
  its own map and never writes; a run of adjacent pages that are not zero
  is one write (capped at ``--max-pages``), so a write carries about two
  pages, as swap's do there (1.97 in the bench's runs).  ``--pages
  text-random``: the second workload's pages (synthetic text and random,
  no zero page), whose writes the kernel merges (42 pages a WRITE in the
  bench's latency workload), here up to ``--max-pages``;
- ``encode``: ``Codec.encode_pages`` of each write (lz4 in C, same-filled
  pages found), what ``SwapSpace.write`` does outside the engine's lock;
- ``commit``: ``Placement.commit`` of the encoded pages, what it does under
  the lock: the store policy, ``pool.store`` of each page that is not
  same-filled, ``table.set_run`` of the words;
- ``pool.store`` and ``table.set_run``: those two steps apart, on a space of
  their own, and ``copy``: the bytes the stores kept copied again to the
  same places of a cold arena, the part of a store that any backend which
  keeps the page pays (the C floor mallocs and copies every page).  These
  three are called from interpreted code, which adds a little to each: they
  split the commit's time, and sum to more than it;
- ``write``: ``SwapSpace.write`` whole; ``rest`` is ``write - encode -
  commit`` (a view per page, the lock, the choice of level).

The pool has a reserve of twice the data (and a chunk for each size
class), faulted in before the clock starts, as the daemon's spares are
faulted in by its housekeeping; under half of it, pages are stored with
lz4 as the daemon's first store does.  Every round reads every page back
from each space that stored it and compares it with what was written, and
checks each space's consistency; the spaces go through the writes in
lockstep (see ``one_round``).  Medians are printed, in µs a page written.

    python3 -m vswapfs_lab.engine_parts [--mib 256] [--rounds 5] [--max-pages 32]
                                        [--pages files|text-random]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

from vswapfs import workload
from vswapfs._consts import PAGE
from vswapfs.engine import SwapSpace
from vswapfs.engine import _entry as E
from vswapfs.engine._pool import CHUNK_BYTES, N_CLASSES

PARTS = ("write", "encode", "commit", "pool.store", "copy", "table.set_run")


@dataclass
class Writes:
    """The writes the daemon is sent: (first slot, the pages' bytes)."""

    runs: list[tuple[int, bytes]]
    pages: int  # pages written (zero pages left out)
    slots: int  # the space they fall in


PAGE_KINDS = {"files": (True, (1, 1, 1)), "text-random": (False, (0, 1, 1))}  # --pages: corpus, mix


def usemem_writes(mib: int, max_pages: int, pages: str = "files") -> Writes:
    """The non-zero pages of a usemem fill of ``mib`` MiB, in runs of
    adjacent pages of at most ``max_pages``: ``files``, the bench's usemem
    (zero pages, text cut from real files, random ones); ``text-random``,
    the latency workload's and engine_bound's second (synthetic text and
    random, no zero page, so runs are as long as ``max_pages`` allows)."""
    files, mix = PAGE_KINDS[pages]
    text = workload._TEXT
    if files:
        workload.use_file_corpus()
    try:
        slots = mib * (1 << 20) // PAGE
        zero = bytes(PAGE)
        runs: list[tuple[int, bytes]] = []
        run: list[bytes] = []  # the pages of slots i - len(run) .. i - 1
        for i in range(slots):
            page = workload.page(i, 1, mix)
            if run and (page == zero or len(run) == max_pages):
                runs.append((i - len(run), b"".join(run)))
                run = []
            if page != zero:  # a zero page the kernel keeps in its own map: never written
                run.append(page)
        if run:
            runs.append((slots - len(run), b"".join(run)))
    finally:
        workload._TEXT = text  # the corpus is this tool's: workload.page is as it was for others
    return Writes(runs, sum(len(d) for _, d in runs) // PAGE, slots)


def _space(w: Writes) -> SwapSpace:
    """A space whose pool stays under half its reserve (so stores are lz4,
    the daemon's first store) even with a chunk begun in every size class."""
    return SwapSpace(w.slots * PAGE, reserve=2 * (w.pages * PAGE + N_CLASSES * CHUNK_BYTES))


def one_round(w: Writes) -> tuple[dict[str, float], int]:
    """Seconds of each part for every write, and the pages that did not
    read back (from any of the three spaces that stored them).

    Three spaces go through the writes in lockstep, so that a swing of the
    CPU's speed hits every part alike: one takes each write whole
    (``SwapSpace.write``), one its encode and commit, one the commit's two
    main steps apart (what ``_store_short`` and ``set_run`` do: the pool
    objects and their words, then the words set), after which the bytes
    those objects hold are copied again to the same places of a fourth
    space's arena, faulted in and never written: what the copy into the
    pool costs of the store.  Each of the three starts a third of the
    writes further on and wraps around: lz4 compresses a page it has just
    compressed much faster (its branches are predicted: 4.2 against 7.4 µs
    a page of usemem's when the spaces took the same write in turn), so
    no space may take the write another just took.  Each part is timed in
    place, write by write, and finds the caches as a write leaves it.
    Raises AssertionError if a space is not consistent afterwards."""
    out = dict.fromkeys(PARTS, 0.0)
    clock = time.perf_counter
    whole, parts, split, cold = _space(w), _space(w), _space(w), _space(w)
    arena = cold._pool._map  # faulted in (the reserve), never written: as cold as a new chunk
    try:
        encode, commit = parts._codec.encode_pages, parts._place.commit
        store, set_run, fresh = split._pool.store, split._table.set_run, split._codec.two_step
        n = len(w.runs)
        for k, (first, data) in enumerate(w.runs):
            t0 = clock()
            whole.write(first * PAGE, data)
            t1 = clock()
            first, data = w.runs[(k + n // 3) % n]
            view = memoryview(data)
            enc = encode(view, None)
            t2 = clock()
            if enc is None:
                raise RuntimeError("encode_pages did not take the pages (no C lz4 in this build?)")
            pages: list[bytes | memoryview] = [view[i:i + PAGE] for i in range(0, len(data), PAGE)]
            t3 = clock()
            commit(first, pages, enc)
            t4 = clock()
            first, data = w.runs[(k + 2 * n // 3) % n]
            view = memoryview(data)
            enc = encode(view, None)
            assert enc is not None
            t5 = clock()
            words = [word or E.pool_word(store(kept := view[i * PAGE:(i + 1) * PAGE] if blob is None
                                               else blob), len(kept))
                     for i, (word, blob) in enumerate(enc)]
            t6 = clock()
            set_run(first, words, fresh)
            t7 = clock()
            offset = split._pool.offset
            moved = [(offset(E.pool_object(word), E.pool_length(word)), i, blob)
                     for i, (word, (_, blob)) in enumerate(zip(words, enc, strict=True))
                     if E.tag(word) == E.POOL]
            t8 = clock()
            for off, i, blob in moved:  # the same bytes to the same places of a cold arena
                kept = view[i * PAGE:(i + 1) * PAGE] if blob is None else blob
                arena[off:off + len(kept)] = kept
            t9 = clock()
            out["write"] += t1 - t0
            out["encode"] += t2 - t1
            out["commit"] += t4 - t3
            out["pool.store"] += t6 - t5
            out["table.set_run"] += t7 - t6
            out["copy"] += t9 - t8
        bad = 0
        for sp in (whole, parts, split):
            for first, data in w.runs:
                got = bytes(sp.read(first * PAGE, len(data)))
                if got != data:
                    bad += sum(got[i:i + PAGE] != data[i:i + PAGE] for i in range(0, len(data), PAGE))
        for name, sp in (("write", whole), ("commit", parts), ("stores", split), ("copy", cold)):
            problems = sp.check()
            if problems:
                raise AssertionError(f"the engine is inconsistent after the {name} run: {problems[:3]}")
    finally:
        for sp in (whole, parts, split, cold):
            sp.close()
    return out, bad


def measure(w: Writes, rounds: int) -> tuple[dict[str, float], int]:
    """Medians over ``rounds`` rounds, in µs a page written (``rest``:
    write - encode - commit, per round), and the pages that did not read
    back in any round."""
    got: dict[str, list[float]] = {p: [] for p in (*PARTS, "rest")}
    bad = 0
    for _ in range(rounds):
        secs, b = one_round(w)
        bad += b
        secs["rest"] = secs["write"] - secs["encode"] - secs["commit"]
        for part, s in secs.items():
            got[part].append(s)
    return {p: statistics.median(v) / w.pages * 1e6 for p, v in got.items()}, bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m vswapfs_lab.engine_parts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=256, help="MiB of usemem filled (default 256)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-pages", type=int, default=32, help="pages a write carries at most (default 32)")
    p.add_argument("--pages", choices=tuple(PAGE_KINDS), default="files",
                   help="files: the bench's usemem (zero, file text and random pages: about 2 pages "
                        "a write); text-random: text and random pages, no zero ones (long writes)")
    a = p.parse_args(argv)
    for flag, value in (("--mib", a.mib), ("--rounds", a.rounds), ("--max-pages", a.max_pages)):
        if value < 1:
            p.error(f"{flag} must be at least 1, not {value}")
    w = usemem_writes(a.mib, a.max_pages, a.pages)
    us, bad = measure(w, a.rounds)
    print(f"{w.pages} pages in {len(w.runs)} writes ({w.pages / len(w.runs):.2f} pages a write) "
          f"of {a.mib} MiB of usemem ({a.pages}); medians of {a.rounds} rounds (the parts in lockstep), "
          "µs a page written:\n")
    print("| part | µs a page | share of the write |\n| --- | --- | --- |")
    for part, v in (("write", us["write"]), ("encode", us["encode"]), ("commit", us["commit"]),
                    ("  of which pool.store", us["pool.store"]),
                    ("    of which the copy into the pool", us["copy"]),
                    ("  of which table.set_run", us["table.set_run"]), ("rest", us["rest"])):
        print(f"| {part} | {v:.2f} | {v / us['write']:.0%} |")
    print(f"\npages that did not read back: {bad}")
    print(json.dumps({"mib": a.mib, "rounds": a.rounds, "kind": a.pages, "pages": w.pages,
                      "writes": len(w.runs), "us_per_page": {k: round(v, 3) for k, v in us.items()},
                      "bad": bad}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
