"""A zsmalloc-like allocator for compressed pages, over one memfd arena.

Objects are packed into size classes 16 bytes apart (16, 32, ... 4096).  Each
class carves fixed-size slots out of chunks of 16-64 KiB (sized per class so
that little is left over at the tail).  There is no Python object per stored
page: a class keeps its chunks in a dict, a bump pointer for the newest chunk
and an ``array`` stack of freed slot indices.

**One mapping, however much is stored.**  Every chunk lives in a 64 KiB slot
of a single memfd that is mapped once, for the pool's whole capacity (RAM
by default: the virtual size costs nothing until written).  A chunk that
empties is given back by punching a hole in the memfd, which works on
mlocked memory (``MADV_DONTNEED`` does not) and leaves the one mapping
whole.  So the daemon's mapping count does not grow with the data, and
``vm.max_map_count`` never caps the pool.

**The serving path never faults memory in.**  A new chunk is taken from a
list of *spare* chunks whose memory was faulted in beforehand.  Three modes:

- ``inline`` (a library user, the default): an empty spare list is refilled
  on the spot, by the thread that stores;
- ``dynamic`` (the daemon): only :meth:`Pool.refill`, called by a
  housekeeping thread outside every lock, faults chunks in; a store that
  finds no spare raises :class:`PoolExhausted` and the caller answers from
  what it has (a backing file, or ENOSPC).  :meth:`Pool.shed` gives spares
  back when the daemon is idle;
- ``reserve`` (``--reserve``): ``reserve`` bytes of chunks are faulted in at
  start and are the whole pool; emptied chunks go back to the spare list and
  nothing is ever given back or added.

An object is named by its class (derived from its length) and an index
``chunk_no * per_chunk + k``.  Chunk numbers are never reused, so an index
left in a free stack after its chunk was released is recognised as stale.

**It outlives the process.**  The arena is a memfd, and a second, small
memfd, the *directory*, says for each 64 KiB slot of the arena which
class and chunk number it holds (0: none).  An entry is written before
the chunk's first object and cleared after its last one was freed.  With
the table's words (which name class, chunk and slot of every object)
that is all a new process needs to take the pool over (:meth:`Pool.adopt`):
the chunks, their live counts, the free slots and the gauges follow.

Memory accounting follows zsmalloc: a chunk counts for all of its bytes
from the moment it is given to a class (its memory is faulted in then),
freed slots inside it keep counting until the chunk empties or is
compacted.  Spare chunks are counted apart (``spare_bytes``).
"""

from __future__ import annotations

import mmap
import os
from array import array
from typing import Final

from mypy_extensions import mypyc_attr

from .. import linux
from .._consts import PAGE as _PAGE
from . import _inject

_ARMED: Final = _inject.armed  # changed in place, never rebound; Final: a C static when compiled

CLASS_STEP: Final = 16
N_CLASSES: Final = 4096 // CLASS_STEP
CHUNK_BYTES: Final = 64 * 1024  # the largest chunk, and the arena's slot size
SPARE_LOW: Final = 32  # dynamic mode: spare chunks kept while idle (2 MiB)
SPARE_HIGH: Final = 256  # dynamic mode: spare chunks refilled to while busy (16 MiB)
DIR_NO_SHIFT: Final = 16  # a directory entry: chunk number above, class index + 1 below


def chunk_bytes_for(size: int) -> int:
    """Chunk size for objects of ``size`` bytes: the multiple of 4 KiB from
    16 to 64 KiB that wastes least at its tail (zsmalloc's choice of
    pages per zspage), the larger one on a tie."""
    return min(range(CHUNK_BYTES, 4 * _PAGE - 1, -_PAGE), key=lambda b: (b % size) / b)


@mypyc_attr(native_class=False)  # mypyc compiles no subclass of MemoryError
class PoolExhausted(MemoryError):
    """No chunk is ready for the object: the reserve is used up, the spare
    list is empty (dynamic mode), or the arena is full."""


def size_class(length: int) -> int:
    """Index of the size class that holds objects of ``length`` bytes."""
    return (length - 1) // CLASS_STEP


