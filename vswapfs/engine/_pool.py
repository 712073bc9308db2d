"""A zsmalloc-like allocator for compressed pages.

Objects are packed into size classes 16 bytes apart (16, 32, ... 4096).  Each
class carves fixed-size slots out of anonymous ``mmap`` chunks of 16-64 KiB
(sized per class so that little is left over at the tail); a chunk
is committed by the kernel only as far as it has been written, so the memory
the pool holds follows the payload closely, whatever the size mix.  There is
no Python object per stored page: a class keeps its chunks in a dict, a bump
pointer for the newest chunk and an ``array`` stack of freed slot indices.

An object is named by its class (derived from its length) and an index
``chunk_no * per_chunk + k``.  Chunk numbers are never reused, so an index
left in a free stack after its chunk was released is recognised as stale.

With a *reserve* the pool takes all its chunks (64 KiB each) from memory
committed up front and never gives them back to the kernel: the
daemon then faults no memory in while it stores pages, which matters when
it shares a memory cgroup with the processes that swap to it (every new
page it faulted in could send it into reclaim that waits on its own I/O).
When the reserve is used up, stores raise :class:`PoolExhausted`.

Memory accounting follows zsmalloc: a chunk counts for what it has committed
(all of it once filled, the bumped part while it is the newest), freed slots
inside it keep counting until the chunk empties or is compacted.
"""

from __future__ import annotations

import mmap
from array import array
from typing import Final

CLASS_STEP: Final = 16
N_CLASSES: Final = 4096 // CLASS_STEP
CHUNK_BYTES: Final = 64 * 1024  # the largest chunk
_PAGE: Final = 4096
_MADV_POPULATE_WRITE: Final = 23  # Linux 5.14+


def chunk_bytes_for(size: int) -> int:
    """Chunk size for objects of ``size`` bytes: the multiple of 4 KiB from
    16 to 64 KiB that wastes least at its tail (zsmalloc's choice of
    pages per zspage), the larger one on a tie."""
    return min(range(CHUNK_BYTES, 4 * _PAGE - 1, -_PAGE), key=lambda b: (b % size) / b)


class PoolExhausted(MemoryError):
    """A reserved pool has no chunk left for the object."""


def _populate(m: mmap.mmap) -> None:
    """Commit every page of ``m`` now (MADV_POPULATE_WRITE, else touch)."""
    try:
        m.madvise(_MADV_POPULATE_WRITE)
    except OSError:
        for off in range(0, len(m), _PAGE):
            m[off] = 0


def size_class(length: int) -> int:
    """Index of the size class that holds objects of ``length`` bytes."""
    return (length - 1) // CLASS_STEP


def _committed(nbytes: int) -> int:
    return (nbytes + _PAGE - 1) // _PAGE * _PAGE


class _SizeClass:
    """Slots of one object size; see the module docstring."""

    __slots__ = (
        "size", "per_chunk", "chunks", "live", "free", "stale", "newest",
        "bump", "next_no", "draining",
    )

    def __init__(self, size: int, chunk_bytes: int) -> None:
        self.size = size  # bytes per slot
        self.per_chunk = chunk_bytes // size  # slots per chunk
        self.chunks: dict[int, mmap.mmap] = {}  # chunk number -> memory
        self.live: dict[int, int] = {}  # chunk number -> live objects
        self.free = array("Q")  # freed slot indices, used LIFO
        self.stale = 0  # entries of `free` whose chunk is gone
        self.newest = -1  # chunk being bump-allocated, -1: none
        self.bump = 0  # next never-used slot in the newest chunk
        self.next_no = 0  # number the next chunk gets
        self.draining: set[int] = set()  # chunks being emptied by compaction

    def chunk_bytes(self, no: int) -> int:
        """Committed bytes of chunk ``no``."""
        used = self.bump if no == self.newest else self.per_chunk
        return _committed(used * self.size)


