"""The swap engine: address space, backends, limits, transfers, faults."""

from __future__ import annotations

import ast
import errno
import os
import random
import threading
from pathlib import Path

import pytest
from conftest import classes_apart

from vswapfs import MiB
from vswapfs.engine import CLUSTER_SLOTS, PAGE, NoSpaceError, SwapSpace, _stats
from vswapfs.engine import entry as E
from vswapfs.engine._codec import LZ4_MARK, Codec
from vswapfs.engine._inject import armed

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # every zstd frame starts with it


def text_page(seed: int) -> bytes:
    return (b"vswapfs page %08d compresses well. " % seed * 200)[:PAGE]


def test_never_written_space_reads_zero_and_costs_nothing() -> None:
    s = SwapSpace(1 << 40)
    assert s.read(123 << 30, 3 * PAGE) == bytes(3 * PAGE)
    assert s.stats()["clusters"] == 0


def test_unaligned_partial_write_is_read_modify_write() -> None:
    s = SwapSpace(4 * MiB)
    s.write(0, text_page(1))
    s.write(1024, b"\xff" * 1024)  # what mkswap does
    expect = bytearray(text_page(1))
    expect[1024:2048] = b"\xff" * 1024
    assert s.read(0, PAGE) == expect
    assert s.read(1000, 100) == expect[1000:1100]


def test_write_across_cluster_boundary() -> None:
    s = SwapSpace(8 * MiB)
    off = CLUSTER_SLOTS * PAGE - 3000
    data = os.urandom(10000)
    s.write(off, data)
    assert s.read(off, len(data)) == data
    assert s.stats()["clusters"] == 2


def test_out_of_range_raises_and_harms_nothing() -> None:
    s = SwapSpace(MiB)
    s.write(0, text_page(7))
    for off, n in ((MiB - 10, 11), (-1, 1), (MiB, 1), (2 * MiB, 0)):
        with pytest.raises(ValueError):
            s.write(off, bytes(max(n, 0)))
        with pytest.raises(ValueError):
            s.read(off, n)
    assert s.read(0, PAGE) == text_page(7)
    assert s.stats()["invalid_io"] == 8


def test_same_filled_pages_live_in_the_table_word() -> None:
    s = SwapSpace(MiB)
    s.write(0, bytes(PAGE))
    s.write(PAGE, b"\xaa" * PAGE)
    s.write(2 * PAGE, (12345).to_bytes(8, "little") * 512)
    st = s.stats()
    assert st["same_pages"] == 3 and st["pool_pages"] == 0 and st["mem_used_total"] == 0
    assert s.read(PAGE, PAGE) == b"\xaa" * PAGE
    assert s.read(2 * PAGE, 8) == (12345).to_bytes(8, "little")


def test_discard_frees_whole_pages_and_zeroes_partial_ones() -> None:
    s = SwapSpace(4 * MiB)
    data = b"".join(text_page(i) for i in range(8))
    s.write(0, data)
    s.discard(100, 3 * PAGE)  # partial page 0, pages 1-2 whole, partial page 3
    expect = bytearray(data)
    expect[100:100 + 3 * PAGE] = bytes(3 * PAGE)
    assert s.read(0, len(data)) == expect
    st = s.stats()
    assert st["notify_free"] == 2 and st["stored_pages"] == 6


def test_discarding_everything_leaves_nothing(tmp_path: Path) -> None:
    s = SwapSpace(64 * MiB, pool_limit=256 * 1024, backing=[str(tmp_path / "b0")])
    for i in range(3000):
        kind = i % 4
        page = (bytes(PAGE), text_page(i), os.urandom(PAGE), b"\x01" * PAGE)[kind]
        s.write(i * PAGE * 5, page)
    st = s.stats()
    assert st["phys_pages"] > 0 and st["pool_pages"] > 0 and st["same_pages"] > 0
    s.discard(0, 64 * MiB)
    st = s.stats()
    assert st["stored_pages"] == 0 and st["clusters"] == 0
    assert st["mem_used_total"] == 0 and st["pool_chunks"] == 0 and st["compr_data_size"] == 0
    bf = s.backing_files()[0]
    assert bf.size() == 0 and bf.allocated_bytes() == 0
    assert st["clusters_created"] == st["clusters_freed"]


def test_release_all_but_keeps_the_header_and_frees_nothing_when_told_not_to_under_the_lock() -> None:
    s = SwapSpace(16 * MiB)
    pages = [text_page(i) for i in range(600)]
    for i, page in enumerate(pages):
        s.write(i * PAGE, page)
    asked: list[bool] = []

    def unless() -> bool:
        asked.append(s._lock.locked())  # asked with the engine lock held
        return True

    assert s.release_all_but(PAGE, unless=unless) is None and asked == [True]
    assert s.stored_pages == 600 and s.counters.swapoff_freed_pages == 0
    assert all(s.read(i * PAGE, PAGE) == page for i, page in enumerate(pages))
    assert s.release_all_but(PAGE, unless=lambda: False) == 599
    assert s.stored_pages == 1 and s.counters.swapoff_freed_pages == 599
    assert s.read(0, PAGE) == pages[0] and s.read(PAGE, PAGE) == bytes(PAGE)
    s.check()


@pytest.mark.parametrize("backed", [False, True])
def test_a_write_keeps_nothing_of_the_callers_buffer(tmp_path: Path, backed: bool) -> None:
    """Pages are stored from views of the write's buffer (a FUSE request's,
    reused for the next request): what was stored must be copies.  With a
    backing file and a small pool limit, some go to the file (the policy's
    path), the rest to the pool, raw or compressed."""
    s = SwapSpace(64 * MiB, pool_limit=512 * 1024 if backed else 0,
                  backing=[str(tmp_path / "b0")] if backed else [])
    rng = random.Random(7)
    pages = [(text_page(i), rng.randbytes(PAGE), bytes(PAGE), b"\x07" * PAGE)[i % 4] for i in range(2048)]
    buf = bytearray(b"".join(pages))
    for at in range(0, len(pages), 32):
        view = memoryview(buf)[at * PAGE:(at + 32) * PAGE]
        s.write(at * PAGE, view)
        view[:] = b"\xee" * len(view)  # the buffer is reused: nothing stored may change
        view.release()
    st = s.stats()
    # with a backing file poor pages go there, without one they are kept raw in the pool
    assert st["pool_pages"] > 0 and (st["phys_pages"] > 0) == backed and (st["huge_pages"] > 0) != backed
    assert [s.read(i * PAGE, PAGE) for i in range(len(pages))] == pages
    s.check()


