"""The virtual swap space: the RFC's vswap device in userspace, as a facade.

The space is addressed by byte offset, like the file the kernel swaps into.
Slot ``s`` is the 4 KiB page at ``s * 4096``.  A page lives in exactly one
backend: its table word (SAME), the compressed pool (POOL) or a slot of a
backing file (PHYS).  Moving a page between backends (writeback,
evacuation, compaction) rewrites that word only; the virtual slot, which
is what the kernel knows, never changes.

The parts, each in its module:

- ``_codec``: same-filled detection, compression and its context pool;
- ``_table``: the dynamic clusters and their ``virtual_table`` words;
- ``_placement``: the store policy, the one path to a backing file,
  writeback, evacuation, compaction and the quarantine of freed slots;
- ``_pool`` and ``_backing``: the two backends that hold data;
- this module: the public operations, and the lock.

The lock discipline, enforced here: every method may be called from any
thread.  One lock, the engine lock (``SwapSpace._lock``), guards the
table, the pool, the backing files' allocators and rmaps, and the
counters; every call into ``_table`` or ``_placement`` is made with it
held.  What runs outside it, and why that is safe:

- compressing written pages (:meth:`SwapSpace.write` encodes before it
  locks) and decompressing read ones, on data the caller owns or that was
  copied under the lock;
- reading backing pages for a read: the words were looked up under the
  lock, and the reader is counted in ``phys_readers`` (see
  ``_placement``), so no physical slot it may read is reused meanwhile;
- faulting spare pool chunks in (:meth:`SwapSpace.replenish`): the slots
  belong to nobody until they are handed over, under the lock.

A write that finds no spare pool chunk (dynamic mode) waits on a condition
of the lock, which releases it, for at most SPARE_WAIT_S: long enough for
housekeeping to fault a burst's chunks in, too short to hang if it cannot.
Once such a wait came to nothing (housekeeping is stuck in reclaim, which
waits on this very daemon), later writes short of spares are refused at
once until housekeeping brings some: under sustained pressure a single
serving thread that waited 0.1 s per refused write served nothing else,
reads included (1,823 refusals, 218 s for the same-cgroup check's hog).

What runs under it, knowingly: the stores of a write (pool copies, and
backing-file writes when the store policy sends pages there), writeback
and evacuation (backing-file I/O, decompression), compaction.  They make
the other threads wait, never the other way round.

Every failure leaves the table, the pool and the rmaps as they were
before the call that failed (:meth:`SwapSpace.check` verifies it); the
tests inject errors at every allocation and I/O point (``_inject``).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from .._consts import (
    CLUSTER_SLOTS,
    DEFAULT_CODEC,
    DEFAULT_FIRST_ALGORITHM,
    DEFAULT_FIRST_LEVEL,
    DEFAULT_LEVEL,
    PAGE,
)
from . import _entry as E
from ._backing import BackingFile
from ._check import check
from ._codec import DEFAULT_HUGE_THRESHOLD, ZERO_WORD, Codec, check_first_algorithm, check_level
from ._placement import DEFAULT_ACCEPT_THRESHOLD, NoSpaceError, Page, Placement
from ._pool import CHUNK_BYTES, SPARE_HIGH, SPARE_LOW, Pool
from ._stats import Counters

_ZERO_PAGE: Final = bytes(PAGE)  # what a never-written or zero page reads as (shared, immutable)

SPARE_WAIT_S: Final = 0.1  # longest a write waits for spare pool chunks (dynamic mode)
RECOMPRESS_BATCH: Final = 64  # pages per recompress() call: ~2.5 ms of zstd here, one lock hold each side


SIZE_FD: Final = "size"  # a memfd holding the space's size: 8 bytes, little-endian


def kept_size(fds: Mapping[str, int]) -> int | None:
    """The size of the space ``fds`` hold (see :meth:`SwapSpace.fds`), None
    if they do not say (fds of a version that did not keep it)."""
    fd = fds.get(SIZE_FD)
    return None if fd is None else int.from_bytes(os.pread(fd, 8, 0), "little")


def backing_of(fds: Mapping[str, int]) -> dict[int, tuple[str, tuple[int, int, int]]]:
    """The backing files among ``fds`` (named by ``BackingFile.fds``): index
    -> (path, (file, directory, checksums)).  The path is the file's own,
    read from /proc."""
    out: dict[int, tuple[str, tuple[int, int, int]]] = {}
    for name, fd in fds.items():
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "backing" and parts[2] == "file":
            i = int(parts[1])
            path = os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")
            out[i] = (path, (fd, fds[f"backing.{i}.dir"], fds[f"backing.{i}.csum"]))
    return out


class SwapSpace:
    """A virtual swap space of ``size`` bytes.

    ``pool_limit`` caps the memory of the compressed pool in bytes (0: no
    cap).  Once it is hit, stores are refused (or, with a backing file,
    written back) until usage falls below ``accept_threshold`` percent of
    it, as zswap does.  Pages that compress to more than ``huge_threshold``
    bytes go to a backing file when there is one and writeback is enabled,
    else they are kept raw in the pool.

    ``fds`` takes over a space a previous process left (the memfds and
    files named by :meth:`fds`, see ``_recover`` in the docs): its pages,
    backing files included, are served again and ``backing`` is ignored.
    The settings must be the ones it was made with (the codec above all).

    ``reserve`` commits that many bytes of pool memory now and stores
    every page in them (see ``_pool``); the pool limit is then at most the
    reserve.  ``dynamic``: new pool chunks come only from spares that
    :meth:`replenish` faulted in beforehand (a housekeeping thread calls
    it), and :meth:`trim` gives spares back; a store that finds none left
    goes to a backing file, or waits up to SPARE_WAIT_S for
    :meth:`replenish` (``spares_wanted`` says so) and is refused if none
    came.  Either way storing a page faults no memory in, which is what a
    daemon needs whose own faults could wait on reclaim that waits on it.

    ``pool_capacity``: the pool arena's address space in bytes (default: RAM;
    a takeover keeps the arena it finds).
    """

    def __init__(
        self,
        size: int,
        *,
        pool_limit: int = 0,
        level: int = DEFAULT_LEVEL,
        first_level: int | None = DEFAULT_FIRST_LEVEL,
        first_algorithm: str = DEFAULT_FIRST_ALGORITHM,
        accept_threshold: int = DEFAULT_ACCEPT_THRESHOLD,
        huge_threshold: int = DEFAULT_HUGE_THRESHOLD,
        writeback_enabled: bool = True,
        backing: Iterable[str] = (),
        reserve: int = 0,
        dynamic: bool = False,
        codec: str = DEFAULT_CODEC,
        fds: Mapping[str, int] | None = None,
        pool_capacity: int = 0,
    ) -> None:
        if reserve < 0:
            raise ValueError(f"reserve must be >= 0 bytes, not {reserve}")
        if reserve and reserve < CHUNK_BYTES:
            raise ValueError(f"a reserve must be at least {CHUNK_BYTES} bytes, not {reserve}")
        if size <= 0 or size % PAGE:
            raise ValueError(f"size must be a positive multiple of {PAGE}, not {size}")
        kept = kept_size(fds) if fds is not None else None
        if kept is not None and kept != size:  # its table covers kept // PAGE slots
            raise ValueError(f"the space to take over was made with {kept} bytes, not {size}")
        self._size_fd = fds.get(SIZE_FD, -1) if fds is not None else -1  # made by fds() if none
        self.size = size
        self.nslots = size // PAGE
        if first_level is not None and codec == "zstd":
            check_level(codec, first_level)
        # fixed for the space's life: the pool's objects are in it (its levels are not)
        self._codec = Codec(codec, first_level=first_level, first_algorithm=first_algorithm)
        self.counters = Counters()
        self._lock = threading.Lock()  # the engine lock: see the module docstring
        # dynamic mode: a write short of spare chunks sets spares_wanted (housekeeping
        # waits on it) and waits on spares_added, trying again at each batch, at most SPARE_WAIT_S
        self.spares_wanted = threading.Event()
        self._spares_added = threading.Condition(self._lock)
        pool = Pool(reserve, dynamic=dynamic, capacity=pool_capacity,
                    fds=(fds["pool"], fds["pool.dir"]) if fds is not None else None)
        self._place = Placement(pool, self._codec, self.counters, self.nslots,
                                writeback_enabled=writeback_enabled,
                                table_fds=(fds["table"], fds["table.owners"]) if fds is not None else None)
        self._table = self._place.table
        self._pool = self._place.pool
        if self._pool.reserve and not pool_limit:
            pool_limit = self._pool.reserve
        self.configure(pool_limit=pool_limit, level=level if codec == "zstd" else None,
                       accept_threshold=accept_threshold, huge_threshold=huge_threshold)
        if fds is not None:
            with self._lock:
                self._place.adopt(backing_of(fds))
        else:
            for path in backing:
                self.add_backing(path)
        self._codec.warm()

    # -- settings -----------------------------------------------------------

    @property
    def codec(self) -> str:
        return self._codec.name

    @property
    def level(self) -> int:
        return self._codec.level

    @property
    def first_level(self) -> int:
        """The zstd level pages are stored at first when ``first_algorithm`` is
        zstd (``level``: one step)."""
        return self._codec.first_level

    @property
    def first_algorithm(self) -> str:
        """What pages are stored with first: ``lz4`` or ``zstd`` (at ``first_level``)."""
        return self._codec.first_algorithm

    @property
    def huge_threshold(self) -> int:
        return self._codec.huge_threshold

    @property
    def pool_limit(self) -> int:
        return self._place.pool_limit

    @property
    def accept_threshold(self) -> int:
        return self._place.accept_threshold

    @property
    def writeback_enabled(self) -> bool:
        return self._place.writeback_enabled

    def configure(
        self,
        *,
        pool_limit: int | None = None,
        level: int | None = None,
        first_level: int | None = None,
        first_algorithm: str | None = None,
        accept_threshold: int | None = None,
        huge_threshold: int | None = None,
        writeback_enabled: bool | None = None,
    ) -> None:
        """Change settings; every value is checked before any is applied."""
        if pool_limit is not None and pool_limit < 0:
            raise ValueError(f"pool_limit must be >= 0 bytes, not {pool_limit}")
        reserve = self._pool.reserve
        if pool_limit is not None and reserve and not 0 < pool_limit <= reserve:
            raise ValueError(f"pool_limit must be 1..{reserve} bytes (the reserve), not {pool_limit}")
        if level is not None:
            check_level(self.codec, level)
        if first_level is not None:
            check_level(self.codec, first_level)
        if first_algorithm is not None:
            check_first_algorithm(self.codec, first_algorithm)
        if accept_threshold is not None and not 0 < accept_threshold <= 100:
            raise ValueError(f"accept_threshold must be a percentage in 1..100, not {accept_threshold}")
        if huge_threshold is not None and not 0 < huge_threshold <= PAGE:
            raise ValueError(f"huge_threshold must be in 1..{PAGE} bytes, not {huge_threshold}")
        with self._lock:
            place = self._place
            if pool_limit is not None:
                place.pool_limit = pool_limit
                place.pool_full = False
            if level is not None or first_level is not None:
                codec = self._codec
                codec.set_levels(codec.level if level is None else level,
                                 codec.fast_level if first_level is None else first_level)
            if first_algorithm is not None:
                self._codec.set_first_algorithm(first_algorithm)
            if accept_threshold is not None:
                place.accept_threshold = accept_threshold
            if huge_threshold is not None:
                self._codec.huge_threshold = huge_threshold
            if writeback_enabled is not None:
                place.writeback_enabled = writeback_enabled

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.counters.invalid_io += 1
            raise ValueError(f"range {offset}+{length} is outside the {self.size}-byte space")

    # -- backing files ---------------------------------------------------------

    def add_backing(self, path: str) -> int:
        """Add a backing file (created sparse at ``path``); returns its index."""
        path = os.path.abspath(path)
        with self._lock:
            return self._place.add(path)

    def fds(self) -> dict[str, int]:
        """The fds that hold the space, by name: hand them to
        ``SwapSpace(..., fds=...)`` in a new process to take it over."""
        with self._lock:
            if self._size_fd < 0:
                self._size_fd = os.memfd_create("vswapfs-size", os.MFD_CLOEXEC)
                os.write(self._size_fd, self.size.to_bytes(8, "little"))
            return {**self._place.fds(), SIZE_FD: self._size_fd}

    def on_fds(self, keep: Callable[[dict[str, int]], None] | None,
               drop: Callable[[list[str]], None] | None) -> None:
        """Call ``keep`` with a new backing file's fds before any page goes
        to it, and ``drop`` with the names of a removed one's."""
        with self._lock:
            self._place.keep_fds, self._place.drop_fds = keep, drop

    def backing_files(self) -> list[BackingFile]:
        """The backing files in use, by index."""
        return [bf for bf in self._place.backing if bf is not None]

    # -- the three operations ------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at byte ``offset``.

        Partial pages are read, modified and stored whole.  Raises
        ValueError outside the space and NoSpaceError when the pool is full
        (or has no chunk ready) and nothing can take the pages; on any
        error nothing stored has changed.
        """
        n = len(data)
        self._check(offset, n)
        if not n:
            return
        mv = memoryview(data).cast("B")
        first = offset // PAGE
        end = (offset + n + PAGE - 1) // PAGE
        pages: list[Page]
        encoded: list[tuple[int, bytes | None]] | None = None
        codec = self._codec
        # the fast first level only while the pool is far from its limit:
        # past half of it, pages are stored dense at once (read without
        # the lock: a stale look only picks the other level for this write)
        limit = self._place.pool_limit
        level = codec.level if limit and self._pool.mem_used * 2 >= limit else None
        try:
            if not (offset | n) % PAGE:  # whole pages: what swap writes
                encoded = codec.encode_pages(mv, level)  # outside the lock
                if encoded is not None:  # views: commit copies what it keeps
                    pages = [mv[i:i + PAGE] for i in range(0, n, PAGE)]
                else:
                    pages = [mv[i:i + PAGE].tobytes() for i in range(0, n, PAGE)]
            else:
                pages = []
                for slot in range(first, end):
                    lo = max(offset, slot * PAGE)
                    hi = min(offset + n, (slot + 1) * PAGE)
                    if hi - lo == PAGE:
                        pages.append(bytes(mv[lo - offset:hi - offset]))
                    else:
                        page = bytearray(self._read_pages(slot, 1))
                        page[lo - slot * PAGE:hi - slot * PAGE] = mv[lo - offset:hi - offset]
                        pages.append(bytes(page))
            if encoded is None:
                encode = codec.encode  # outside the lock
                encoded = [encode(bytes(p), level) for p in pages]
            with self._lock:
                try:
                    self._place.commit(first, pages, encoded)
                except NoSpaceError:
                    place = self._place
                    if not (self._pool.dynamic and place.short_of_spares):
                        raise
                    self.spares_wanted.set()
                    if place.refill_stuck:  # the last wait came to nothing: fail fast until
                        raise  # housekeeping brings spares (see below)
                    self.counters.spare_waits += 1
                    self._commit_when_spares_come(first, pages, encoded)
        except MemoryError as e:  # no memory for the work itself: the kernel gets ENOSPC
            self.counters.failed_writes += 1
            raise NoSpaceError(f"out of memory: {e}") from None
        except OSError:
            self.counters.failed_writes += 1
            raise

    def _commit_when_spares_come(self, first: int, pages: list[Page],
                                 encoded: list[tuple[int, bytes | None]]) -> None:
        """With the lock held, by a write short of spares: wait for housekeeping's
        refill (the lock released meanwhile), committing again at each batch it
        hands over, for at most SPARE_WAIT_S; then mark the refill stuck and
        try once more (raising NoSpaceError if still short)."""
        place = self._place
        until = time.monotonic() + SPARE_WAIT_S
        while True:
            left = until - time.monotonic()
            if left <= 0 or not self._spares_added.wait(left):
                place.refill_stuck = True
                place.commit(first, pages, encoded)  # the last try
                return
            try:
                place.commit(first, pages, encoded)
                return
            except NoSpaceError:
                if not place.short_of_spares:
                    raise

    def read(self, offset: int, size: int) -> bytes | memoryview:
        """Read ``size`` bytes at ``offset``; never-written space reads as
        zeros.  A backing page that cannot be read or fails its checksum,
        or a pool object that does not decompress, raises OSError(EIO);
        no other page is affected."""
        self._check(offset, size)
        if not size:
            return b""
        first = offset // PAGE
        end = (offset + size + PAGE - 1) // PAGE
        try:
            out = self._read_pages(first, end - first)
        except MemoryError as e:
            self.counters.failed_reads += 1
            raise OSError(errno.ENOMEM, f"out of memory: {e}") from None
        except OSError:
            self.counters.failed_reads += 1
            raise
        skip = offset - first * PAGE
        if skip == 0 and size == len(out):
            return out
        return memoryview(out)[skip:skip + size]

    def _read_pages(self, first: int, count: int) -> bytes:
        """Look the words up and copy pool objects under the lock; read
        backing pages and decompress outside it.  One page (what a swap-in
        asks for) is returned as it was decoded; more are decoded straight
        into the one bytes object returned with lz4 in C (``Codec.gather``),
        else decoded and joined."""
        pages = [_ZERO_PAGE] * count
        blobs: list[tuple[int, bytes]] = []
        phys: list[tuple[int, int, BackingFile]] = []
        place = self._place
        with self._lock:
            clusters = self._table.clusters
            backing = place.backing
            for i in range(count):
                slot = first + i
                cl = clusters.get(slot // CLUSTER_SLOTS)
                if cl is None:
                    continue
                word = cl.table[slot % CLUSTER_SLOTS]
                t = word & E.TAG_MASK
                if t == E.POOL:
                    blobs.append((i, self._pool.load(E.pool_object(word), E.pool_length(word))))
                elif t == E.SAME:
                    if word != ZERO_WORD:
                        pages[i] = E.same_page(word)
                elif t == E.PHYS:
                    bf = backing[E.phys_file(word)]
                    assert bf is not None
                    phys.append((i, word, bf))
            if phys:
                place.phys_readers += 1  # until we are done, no physical slot is reused
        try:
            for i, word, bf in phys:
                pages[i] = self._read_phys_stable(first + i, word, bf)
        finally:
            if phys:
                with self._lock:
                    place.phys_readers -= 1
                    if not place.phys_readers:
                        place.readers_done()
        if count > 1:  # one page is returned as decoded: nothing to join
            joined = self._codec.gather(pages, blobs)  # lz4 in C: decoded into one object
            if joined is not None:
                return joined
        codec = self._codec  # a direct call, compiled: a swap-in's one page comes this way
        for i, blob in blobs:
            pages[i] = codec.decode(blob)
        return pages[0] if count == 1 else b"".join(pages)

    def _read_phys_stable(self, slot: int, word: int, bf: BackingFile) -> bytes:
        """Read a backing page without the lock (counted in ``phys_readers``).
        If the read fails because the page moved meanwhile (writeback,
        evacuation), read it where it is now; if it did not move, the
        error is real."""
        try:
            return self._place.read_phys(word, bf, final=False)
        except OSError as e:
            with self._lock:
                if self._table.word(slot) == word:
                    self._place.count_read_error(e)
                    raise
            return self._read_pages(slot, 1)

    def discard(self, offset: int, length: int) -> None:
        """Free ``length`` bytes at ``offset``, like a punched hole: whole pages
        are released, the covered parts of partial pages are zeroed.  The
        whole pages are freed first, so a partial page that cannot be
        stored again (ENOSPC) frees no less."""
        self._check(offset, length)
        if not length:
            return
        end = offset + length
        lo = (offset + PAGE - 1) // PAGE  # first whole page
        hi = end // PAGE  # end of the whole pages
        if lo < hi:
            with self._lock:
                self.counters.notify_free += self._table.free(lo, hi)
                self._place.note_mem()
        partial = [(offset, end)] if lo > hi else [(offset, lo * PAGE), (hi * PAGE, end)]
        for a, b in partial:
            if a < b and self.entry(a // PAGE):
                self.write(a, bytes(b - a))

    def release_all_but(self, keep: int, unless: Callable[[], bool] | None = None) -> int | None:
        """Free every page after the first ``keep`` bytes (a page multiple),
        counted as ``swapoff_freed_pages``; returns the pages freed.
        ``unless`` is asked under the lock first: if it says True, nothing
        is freed and None is returned (whoever decided to free may have
        looked before a write that this lock then let through)."""
        with self._lock:
            if unless is not None and unless():
                return None
            freed = self._table.free(keep // PAGE, self.nslots)
            self.counters.swapoff_freed_pages += freed
            self._place.note_mem()
            return freed

    def entry(self, slot: int) -> int:
        """The table word of virtual slot ``slot`` now (see ``_entry``)."""
        with self._lock:
            return self._table.word(slot)

    # -- backend transfer ----------------------------------------------------

    def writeback(self, pages: int | None = None) -> int:
        """Move up to ``pages`` (None: all) least-recently-written pool pages
        to a backing file; returns how many moved."""
        with self._lock:
            if self._place.target() is None:
                raise OSError(errno.ENODEV, "no backing file to write back to")
            moved = self._place.writeback(pages)
            self._place.note_mem()
            return moved

    def remove_backing(self, path: str) -> int:
        """Evacuate a backing file, then close and delete it.

        Its pages move to another backing file, or into the pool when there
        is none; they are found through the file's rmap and only their table
        words change.  Returns the pages moved.  If some cannot be moved
        (read error, no room), the error is raised and the file stays with
        the pages that are left.
        """
        path = os.path.abspath(path)
        with self._lock:
            return self._place.remove(path)

    def recompress(self, pages: int = RECOMPRESS_BATCH) -> int:
        """Make up to ``pages`` pool pages written since the last call denser:
        stored first (lz4, or zstd at ``first_level``), they are compressed again at ``level``
        (oldest cluster first; a page already at ``level`` gains nothing and
        stays).  The words and object copies are taken under the lock, the
        compression runs outside it, and each page is put in place only if
        it was not rewritten meanwhile (``Placement.settle``): a read or
        write waits for neither.  Returns the pages looked at, 0 when there
        is nothing left to look at (or one step only) or no pool chunk was
        ready for a dense object (the pages left keep their mark).  Memory
        comes back once chunks empty or :meth:`compact` packs them."""
        codec = self._codec
        if not codec.two_step:
            return 0
        with self._lock:
            pool = self._pool
            batch = [(slot, w, pool.load(E.pool_object(w), E.pool_length(w)))
                     for slot, w in self._table.fresh_words(pages)]
        dense: list[bytes | None] = []
        for _, _, blob in batch:
            try:
                dense.append(codec.recompress(blob))
            except (OSError, MemoryError):  # a corrupt object stays as it is: reads report it
                dense.append(None)
        if any(d is not None for d in dense):
            with self._lock:
                if not self._place.settle(batch, dense):
                    return 0
        return len(batch)

    def compact(self, *, yielding: bool = False, until: Callable[[], bool] | None = None) -> int:
        """Pack sparse pool chunks together; returns 4 KiB pages freed.  A
        move that finds no chunk ready ends the compaction early.

        ``yielding``: take the lock for one cluster's moves at a time, so
        that reads and writes go on between them (for housekeeping; chunks
        being drained take no new objects meanwhile, see ``_pool``), and
        stop early once ``until()`` is true."""
        if not yielding:
            with self._lock:
                freed = self._place.compact() // PAGE
                self.counters.pages_compacted += freed
                return freed
        place, pool = self._place, self._pool
        with self._lock:
            if not pool.plan_compaction():
                place.end_compaction()
                return 0
            clusters = list(self._table.clusters)
        freed = 0  # bytes, counted per step: what others free between steps is theirs
        try:
            for ci in clusters:
                with self._lock:
                    before = pool.mem_used
                    ok = place.compact_cluster(ci)
                    freed += max(before - pool.mem_used, 0)
                if not ok or (until is not None and until()):
                    break
        finally:
            with self._lock:
                place.end_compaction()
                self.counters.pages_compacted += freed // PAGE
        return freed // PAGE

    # -- memory kept for the serving path (dynamic mode) ---------------------

    def replenish(self, busy: bool = True) -> int:
        """Fault spare pool chunks in, up to the pool's high mark (its low
        mark if not ``busy``), in dynamic mode; nothing otherwise.  Returns
        the bytes faulted in.  The faulting runs without the engine lock:
        a thread here that waits on reclaim holds up nobody who serves."""
        return self._place.replenish(self._spares_added, SPARE_HIGH if busy else SPARE_LOW)

    def trim(self) -> None:
        """Give back memory kept only to make the next burst cheaper: the
        backing files' write buffers and the spare pool chunks beyond the
        idle mark.  For idle time, after frees."""
        with self._lock:
            for bf in self.backing_files():
                bf.release_buffers()
                bf.tidy()
            self._pool.shed()
            self._table.shed()

    # -- state ---------------------------------------------------------------

    @property
    def stored_pages(self) -> int:
        """Slots holding data, any backend."""
        tp = self._table.tag_pages
        return tp[E.SAME] + tp[E.POOL] + tp[E.PHYS]

    def stats(self) -> dict[str, int]:
        """Every counter and gauge, by name (described in ``_stats``)."""
        with self._lock:
            s = self._place.gauges()
            s["disksize"] = self.size
            s.update(self.counters.as_dict())
            return s

    def check(self) -> list[str]:
        """Consistency of everything the engine keeps, for tests and for
        recovery: every table word's target exists and is used once, every
        rmap entry points back at its word, the per-cluster and global
        gauges match a recount, and the pool and file accounting sum.
        Returns the problems found (none: an empty list)."""
        with self._lock:
            return check(self._place)

    def close(self) -> None:
        """Release all memory and delete the backing files."""
        with self._lock:
            self._place.close()
            if self._size_fd >= 0:
                os.close(self._size_fd)
                self._size_fd = -1
