"""Crash the engine at every step of random operations, take it over in a
new process, and compare with a model.

A real crash, not a simulated one: for each operation the test forks a
child that runs it and exits with ``os._exit`` (what ``kill -9`` leaves) at
the n-th point where state that outlives the process changes
(``_inject.crash_after``), for n = 1, 2, ... until the operation ends
before the n-th point.  Another child then takes the space over from the
same memfds and backing file (``SwapSpace(..., fds=...)``), as a new
daemon would, and checks:

- every page reads back as the model says: a page the operation did not
  touch as before it; a page it was writing either as before or as it was
  being written (the kernel resends a write it got no answer to);
- the engine's consistency check finds nothing, and no word lost its data;
- freeing everything leaves nothing behind: no cluster, no pool chunk, no
  backing block (so a crash leaks nothing for good).

Between runs the state is put back from a snapshot, and the parent runs
the operation itself to go on.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable

import pytest

from vswapfs.engine import PAGE, NoSpaceError, SwapSpace, kept_size
from vswapfs.engine._inject import CRASH_EXIT, crash_after

SIZE = 3 * 512 * PAGE  # three clusters
POOL_CAPACITY = 8 << 20  # a small arena: snapshots stay cheap
SETTINGS = {"pool_limit": 192 * 1024, "accept_threshold": 75, "pool_capacity": POOL_CAPACITY}


def page_of(rng: random.Random, kind: str) -> bytes:
    if kind == "zero":
        return bytes(PAGE)
    if kind == "same":
        return rng.getrandbits(64).to_bytes(8, "little") * (PAGE // 8)
    if kind == "text":
        return (b"page %d of the recovery model; " % rng.getrandbits(20) * 200)[:PAGE]
    if kind == "words":  # what recompression makes denser
        return b" ".join(b"w%d" % rng.randrange(300) for _ in range(1200))[:PAGE]
    return rng.randbytes(PAGE)


def _plain(fd: int) -> int:
    """The same file opened again without O_DIRECT (a backing file has it)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDWR)


def snapshot(fds: dict[str, int]) -> dict[str, bytes]:
    out = {}
    for name, fd in fds.items():
        if not (name.startswith("backing.") and name.endswith(".dir")):  # a directory fd
            plain = _plain(fd)
            out[name] = os.pread(plain, os.fstat(plain).st_size, 0)
            os.close(plain)
    return out


def restore(fds: dict[str, int], snap: dict[str, bytes]) -> None:
    for name, data in snap.items():
        fd = _plain(fds[name])
        os.ftruncate(fd, 0)  # drops every page, so holes stay holes where data is zero
        os.ftruncate(fd, len(data))
        view = memoryview(data)
        for off in range(0, len(data), PAGE):
            chunk = view[off:off + PAGE]
            if any(chunk):
                os.pwrite(fd, chunk, off)
        os.close(fd)