def test_pool_limit_without_backing_refuses_cleanly_with_hysteresis() -> None:
    s = SwapSpace(1024 * MiB, pool_limit=MiB, accept_threshold=50)
    i = 0
    with pytest.raises(NoSpaceError) as err:
        while True:
            s.write(i * PAGE, text_page(i) + b"")
            i += 1
    assert err.value.errno == errno.ENOSPC
    assert i > 0
    for k in range(i):
        assert s.read(k * PAGE, PAGE) == text_page(k)  # nothing stored was harmed
    assert s.read(i * PAGE, PAGE) == bytes(PAGE)  # the refused page was not stored
    st = s.stats()
    assert st["pool_limit_hit"] == 1 and st["failed_writes"] == 1 and st["pool_full"] == 1
    s.write(i * PAGE, bytes(PAGE))  # zero pages need no pool memory
    s.discard(0, 10 * PAGE)  # not enough to get under 50 %
    with pytest.raises(NoSpaceError):
        s.write(i * PAGE, text_page(i))
    s.discard(0, (i * 3 // 4) * PAGE)  # now well under 50 %
    s.write(i * PAGE, text_page(i))
    assert s.stats()["pool_full"] == 0


def test_writeback_moves_lru_pages_without_changing_slots(tmp_path: Path) -> None:
    s = SwapSpace(64 * MiB, backing=[str(tmp_path / "b0")])
    pages = {i * 3: text_page(i) for i in range(2000)}
    for slot, page in pages.items():
        s.write(slot * PAGE, page)
    first_cluster = [s.entry(slot) for slot in range(0, 600, 3)]
    assert all(E.tag(w) == E.POOL for w in first_cluster)
    assert s.writeback(100) == 100
    # the oldest-written cluster went first
    assert all(E.tag(s.entry(slot)) == E.PHYS for slot in range(0, 300, 3))
    assert s.writeback() == 1900
    st = s.stats()
    assert st["pool_pages"] == 0 and st["phys_pages"] == 2000 and st["mem_used_total"] == 0
    assert st["written_back_pages"] == 2000
    for slot, page in pages.items():
        assert s.read(slot * PAGE, PAGE) == page


def test_pool_over_limit_writes_back_automatically(tmp_path: Path) -> None:
    limit = 256 * 1024
    s = SwapSpace(64 * MiB, pool_limit=limit, backing=[str(tmp_path / "b0")])
    for i in range(12000):
        s.write(i * PAGE, text_page(i))
    st = s.stats()
    assert st["mem_used_total"] <= limit and st["written_back_pages"] > 0
    assert st["pool_pages"] > 0 and st["phys_pages"] > 0
    assert all(s.read(i * PAGE, PAGE) == text_page(i) for i in range(12000))


def test_incompressible_pages_go_to_backing_or_stay_raw(tmp_path: Path) -> None:
    s = SwapSpace(MiB)
    rnd = os.urandom(PAGE)
    s.write(0, rnd)
    st = s.stats()
    assert st["huge_pages"] == 1 and st["reject_compress_poor"] == 1
    s2 = SwapSpace(MiB, backing=[str(tmp_path / "b0")])
    s2.write(0, rnd)
    assert s2.stats()["phys_pages"] == 1 and s2.read(0, PAGE) == rnd


def test_evacuation_moves_pages_to_another_file_then_to_the_pool(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    s = SwapSpace(64 * MiB, backing=[a])
    data = {i: os.urandom(PAGE) if i % 2 else text_page(i) for i in range(1500)}
    for i, page in data.items():
        s.write(i * PAGE, page)
    s.writeback()
    s.add_backing(b)
    words = [s.entry(i) for i in data]
    assert s.remove_backing(a) == 1500
    assert not os.path.exists(a)
    assert all(E.phys_file(s.entry(i)) == 1 for i in data) and words != [s.entry(i) for i in data]
    assert s.remove_backing(b) == 1500
    st = s.stats()
    assert st["phys_pages"] == 0 and st["evacuated_pages"] == 3000 and st["backing_files"] == 0
    assert all(s.read(i * PAGE, PAGE) == page for i, page in data.items())


def test_compaction_returns_memory_and_keeps_data() -> None:
    s = SwapSpace(256 * MiB)
    data = {i: os.urandom(600) + bytes(PAGE - 600) for i in range(6000)}
    for i, page in data.items():
        s.write(i * PAGE, page)
    for i in data:
        if i % 5:
            s.discard(i * PAGE, PAGE)
    before = s.stats()["mem_used_total"]
    freed = s.compact()
    after = s.stats()
    assert freed > 0 and after["mem_used_total"] < before * 0.5
    assert after["pages_compacted"] == freed
    assert all(s.read(i * PAGE, PAGE) == data[i] for i in data if not i % 5)


def test_checksum_mismatch_is_an_error_for_that_page_only(tmp_path: Path) -> None:
    path = str(tmp_path / "b0")
    s = SwapSpace(MiB, backing=[path])
    pages = [os.urandom(PAGE) for _ in range(4)]
    for i, p in enumerate(pages):
        s.write(i * PAGE, p)
    bad = E.phys_slot(s.entry(2))
    with open(path, "r+b") as f:
        f.seek(bad * PAGE + 100)
        f.write(b"bitrot")
    with pytest.raises(OSError) as err:
        s.read(2 * PAGE, PAGE)
    assert err.value.errno == errno.EIO
    for i in (0, 1, 3):
        assert s.read(i * PAGE, PAGE) == pages[i]
    st = s.stats()
    assert st["checksum_failures"] == 1 and st["failed_reads"] == 1 and st["bd_read_errors"] == 1


def test_short_read_from_backing_is_an_error_for_that_page_only(tmp_path: Path) -> None:
    path = str(tmp_path / "b0")
    s = SwapSpace(MiB, backing=[path])
    pages = [os.urandom(PAGE) for _ in range(4)]
    for i, p in enumerate(pages):
        s.write(i * PAGE, p)
    with open(path, "r+b") as f:  # someone truncates the file under us
        f.truncate(E.phys_slot(s.entry(3)) * PAGE)
    with pytest.raises(OSError):
        s.read(3 * PAGE, PAGE)
    assert [s.read(i * PAGE, PAGE) for i in range(3)] == pages[:3]


def test_enospc_on_backing_keeps_pages_where_they_were(small_fs: Path) -> None:
    s = SwapSpace(256 * MiB, backing=[str(small_fs / "b0")])
    try:
        data = {i: os.urandom(PAGE) for i in range(4000)}  # 16 MiB, incompressible
        for i, page in data.items():
            s.write(i * PAGE, page)  # to disk until the 8 MiB file system is full
        st = s.stats()
        assert st["bd_write_errors"] >= 1
        assert st["phys_pages"] > 0 and st["huge_pages"] > 0  # the rest stayed in the pool, raw
        assert s.writeback() == 0  # still full: every page stays where it is
        assert s.stats()["bd_write_errors"] >= 2
        assert all(s.read(i * PAGE, PAGE) == page for i, page in data.items())
        assert s.stats()["failed_writes"] == 0
        s.discard(0, 256 * MiB)
        assert s.backing_files()[0].allocated_bytes() == 0
    finally:
        s.close()


def test_reserve_caps_the_pool_and_refuses_cleanly_when_used_up() -> None:
    reserve = 4 * 64 * 1024
    s = SwapSpace(64 * MiB, reserve=reserve, accept_threshold=100)
    assert s.pool_limit == reserve and s.stats()["pool_reserve"] == reserve
    for bad in (0, reserve + 1):
        with pytest.raises(ValueError):
            s.configure(pool_limit=bad)
    # four size classes take the four reserved chunks (all of each counts: it
    # is faulted in) with a page or so each; a fifth class finds no chunk left
    pages = [os.urandom(n) + bytes(PAGE - n) for n in (512, 1024, 1536, 2048, 2560)]
    blobs = [s._codec.encode(p)[1] for p in pages]
    assert len({(len(b) - 1) // 16 for b in blobs if b}) == 5
    for i, p in enumerate(pages[:4]):
        s.write(i * PAGE, p)
    assert s.stats()["mem_used_total"] == reserve and s.stats()["pool_spare"] == 0
    with pytest.raises(NoSpaceError):
        s.write(4 * PAGE, pages[4])
    assert s.read(4 * PAGE, PAGE) == bytes(PAGE)
    for i, p in enumerate(pages[:4]):
        assert s.read(i * PAGE, PAGE) == p
    s.discard(0, PAGE)  # its chunk goes back to the reserve
    s.write(4 * PAGE, pages[4])
    assert s.read(4 * PAGE, PAGE) == pages[4]
    with pytest.raises(ValueError):
        SwapSpace(64 * MiB, reserve=4096)


def _shmem_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssShmem:"))


def test_trim_gives_the_writeback_buffer_back_and_writeback_still_works(tmp_path: Path) -> None:
    # zstd first: the pool memory the writeback frees stays small beside the buffer's 1 MiB
    s = SwapSpace(64 * MiB, backing=[str(tmp_path / "b0")], first_algorithm="zstd")
    for i in range(600):
        s.write(i * PAGE, text_page(i))
    before = _shmem_kib()
    assert s.writeback(300) == 300
    assert _shmem_kib() - before >= 1000  # the 1 MiB buffer is resident after a writeback
    s.trim()
    assert _shmem_kib() - before < 100
    assert s.writeback() == 300
    assert all(s.read(i * PAGE, PAGE) == text_page(i) for i in range(600))
    s.trim()
    s.close()


def test_lz4_space_stores_every_kind_of_page_and_has_no_levels(tmp_path: Path) -> None:
    pages = [text_page(i) if i % 4 == 0 else os.urandom(PAGE) if i % 4 == 1
             else bytes(PAGE) if i % 4 == 2 else bytes([i % 251]) * PAGE for i in range(1024)]
    s = SwapSpace(8 * MiB, codec="lz4", backing=[str(tmp_path / "b0")])
    try:
        s.write(0, b"".join(pages))
        st = s.stats()
        # text in the pool, shrunk; random pages straight to the backing file; the rest in words
        assert st["pool_pages"] == 256 and st["phys_pages"] == 256 and st["zero_pages"] == 512
        assert st["compr_data_size"] < 256 * PAGE // 4
        assert s.writeback(100) == 100 and s.compact() >= 0
        for i, page in enumerate(pages):
            assert s.read(i * PAGE, PAGE) == page, f"page {i}"
        with pytest.raises(ValueError, match="levels are zstd's"):
            s.configure(level=3)
    finally:
        s.close()
    with pytest.raises(ValueError, match="codec must be one of zstd, lz4"):
        SwapSpace(MiB, codec="lzo")


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_an_object_of_exactly_a_page_is_kept_raw(codec: str) -> None:
    """A pool object of 4096 bytes reads back as a raw page, so a page that
    compresses to exactly 4096 bytes (lz4 does, for this one) must be stored
    raw even when huge_threshold allows 4096."""
    tail = random.Random(0).randbytes(PAGE)
    page = bytes(22) + tail[22:]
    s = SwapSpace(MiB, codec=codec, huge_threshold=PAGE)
    if codec == "lz4":
        assert len(s._codec.compress(page)) == PAGE  # the case this test is about
    s.write(0, page)
    assert s.read(0, PAGE) == page
    assert s.stats()["huge_pages"] == 1


# -- failure paths: each leaves the space as it was (issue: nothing lost) -----

def test_a_failed_pool_store_leaves_no_orphan_backing_slot(tmp_path: Path) -> None:
    """A write whose poorly compressing page went to the backing file while
    its other page found no pool chunk must release the backing slot: an
    orphan would later be evacuated into a live slot, which would then read
    back an old page."""
    s = SwapSpace(MiB, backing=[str(tmp_path / "b0")])
    s.write(0, text_page(0))  # slot 0 lives in the pool
    armed["pool.chunk"] = errno.ENOMEM
    try:
        s.write(PAGE, os.urandom(PAGE))  # poor: straight to the backing file, no chunk needed
        with pytest.raises(NoSpaceError):  # the random page reaches the file, the text page no chunk
            s.write(4 * PAGE, os.urandom(PAGE) + text_page(7)[:3000] + os.urandom(PAGE - 3000))
    finally:
        armed.clear()
    assert s.check() == []
    assert s.stats()["phys_pages"] == 1  # only the page whose write succeeded
    assert s.read(4 * PAGE, 2 * PAGE) == bytes(2 * PAGE)
    s.add_backing(str(tmp_path / "b1"))
    assert s.remove_backing(str(tmp_path / "b0")) == 1
    assert s.read(0, PAGE) == text_page(0) and s.check() == []


def test_a_backing_read_never_sees_its_slot_reused(tmp_path: Path) -> None:
    """A read takes a backing page without the lock.  If the slot is freed
    and given to another page meanwhile, the read must not return that
    page: freed slots wait in quarantine until the reader is done."""
    s = SwapSpace(MiB, backing=[str(tmp_path / "b0")])
    mine, other = os.urandom(PAGE), os.urandom(PAGE)
    s.write(0, mine)
    bf = s.backing_files()[0]
    entered, resume = threading.Event(), threading.Event()
    real_read = bf.read

    def slow_read(pslot: int, expect: int) -> bytes:
        entered.set()
        assert resume.wait(10)
        return real_read(pslot, expect)

    bf.read = slow_read  # type: ignore[method-assign]  # hold the reader between lookup and pread
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(bytes(s.read(0, PAGE))))
    reader.start()
    assert entered.wait(10)
    bf.read = real_read  # type: ignore[method-assign]
    s.discard(0, PAGE)  # slot 0's page is freed...
    s.write(8 * PAGE, other)  # ...and another page takes a backing slot
    assert s.entry(8 * PAGE // PAGE) != 0 and E.phys_slot(s.entry(8)) != 0  # not the reader's slot
    resume.set()
    reader.join()
    assert got == [mine]  # the page as it was when the read looked it up, never `other`
    assert s.check() == [] and s.read(8 * PAGE, PAGE) == other
    assert bf.live == 1  # the quarantined slot was freed once the reader was done


def test_discard_frees_whole_pages_even_when_an_edge_cannot_be_stored() -> None:
    # (zstd first: page 0's rewrite then needs a chunk a full pool cannot give)
    s = SwapSpace(64 * MiB, pool_limit=256 * 1024, accept_threshold=100, first_algorithm="zstd")
    n = 0
    with pytest.raises(NoSpaceError):
        while True:
            s.write(n * PAGE, text_page(n))
            n += 1
    held = s.stats()["stored_pages"]
    with pytest.raises(NoSpaceError):  # the partial first page cannot be stored again
        s.discard(100, 10 * PAGE)
    st = s.stats()
    assert st["stored_pages"] == held - 9 and st["notify_free"] == 9  # pages 1..9 are gone
    assert s.read(0, 100) == text_page(0)[:100] and s.check() == []


def _object_offset(s: SwapSpace, slot: int) -> int:
    """Where in the pool's memory the object of ``slot`` starts."""
    w = s.entry(slot)
    cls = s._pool._classes[(E.pool_length(w) - 1) // 16]
    no, k = divmod(E.pool_object(w), cls.per_chunk)
    return int(cls.chunks[no] + k * cls.size)


def test_a_corrupt_pool_object_reads_eio_and_is_counted() -> None:
    s = SwapSpace(MiB)
    s.write(0, text_page(1) + text_page(2))
    pool = s._pool
    off = _object_offset(s, 1)
    pool._map[off:off + 8] = b"\xff" * 8  # bit rot in the pool
    with pytest.raises(OSError) as err:
        s.read(PAGE, PAGE)
    assert err.value.errno == errno.EIO
    assert s.read(0, PAGE) == text_page(1)
    assert s.stats()["failed_reads"] == 1


def test_a_compaction_whose_move_fails_stops_and_keeps_everything() -> None:
    s = SwapSpace(256 * MiB)
    data = {i: os.urandom(600) + bytes(PAGE - 600) for i in range(3000)}
    for i, page in data.items():
        s.write(i * PAGE, page)
    for i in data:
        if i % 5:
            s.discard(i * PAGE, PAGE)
    armed["pool.move"] = errno.ENOMEM
    try:
        assert s.compact() == 0  # the first move fails: nothing moved, nothing lost
    finally:
        armed.clear()
    assert s.check() == []
    assert all(s.read(i * PAGE, PAGE) == data[i] for i in data if not i % 5)
    assert s.compact() > 0  # and a later compaction works
    assert s.check() == [] and all(s.read(i * PAGE, PAGE) == data[i] for i in data if not i % 5)


def test_check_finds_a_word_that_points_nowhere(tmp_path: Path) -> None:
    s = SwapSpace(MiB, backing=[str(tmp_path / "b0")])
    s.write(0, text_page(0) + os.urandom(PAGE))
    assert s.check() == []
    cl = s._table.clusters[0]
    cl.table[1] = E.phys_word(0, 77)  # a PHYS word whose slot holds nothing
    assert any("does not point back" in p for p in s.check())
    cl.table[0] = E.pool_word(999, 100)
    assert len(s.check()) >= 2


# -- backing files: created safely, removed safely ------------------------------

def test_backing_files_refuse_existing_paths_symlinks_and_unsafe_directories(tmp_path: Path) -> None:
    s = SwapSpace(MiB)
    taken = tmp_path / "taken"
    taken.write_bytes(b"someone's data")
    with pytest.raises(FileExistsError):
        s.add_backing(str(taken))
    assert taken.read_bytes() == b"someone's data"
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(FileExistsError):  # O_NOFOLLOW|O_EXCL: a symlink is an existing name
        s.add_backing(str(tmp_path / "link"))
    assert not (tmp_path / "target").exists()
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        s.add_backing(str(open_dir / "b0"))
    os.chmod(open_dir, 0o1777)  # sticky or not, anyone could take the name first
    with pytest.raises(PermissionError, match="writable by others"):
        s.add_backing(str(open_dir / "b0"))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(PermissionError, match="owned by uid 65534"):
        s.add_backing(str(theirs / "b0"))
    below = theirs / "sub"
    below.mkdir()
    with pytest.raises(PermissionError, match="owned by uid 65534"):
        s.add_backing(str(below / "b0"))
    with pytest.raises(FileNotFoundError):
        s.add_backing(str(tmp_path / "no-such-dir" / "b0"))
    assert s.backing_files() == [] and s.check() == []
    s.add_backing(str(tmp_path / "ok"))
    assert os.stat(tmp_path / "ok").st_mode & 0o777 == 0o600


def test_removing_a_backing_file_deletes_only_the_file_it_created(tmp_path: Path) -> None:
    path = tmp_path / "b0"
    s = SwapSpace(MiB, backing=[str(path)])
    s.write(0, os.urandom(PAGE))
    os.rename(path, tmp_path / "moved")  # someone swaps the name for another file
    path.write_bytes(b"not vswapfs's")
    s.close()
    assert path.read_bytes() == b"not vswapfs's"
    s2 = SwapSpace(MiB, backing=[str(tmp_path / "b1")])
    s2.close()
    assert not (tmp_path / "b1").exists()


# -- scale: structures follow the data, not the size --------------------------

def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_pool_holds_more_than_max_map_count_chunks_in_one_mapping() -> None:
    """Every pool chunk lives in one memfd mapping: lower vm.max_map_count
    below what a mapping per chunk would need, and store more than that."""
    knob = Path("/proc/sys/vm/max_map_count")
    if os.geteuid() != 0:
        pytest.skip("needs root to lower vm.max_map_count")
    saved = knob.read_text()
    limit = _maps() + 1000
    s = SwapSpace(1 << 30)
    before = _maps()
    try:
        knob.write_text(str(limit))
        page = os.urandom(PAGE)
        block = page * 256  # 1 MiB of incompressible pages: kept raw, a chunk per 16
        mib = (limit * 64 * 1024 >> 20) + 64  # more than `limit` chunks of 64 KiB could hold
        for i in range(mib):
            s.write(i * MiB, block)
        st = s.stats()
        assert st["pool_chunks"] > limit and st["mem_used_total"] > limit * 64 * 1024
        assert _maps() - before <= 2
        assert s.read((mib - 1) * MiB, MiB) == block
    finally:
        knob.write_text(saved)
        s.close()


def test_a_64_gib_space_costs_per_cluster_used_not_per_slot() -> None:
    """Nothing is allocated per virtual slot or per GiB of virtual space:
    a 64 GiB space costs nothing empty, and one page in each of 1024
    clusters spread over it costs 1024 tables."""
    s = SwapSpace(64 << 30)
    assert s.stats()["metadata_bytes"] == 0 and s.stats()["clusters"] == 0
    maps = _maps()
    step = (64 << 30) // 1024
    for i in range(1024):
        s.write(i * step, text_page(i))
    st = s.stats()
    assert st["clusters"] == 1024 and st["pool_chunks"] <= 4
    assert st["metadata_bytes"] < 1024 * 5000  # a 4 KiB table and its object per cluster
    assert _maps() - maps <= 2
    s.discard(0, 64 << 30)
    assert s.stats()["metadata_bytes"] == 0 and s.check() == []


def test_incompressible_pages_without_a_backing_file_count_against_the_limit() -> None:
    s = SwapSpace(256 * MiB, pool_limit=MiB)
    with pytest.raises(NoSpaceError):
        for i in range(1000):
            s.write(i * PAGE, os.urandom(PAGE))
    st = s.stats()
    assert st["huge_pages"] > 0 and st["mem_used_total"] <= MiB and st["pool_limit_hit"] == 1


def test_a_dynamic_space_stores_only_into_spares_and_answers_from_what_it_has(tmp_path: Path) -> None:
    """Dynamic mode (the daemon's): a store takes a chunk only from the
    spares faulted in ahead.  With none ready it goes to a backing file,
    else it is refused (ENOSPC): it never faults memory in itself."""
    from vswapfs.engine._pool import CHUNK_BYTES, SPARE_HIGH, SPARE_LOW

    s = SwapSpace(64 * MiB, dynamic=True)
    assert s.stats()["pool_spare"] == 0
    with pytest.raises(NoSpaceError, match="is ready"):  # a table page for the cluster, or a chunk
        s.write(0, text_page(0))
    assert s.stats()["stored_pages"] == 0 and s.check() == []
    from vswapfs.engine._table import SPARE_LOW as TABLE_SPARE_LOW

    table_pages = min(TABLE_SPARE_LOW, 64 * MiB // (512 * PAGE))  # a page per cluster at most
    assert s.replenish(busy=False) == SPARE_LOW * CHUNK_BYTES + table_pages * PAGE
    s.write(0, text_page(0))
    assert s.read(0, PAGE) == text_page(0)
    s.replenish()
    assert s.stats()["pool_spare"] == SPARE_HIGH * CHUNK_BYTES  # topped up to the high mark
    s.trim()  # idle: back to the low mark
    assert s.stats()["pool_spare"] == SPARE_LOW * CHUNK_BYTES
    s.close()

    s = SwapSpace(64 * MiB, dynamic=True, backing=[str(tmp_path / "b0")])
    table = s._place.table  # its spare pages only, as housekeeping faults them in
    pages = table.refill_wanted()
    table.fault_in(pages)
    table.add_spare(pages)
    s.write(0, text_page(1) + os.urandom(PAGE))  # no spare chunk: both pages go to the backing file
    st = s.stats()
    assert st["phys_pages"] == 2 and st["pool_pages"] == 0 and st["failed_writes"] == 0
    assert s.read(0, 2 * PAGE)[:PAGE] == text_page(1) and s.check() == []
    s.close()


def test_a_refill_hands_its_chunks_over_a_batch_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamic mode: housekeeping's refill faults spare chunks in
    REFILL_BATCH at a time, and each batch is a spare as soon as it is in:
    a daemon in a full memory cgroup stores writes in the first batches
    while a later one waits on reclaim (which those very writes feed).  If
    the kernel fails a batch, the batches before it stay spares and the
    rest of the refill goes back.  (The kernel's faulting is watched, not
    replaced: each call goes through to the real ``populate_all``.)"""
    from vswapfs import linux
    from vswapfs.engine._placement import REFILL_BATCH
    from vswapfs.engine._pool import CHUNK_BYTES, SPARE_HIGH

    real = linux.populate_all
    spare_at_batch: list[int] = []  # pool_spare as each batch of chunks begins to fault in
    fail_batch = 0  # the batch the kernel fails (1-based; 0: none)
    stored_meanwhile: list[bytes] = []

    def watched(base: int, offsets: set[int] | list[int], length: int, *, owned: bool = True) -> None:
        if length == CHUNK_BYTES:  # the pool's chunks (not the directory's pages)
            assert len(offsets) <= REFILL_BATCH
            spare_at_batch.append(s.stats()["pool_spare"])
            if len(spare_at_batch) == 3 and not fail_batch:  # a write comes mid-refill
                s.write(0, text_page(5))
                stored_meanwhile.append(bytes(s.read(0, PAGE)))
            if len(spare_at_batch) == fail_batch:
                raise OSError(errno.ENOMEM, "Cannot allocate memory")
        real(base, offsets, length, owned=owned)

    monkeypatch.setattr(linux, "populate_all", watched)
    s = SwapSpace(64 * MiB, dynamic=True)
    s.replenish()
    batch = REFILL_BATCH * CHUNK_BYTES
    assert len(spare_at_batch) == SPARE_HIGH // REFILL_BATCH
    assert spare_at_batch[:2] == [0, batch]  # each batch handed over before the next one began
    assert stored_meanwhile == [text_page(5)]  # served from the first batches while the refill went on
    assert s.stats()["failed_writes"] == 0 and s.stats()["spare_waits"] == 0 and s.check() == []
    s.close()

    spare_at_batch.clear()
    fail_batch = 3
    s = SwapSpace(64 * MiB, dynamic=True)
    s.replenish()
    assert len(spare_at_batch) == 3 and s.stats()["pool_spare"] == 2 * batch  # kept what got in
    assert s.check() == []
    fail_batch = 0
    s.replenish()  # the slots given back are faulted in the next time
    assert s.stats()["pool_spare"] == SPARE_HIGH * CHUNK_BYTES and s.check() == []
    s.close()


def test_a_write_short_of_spares_waits_a_moment_for_them_and_no_longer() -> None:
    """Dynamic mode: a write that finds no spare chunk asks for some
    (``spares_wanted``) and waits, the engine lock released, until
    housekeeping's ``replenish`` brings them (then it is stored) or for at
    most SPARE_WAIT_S (then it is refused): a burst is not refused for a
    few milliseconds of faulting, and a housekeeper that cannot fault
    cannot hang a write.  After a wait that came to nothing, writes short
    of spares are refused at once until housekeeping brings some.
    ``spare_waits`` counts the waits."""
    import time

    from vswapfs.engine._space import SPARE_WAIT_S

    s = SwapSpace(64 * MiB, dynamic=True)
    keeper_saw = threading.Event()

    def keeper() -> None:  # what the daemon's housekeeping thread does
        if s.spares_wanted.wait(5):
            keeper_saw.set()
            s.replenish()

    t = threading.Thread(target=keeper)
    t.start()
    s.write(PAGE, text_page(1))  # waits, then is stored
    t.join()
    assert keeper_saw.is_set() and s.read(PAGE, PAGE) == text_page(1)
    assert s.stats()["failed_writes"] == 0 and s.stats()["spare_waits"] == 1 and s.check() == []
    s.close()

    s = SwapSpace(64 * MiB, dynamic=True)
    t0 = time.monotonic()
    with pytest.raises(NoSpaceError, match="is ready"):
        s.write(0, text_page(0))  # nobody replenishes
    waited = time.monotonic() - t0
    assert SPARE_WAIT_S * 0.9 <= waited < SPARE_WAIT_S + 0.5
    assert s.spares_wanted.is_set() and s.stats()["stored_pages"] == 0
    # that wait came to nothing (housekeeping stuck in reclaim): the next writes
    # short of spares are refused at once, not after another wait each
    t0 = time.monotonic()
    with pytest.raises(NoSpaceError, match="is ready"):
        s.write(0, text_page(0))
    assert time.monotonic() - t0 < SPARE_WAIT_S / 2
    s.replenish()  # housekeeping got through: stores go on
    s.write(0, text_page(0))
    assert s.read(0, PAGE) == text_page(0)
    stats = s.stats()
    assert stats["failed_writes"] == 2 and stats["spare_waits"] == 1  # the refusal at once waited not
    assert s.check() == []
    s.close()


def test_a_write_needing_more_chunks_than_the_spares_waits_for_them_without_using_them_up() -> None:
    """Dynamic mode: a write of many pages, each in a size class of its own,
    needs a new chunk for each (a burst of the kernel's swap writes after
    an idle spell: 128 pages at once, and 32 spares kept while idle).  It
    must wait for housekeeping's refill and be stored, not refused.  Before,
    it tried to store page by page, ran out of spares halfway, and undoing
    that gave the chunks it had taken back to the kernel, not to the
    spares: trying again at each batch of the refill, it used every batch
    up and was refused after its wait, every time.  Now a store that might
    not fit is checked first and takes no spare unless it fits, and the
    refill brings at least what the waiting write needs, even past the
    busy mark."""
    from vswapfs.engine._pool import SPARE_HIGH, SPARE_LOW

    data = classes_apart(128)
    s = SwapSpace(64 * MiB, dynamic=True)
    s.replenish(busy=False)  # idle: the low mark
    assert s._pool.spare_chunks == SPARE_LOW < 128

    def keeper() -> None:  # what the daemon's housekeeping thread does
        if s.spares_wanted.wait(5):
            s.spares_wanted.clear()
            s.replenish()

    t = threading.Thread(target=keeper)
    t.start()
    s.write(0, data)  # waits for the refill, then is stored
    t.join()
    assert bytes(s.read(0, len(data))) == data
    stats = s.stats()
    assert stats["failed_writes"] == 0 and stats["spare_waits"] == 1 and s.check() == []
    s.close()

    # nobody refills: refused after the wait, with no spare used up trying
    s = SwapSpace(64 * MiB, dynamic=True)
    s.replenish(busy=False)
    with pytest.raises(NoSpaceError, match="is ready"):
        s.write(0, data)
    assert s._pool.spare_chunks == SPARE_LOW and s.stats()["stored_pages"] == 0
    need = s._place.spares_needed  # what the refused write needed at once
    assert SPARE_LOW < need <= 128
    s.replenish(busy=False)  # even the idle mark's refill brings that much now
    assert s._pool.spare_chunks >= need
    s.write(0, data)  # stored at once
    assert bytes(s.read(0, len(data))) == data
    stats = s.stats()
    assert stats["failed_writes"] == 1 and stats["spare_waits"] == 1 and s.check() == []
    s.close()

    # a refill reaches what a waiting write needs even where the mark would stop it
    s = SwapSpace(64 * MiB, dynamic=True)
    pool = s._pool
    offs = pool.refill_wanted(SPARE_HIGH)
    pool.give_back_slots(offs[SPARE_HIGH * 3 // 4:])  # as many spares as the busy mark is content with
    pool.fault_in(offs[:SPARE_HIGH * 3 // 4])
    pool.add_spare(offs[:SPARE_HIGH * 3 // 4])
    assert pool.refill_wanted(SPARE_HIGH) == []
    s._place.spares_needed = SPARE_HIGH  # a write of 256 pages in 256 classes waits
    s.replenish()
    assert pool.spare_chunks == SPARE_HIGH
    s.close()


_WORDS = b"the of and to in is swap page kernel memory cluster slot table pool daemon zstd".split()


def _text(i: int) -> bytes:
    """Text that zstd's level 1 packs a fifth denser than its level -1."""
    r = random.Random(i)
    return b" ".join(r.choice(_WORDS) + b"%d" % r.randrange(100) for _ in range(900))[:PAGE]


def test_recompression_makes_first_level_pages_denser_and_keeps_them() -> None:
    space = SwapSpace(8 * MiB, first_algorithm="zstd")  # stored at level -1, recompressed to 1
    assert (space.first_level, space.level) == (-1, 1)
    pages = [_text(i) if i % 3 else os.urandom(PAGE) for i in range(600)]  # two clusters
    space.write(0, b"".join(pages))
    before = space.stats()
    looked = 0
    while n := space.recompress():
        looked += n
    after = space.stats()
    text = sum(1 for i in range(600) if i % 3)
    assert looked == text  # raw (random) pages are not looked at
    assert 0 < after["recompressed_pages"] <= text
    assert after["compr_data_size"] == before["compr_data_size"] - after["recompress_saved_bytes"]
    assert after["recompress_saved_bytes"] > 0
    assert space.read(0, 600 * PAGE) == b"".join(pages)
    assert space.check() == []
    assert space.recompress() == 0  # nothing written since: nothing to look at
    space.write(5 * PAGE, _text(9999))  # a write marks its page again
    assert space.recompress() == 1
    space.write(510 * PAGE, b"".join(_text(i) for i in range(4)))  # two clusters' slots
    assert space.recompress() == 4


def test_recompression_is_off_with_one_level_or_lz4() -> None:
    for space in (SwapSpace(4 * MiB, first_level=1, first_algorithm="zstd"),
                  SwapSpace(4 * MiB, first_level=None, first_algorithm="zstd"),
                  SwapSpace(4 * MiB, codec="lz4")):
        space.write(0, b"".join(_text(i) for i in range(10)))
        assert space.recompress() == 0 and space.first_level == space.level


def _object(space: SwapSpace, slot: int) -> bytes:
    """The pool object slot ``slot`` is stored in."""
    w = space.entry(slot)
    assert E.tag(w) == E.POOL
    return space._pool.load(E.pool_object(w), E.pool_length(w))


def test_pages_are_stored_first_with_lz4_then_recompressed_to_zstd() -> None:
    space = SwapSpace(8 * MiB)  # the defaults: lz4 first, zstd level 1 in the end
    assert (space.first_algorithm, space.level) == ("lz4", 1)
    pages = [_text(i) for i in range(40)]
    space.write(0, b"".join(pages))
    first = [_object(space, i) for i in range(40)]
    assert all(o[:1] == LZ4_MARK for o in first)  # lz4, marked
    assert space.read(0, 40 * PAGE) == b"".join(pages)
    while space.recompress():
        pass
    final = [_object(space, i) for i in range(40)]
    assert all(o[:4] == ZSTD_MAGIC and len(o) < len(f) for o, f in zip(final, first, strict=True))
    assert space.stats()["recompressed_pages"] == 40
    assert space.read(0, 40 * PAGE) == b"".join(pages) and space.check() == []


def test_the_first_algorithm_changes_at_run_time_and_both_kinds_read_back() -> None:
    space = SwapSpace(4 * MiB)
    space.write(0, _text(1))
    space.configure(first_algorithm="zstd")  # control/first_comp_algorithm
    assert space.first_algorithm == "zstd"
    space.write(PAGE, _text(2))
    assert _object(space, 0)[:1] == LZ4_MARK and _object(space, 1)[:4] == ZSTD_MAGIC
    space.configure(first_algorithm="lz4")
    space.write(2 * PAGE, _text(3))
    assert _object(space, 2)[:1] == LZ4_MARK
    assert space.read(0, 3 * PAGE) == _text(1) + _text(2) + _text(3)
    with pytest.raises(ValueError):
        space.configure(first_algorithm="gzip")
    with pytest.raises(ValueError):
        SwapSpace(4 * MiB, codec="lz4").configure(first_algorithm="lz4")  # one step: nothing first
    with pytest.raises(ValueError):
        SwapSpace(4 * MiB, first_algorithm="zlib")
    assert space.first_algorithm == "lz4" and space.check() == []


def test_a_corrupt_lz4_object_reads_eio() -> None:
    s = SwapSpace(MiB)
    s.write(0, _text(1) + _text(2))
    pool = s._pool
    off = _object_offset(s, 1)
    assert pool._map[off:off + 1] == LZ4_MARK
    pool._map[off + 1:off + 9] = b"\xff" * 8  # bit rot behind the mark
    with pytest.raises(OSError) as err:
        s.read(PAGE, PAGE)
    assert err.value.errno == errno.EIO
    assert s.read(0, PAGE) == _text(1)


def test_a_corrupt_object_in_a_several_page_read_fails_that_read_only() -> None:
    """The pages of a READ are decoded into one object (``Codec.gather``): a
    corrupt object among them is EIO for the read, counted once, and its
    neighbours still read."""
    s = SwapSpace(MiB)
    s.write(0, _text(1) + _text(2) + _text(3))
    off = _object_offset(s, 1)
    s._pool._map[off + 1:off + 9] = b"\xff" * 8
    with pytest.raises(OSError) as err:
        s.read(0, 3 * PAGE)
    assert err.value.errno == errno.EIO and s.stats()["failed_reads"] == 1
    assert s.read(0, PAGE) == _text(1) and s.read(2 * PAGE, PAGE) == _text(3)


def test_first_level_is_never_denser_than_the_level_and_is_checked() -> None:
    space = SwapSpace(4 * MiB)
    space.configure(level=-5)
    assert space.first_level == -5  # the final level is faster: one step
    space.configure(level=3)
    assert space.first_level == -1
    with pytest.raises(ValueError):
        space.configure(first_level=0)
    with pytest.raises(ValueError):
        SwapSpace(4 * MiB, first_level=-1000)


def test_a_page_rewritten_while_it_was_recompressed_keeps_the_new_data() -> None:
    space = SwapSpace(4 * MiB)
    space.write(0, b"".join(_text(i) for i in range(8)))

    class RewritingCodec(Codec):
        def recompress(self, blob: bytes) -> bytes | None:
            # another thread writes while the lock is not held; runs once
            if space.read(3 * PAGE, PAGE) == _text(3):
                space.write(3 * PAGE, _text(333))
            return super().recompress(blob)

    real = space._codec
    space._codec = RewritingCodec(first_level=real.first_level)  # the same levels, one hook
    while space.recompress():
        pass
    space._codec = real
    assert space.read(3 * PAGE, PAGE) == _text(333)
    assert space.read(0, 3 * PAGE) == b"".join(_text(i) for i in range(3))
    assert space.check() == []


def test_settle_skips_a_word_whose_object_now_holds_other_bytes() -> None:
    """The same word can come back (a freed object reused for a page of the
    same length): the bytes decide, not the word."""
    space = SwapSpace(4 * MiB)
    space.write(0, _text(1))
    word = space.entry(0)
    dense = space._codec.recompress(space._pool.load(E.pool_object(word), E.pool_length(word)))
    assert dense is not None
    with space._lock:
        assert space._place.settle([(0, word, b"not what the pool holds")], [dense])
    assert space.entry(0) == word and space.read(0, PAGE) == _text(1)
    assert space.stats()["recompressed_pages"] == 0


def test_past_half_the_pool_limit_pages_are_stored_dense_at_once() -> None:
    dense_len = len(Codec().compress(_text(7), 1))
    fast_len = len(Codec().compress(_text(7)))  # the first store's (lz4)
    assert fast_len > dense_len
    space = SwapSpace(8 * MiB, pool_limit=1 * MiB)
    space.write(0, _text(7))
    assert E.pool_length(space.entry(0)) == fast_len  # far from the limit: the fast level
    i = 1
    while space.stats()["mem_used_total"] * 2 < 1 * MiB:
        space.write(i * PAGE, os.urandom(PAGE))  # raw pages fill the pool
        i += 1
    space.write(i * PAGE, _text(7))
    assert E.pool_length(space.entry(i)) == dense_len  # past half: dense at once
    assert space.read(i * PAGE, PAGE) == _text(7) and space.check() == []


def test_the_counters_class_declares_exactly_the_described_counters() -> None:
    # Read from the source: compiled by mypyc, the class keeps no __annotations__.
    tree = ast.parse((Path(_stats.__file__).parent / "_stats.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Counters")
    declared = [n.target.id for n in cls.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    assert declared == list(_stats.COUNTERS)
    counters = _stats.Counters()
    assert counters.as_dict() == dict.fromkeys(_stats.COUNTERS, 0)
    counters.notify_free += 3
    assert counters.as_dict()["notify_free"] == 3
