"""Random operations on a SwapSpace against a plain bytearray model.

Small limits (a 256 KiB pool, files that come and go) push every path:
same-filled, compressed and raw pages, automatic and on-demand writeback,
evacuation to another file or into the pool, compaction and refusal at the
limit.  Any difference from the model is a bug.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vswapfs.engine import CODECS, PAGE, NoSpaceError, SwapSpace
from vswapfs.engine import entry as E

SIZE = 3 * 512 * PAGE + 5 * PAGE  # three clusters and a bit


def page_of(kind: str, seed: int) -> bytes:
    if kind == "zero":
        return bytes(PAGE)
    if kind == "same":
        return (seed * 0x9E3779B97F4A7C15 % (1 << 64)).to_bytes(8, "little") * (PAGE // 8)
    if kind == "text":
        return (b"page %d of the model; " % seed * 300)[:PAGE]
    return os.urandom(PAGE)


kinds = st.sampled_from(["zero", "same", "text", "random"])


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
        try:
            self.space.discard(0, SIZE)
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
        except NoSpaceError:
            assert self.space.read(offset, len(data)) == self.model[offset:offset + len(data)]
            return
        self.model[offset:offset + len(data)] = data

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
        assert self.space.read(offset, n) == self.model[offset:offset + n]

    @rule(offset=st.integers(0, SIZE - 1), n=st.integers(1, 600 * PAGE))
    def discard(self, offset: int, n: int) -> None:
        n = min(n, SIZE - offset)
        self.space.discard(offset, n)
        self.model[offset:offset + n] = bytes(n)

    @rule(cluster=st.integers(0, 2))
    def discard_cluster(self, cluster: int) -> None:
        """What the kernel sends: one whole, aligned 512-slot cluster."""
        self.discard(cluster * 512 * PAGE, 512 * PAGE)

    @precondition(lambda self: self.space.backing_files())
    @rule(n=st.one_of(st.none(), st.integers(1, 300)))
    def writeback(self, n: int | None) -> None:
        self.space.writeback(n)

    @precondition(lambda self: len(self.space.backing_files()) < 3)
    @rule()
    def add_backing(self) -> None:
        self.n_files += 1
        self.space.add_backing(os.path.join(self.dir, f"b{self.n_files}"))

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

    @rule()
    def compact(self) -> None:
        self.space.compact()

    @rule(enabled=st.booleans())
    def toggle_writeback(self, enabled: bool) -> None:
        self.space.configure(writeback_enabled=enabled)

    @invariant()
    def counters_agree(self) -> None:
        s = self.space.stats()
        assert s["stored_pages"] == s["same_pages"] + s["pool_pages"] + s["phys_pages"]
        assert s["orig_data_size"] == s["stored_pages"] * PAGE
        assert s["compr_data_size"] <= s["mem_used_total"] <= s["mem_used_max"]
        assert s["phys_pages"] == sum(bf.live for bf in self.space.backing_files())
        # the gauges are kept incrementally: recount them from the tables
        words = [w for cl in self.space._clusters.values() for w in cl.table if w]
        tags = [w & E.TAG_MASK for w in words]
        assert s["same_pages"] == tags.count(E.SAME) and s["pool_pages"] == tags.count(E.POOL)
        raw = [t == E.POOL and E.pool_length(w) == PAGE for t, w in zip(tags, words, strict=True)]
        assert s["huge_pages"] == sum(raw)
        assert s["clusters"] == sum(1 for cl in self.space._clusters.values() if cl.used)


SpaceModel.TestCase.settings = settings(max_examples=120, stateful_step_count=50, deadline=None)
test_space_matches_bytearray_model = SpaceModel.TestCase
