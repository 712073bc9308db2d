"""A verifying memory workload: fill anonymous memory, read it back.

Every page's content is a function of its index and a generation number:
a zero page, a compressible text page or a random-looking page, each (but
the zero ones) starting with its index and generation.  So every read can
be checked, and a page that comes back from the wrong slot, an old
generation or corrupted is caught.

Run it under a memory cgroup limit to force it through swap::

    python -m vswapfs.workload --mib 192 [--pattern seq|random] [--rounds N]

prints one JSON line: pages written, verified, bad, and timings.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import struct
import sys
import time

PAGE = 4096
KINDS = ("zero", "text", "random")
_HDR = struct.Struct("<QQ")
_RND = random.Random(0x5EED).randbytes(PAGE * 65)
_TEXT = b"".join(b"line %04d: the quick brown fox jumps over the lazy swap daemon\n" % i
                 for i in range(128))  # 8 KiB: any 4 KiB window fits


def kind_of(index: int, gen: int, mix: tuple[int, int, int] = (1, 1, 1)) -> str:
    """Which kind page ``index`` is at generation ``gen`` (zero:text:random = mix)."""
    k = (index * 2654435761 + gen * 40503) % sum(mix)
    return "zero" if k < mix[0] else "text" if k < mix[0] + mix[1] else "random"


def page(index: int, gen: int, mix: tuple[int, int, int] = (1, 1, 1)) -> bytes:
    """The expected content of page ``index`` at generation ``gen``."""
    kind = kind_of(index, gen, mix)
    if kind == "zero":
        return bytes(PAGE)
    hdr = _HDR.pack(index, gen)
    if kind == "text":
        off = (index * 67) % len(_TEXT)
        return hdr + (_TEXT[off:] + _TEXT)[:PAGE - 16]
    off = (index * 4099 + gen * 31) % (64 * PAGE)
    return hdr + _RND[off + 16:off + PAGE]


def fill(mem: mmap.mmap, order: list[int], gen: int, mix: tuple[int, int, int]) -> None:
    for i in order:
        mem[i * PAGE:(i + 1) * PAGE] = page(i, gen, mix)


def verify(mem: mmap.mmap, order: list[int], gen: int, mix: tuple[int, int, int]) -> list[int]:
    """Indices of pages that do not hold what they should."""
    return [i for i in order if mem[i * PAGE:(i + 1) * PAGE] != page(i, gen, mix)]


def run(mib: int, pattern: str = "seq", rounds: int = 1, mix: tuple[int, int, int] = (1, 1, 1),
        seed: int = 1, hold: bool = False) -> dict[str, object]:
    """Fill and verify ``mib`` MiB ``rounds`` times.  With ``hold``, after the
    first fill print ``filled`` and wait for a line on stdin before
    verifying (so a test can swapoff, kill the daemon... in between)."""
    n = mib * (1 << 20) // PAGE
    mem = mmap.mmap(-1, n * PAGE)
    order = list(range(n))
    rng = random.Random(seed)
    written = verified = 0
    bad: list[int] = []
    t_write = t_verify = 0.0
    for gen in range(1, rounds + 1):
        if pattern == "random":
            rng.shuffle(order)
        t0 = time.perf_counter()
        fill(mem, order, gen, mix)
        t1 = time.perf_counter()
        if hold and gen == 1:
            print("filled", flush=True)
            sys.stdin.readline()
        if pattern == "random":
            rng.shuffle(order)
        bad += verify(mem, order, gen, mix)
        t2 = time.perf_counter()
        written += n
        verified += n
        t_write += t1 - t0
        t_verify += t2 - t1
    t0 = time.perf_counter()
    mem.close()
    return {"pages": n, "written": written, "verified": verified, "bad": len(bad),
            "bad_pages": bad[:20], "write_s": round(t_write, 3), "verify_s": round(t_verify, 3),
            "free_s": round(time.perf_counter() - t0, 3), "pid": os.getpid()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, required=True)
    p.add_argument("--pattern", choices=("seq", "random"), default="seq")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--mix", default="1:1:1", help="zero:text:random weights")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--hold", action="store_true", help="after filling, wait for a line on stdin")
    a = p.parse_args()
    mix = tuple(int(x) for x in a.mix.split(":"))
    if len(mix) != 3 or sum(mix) <= 0 or min(mix) < 0:
        p.error("--mix takes three non-negative weights like 1:1:1")
    print(json.dumps(run(a.mib, a.pattern, a.rounds, mix, a.seed, a.hold)), flush=True)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
