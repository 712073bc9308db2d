"""A verifying memory workload: fill anonymous memory, read it back.

Every page's content is a function of its address (index) and a generation number:
a zero page, a compressible text page or a random-looking page, each (but
the zero ones) starting with its index and generation.  So every read can
be checked, and a page that comes back from the wrong slot, an old
generation or corrupted is caught.

Run it under a memory cgroup limit to force it through swap::

    python -m vswapfs.workload --mib 192 [--pattern seq|random|cow|mix] [--rounds N]
                               [--duration S] [--report]

prints one JSON line: pages written, verified, bad, and timings; exits 1 if
any page was bad.
"""

from __future__ import annotations

import argparse
import glob
import json
import mmap
import os
import random
import struct
import sys
import time

from . import linux
from ._consts import PAGE

KINDS = ("zero", "text", "random")
_HDR = struct.Struct("<QQ")
_RND = random.Random(0x5EED).randbytes(PAGE * 65)
_TEXT = b"".join(b"line %04d: the quick brown fox jumps over the lazy swap daemon\n" % i
                 for i in range(128))  # 8 KiB: any 4 KiB window fits


_FILL = False  # memhog-like: every page one repeated 8-byte value (see use_fill)
_KIND_RUN = 1  # pages of one kind in a row (see use_kind_run)


def use_file_corpus(mib: int = 8) -> None:
    """Cut text pages from real files on this machine (shared libraries,
    executables, Python sources) instead of the synthetic text."""
    global _TEXT
    pats = ("/usr/lib/x86_64-linux-gnu/*.so*", "/usr/lib/*/*.so*", "/usr/bin/*",
            sys.prefix + "/lib/python3*/*.py", "/usr/share/doc/*/*")
    data = bytearray()
    for f in sorted({f for pat in pats for f in glob.glob(pat) if os.path.isfile(f)}):
        try:
            with open(f, "rb") as fh:
                data += fh.read(1 << 20)
        except OSError:
            continue
        if len(data) >= mib << 20:
            break
    if len(data) >= 2 * PAGE:
        _TEXT = bytes(data)


def use_fill() -> None:
    """memhog-like pages: each a single 8-byte value repeated (its index and generation)."""
    global _FILL
    _FILL = True


def use_kind_run(pages: int) -> None:
    """Pages of one kind come in runs of ``pages`` (default 1: the kind
    changes from page to page).  The kernel writes no zero page to swap, so
    with runs of 1 and the 1:1:1 mix every third page is a gap, and a swap
    write carries about 2 pages; longer runs let it merge more."""
    global _KIND_RUN
    if pages < 1:
        raise ValueError(f"a kind run is at least 1 page, not {pages}")
    _KIND_RUN = pages


