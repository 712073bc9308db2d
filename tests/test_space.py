"""The swap engine: address space, backends, limits, transfers, faults."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from vswapfs.engine import CLUSTER_SLOTS, PAGE, NoSpaceError, SwapSpace
from vswapfs.engine import entry as E

MiB = 1 << 20


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
    first_cluster = [s._word(slot) for slot in range(0, 600, 3)]
    assert all(E.tag(w) == E.POOL for w in first_cluster)
    assert s.writeback(100) == 100
    # the oldest-written cluster went first
    assert all(E.tag(s._word(slot)) == E.PHYS for slot in range(0, 300, 3))
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
    words = [s._word(i) for i in data]
    assert s.remove_backing(a) == 1500
    assert not os.path.exists(a)
    assert all(E.phys_file(s._word(i)) == 1 for i in data) and words != [s._word(i) for i in data]
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
    bad = E.phys_slot(s._word(2))
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
        f.truncate(E.phys_slot(s._word(3)) * PAGE)
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
    # four size classes take the four reserved chunks with a page or so each,
    # far under the limit; a fifth class finds no chunk left
    pages = [os.urandom(n) + bytes(PAGE - n) for n in (512, 1024, 1536, 2048, 2560)]
    blobs = [s._encode(p)[1] for p in pages]
    assert len({(len(b) - 1) // 16 for b in blobs if b}) == 5
    for i, p in enumerate(pages[:4]):
        s.write(i * PAGE, p)
    assert s.stats()["mem_used_total"] < reserve // 4
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
    s = SwapSpace(64 * MiB, backing=[str(tmp_path / "b0")])
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
        assert len(s._compress(page)) == PAGE  # the case this test is about
    s.write(0, page)
    assert s.read(0, PAGE) == page
    assert s.stats()["huge_pages"] == 1