def run_child(fn: Callable[[], int]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def verify_takeover(fds: dict[str, int], model: bytearray, before: bytearray,
                    touched: range) -> int:
    """In a child: take the space over, check it against the model, free
    everything; exit status 0 if all held, else what failed (printed)."""
    space = SwapSpace(SIZE, **SETTINGS, fds=fds)  # type: ignore[arg-type]
    problems = space.check()
    stats = space.stats()
    if stats["recovery_lost_pages"]:
        problems.append(f"{stats['recovery_lost_pages']} words lost their data")
    got = space.read(0, SIZE)
    for slot in range(SIZE // PAGE):
        lo, hi = slot * PAGE, (slot + 1) * PAGE
        page = bytes(got[lo:hi])
        if page == model[lo:hi] or (slot in touched and page == before[lo:hi]):
            continue
        problems.append(f"slot {slot} reads wrong after the takeover")
    space.discard(0, SIZE)
    space.trim()
    s = space.stats()
    left = {k: s[k] for k in ("stored_pages", "clusters", "pool_chunks", "mem_used_total")
            if s[k]}
    if left or any(bf.allocated_bytes() for bf in space.backing_files()):
        problems.append(f"left after freeing everything: {left}, backing "
                        f"{[bf.allocated_bytes() for bf in space.backing_files()]}")
    for p in problems[:10]:
        print("takeover:", p)
    return 1 if problems else 0


@pytest.mark.parametrize("seed", [1])
def test_crash_at_every_step_recovers_every_page(seed: int) -> None:
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="vswapfs-recovery-")
    space = SwapSpace(SIZE, **SETTINGS, backing=[os.path.join(tmp, "b0")])  # type: ignore[arg-type]
    model = bytearray(SIZE)
    crashes = 0
    try:
        for _ in range(24):
            op = rng.choice(["write", "write", "write", "discard", "writeback", "compact",
                             "rewrite", "recompress"])
            if op in ("write", "rewrite"):
                # a few hot spots, so that writes replace pages and free what they held
                first = rng.choice([0, 512, 1024]) + rng.randrange(24)
                n = rng.randint(1, 8)
                kinds = ["zero", "same", "text", "words", "words", "random"]
                data = b"".join(page_of(rng, rng.choice(kinds)) for _ in range(n))
                touched = range(first, first + n)
                new = bytearray(model)
                new[first * PAGE:(first + n) * PAGE] = data

                def do(first: int = first, data: bytes = data) -> None:
                    space.write(first * PAGE, data)
            elif op == "discard":
                first = rng.randrange(SIZE // PAGE)
                n = rng.choice([1, 7, 512 - first % 512])  # a cluster's rest: the kernel's discard
                n = min(n, SIZE // PAGE - first)
                touched = range(first, first + n)
                new = bytearray(model)
                new[first * PAGE:(first + n) * PAGE] = bytes(n * PAGE)

                def do(first: int = first, n: int = n) -> None:
                    space.discard(first * PAGE, n * PAGE)
            else:
                touched = range(0)
                new = model

                def do(op: str = op) -> None:
                    if op == "writeback":
                        space.writeback(rng.randint(1, 40))
                    elif op == "recompress":
                        space.recompress()
                    else:
                        space.compact()

            fds = space.fds()
            snap = snapshot(fds)
            step = 1
            while True:
                def crash_run(step: int = step, do: Callable[[], None] = do) -> int:
                    crash_after(step)
                    try:
                        do()
                    except NoSpaceError:
                        pass
                    return 0

                code = run_child(crash_run)
                if code == 0:  # the operation ended before that many points
                    break
                assert code == CRASH_EXIT, f"{op} died with {code} at step {step}"
                crashes += 1
                ok = run_child(functools.partial(verify_takeover, fds, new, model, touched))
                assert ok == 0, f"takeover after a crash at step {step} of {op} failed"
                restore(fds, snap)
                step += 1
            restore(fds, snap)
            try:
                do()
            except NoSpaceError:
                new = model
            model = new
            assert space.check() == []
        print(f"{crashes} crashes taken over")
        assert crashes > 100, f"only {crashes} crashes: the points do not cover the operations"
    finally:
        space.close()
        shutil.rmtree(tmp)


def test_a_takeover_serves_the_size_the_space_was_made_with() -> None:
    """The size travels with the fds: a new daemon whose default size came
    out otherwise (RAM or disk room changed) must not serve another image
    over the same table."""
    space = SwapSpace(SIZE, **SETTINGS)  # type: ignore[arg-type]
    try:
        page = os.urandom(PAGE)
        space.write(SIZE - PAGE, page)
        fds = space.fds()
        assert kept_size(fds) == SIZE and kept_size({}) is None
        with pytest.raises(ValueError, match=f"made with {SIZE} bytes, not {SIZE + 512 * PAGE}"):
            SwapSpace(SIZE + 512 * PAGE, **SETTINGS, fds=fds)  # type: ignore[arg-type]

        def take_over() -> int:
            new = SwapSpace(SIZE, **SETTINGS, fds=fds)  # type: ignore[arg-type]
            ok = new.size == SIZE and bytes(new.read(SIZE - PAGE, PAGE)) == page and not new.check()
            return 0 if ok and kept_size(new.fds()) == SIZE else 1

        assert run_child(take_over) == 0
    finally:
        space.close()