def default_capacity() -> int:
    """The arena's size when none is given: RAM, in whole chunks."""
    return max(linux.mem_total() // CHUNK_BYTES, 1) * CHUNK_BYTES


class _SizeClass:
    """Slots of one object size; see the module docstring."""

    __slots__ = (
        "size", "per_chunk", "chunk_bytes", "chunks", "live", "free", "stale", "newest",
        "bump", "next_no", "draining",
    )

    def __init__(self, size: int, chunk_bytes: int) -> None:
        self.size = size  # bytes per slot
        self.chunk_bytes = chunk_bytes  # bytes of a chunk of this class
        self.per_chunk = chunk_bytes // size  # slots per chunk
        self.chunks: dict[int, int] = {}  # chunk number -> its byte offset in the arena
        self.live: dict[int, int] = {}  # chunk number -> live objects
        self.free = array("Q")  # freed slot indices, used LIFO
        self.stale = 0  # entries of `free` whose chunk is gone
        self.newest = -1  # chunk being bump-allocated, -1: none
        self.bump = 0  # next never-used slot in the newest chunk
        self.next_no = 0  # number the next chunk gets
        self.draining: set[int] = set()  # chunks being emptied by compaction


class Pool:
    """Stores byte strings of 1..4096 bytes and hands back object indices.

    ``reserve`` (bytes, rounded down to whole 64 KiB chunks) makes it a
    fixed pool of that much memory, faulted in now; else ``dynamic`` says
    whether only :meth:`refill` may fault chunks in (see the module
    docstring).  ``capacity`` is the arena's size (default: RAM).
    Not thread-safe: the owner (the swap engine) serialises calls, except
    :meth:`refill`'s faulting, which runs without it (see there).
    """

    def __init__(self, reserve: int = 0, *, dynamic: bool = False, capacity: int = 0,
                 fds: tuple[int, int] | None = None) -> None:
        self.reserve = reserve // CHUNK_BYTES * CHUNK_BYTES  # bytes committed up front, for good
        self.dynamic = dynamic and not self.reserve
        if self.reserve:
            capacity = self.reserve
        capacity = (capacity or default_capacity()) // CHUNK_BYTES * CHUNK_BYTES
        self._slots = capacity // CHUNK_BYTES  # 64 KiB slots in the arena
        if fds is None:  # a new pool; else the (arena, directory) memfds a previous process left
            fds = (os.memfd_create("vswapfs-pool", os.MFD_CLOEXEC),
                   os.memfd_create("vswapfs-pool-dir", os.MFD_CLOEXEC))
            os.ftruncate(fds[0], capacity)
            os.ftruncate(fds[1], 8 * self._slots)
        else:
            capacity = os.fstat(fds[0]).st_size  # as it was made
            self._slots = capacity // CHUNK_BYTES
        self.capacity = capacity  # bytes of the arena
        self._fd, self.dir_fd = fds
        self._map = mmap.mmap(self._fd, capacity)
        self._base = linux.buffer_address(self._map)
        self._dir_map = mmap.mmap(self.dir_fd, 8 * self._slots)
        # arena slot -> (chunk number << DIR_NO_SHIFT) | (class index + 1); 0: not a chunk
        self._dir = memoryview(self._dir_map).cast("Q")
        self._dir_base = linux.buffer_address(self._dir_map)
        self._next_slot = 0  # slots below this have been used at least once
        self._free_slots = array("Q")  # offsets of slots below _next_slot not in use (holes)
        self._spare = array("Q")  # offsets of faulted-in slots not in use
        self._classes = [_SizeClass((i + 1) * CLASS_STEP, CHUNK_BYTES if self.reserve
                                    else chunk_bytes_for((i + 1) * CLASS_STEP)) for i in range(N_CLASSES)]
        self.mem_used = 0  # bytes of chunks given to classes (zram mem_used_total)
        self.payload = 0  # bytes of stored objects (zram compr_data_size)
        self.objects = 0  # objects stored
        self.chunks = 0  # chunks in use now
        if self.reserve and not any(self._dir):
            offs = self._take_slots(self._slots)
            linux.populate(self._base, capacity)
            self._spare.extend(offs)

    @property
    def fds(self) -> dict[str, int]:
        """The memfds that hold the pool: what a new process adopts."""
        return {"pool": self._fd, "pool.dir": self.dir_fd}

    @property
    def spare_bytes(self) -> int:
        """Bytes of faulted-in chunks not in use (the reserve or the dynamic spares)."""
        return len(self._spare) * CHUNK_BYTES

    # -- the arena's slots ------------------------------------------------

    def _take_slots(self, n: int) -> list[int]:
        """Up to ``n`` unused slot offsets (holes first), not yet spare."""
        out: list[int] = []
        free = self._free_slots
        while free and len(out) < n:
            out.append(free.pop())
        while len(out) < n and self._next_slot < self._slots:
            out.append(self._next_slot * CHUNK_BYTES)
            self._next_slot += 1
        return out

    def _punch(self, off: int, length: int = CHUNK_BYTES) -> None:
        linux.punch_hole(self._fd, off, length)

    @property
    def spare_chunks(self) -> int:
        """Faulted-in chunks not in use: a store of this many objects or fewer
        never finds none ready (each object takes one new chunk at most)."""
        return len(self._spare)

    def refill_wanted(self, mark: int = SPARE_HIGH, need: int = 0) -> list[int]:
        """Slots to fault in so that the spare list reaches ``mark``
        (dynamic mode; none otherwise), if it is below 3/4 of it or below
        ``need``.  Call with the owner's lock; fault them in with
        :meth:`fault_in` without it, then :meth:`add_spare`."""
        if not self.dynamic or len(self._spare) >= max(mark * 3 // 4, need):
            return []
        return self._take_slots(mark - len(self._spare))

    def fault_in(self, offs: list[int]) -> None:
        """Fault the given slots in.  Needs no lock (the slots belong to no
        one yet); the GIL is released while the kernel works.  Raises
        PoolExhausted if the kernel has no memory for them."""
        try:
            if _ARMED:
                for _ in offs:
                    _inject.point("pool.chunk")
            linux.populate_all(self._base, offs, CHUNK_BYTES)  # adjacent chunks in one call
            # and the directory's pages that name them, which a new chunk writes
            linux.populate_all(self._dir_base, {off // CHUNK_BYTES * 8 // _PAGE * _PAGE for off in offs},
                               _PAGE, owned=False)  # they name other chunks too
        except (OSError, MemoryError) as e:
            raise PoolExhausted(f"cannot fault a pool chunk in: {e}") from None

    def add_spare(self, offs: list[int]) -> None:
        """Hand faulted-in slots to the spare list (with the owner's lock)."""
        self._spare.extend(offs)

    def give_back_slots(self, offs: list[int]) -> None:
        """Return slots from :meth:`refill_wanted` that could not be faulted in."""
        for off in offs:
            self._punch(off)
            self._free_slots.append(off)

    def shed(self, keep: int = SPARE_LOW) -> int:
        """Give spare chunks beyond ``keep`` back to the kernel (dynamic
        mode, when idle); returns the bytes given back."""
        if not self.dynamic:
            return 0
        n = 0
        while len(self._spare) > keep:
            off = self._spare.pop()
            self._punch(off)
            self._free_slots.append(off)
            n += CHUNK_BYTES
        return n

    # -- allocation -----------------------------------------------------

    def new_chunks(self, lengths: list[int]) -> tuple[int, int]:
        """(chunks, bytes of them) that storing objects of these lengths
        would add: what does not fit in the classes' free and uncarved slots."""
        want: dict[int, int] = {}
        for n in lengths:
            c = size_class(n)
            want[c] = want.get(c, 0) + 1
        chunks = nbytes = 0
        for c, n in want.items():
            cls = self._classes[c]
            room = len(cls.free) - cls.stale + (cls.per_chunk - cls.bump if cls.newest >= 0 else 0)
            if n > room:
                k = -(-(n - room) // cls.per_chunk)
                chunks += k
                nbytes += k * cls.chunk_bytes
        return chunks, nbytes

    def fits(self, lengths: list[int], chunks: int | None = None) -> bool:
        """True if objects of these lengths (needing ``chunks`` new chunks,
        see :meth:`new_chunks`) can be stored now without faulting memory
        in (inline mode: if the arena has room)."""
        if chunks is None:
            chunks = self.new_chunks(lengths)[0]
        have = len(self._spare)
        if not self.reserve and not self.dynamic:
            have += len(self._free_slots) + self._slots - self._next_slot
        return chunks <= have

    def store(self, data: bytes | memoryview) -> int:
        """Copy ``data`` into the pool; return its object index.  Raises
        PoolExhausted (and stores nothing) if no chunk is ready for it."""
        length = len(data)
        cls = self._classes[size_class(length)]
        obj = self._alloc(cls)
        per = cls.per_chunk  # not divmod: compiled, // and % stay native int arithmetic
        no = obj // per
        off = cls.chunks[no] + obj % per * cls.size
        self._map[off:off + length] = data
        if _ARMED:
            _inject.point("pool.store")
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
        cls.bump += 1
        return obj

    def _new_chunk(self, cls: _SizeClass) -> None:
        if not self._spare:
            if self.reserve:
                raise PoolExhausted(f"the {self.reserve}-byte pool reserve is used up")
            if self.dynamic:
                raise PoolExhausted("no spare pool chunk is ready (the refill is behind)")
            offs = self._take_slots(1)
            if not offs:
                raise PoolExhausted(f"the {self.capacity}-byte pool arena is full")
            try:
                self.fault_in(offs)
            except PoolExhausted:
                self.give_back_slots(offs)
                raise
            self._spare.extend(offs)
        off = self._spare.pop()
        if cls.chunk_bytes < CHUNK_BYTES and not self.reserve:
            self._punch(off + cls.chunk_bytes, CHUNK_BYTES - cls.chunk_bytes)  # the unused tail
        no = cls.next_no
        cls.next_no += 1
        self._dir[off // CHUNK_BYTES] = (no << DIR_NO_SHIFT) | (size_class(cls.size) + 1)
        if _ARMED:
            _inject.point("pool.new")
        cls.chunks[no] = off
        cls.live[no] = 0
        cls.newest = no
        cls.bump = 0
        self.chunks += 1
        self.mem_used += cls.chunk_bytes

    # -- access ---------------------------------------------------------

    def offset(self, obj: int, length: int) -> int:
        """Where the object of ``length`` bytes starts in the arena (its memfd)."""
        cls = self._classes[size_class(length)]
        per = cls.per_chunk  # not divmod: compiled, // and % stay native int arithmetic
        return cls.chunks[obj // per] + obj % per * cls.size

    def load(self, obj: int, length: int) -> bytes:
        """A copy of the object's bytes."""
        off = self.offset(obj, length)
        return self._map[off:off + length]

    def holds(self, obj: int, length: int) -> bool:
        """True if ``obj`` names a live slot (for consistency checks: a slot
        that is on its class's free stack or was never carved is not)."""
        cls = self._classes[size_class(length)]
        no, k = divmod(obj, cls.per_chunk)
        return no in cls.chunks and not (no == cls.newest and k >= cls.bump)

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
        self.mem_used -= cls.chunk_bytes
        off = cls.chunks.pop(no)
        self._dir[off // CHUNK_BYTES] = 0  # empty: no word names it any more
        if _ARMED:
            _inject.point("pool.drop")
        if self.reserve:
            self._spare.append(off)  # stays faulted in for the next chunk
        elif self.dynamic and cls.chunk_bytes == CHUNK_BYTES and len(self._spare) < SPARE_LOW:
            self._spare.append(off)  # whole and faulted in: a spare as it is (beyond the low
            # mark it is given back at once, so memory returns as soon as it is freed)
        else:
            self._punch(off, cls.chunk_bytes)
            self._free_slots.append(off)
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
        :meth:`move`, and calls :meth:`end_compaction` (also when a move
        failed: see there).
        """
        marked = 0
        for cls in self._classes:
            if len(cls.chunks) < 2:
                continue
            holes = sum(cls.per_chunk - n for no, n in cls.live.items() if no not in cls.draining)
            if cls.newest >= 0:
                holes -= cls.per_chunk - cls.bump  # not yet carved: not a hole
            for no, n in sorted(cls.live.items(), key=lambda item: item[1]):
                own_holes = cls.per_chunk - n
                if no == cls.newest or no in cls.draining:
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

    def copy(self, obj: int, length: int) -> int:
        """Copy an object out of a draining chunk; return the new index.
        The caller points the word at it, then frees the old one."""
        if _ARMED:
            _inject.point("pool.move")
        return self.store(self.load(obj, length))

    def end_compaction(self) -> None:
        """End a compaction.  Normally no draining chunk is left (each is
        released as its last object moves out).  After a failed move some
        keep objects: they stay sealed (their free slots are not reused)
        until they empty by themselves, which wastes their holes for a
        while but keeps every count right."""
        for cls in self._classes:
            cls.draining &= cls.chunks.keys()

    # -- a new process takes over ---------------------------------------

    def per_chunk(self, c: int) -> int:
        """Objects per chunk of class ``c``."""
        return self._classes[c].per_chunk

    def adopt(self, objects: dict[tuple[int, int], dict[int, int]]) -> list[tuple[int, int]]:
        """Take over the chunks a previous process left, given for each
        (class index, chunk number) the slots in it that table words name,
        with each object's length.
        Rebuilds the chunks, live counts, free stacks and gauges; chunks no
        word names are given back, and so is every arena slot that is not
        a chunk (spares, in dynamic mode; a reserve keeps them as spares).
        Returns the (class index, object) pairs named by words whose chunk
        is not in the directory, which a crash-safe engine never leaves."""
        seen: set[tuple[int, int]] = set()
        used_slots: list[int] = []
        for s, e in enumerate(self._dir.tolist()):
            if not e:
                continue
            c, no = (e & ((1 << DIR_NO_SHIFT) - 1)) - 1, e >> DIR_NO_SHIFT
            live = objects.get((c, no))
            if not 0 <= c < N_CLASSES or not live:  # emptied, the directory not yet cleared
                self._dir[s] = 0
                continue
            cls = self._classes[c]
            off = s * CHUNK_BYTES
            cls.chunks[no] = off
            cls.live[no] = len(live)
            cls.next_no = max(cls.next_no, no + 1)
            cls.free.extend(no * cls.per_chunk + k for k in range(cls.per_chunk - 1, -1, -1)
                            if k not in live)
            seen.add((c, no))
            used_slots.append(s)
            self.chunks += 1
            self.mem_used += cls.chunk_bytes
            self.objects += len(live)
            self.payload += sum(live.values())
        self._next_slot = max(used_slots) + 1 if used_slots else 0
        busy = set(used_slots)
        holes = [s for s in range(self._next_slot) if s not in busy]
        if self.reserve:  # every slot of a reserve is faulted in: not a chunk, a spare
            self._spare.extend(s * CHUNK_BYTES for s in range(self._slots) if s not in busy)
            self._next_slot = self._slots
        else:
            self._free_slots.extend(s * CHUNK_BYTES for s in holes)
            if self._next_slot < self._slots:
                self._punch(self._next_slot * CHUNK_BYTES, self.capacity - self._next_slot * CHUNK_BYTES)
            for s in holes:
                self._punch(s * CHUNK_BYTES)
        return [(c, no * self._classes[c].per_chunk + k) for (c, no), ks in objects.items()
                if (c, no) not in seen for k in ks]

    def close(self) -> None:
        """Release every chunk and the arena."""
        self._dir.release()
        self._dir_map.close()
        os.close(self.dir_fd)
        self._map.close()
        os.close(self._fd)
        self._fd = self.dir_fd = -1
        self._spare = array("Q")
        self._free_slots = array("Q")
        self.mem_used = self.payload = self.objects = self.chunks = 0