class Pool:
    """Stores byte strings of 1..4096 bytes and hands back object indices.

    ``reserve`` (bytes, rounded down to whole 64 KiB chunks) commits that
    much memory now and serves every chunk from it; 0 maps chunks lazily.
    Not thread-safe: the owner (the swap engine) serialises calls.
    """

    def __init__(self, reserve: int = 0) -> None:
        self.reserve = reserve // CHUNK_BYTES * CHUNK_BYTES  # bytes committed up front
        self._spare: list[mmap.mmap] = []  # reserved chunks not in use
        for _ in range(self.reserve // CHUNK_BYTES):
            m = mmap.mmap(-1, CHUNK_BYTES)
            _populate(m)
            self._spare.append(m)
        self._classes = [self._new_class((i + 1) * CLASS_STEP) for i in range(N_CLASSES)]
        self.mem_used = 0  # bytes committed by all chunks (zram mem_used_total)
        self.payload = 0  # bytes of stored objects (zram compr_data_size)
        self.objects = 0  # objects stored
        self.chunks = 0  # chunks allocated now

    def _new_class(self, size: int) -> _SizeClass:
        return _SizeClass(size, CHUNK_BYTES if self.reserve else chunk_bytes_for(size))

    def fits(self, lengths: list[int]) -> bool:
        """True if objects of these lengths can be stored now.  Always true
        without a reserve; with one, it checks the spare chunks."""
        if not self.reserve:
            return True
        want: dict[int, int] = {}
        for n in lengths:
            c = size_class(n)
            want[c] = want.get(c, 0) + 1
        chunks = 0
        for c, n in want.items():
            cls = self._classes[c]
            room = len(cls.free) - cls.stale + (cls.per_chunk - cls.bump if cls.newest >= 0 else 0)
            if n > room:
                chunks += -(-(n - room) // cls.per_chunk)
        return chunks <= len(self._spare)

    # -- allocation -----------------------------------------------------

    def store(self, data: bytes | memoryview) -> int:
        """Copy ``data`` into the pool; return its object index."""
        length = len(data)
        cls = self._classes[size_class(length)]
        obj = self._alloc(cls)
        no, k = divmod(obj, cls.per_chunk)
        off = k * cls.size
        cls.chunks[no][off:off + length] = data
        cls.live[no] += 1
        self.payload += length
        self.objects += 1
        return obj

    def _alloc(self, cls: _SizeClass) -> int:
        free = cls.free
        while free:
            obj = free.pop()
            if obj // cls.per_chunk in cls.chunks:
                return obj
            cls.stale -= 1
        if cls.newest < 0 or cls.bump >= cls.per_chunk:
            self._new_chunk(cls)
        obj = cls.newest * cls.per_chunk + cls.bump
        before = _committed(cls.bump * cls.size)
        cls.bump += 1
        self.mem_used += _committed(cls.bump * cls.size) - before
        return obj

    def _new_chunk(self, cls: _SizeClass) -> None:
        if self.reserve and not self._spare:
            raise PoolExhausted(f"the {self.reserve}-byte pool reserve is used up")
        no = cls.next_no
        cls.next_no += 1
        if self.reserve:
            cls.chunks[no] = self._spare.pop()
        else:
            cls.chunks[no] = mmap.mmap(-1, cls.per_chunk * cls.size)
        cls.live[no] = 0
        cls.newest = no
        cls.bump = 0
        self.chunks += 1

    # -- access ---------------------------------------------------------

    def load(self, obj: int, length: int) -> bytes:
        """A copy of the object's bytes."""
        cls = self._classes[size_class(length)]
        no, k = divmod(obj, cls.per_chunk)
        off = k * cls.size
        return cls.chunks[no][off:off + length]

    def free(self, obj: int, length: int) -> None:
        """Release an object; a chunk left empty is returned to the kernel."""
        cls = self._classes[size_class(length)]
        no = obj // cls.per_chunk
        left = cls.live[no] - 1
        self.payload -= length
        self.objects -= 1
        if left:
            cls.live[no] = left
            if no not in cls.draining:  # a draining chunk's slots are never reused
                cls.free.append(obj)
            return
        self._drop_chunk(cls, no)

    def _drop_chunk(self, cls: _SizeClass, no: int) -> None:
        carved = cls.bump if no == cls.newest else cls.per_chunk
        self.mem_used -= cls.chunk_bytes(no)
        m = cls.chunks.pop(no)
        if self.reserve:
            self._spare.append(m)  # stays committed for the next chunk
        else:
            m.close()
        del cls.live[no]
        self.chunks -= 1
        if no == cls.newest:
            cls.newest = -1
            cls.bump = 0
        if no in cls.draining:
            cls.draining.discard(no)  # its slots were purged from `free`
        else:
            cls.stale += carved - 1  # all its slots but the last are in `free`
        if not cls.chunks:
            del cls.free[:]
            cls.stale = 0
        elif cls.stale > len(cls.free) // 2:
            self._purge_free(cls)

    @staticmethod
    def _purge_free(cls: _SizeClass) -> None:
        per, keep, drain = cls.per_chunk, cls.chunks, cls.draining
        cls.free = array("Q", (o for o in cls.free if o // per in keep and o // per not in drain))
        cls.stale = 0

    # -- compaction -----------------------------------------------------

    def plan_compaction(self) -> int:
        """Mark the sparsest chunks of each class for draining.

        A chunk is drained only if its live objects fit into the free slots of
        the chunks that stay.  Returns how many chunks were marked.  The owner
        then moves every object for which :meth:`draining` is true with
        :meth:`move`, and calls :meth:`end_compaction`.
        """
        marked = 0
        for cls in self._classes:
            if len(cls.chunks) < 2:
                continue
            holes = sum(cls.per_chunk - n for n in cls.live.values())
            if cls.newest >= 0:
                holes -= cls.per_chunk - cls.bump  # not yet carved: not a hole
            for no, n in sorted(cls.live.items(), key=lambda item: item[1]):
                own_holes = cls.per_chunk - n
                if no == cls.newest:
                    continue
                if n <= holes - own_holes:
                    cls.draining.add(no)
                    holes -= own_holes + n
                    marked += 1
                else:
                    break
            if cls.draining:
                self._purge_free(cls)
        return marked

    def draining(self, obj: int, length: int) -> bool:
        """True if the object sits in a chunk marked by plan_compaction."""
        cls = self._classes[size_class(length)]
        return bool(cls.draining) and obj // cls.per_chunk in cls.draining

    def move(self, obj: int, length: int) -> int:
        """Move an object out of a draining chunk; return its new index."""
        data = self.load(obj, length)
        new = self.store(data)
        self.free(obj, length)
        return new

    def end_compaction(self) -> None:
        """Forget draining marks (normally none are left: drained chunks are
        released as their last object moves out)."""
        for cls in self._classes:
            cls.draining.clear()

    def close(self) -> None:
        """Release every chunk."""
        for cls in self._classes:
            for m in cls.chunks.values():
                m.close()
        for m in self._spare:
            m.close()
        self._spare = []
        self.reserve = 0
        self._classes = [self._new_class(c.size) for c in self._classes]
        self.mem_used = self.payload = self.objects = self.chunks = 0