def kind_of(index: int, gen: int, mix: tuple[int, int, int] = (1, 1, 1)) -> str:
    """Which kind page ``index`` is at generation ``gen`` (zero:text:random = mix)."""
    k = (index // _KIND_RUN * 2654435761 + gen * 40503) % sum(mix)
    return "zero" if k < mix[0] else "text" if k < mix[0] + mix[1] else "random"


def page(index: int, gen: int, mix: tuple[int, int, int] = (1, 1, 1)) -> bytes:
    """The expected content of page ``index`` at generation ``gen``."""
    if _FILL:
        return _HDR.pack(index * 1000003 + gen, index * 1000003 + gen)[:8] * (PAGE // 8)
    kind = kind_of(index, gen, mix)
    if kind == "zero":
        return bytes(PAGE)
    hdr = _HDR.pack(index, gen)
    if kind == "text":
        off = (index * 4099 + gen * 67) % (len(_TEXT) - PAGE)
        return hdr + _TEXT[off:off + PAGE - 16]
    off = (index * 4099 + gen * 31) % (64 * PAGE)
    return hdr + _RND[off + 16:off + PAGE]


def fill(mem: mmap.mmap, order: list[int], gen: int, mix: tuple[int, int, int]) -> None:
    for i in order:
        mem[i * PAGE:(i + 1) * PAGE] = page(i, gen, mix)


def verify(mem: mmap.mmap, order: list[int], gen: int, mix: tuple[int, int, int]) -> list[int]:
    """Indices of pages that do not hold what they should."""
    return [i for i in order if mem[i * PAGE:(i + 1) * PAGE] != page(i, gen, mix)]


def _cow_round(mem: mmap.mmap, order: list[int], gen: int, mix: tuple[int, int, int]) -> tuple[int, int]:
    """Fork; the child checks generation ``gen - 1`` while the parent
    overwrites every page with ``gen``: copy-on-write must keep them apart.
    Returns (pages verified, bad pages) over both processes."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: sees the memory as it was at fork
        os.close(r)
        bad = len(verify(mem, order, gen - 1, mix))
        os.write(w, json.dumps([len(order), bad]).encode())
        os._exit(0)
    os.close(w)
    fill(mem, order, gen, mix)
    with os.fdopen(r) as f:
        child = json.loads(f.read() or "[0, 1]")
    _, status = os.waitpid(pid, 0)
    if status:
        child[1] += 1
    return child[0], child[1]


PATTERNS = ("seq", "random", "cow")


def swapped_out(mem: mmap.mmap, n: int) -> list[int]:
    """Indices of pages of ``mem`` that are swapped out now (pagemap bit 62)."""
    return [i for i, w in enumerate(linux.pagemap(linux.buffer_address(mem), n)) if (w >> 62) & 1]


def swapin_latency(mem: mmap.mmap, n: int, samples: int, rng: random.Random) -> dict[str, float]:
    """Touch ``samples`` random swapped-out pages one at a time; microseconds."""
    cands = swapped_out(mem, n)
    pick = rng.sample(cands, min(samples, len(cands)))
    lat = []
    for i in pick:
        t0 = time.perf_counter_ns()
        mem[i * PAGE]  # the fault: one swap-in
        lat.append((time.perf_counter_ns() - t0) / 1000)
    lat.sort()
    if not lat:
        return {"samples": 0}
    return {"samples": len(lat), "p50_us": round(lat[len(lat) // 2], 1),
            "p99_us": round(lat[min(len(lat) - 1, len(lat) * 99 // 100)], 1),
            "mean_us": round(sum(lat) / len(lat), 1), "swapped_out_pages": len(cands)}


def run(mib: int, pattern: str = "seq", rounds: int = 1, mix: tuple[int, int, int] = (1, 1, 1),
        seed: int = 1, hold: bool = False, duration: float = 0.0,
        report: bool = False, latency: int = 0) -> dict[str, object]:
    """Fill and verify ``mib`` MiB for ``rounds`` rounds (or ``duration``
    seconds).  ``pattern`` is seq, random, cow (fork and overwrite while the
    child checks the old generation) or mix (the three in turn).  With
    ``hold``, after the first fill print ``filled`` and wait for a line on
    stdin before verifying (so a test can swapoff, kill the daemon...).
    With ``report``, print a JSON line after every round.  With ``latency``,
    after the first fill time that many swap-ins of random swapped-out pages."""
    n = mib * (1 << 20) // PAGE
    # private anonymous memory, as a process heap: shared would be shmem, and fork would not copy
    mem = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    order = list(range(n))
    rng = random.Random(seed)
    written = verified = bad = 0
    bad_pages: list[int] = []
    t_write = t_verify = 0.0
    cpu_write = cpu_verify = 0.0  # the machine's CPU-seconds in each phase (linux.cpu_busy_s)
    start = time.perf_counter()
    gen = 0
    while gen < rounds or (duration and time.perf_counter() - start < duration):
        gen += 1
        pat = PATTERNS[(gen - 1) % 3] if pattern == "mix" else pattern
        if pat == "cow" and gen == 1:
            pat = "seq"  # there is nothing to copy yet
        if pat == "random":
            rng.shuffle(order)
        t0, c0 = time.perf_counter(), linux.cpu_busy_s()
        if pat == "cow":
            v, b = _cow_round(mem, order, gen, mix)
            verified += v
            bad += b
        else:
            fill(mem, order, gen, mix)
        t1, c1 = time.perf_counter(), linux.cpu_busy_s()
        if hold and gen == 1:
            print("filled", flush=True)
            sys.stdin.readline()
        if latency and gen == 1:
            lat = swapin_latency(mem, n, latency, rng)
        if pat == "random":
            rng.shuffle(order)
        c1b = linux.cpu_busy_s()  # the verify's CPU from here (not the latency sampling's)
        wrong = verify(mem, order, gen, mix)
        t2, c2 = time.perf_counter(), linux.cpu_busy_s()
        bad += len(wrong)
        bad_pages += wrong[:20 - len(bad_pages)]
        written += n
        verified += n
        t_write += t1 - t0
        t_verify += t2 - t1
        cpu_write += c1 - c0
        cpu_verify += c2 - c1b
        if report:
            print(json.dumps({"round": gen, "pattern": pat, "written": written, "verified": verified,
                              "bad": bad}), flush=True)
    t0 = time.perf_counter()
    mem.close()
    extra = {"latency": lat} if latency else {}
    return {**extra, "pages": n, "rounds": gen, "written": written, "verified": verified, "bad": bad,
            "bad_pages": bad_pages, "write_s": round(t_write, 3), "verify_s": round(t_verify, 3),
            "write_cpu_s": round(cpu_write, 2), "verify_cpu_s": round(cpu_verify, 2),
            "free_s": round(time.perf_counter() - t0, 3), "pid": os.getpid()}


def parse_mix(text: str) -> tuple[int, int, int]:
    """``zero:text:random`` page weights, three non-negative integers, not all 0;
    ValueError with one clear line otherwise."""
    bad = ValueError(f"weights must be three non-negative integers, not all 0, like 1:1:1; not {text!r}")
    try:
        zero, text_w, rand = (int(x) for x in text.split(":"))
    except ValueError:
        raise bad from None
    if min(zero, text_w, rand) < 0 or zero + text_w + rand == 0:
        raise bad
    return zero, text_w, rand


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, required=True)
    p.add_argument("--pattern", choices=(*PATTERNS, "mix"), default="seq")
    p.add_argument("--duration", type=float, default=0, help="go on for this many seconds")
    p.add_argument("--report", action="store_true", help="a JSON line after every round")
    p.add_argument("--files", action="store_true", help="text pages cut from real files")
    p.add_argument("--fill", action="store_true", help="memhog-like: one repeated value per page")
    p.add_argument("--latency", type=int, default=0, metavar="N",
                   help="after the first fill, time N swap-ins of random swapped-out pages")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--mix", default="1:1:1", help="zero:text:random weights")
    p.add_argument("--kind-run", type=int, default=1, metavar="PAGES",
                   help="pages of one kind in a row (default 1: the kind changes every page)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--hold", action="store_true", help="after filling, wait for a line on stdin")
    a = p.parse_args()
    try:
        mix = parse_mix(a.mix)
    except ValueError as e:
        p.error(f"--mix: {e}")
    if a.kind_run < 1:
        p.error(f"--kind-run takes a number of pages of at least 1, not {a.kind_run}")
    use_kind_run(a.kind_run)
    if a.files:
        use_file_corpus()
    if a.fill:
        use_fill()
    result = run(a.mib, a.pattern, a.rounds, mix, a.seed, a.hold, a.duration, a.report,
                 a.latency)
    print(json.dumps(result), flush=True)
    sys.exit(1 if result["bad"] else 0)


if __name__ == "__main__":
    main()
