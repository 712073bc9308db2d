"""Random operations on a SwapSpace against a plain bytearray model.

Small limits (a 256 KiB pool, files that come and go) push every path:
same-filled, compressed and raw pages, automatic and on-demand writeback,
evacuation to another file or into the pool, compaction, recompression
and refusal at the limit.  Faults are injected at every allocation and I/O point the engine
has (``_inject``), with every errno it can meet: an operation that fails
must leave the space as it was, and any difference from the model is a
bug.  After every step the engine's own consistency check
(``SwapSpace.check``) must find nothing.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vswapfs.engine import CODECS, PAGE, NoSpaceError, SwapSpace
from vswapfs.engine import entry as E
from vswapfs.engine._inject import POINTS, armed

SIZE = 3 * 512 * PAGE + 5 * PAGE  # three clusters and a bit


def page_of(kind: str, seed: int) -> bytes:
    if kind == "zero":
        return bytes(PAGE)
    if kind == "same":
        return (seed * 0x9E3779B97F4A7C15 % (1 << 64)).to_bytes(8, "little") * (PAGE // 8)
    if kind == "text":
        return (b"page %d of the model; " % seed * 300)[:PAGE]
    if kind == "words":  # denser at the level than at the first level: recompression moves it
        rng = random.Random(seed)
        return b" ".join(b"w%d" % rng.randrange(300) for _ in range(1200))[:PAGE]
    return os.urandom(PAGE)


kinds = st.sampled_from(["zero", "same", "text", "words", "random"])


class SpaceModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="vswapfs-model-")
        self.model = bytearray(SIZE)
        self.n_files = 0

    @initialize(limit=st.sampled_from([0, 256 * 1024]), backed=st.booleans(), codec=st.sampled_from(CODECS))
    def start(self, limit: int, backed: bool, codec: str) -> None:
        self.space = SwapSpace(SIZE, pool_limit=limit, accept_threshold=75, codec=codec)
        if backed:
            self.add_backing()

    def teardown(self) -> None:
        armed.clear()
        try:
            self.space.discard(0, SIZE)
            self.space.trim()  # what the daemon does when idle: retries failed punches
            st_ = self.space.stats()
            assert st_["stored_pages"] == 0 and st_["clusters"] == 0
            assert st_["mem_used_total"] == 0 and st_["pool_chunks"] == 0
            assert all(bf.allocated_bytes() == 0 and bf.size() == 0
                       for bf in self.space.backing_files())
        finally:
            self.space.close()
            shutil.rmtree(self.dir)

    def try_write(self, offset: int, data: bytes) -> None:
        try:
            self.space.write(offset, data)
        except OSError:  # NoSpaceError, or an injected fault: nothing may have changed
            self.check_read(offset, len(data))
            return
        self.model[offset:offset + len(data)] = data

    def check_read(self, offset: int, n: int) -> None:
        """Read through the engine and compare, unless an injected read
        fault makes the read fail (then nothing is compared)."""
        try:
            got = self.space.read(offset, n)
        except OSError:
            assert armed, "a read failed with no fault injected"
            return
        assert got == self.model[offset:offset + n]

    @rule(slot=st.integers(0, SIZE // PAGE - 4), n=st.integers(1, 4), kind=kinds, seed=st.integers(0, 50))
    def write_pages(self, slot: int, n: int, kind: str, seed: int) -> None:
        self.try_write(slot * PAGE, b"".join(page_of(kind, seed + i) for i in range(n)))

    @rule(offset=st.integers(0, SIZE - 1), n=st.integers(1, 3 * PAGE), kind=kinds, seed=st.integers(0, 50))
    def write_unaligned(self, offset: int, n: int, kind: str, seed: int) -> None:
        n = min(n, SIZE - offset)
        self.try_write(offset, (page_of(kind, seed) * 3)[:n])

    @rule(offset=st.integers(0, SIZE - 1), n=st.integers(0, 5 * PAGE))
    def read(self, offset: int, n: int) -> None:
        n = min(n, SIZE - offset)
        self.check_read(offset, n)

    @rule(offset=st.integers(0, SIZE - 1), n=st.integers(1, 600 * PAGE))
    def discard(self, offset: int, n: int) -> None:
        n = min(n, SIZE - offset)
        try:
            self.space.discard(offset, n)
        except OSError:
            # the whole pages are freed first; a partial edge that could not be
            # stored again keeps its bytes (and the other edge may or may not be done)
            lo, hi = -(-offset // PAGE) * PAGE, (offset + n) // PAGE * PAGE
            if lo < hi:
                self.model[lo:hi] = bytes(hi - lo)
            for a, b in ((offset, min(lo, offset + n)), (max(hi, offset), offset + n)):
                if a < b and self.space_reads(a, b - a) == bytes(b - a):
                    self.model[a:b] = bytes(b - a)
            return
        self.model[offset:offset + n] = bytes(n)

    def space_reads(self, offset: int, n: int) -> bytes | None:
        saved = dict(armed)
        armed.clear()
        try:
            return bytes(self.space.read(offset, n))
        finally:
            armed.update(saved)

    @rule(point=st.sampled_from(POINTS), err=st.sampled_from([errno.ENOMEM, errno.EIO, errno.ENOSPC]))
    def inject(self, point: str, err: int) -> None:
        armed[point] = err

    @rule()
    def heal(self) -> None:
        armed.clear()

    @rule(cluster=st.integers(0, 2))
    def discard_cluster(self, cluster: int) -> None:
        """What the kernel sends: one whole, aligned 512-slot cluster."""
        self.discard(cluster * 512 * PAGE, 512 * PAGE)

    @precondition(lambda self: self.space.backing_files())
    @rule(n=st.one_of(st.none(), st.integers(1, 300)))
    def writeback(self, n: int | None) -> None:
        try:
            self.space.writeback(n)
        except OSError:
            assert armed or not self.space.backing_files()

    @precondition(lambda self: len(self.space.backing_files()) < 3)
    @rule()
    def add_backing(self) -> None:
        self.n_files += 1
        try:
            self.space.add_backing(os.path.join(self.dir, f"b{self.n_files}"))
        except OSError:
            assert armed

    @precondition(lambda self: self.space.backing_files())
    @rule(which=st.integers(0, 2))
    def evacuate(self, which: int) -> None:
        files = self.space.backing_files()
        path = files[which % len(files)].path
        try:
            self.space.remove_backing(path)
            assert not os.path.exists(path)
        except NoSpaceError:
            pass  # the pool is full and there is no other file: pages stay
        except OSError:
            assert armed  # an injected read or write fault: pages stay

    @rule(yielding=st.booleans())
    def compact(self, yielding: bool) -> None:
        self.space.compact(yielding=yielding)

    @rule()
    def recompress(self) -> None:
        self.space.recompress()

    @rule(enabled=st.booleans())
    def toggle_writeback(self, enabled: bool) -> None:
        self.space.configure(writeback_enabled=enabled)

    @rule(first=st.sampled_from(["lz4", "zstd"]))
    def switch_first_store(self, first: str) -> None:
        """lz4 and zstd objects side by side: each reads back, either recompresses."""
        if self.space.codec == "zstd":
            self.space.configure(first_algorithm=first)

    @invariant()
    def consistent(self) -> None:
        assert self.space.check() == []

    @invariant()
    def counters_agree(self) -> None:
        s = self.space.stats()
        assert s["stored_pages"] == s["same_pages"] + s["pool_pages"] + s["phys_pages"]
        assert s["orig_data_size"] == s["stored_pages"] * PAGE
        assert s["compr_data_size"] <= s["mem_used_total"] <= s["mem_used_max"]
        assert s["phys_pages"] == sum(bf.live for bf in self.space.backing_files())
        # the gauges are kept incrementally: recount them from the tables
        words = [w for cl in self.space._table.clusters.values() for w in cl.table if w]
        tags = [w & E.TAG_MASK for w in words]
        assert s["same_pages"] == tags.count(E.SAME) and s["pool_pages"] == tags.count(E.POOL)
        raw = [t == E.POOL and E.pool_length(w) == PAGE for t, w in zip(tags, words, strict=True)]
        assert s["huge_pages"] == sum(raw)
        assert s["clusters"] == sum(1 for cl in self.space._table.clusters.values() if cl.used)


SpaceModel.TestCase.settings = settings(max_examples=120, stateful_step_count=50, deadline=None)
test_space_matches_bytearray_model = SpaceModel.TestCase


# -- many threads at once ---------------------------------------------------------

def _owner(space: SwapSpace, first: int, slots: int, seed: int, steps: int, errors: list[str]) -> None:
    """Write, read back and discard in slots ``first .. first+slots-1``,
    which no other thread writes: its model of them is exact."""
    rng = random.Random(seed)
    model = bytearray(slots * PAGE)
    try:
        for _ in range(steps):
            slot = rng.randrange(slots - 4)
            n = rng.randint(1, 4)
            op = rng.random()
            if op < 0.5:
                data = b"".join(page_of(rng.choice(["zero", "same", "text", "random"]), rng.randrange(50))
                                for _ in range(n))
                try:
                    space.write((first + slot) * PAGE, data)
                    model[slot * PAGE:(slot + n) * PAGE] = data
                except NoSpaceError:
                    pass
            elif op < 0.85:
                got = space.read((first + slot) * PAGE, n * PAGE)
                if got != model[slot * PAGE:(slot + n) * PAGE]:
                    errors.append(f"thread {seed}: slots {first + slot}+{n} read wrong")
                    return
            else:
                space.discard((first + slot) * PAGE, n * PAGE)
                model[slot * PAGE:(slot + n) * PAGE] = bytes(n * PAGE)
        if space.read(first * PAGE, slots * PAGE) != model:
            errors.append(f"thread {seed}: final read-back differs")
    except Exception as e:  # report, do not hide, whatever went wrong
        errors.append(f"thread {seed}: {e!r}")


def _mover(space: SwapSpace, workdir: str, seed: int, stop: threading.Event, errors: list[str]) -> None:
    """Move pages between backends under the owners' feet: writeback,
    compaction, recompression, a backing file added and evacuated now and then."""
    rng = random.Random(seed)
    n = 0
    try:
        while not stop.is_set():
            op = rng.random()
            if op < 0.4:
                try:
                    space.writeback(rng.choice([None, 16, 200]))
                except OSError:
                    pass  # no backing file right now
            elif op < 0.5:
                space.compact(yielding=rng.random() < 0.5)
            elif op < 0.6:
                space.recompress()
            elif op < 0.8 and len(space.backing_files()) < 3:
                n += 1
                space.add_backing(os.path.join(workdir, f"m{seed}-{n}"))
            elif space.backing_files():
                try:
                    space.remove_backing(rng.choice(space.backing_files()).path)
                except (NoSpaceError, FileNotFoundError):
                    pass  # full pool and no other file, or the other mover took it
    except Exception as e:
        errors.append(f"mover {seed}: {e!r}")


@pytest.mark.parametrize("codec", CODECS)
def test_threads_reading_writing_and_moving_pages_at_once_lose_nothing(codec: str, tmp_path: str) -> None:
    slots, owners = 256, 4
    space = SwapSpace(owners * slots * PAGE, pool_limit=512 * 1024, accept_threshold=75, codec=codec,
                      backing=[os.path.join(tmp_path, "b0")])
    errors: list[str] = []
    stop = threading.Event()
    movers = [threading.Thread(target=_mover, args=(space, str(tmp_path), k, stop, errors)) for k in (1, 2)]
    workers = [threading.Thread(target=_owner, args=(space, i * slots, slots, 100 + i, 600, errors))
               for i in range(owners)]
    for t in movers + workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    for t in movers:
        t.join()
    try:
        assert errors == []
        assert space.check() == []
        st = space.stats()
        assert st["written_back_pages"] > 0 and st["evacuated_pages"] > 0
    finally:
        space.close()
