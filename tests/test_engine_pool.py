"""The zsmalloc-like pool: packing, freeing, compaction."""

import errno
import mmap
import os
import random

import pytest

from vswapfs import linux
from vswapfs.engine._pool import CHUNK_BYTES, Pool, PoolExhausted, chunk_bytes_for


def test_objects_round_trip_and_memory_follows_payload() -> None:
    pool = Pool()
    rng = random.Random(0)
    objs = []
    for _ in range(5000):
        data = rng.randbytes(rng.randrange(1, 4097))
        objs.append((pool.store(data), data))
    for obj, data in objs:
        assert pool.load(obj, len(data)) == data
    # class rounding (< 16 bytes) plus at most one partly used chunk per class
    # (faulted in whole when a class takes it, as zsmalloc allocates zspages)
    assert pool.mem_used - pool.payload <= 16 * len(objs) + sum(c.chunk_bytes for c in pool._classes)
    for obj, data in objs:
        pool.free(obj, len(data))
    assert (pool.mem_used, pool.payload, pool.objects, pool.chunks) == (0, 0, 0, 0)


def test_freed_slots_are_reused() -> None:
    pool = Pool()
    a = pool.store(b"x" * 100)
    pool.store(b"y" * 100)
    pool.free(a, 100)
    assert pool.store(b"z" * 100) == a
    assert pool.load(a, 100) == b"z" * 100


def test_compaction_frees_sparse_chunks_and_keeps_data() -> None:
    pool = Pool()
    size = 1000
    per_chunk = chunk_bytes_for(1008) // 1008
    objs = [pool.store(bytes([i % 256]) * size) for i in range(per_chunk * 8)]
    for i, obj in enumerate(objs):
        if i % 4:  # leave every chunk a quarter full
            pool.free(obj, size)
    kept = {obj: bytes([i % 256]) * size for i, obj in enumerate(objs) if not i % 4}
    before = pool.mem_used
    assert pool.plan_compaction() > 0
    moved = {}
    for obj, data in kept.items():
        new = pool.copy(obj, size) if pool.draining(obj, size) else obj
        if new != obj:
            pool.free(obj, size)
        moved[new] = data
    pool.end_compaction()
    assert pool.mem_used < before / 2
    for obj, data in moved.items():
        assert pool.load(obj, size) == data


def test_reserved_pool_reuses_its_chunks_and_refuses_past_the_reserve() -> None:
    pool = Pool(reserve=4 * CHUNK_BYTES)
    assert pool.reserve == 4 * CHUNK_BYTES
    spare = list(pool._spare)
    per_chunk = CHUNK_BYTES // 4096
    objs = [pool.store(bytes([i]) * 4096) for i in range(4 * per_chunk)]
    assert pool.chunks == 4 and not pool.fits([4096])
    with pytest.raises(PoolExhausted):
        pool.store(b"x" * 4096)
    assert pool.objects == 4 * per_chunk  # the refused store changed nothing
    assert not pool.fits([100])  # another class would need a chunk too...
    for obj in objs[:per_chunk]:
        pool.free(obj, 4096)
    assert pool.fits([100] * (CHUNK_BYTES // 112))  # ...and one came back
    obj = pool.store(b"y" * 100)
    assert pool.load(obj, 100) == b"y" * 100
    in_use = [off for cls in pool._classes for off in cls.chunks.values()]
    assert set(in_use) <= set(spare)  # no chunk came from outside the reserve
    for i, o in enumerate(objs[per_chunk:], start=per_chunk):
        assert pool.load(o, 4096) == bytes([i]) * 4096


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The ranges of the file that hold pages (SEEK_DATA / SEEK_HOLE)."""
    out, off = [], 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after off
            break
        off = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, off))
    return out


def test_populate_all_faults_in_every_piece_and_nothing_between() -> None:
    page = 4096
    fd = os.memfd_create("vswapfs-test-populate")
    try:
        os.ftruncate(fd, 64 * page)
        with mmap.mmap(fd, 64 * page) as m:
            # unsorted, adjacent pieces (one run), a lone one, a repeat
            linux.populate_all(linux.buffer_address(m), [20 * page, 4 * page, 6 * page, 2 * page,
                                                         40 * page, 4 * page], 2 * page)
            assert _data_ranges(fd, 64 * page) == [(2 * page, 8 * page), (20 * page, 22 * page),
                                                   (40 * page, 42 * page)]
    finally:
        os.close(fd)


def test_populate_raises_what_the_kernel_refuses_instead_of_writing_there() -> None:
    m = mmap.mmap(-1, 3 * 4096)
    addr = linux.buffer_address(m)
    m.close()  # unmapped now: the kernel says ENOMEM; touching it would be a SIGSEGV
    with pytest.raises(OSError) as e:
        linux.populate(addr, 4096)
    assert e.value.errno == errno.ENOMEM


def test_populate_touches_pages_by_reading_where_they_hold_data() -> None:
    # a range the kernel will not advise (not page-aligned: EINVAL, as a kernel without
    # MADV_POPULATE_WRITE says) is touched page by page instead; live memory only read
    with mmap.mmap(-1, 3 * 4096) as m:
        m[:] = b"\xa5" * len(m)
        linux.populate(linux.buffer_address(m) + 1, 2 * 4096, owned=False)
        assert m[:] == b"\xa5" * len(m)
        linux.populate(linux.buffer_address(m) + 1, 2 * 4096)  # owned: a byte per page written
        assert m[1] == 0 and m[4097] == 0 and m[2] == 0xa5
