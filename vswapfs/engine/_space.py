"""The virtual swap space: the RFC's vswap device in userspace.

The space is addressed by byte offset, like the file the kernel swaps into.
Slot ``s`` is the 4 KiB page at ``s * 4096``; cluster ``c`` is slots
``c * 512 .. c * 512 + 511``.  A cluster exists only while one of its slots
holds data: it is created by the first write into it and dropped when its
last slot is freed, so unused capacity costs nothing (a dict keyed by
cluster index plays the kernel's xarray).  Each cluster's ``table`` is the
RFC's ``virtual_table``: one 64-bit entry word per slot, see ``_entry``.

A page lives in exactly one backend: its table word (SAME), the compressed
pool (POOL) or a slot of a backing file (PHYS).  Moving a page between
backends (writeback, evacuation, compaction) rewrites that word only; the
virtual slot, which is what the kernel knows, never changes.

Pages are compressed with zstd (level 1 by default) or, for a space made
with ``codec="lz4"``, with lz4: twice as fast, a quarter less dense on
text.  The codec is fixed for the space's life (the pool holds its output).

Threading: every method may be called from any thread.  One lock, the
engine lock (``SwapSpace._lock``), guards the tables, the pool, the
backing files' allocators and rmaps, and the counters.  What runs outside
it, and why that is safe:

- compressing written pages and decompressing read ones (zstandard
  releases the GIL), on data the caller owns or copied under the lock;
- reading backing pages for a read: the words were looked up under the
  lock, and while any such read is in flight (``_phys_readers``) no
  physical slot is freed, only quarantined (``_deferred``), so a slot
  cannot be reused under a reader and hand it another page;
- faulting spare pool chunks in (:meth:`SwapSpace.replenish`): the slots
  belong to nobody until they are handed over, under the lock.

What runs under it, knowingly: the stores of a write (pool copies, and
backing-file writes when the store policy sends pages there), writeback
and evacuation (backing-file I/O, decompression), compaction.  They make
the other threads wait, never the other way round.

zstd contexts are shared through a small free list rather than kept per
thread: a thread that compresses once does not keep a context for good,
and the first ones are made (and their code faulted in) at start, not in
the middle of a burst.

Every failure leaves the tables, the pool and the rmaps as they were
before the call that failed (:meth:`SwapSpace.check` verifies it); the
tests inject errors at every allocation and I/O point (``_inject``).
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from array import array
from collections.abc import Iterable
from types import ModuleType
from typing import Final

import zstandard

from . import _entry as E
from . import _inject
from ._backing import BackingChecksumError, BackingFile, checksum
from ._pool import CHUNK_BYTES, SPARE_HIGH, SPARE_LOW, Pool, PoolExhausted, size_class
from ._stats import Counters

PAGE: Final = E.PAGE_SIZE
CLUSTER_SLOTS: Final = 512
CLUSTER_BYTES: Final = PAGE * CLUSTER_SLOTS
CODECS: Final = ("zstd", "lz4")  # zstd for the ratio, lz4 for speed (zram's comp_algorithm)
DEFAULT_CODEC: Final = "zstd"
DEFAULT_LEVEL: Final = 1
MIN_LEVEL: Final = -100  # zstd's fast levels (negative) trade ratio for speed
MAX_LEVEL: Final = zstandard.MAX_COMPRESSION_LEVEL
DEFAULT_HUGE_THRESHOLD: Final = PAGE * 3 // 4
DEFAULT_ACCEPT_THRESHOLD: Final = 90
WRITEBACK_BATCH: Final = 256

QUARANTINED: Final = -3  # rmap value of a freed physical slot a reader may still read
_ZERO_PAGE: Final = bytes(PAGE)
_ZERO_WORD: Final = E.same_word(0)
_EMPTY_TABLE: Final = bytes(8 * CLUSTER_SLOTS)
_WARM_PAGE: Final = b"vswapfs warms its zstd contexts up. " * 113 + bytes(28)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """A page compressor: no frame checksum, size or dictionary id (the
    table word knows the length).  zstd sizes its window and tables for
    the 4 KiB input by itself (an 86 KB context at level 1)."""
    return zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=False,
                                    write_dict_id=False)


class NoSpaceError(OSError):
    """The pool is at its limit and no backing file can take the page."""

    def __init__(self, msg: str) -> None:
        super().__init__(errno.ENOSPC, msg)


class _Cluster:
    """A dynamic cluster: its virtual_table and how many slots are in use."""

    __slots__ = ("table", "used", "pool")

    def __init__(self) -> None:
        self.table = array("Q", _EMPTY_TABLE)  # the virtual_table, 8 bytes a slot
        self.used = 0  # slots whose word is not NONE
        self.pool = 0  # slots whose word is POOL (writeback skips clusters at 0)


# Bytes one live cluster costs: the object, its table and its dict entry.
_CLUSTER_FOOTPRINT: Final = (sys.getsizeof(_Cluster()) + sys.getsizeof(array("Q", _EMPTY_TABLE))
                             + 3 * 8)


class SwapSpace:
    """A virtual swap space of ``size`` bytes.

    ``pool_limit`` caps the memory of the compressed pool in bytes (0: no
    cap).  Once it is hit, stores are refused (or, with a backing file,
    written back) until usage falls below ``accept_threshold`` percent of
    it, as zswap does.  Pages that compress to more than ``huge_threshold``
    bytes go to a backing file when there is one and writeback is enabled,
    else they are kept raw in the pool.

    ``reserve`` commits that many bytes of pool memory now and stores
    every page in them (see ``_pool``); the pool limit is then at most the
    reserve.  ``dynamic``: new pool chunks come only from spares that
    :meth:`replenish` faulted in beforehand (a housekeeping thread calls
    it), and :meth:`trim` gives spares back; a store that finds none left
    goes to a backing file or is refused.  Either way storing a page
    faults no memory in, which is what a daemon needs whose own faults
    could wait on reclaim that waits on it.
    """

    def __init__(
        self,
        size: int,
        *,
        pool_limit: int = 0,
        level: int = DEFAULT_LEVEL,
        accept_threshold: int = DEFAULT_ACCEPT_THRESHOLD,
        huge_threshold: int = DEFAULT_HUGE_THRESHOLD,
        writeback_enabled: bool = True,
        backing: Iterable[str] = (),
        reserve: int = 0,
        dynamic: bool = False,
        codec: str = DEFAULT_CODEC,
    ) -> None:
        if reserve < 0:
            raise ValueError(f"reserve must be >= 0 bytes, not {reserve}")
        if reserve and reserve < CHUNK_BYTES:
            raise ValueError(f"a reserve must be at least {CHUNK_BYTES} bytes, not {reserve}")
        if size <= 0 or size % PAGE:
            raise ValueError(f"size must be a positive multiple of {PAGE}, not {size}")
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, not {codec!r}")
        self.codec = codec  # fixed for the space's life: the pool's objects are in it
        self._lz4: ModuleType | None = None  # lz4.block when the codec is lz4
        if codec == "lz4":  # imported only when used: loaded in a zstd daemon, it cost a
            # point of the memory returned after a burst in the bench (98.7% vs 99.7%)
            import lz4.block
            self._lz4 = lz4.block
        self.size = size
        self.nslots = size // PAGE
        self._clusters: dict[int, _Cluster] = {}  # cluster index -> cluster, oldest write first
        self._pool = Pool(reserve, dynamic=dynamic)
        self._backing: list[BackingFile | None] = [None] * E.MAX_BACKING_FILES
        self._evacuating: set[int] = set()  # backing-file indices being emptied
        self._lock = threading.Lock()
        self._phys_readers = 0  # reads of backing pages in flight outside the lock
        self._deferred: list[tuple[BackingFile, int]] = []  # physical slots freed meanwhile
        self._retired: list[BackingFile] = []  # removed backing files a reader may still use
        self._cctxs: list[tuple[int, zstandard.ZstdCompressor]] = []  # idle (level, compressor)
        self._dctxs: list[zstandard.ZstdDecompressor] = []  # idle decompressors
        self._pool_full = False  # zswap's hysteresis: set at the limit, cleared below the threshold
        self.counters = Counters()
        self.tag_pages = [0, 0, 0, 0]  # slots per backend, indexed by tag
        self.huge_pages = 0  # POOL pages kept raw (4096 bytes)
        self.pool_limit = 0
        self.level = 0
        self.accept_threshold = 0
        self.huge_threshold = 0
        self.writeback_enabled = writeback_enabled
        if self._pool.reserve and not pool_limit:
            pool_limit = self._pool.reserve
        self.configure(pool_limit=pool_limit, level=level if codec == "zstd" else None,
                       accept_threshold=accept_threshold, huge_threshold=huge_threshold)
        for path in backing:
            self.add_backing(path)
        warm = self._encode(_WARM_PAGE)[1]  # make the first contexts now
        if warm is not None:
            self._decode(warm)

    # -- settings -----------------------------------------------------------

    def configure(
        self,
        *,
        pool_limit: int | None = None,
        level: int | None = None,
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
        if level is not None and self.codec != "zstd":
            raise ValueError(f"levels are zstd's; this space compresses with {self.codec}")
        if level is not None and (level == 0 or not MIN_LEVEL <= level <= MAX_LEVEL):
            raise ValueError(f"level must be a non-zero zstd level in {MIN_LEVEL}..{MAX_LEVEL}, "
                             f"not {level}")
        if accept_threshold is not None and not 0 < accept_threshold <= 100:
            raise ValueError(f"accept_threshold must be a percentage in 1..100, not {accept_threshold}")
        if huge_threshold is not None and not 0 < huge_threshold <= PAGE:
            raise ValueError(f"huge_threshold must be in 1..{PAGE} bytes, not {huge_threshold}")
        with self._lock:
            if pool_limit is not None:
                self.pool_limit = pool_limit
                self._pool_full = False
            if level is not None:
                self.level = level
            if accept_threshold is not None:
                self.accept_threshold = accept_threshold
            if huge_threshold is not None:
                self.huge_threshold = huge_threshold
            if writeback_enabled is not None:
                self.writeback_enabled = writeback_enabled

    # -- compression (pooled contexts, no lock) ------------------------------

    def _compress(self, page: bytes) -> bytes:
        if _inject.armed:
            _inject.point("codec.compress")
        if self._lz4:  # stateless: no context to pool
            return self._lz4.compress(page, store_size=False)
        level = self.level
        try:
            lv, c = self._cctxs.pop()  # list.pop and append are atomic under the GIL
            if lv != level:
                c = _compressor(level)
        except IndexError:
            c = _compressor(level)
        try:
            return c.compress(page)
        except zstandard.ZstdError as e:  # zstd fails only when it cannot allocate
            raise MemoryError(f"zstd: {e}") from None
        finally:
            self._cctxs.append((level, c))

    def _decode(self, blob: bytes) -> bytes:
        """The page a pool object holds.  A corrupt object is an I/O error
        (EIO), as a bad backing page is."""
        if _inject.armed:
            _inject.point("codec.decompress")
        if len(blob) == PAGE:
            return blob
        if self._lz4:
            try:
                page = self._lz4.decompress(blob, uncompressed_size=PAGE)
            except self._lz4.LZ4BlockError as e:
                raise OSError(errno.EIO, f"pool object does not decompress: {e}") from None
            if len(page) != PAGE:
                raise OSError(errno.EIO, "pool object did not decompress to a page")
            return page
        try:
            d = self._dctxs.pop()
        except IndexError:
            d = zstandard.ZstdDecompressor()
        try:
            page = d.decompress(blob, max_output_size=PAGE)
        except zstandard.ZstdError as e:
            raise OSError(errno.EIO, f"pool object does not decompress: {e}") from None
        finally:
            self._dctxs.append(d)
        if len(page) != PAGE:
            raise OSError(errno.EIO, "pool object did not decompress to a page")
        return page

    def _encode(self, page: bytes) -> tuple[int, bytes | None]:
        """(SAME word, None) for a same-filled page, else (0, payload) where
        the payload is the compressed page, or None if it compresses poorly."""
        if page == _ZERO_PAGE:
            return _ZERO_WORD, None
        head = page[:8]
        if page[-8:] == head and page[2048:2056] == head and page == head * (PAGE // 8):
            word = E.same_word(int.from_bytes(head, "little"))
            if word is not None:
                return word, None
        blob = self._compress(page)
        if len(blob) > self.huge_threshold or len(blob) >= PAGE:  # a 4096-byte object is a raw page
            return 0, None
        return 0, blob

    # -- address checks -------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.counters.invalid_io += 1
            raise ValueError(f"range {offset}+{length} is outside the {self.size}-byte space")

    # -- table helpers (call with the lock held) ------------------------------

    def _word(self, slot: int) -> int:
        cl = self._clusters.get(slot // CLUSTER_SLOTS)
        return cl.table[slot % CLUSTER_SLOTS] if cl else 0

    def _account(self, word: int, delta: int) -> None:
        t = word & E.TAG_MASK
        self.tag_pages[t] += delta
        if t == E.POOL and E.pool_length(word) == PAGE:
            self.huge_pages += delta

    def _release(self, word: int) -> None:
        """Free the backend resources of an entry word (never raises).  A
        physical slot is only quarantined while a reader may be reading it
        without the lock (see the module docstring)."""
        t = word & E.TAG_MASK
        if t == E.POOL:
            self._pool.free(E.pool_object(word), E.pool_length(word))
        elif t == E.PHYS:
            bf = self._backing[E.phys_file(word)]
            assert bf is not None
            p = E.phys_slot(word)
            if self._phys_readers:
                bf.rmap[p] = QUARANTINED
                self._deferred.append((bf, p))
            else:
                bf.free(p)

    def _readers_done(self) -> None:
        """The last unlocked reader is done (lock held): free what waited."""
        for bf, p in self._deferred:
            bf.free(p)
        self._deferred = []
        for bf in self._retired:
            bf.close()
        self._retired = []

    def _set(self, slot: int, word: int) -> None:
        """Point ``slot`` at ``word``, freeing what it held; creates and
        drops clusters as needed.  The caller has already stored the data."""
        ci, idx = divmod(slot, CLUSTER_SLOTS)
        cl = self._clusters.get(ci)
        if cl is None:
            if not word:
                return
            cl = self._clusters[ci] = _Cluster()
            self.counters.clusters_created += 1
        old = cl.table[idx]
        if old:
            self._release(old)
            self._account(old, -1)
            cl.used -= 1
            cl.pool -= (old & E.TAG_MASK) == E.POOL
        cl.table[idx] = word
        if word:
            self._account(word, 1)
            cl.used += 1
            cl.pool += (word & E.TAG_MASK) == E.POOL
        elif not cl.used:
            del self._clusters[ci]
            self.counters.clusters_freed += 1

    def _touch(self, ci: int) -> None:
        """Move cluster ``ci`` to the young end of the writeback LRU."""
        cl = self._clusters.pop(ci, None)
        if cl is not None:
            self._clusters[ci] = cl

    def _store_pool(self, blob: bytes) -> int:
        word = E.pool_word(self._pool.store(blob), len(blob))
        if len(blob) == PAGE:
            self.counters.huge_pages_since += 1
        return word

    def _note_mem(self) -> None:
        used = self._pool.mem_used
        if used > self.counters.mem_used_max:
            self.counters.mem_used_max = used
        if self._pool_full and used < self.pool_limit * self.accept_threshold // 100:
            self._pool_full = False

    # -- backing files ---------------------------------------------------------

    def _target(self) -> BackingFile | None:
        """The backing file new physical pages go to, if any."""
        for bf in self._backing:
            if bf is not None and bf.index not in self._evacuating:
                return bf
        return None

    def add_backing(self, path: str) -> int:
        """Add a backing file (created sparse at ``path``); returns its index."""
        path = os.path.abspath(path)
        with self._lock:
            if any(bf is not None and bf.path == path for bf in self._backing):
                raise FileExistsError(errno.EEXIST, f"{path} is already a backing file", path)
            try:
                index = self._backing.index(None)
            except ValueError:
                raise OSError(errno.EMFILE, f"at most {E.MAX_BACKING_FILES} backing files") from None
            self._backing[index] = BackingFile(path, index)
            return index

    def backing_files(self) -> list[BackingFile]:
        """The backing files in use, by index."""
        return [bf for bf in self._backing if bf is not None]

    def _write_phys(self, bf: BackingFile, slots: list[int], pages: list[bytes]) -> list[int]:
        """Write pages for virtual ``slots`` to ``bf``: the one way pages
        reach a backing file.  Returns their PHYS words; the slots are bound
        in the rmap, so a caller that then fails must release the words.
        On failure nothing is bound, the error is counted and re-raised."""
        pslots: list[int] = []
        try:
            pslots = bf.alloc(len(pages))
            bf.write(pslots, pages)
        except OSError:
            self.counters.bd_write_errors += 1
            for p in pslots:
                bf.free(p)
            raise
        self.counters.bd_writes += len(pages)
        for p, v, page in zip(pslots, slots, pages, strict=True):
            bf.bind(p, v, checksum(page))
        return [E.phys_word(bf.index, p) for p in pslots]

    def _read_phys(self, word: int, *, final: bool = True, bf: BackingFile | None = None) -> bytes:
        """Read and verify a backing page.  Errors are counted unless
        ``final`` is false (the caller will look again and count).  ``bf``:
        the file, as looked up under the lock (a reader without it must not
        look again: the file may have been removed meanwhile)."""
        if bf is None:
            bf = self._backing[E.phys_file(word)]
            assert bf is not None
        p = E.phys_slot(word)
        try:
            page = bf.read(p, bf.csum[p])
        except OSError as e:
            if final:
                self._count_read_error(e)
            raise
        self.counters.bd_reads += 1
        return page

    def _count_read_error(self, e: OSError) -> None:
        self.counters.bd_read_errors += 1
        if isinstance(e, BackingChecksumError):
            self.counters.checksum_failures += 1

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
        pages: list[bytes]
        try:
            if not (offset | n) % PAGE:  # whole pages: what swap writes
                pages = [mv[i:i + PAGE].tobytes() for i in range(0, n, PAGE)]
            else:
                pages = []
                for slot in range(first, end):
                    lo = max(offset, slot * PAGE)
                    hi = min(offset + n, (slot + 1) * PAGE)
                    if hi - lo == PAGE:
                        pages.append(bytes(mv[lo - offset:hi - offset]))
                    else:
                        page = self._read_pages(slot, 1)
                        page[lo - slot * PAGE:hi - slot * PAGE] = mv[lo - offset:hi - offset]
                        pages.append(bytes(page))
            encode = self._encode
            encoded = [encode(p) for p in pages]
            with self._lock:
                self._commit(first, pages, encoded)
        except MemoryError as e:  # no memory for the work itself: the kernel gets ENOSPC
            self.counters.failed_writes += 1
            raise NoSpaceError(f"out of memory: {e}") from None
        except OSError:
            self.counters.failed_writes += 1
            raise

    def _commit(self, first: int, pages: list[bytes], encoded: list[tuple[int, bytes | None]]) -> None:
        """Store encoded pages and point their slots at them (lock held).
        The store policy: same-filled pages in the word; pages that
        compress poorly to a backing file if there is one (else raw in
        the pool); the rest in the pool, or, when it is at its limit or
        has no chunk ready, to a backing file, else NoSpaceError.  All or
        nothing: whatever was stored before a failure is released."""
        words = [w for w, _ in encoded]
        poor = [i for i, (w, b) in enumerate(encoded) if not w and b is None]
        self.counters.reject_compress_poor += len(poor)
        target = self._target() if self.writeback_enabled else None
        stored: list[int] = []  # words made here, released again if anything fails
        try:
            to_disk: set[int] = set()
            if poor and target is not None:
                try:
                    phys = self._write_phys(target, [first + i for i in poor], [pages[i] for i in poor])
                    stored += phys
                    for i, w in zip(poor, phys, strict=True):
                        words[i] = w
                    to_disk = set(poor)
                except OSError:
                    pass  # the backing file failed: keep them raw in the pool
            blobs = {i: (b if b is not None else pages[i]) for i, (w, b) in enumerate(encoded)
                     if not w and i not in to_disk}
            if blobs and not self._room([len(b) for b in blobs.values()]):
                if target is None:
                    raise NoSpaceError(self._why_no_room())
                try:  # zswap's reject path: straight to the backing file
                    idx = sorted(blobs)
                    phys = self._write_phys(target, [first + i for i in idx], [pages[i] for i in idx])
                except OSError:
                    raise NoSpaceError(self._why_no_room() + "; the backing file failed too") from None
                stored += phys
                for i, w in zip(idx, phys, strict=True):
                    words[i] = w
                blobs = {}
            for i, blob in blobs.items():
                try:
                    w = self._store_pool(blob)
                except PoolExhausted as e:
                    raise NoSpaceError(str(e)) from None
                stored.append(w)
                words[i] = w
        except BaseException:
            for w in stored:
                self._release(w)
            self._note_mem()
            raise
        for i, w in enumerate(words):
            self._set(first + i, w)
        for ci in range(first // CLUSTER_SLOTS, (first + len(words) - 1) // CLUSTER_SLOTS + 1):
            self._touch(ci)
        self._note_mem()

    def _why_no_room(self) -> str:
        if self.pool_limit and self._pool_full:
            return (f"pool limit {self.pool_limit} bytes reached ({self._pool.mem_used} in use) "
                    "and no backing file took the pages")
        return "no pool chunk is ready for the pages and no backing file took them"

    def _room(self, lengths: list[int]) -> bool:
        """True if objects of ``lengths`` fit now: under the limit (after
        writeback, see _make_room) and in chunks that need no memory
        faulted in (a reserve's, or the spares, see ``_pool``)."""
        chunks, nbytes = self._pool.new_chunks(lengths)
        if self.pool_limit and not self._make_room(nbytes):
            return False
        return self._pool.fits(lengths, chunks)

    def _make_room(self, need: int) -> bool:
        """True if ``need`` more pool bytes fit under the limit, after writing
        back least-recently-written pages if there is a backing file."""
        limit = self.pool_limit
        if not self._pool_full and self._pool.mem_used + need <= limit:
            return True
        if not self._pool_full:
            self._pool_full = True
            self.counters.pool_limit_hit += 1
        if self.writeback_enabled and self._target() is not None:
            goal = limit * self.accept_threshold // 100 - need
            self._writeback_locked(None, until_below=max(goal, 0))
        self._note_mem()
        return not self._pool_full and self._pool.mem_used + need <= limit

    def read(self, offset: int, size: int) -> bytearray | memoryview:
        """Read ``size`` bytes at ``offset``; never-written space reads as
        zeros.  A backing page that cannot be read or fails its checksum,
        or a pool object that does not decompress, raises OSError(EIO);
        no other page is affected."""
        self._check(offset, size)
        if not size:
            return bytearray()
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

    def _read_pages(self, first: int, count: int) -> bytearray:
        out = bytearray(count * PAGE)
        blobs: list[tuple[int, bytes]] = []
        phys: list[tuple[int, int, BackingFile]] = []
        with self._lock:
            clusters = self._clusters
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
                    if word != _ZERO_WORD:
                        out[i * PAGE:(i + 1) * PAGE] = E.same_page(word)
                elif t == E.PHYS:
                    bf = self._backing[E.phys_file(word)]
                    assert bf is not None
                    phys.append((i, word, bf))
            if phys:
                self._phys_readers += 1  # until we are done, no physical slot is reused
        try:
            for i, word, bf in phys:
                out[i * PAGE:(i + 1) * PAGE] = self._read_phys_stable(first + i, word, bf)
        finally:
            if phys:
                with self._lock:
                    self._phys_readers -= 1
                    if not self._phys_readers:
                        self._readers_done()
        for i, blob in blobs:
            out[i * PAGE:(i + 1) * PAGE] = self._decode(blob)
        return out

    def _read_phys_stable(self, slot: int, word: int, bf: BackingFile) -> bytes:
        """Read a backing page without the lock (a reader is counted in
        ``_phys_readers``, so the slot cannot be reused meanwhile).  If the
        read fails because the page moved meanwhile (writeback, evacuation),
        read it where it is now; if it did not move, the error is real."""
        try:
            return self._read_phys(word, final=False, bf=bf)
        except OSError as e:
            with self._lock:
                if self._word(slot) == word:
                    self._count_read_error(e)
                    raise
            return bytes(self._read_pages(slot, 1))

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
                self.counters.notify_free += self._free_pages(lo, hi)
                self._note_mem()
        partial = [(offset, end)] if lo > hi else [(offset, lo * PAGE), (hi * PAGE, end)]
        for a, b in partial:
            if a < b and self._word_unlocked(a // PAGE):
                self.write(a, bytes(b - a))

    def _free_pages(self, lo: int, hi: int) -> int:
        """Free slots ``lo .. hi-1`` (lock held); returns how many held data."""
        freed = 0
        c_lo, c_hi = lo // CLUSTER_SLOTS, (hi - 1) // CLUSTER_SLOTS
        if c_hi - c_lo + 1 > len(self._clusters):
            cis = sorted(c for c in self._clusters if c_lo <= c <= c_hi)
        else:
            cis = [c for c in range(c_lo, c_hi + 1) if c in self._clusters]
        for ci in cis:
            cl = self._clusters[ci]
            base = ci * CLUSTER_SLOTS
            a, b = max(lo - base, 0), min(hi - base, CLUSTER_SLOTS)
            if a == 0 and b == CLUSTER_SLOTS:  # what the kernel discards: a whole cluster
                freed += self._drop_cluster(ci, cl)
                continue
            table = cl.table
            for idx in range(a, b):
                if table[idx]:
                    self._set(base + idx, 0)
                    freed += 1
                    if ci not in self._clusters:
                        break
        return freed

    def _drop_cluster(self, ci: int, cl: _Cluster) -> int:
        """Free every slot of cluster ``ci`` and drop it (lock held); returns
        how many held data.  ``_set`` slot by slot, with the bookkeeping
        summed once."""
        release = self._release
        per_tag = [0, 0, 0, 0]
        huge = 0
        for w in cl.table:
            if w:
                release(w)
                t = w & E.TAG_MASK
                per_tag[t] += 1
                huge += t == E.POOL and E.pool_length(w) == PAGE
        for t, n in enumerate(per_tag):
            self.tag_pages[t] -= n
        self.huge_pages -= huge
        del self._clusters[ci]
        self.counters.clusters_freed += 1
        return cl.used

    def release_all_but(self, keep: int) -> int:
        """Free every page after the first ``keep`` bytes (a page multiple),
        counted as ``swapoff_freed_pages``; returns the pages freed."""
        with self._lock:
            freed = self._free_pages(keep // PAGE, self.nslots)
            self.counters.swapoff_freed_pages += freed
            self._note_mem()
            return freed

    def _word_unlocked(self, slot: int) -> int:
        with self._lock:
            return self._word(slot)

    def entry(self, slot: int) -> int:
        """The table word of virtual slot ``slot`` now (see ``_entry``)."""
        return self._word_unlocked(slot)

    # -- backend transfer ----------------------------------------------------

    def writeback(self, pages: int | None = None) -> int:
        """Move up to ``pages`` (None: all) least-recently-written pool pages
        to a backing file; returns how many moved."""
        with self._lock:
            if self._target() is None:
                raise OSError(errno.ENODEV, "no backing file to write back to")
            moved = self._writeback_locked(pages)
            self._note_mem()
            return moved

    def _writeback_locked(self, want: int | None, until_below: int | None = None) -> int:
        """Write pool pages back, oldest cluster first (lock held).  A batch
        that cannot be decompressed or written stays in the pool, and the
        writeback stops there."""
        moved = 0
        for ci in list(self._clusters):
            cl = self._clusters.get(ci)
            if cl is None or not cl.pool:
                continue
            base = ci * CLUSTER_SLOTS
            todo = [(base + i, w) for i, w in enumerate(cl.table) if w & E.TAG_MASK == E.POOL]
            for k in range(0, len(todo), WRITEBACK_BATCH):
                if want is not None and moved >= want:
                    return moved
                if until_below is not None and self._pool.mem_used <= until_below:
                    return moved
                batch = todo[k:k + WRITEBACK_BATCH]
                if want is not None:
                    batch = batch[:want - moved]
                target = self._target()
                if target is None:
                    return moved
                try:
                    pages = [self._decode(self._pool.load(E.pool_object(w), E.pool_length(w)))
                             for _, w in batch]
                    words = self._write_phys(target, [s for s, _ in batch], pages)
                except (OSError, MemoryError):
                    return moved  # the pages stay in the pool
                for (slot, _), word in zip(batch, words, strict=True):
                    self._set(slot, word)
                moved += len(batch)
                self.counters.written_back_pages += len(batch)
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
            bf = next((b for b in self._backing if b is not None and b.path == path), None)
            if bf is None:
                raise FileNotFoundError(errno.ENOENT, f"{path} is not a backing file", path)
            self._evacuating.add(bf.index)
            before = self.counters.evacuated_pages
            try:
                self._evacuate(bf)
            except MemoryError as e:
                raise OSError(errno.ENOMEM, f"out of memory: {e}") from None
            finally:
                self._evacuating.discard(bf.index)
                self._note_mem()
            # quarantined slots may still be read: the file goes when the readers are done
            moved = self.counters.evacuated_pages - before
            self._deferred = [(b, p) for b, p in self._deferred if b is not bf]
            self._backing[bf.index] = None
            if self._phys_readers:
                self._retired.append(bf)
            else:
                bf.close()
            return moved

    def _evacuate(self, bf: BackingFile) -> None:
        """Move every page of ``bf`` elsewhere (lock held), one by one."""
        for pslot, vslot in list(bf.slots_in_use()):
            page = self._read_phys(E.phys_word(bf.index, pslot))
            target = self._target() if self.writeback_enabled else None
            if target is not None:
                word = self._write_phys(target, [vslot], [page])[0]
            else:
                word, blob = self._encode(page)
                if not word:
                    blob = blob if blob is not None else page
                    if not self._room([len(blob)]):
                        raise NoSpaceError("no room in the pool to evacuate into")
                    try:
                        word = self._store_pool(blob)
                    except PoolExhausted as e:
                        raise NoSpaceError(str(e)) from None
            self._set(vslot, word)
            self.counters.evacuated_pages += 1

    def compact(self) -> int:
        """Pack sparse pool chunks together; returns 4 KiB pages freed.  A
        move that finds no chunk ready ends the compaction early."""
        with self._lock:
            before = self._pool.mem_used
            pool = self._pool
            try:
                if pool.plan_compaction():
                    for cl in self._clusters.values():
                        if not cl.pool:
                            continue
                        table = cl.table
                        for idx, w in enumerate(table):
                            if w & E.TAG_MASK == E.POOL:
                                obj, length = E.pool_object(w), E.pool_length(w)
                                if pool.draining(obj, length):
                                    table[idx] = E.pool_word(pool.move(obj, length), length)
            except MemoryError:  # PoolExhausted too: what moved stays moved, the rest stays put
                pass
            finally:
                pool.end_compaction()
            freed = max(before - pool.mem_used, 0) // PAGE
            self.counters.pages_compacted += freed
            self._note_mem()
            return freed

    # -- memory kept for the serving path (dynamic mode) ---------------------

    def replenish(self, busy: bool = True) -> int:
        """Fault spare pool chunks in, up to the pool's high mark (its low
        mark if not ``busy``), in dynamic mode; nothing otherwise.  Returns
        the bytes faulted in.  The faulting runs without the engine lock:
        a thread here that waits on reclaim holds up nobody who serves."""
        with self._lock:
            offs = self._pool.refill_wanted(SPARE_HIGH if busy else SPARE_LOW)
        if not offs:
            return 0
        try:
            self._pool.fault_in(offs)
        except PoolExhausted:
            with self._lock:
                self._pool.give_back_slots(offs)
            return 0
        with self._lock:
            self._pool.add_spare(offs)
        return len(offs) * CHUNK_BYTES

    # -- state ---------------------------------------------------------------

    @property
    def stored_pages(self) -> int:
        """Slots holding data, any backend."""
        tp = self.tag_pages
        return tp[E.SAME] + tp[E.POOL] + tp[E.PHYS]

    def stats(self) -> dict[str, int]:
        """Every counter and gauge, by name (described in ``_stats``)."""
        with self._lock:
            tp = self.tag_pages
            stored = self.stored_pages
            backing = self.backing_files()
            s = {
                "disksize": self.size,
                "stored_pages": stored,
                "zero_pages": tp[E.SAME],
                "same_pages": tp[E.SAME],
                "pool_pages": tp[E.POOL],
                "phys_pages": tp[E.PHYS],
                "huge_pages": self.huge_pages,
                "orig_data_size": stored * PAGE,
                "compr_data_size": self._pool.payload,
                "mem_used_total": self._pool.mem_used,
                "mem_limit": self.pool_limit,
                "pool_reserve": self._pool.reserve,
                "pool_spare": self._pool.spare_bytes,
                "pool_chunks": self._pool.chunks,
                "clusters": len(self._clusters),
                "metadata_bytes": len(self._clusters) * _CLUSTER_FOOTPRINT
                + sum(16 * len(bf.rmap) for bf in backing),
                "bd_count": tp[E.PHYS],
                "backing_files": len(backing),
                "backing_allocated_bytes": sum(bf.allocated_bytes() for bf in backing),
                "pool_full": int(self._pool_full),
            }
            s.update(self.counters.as_dict())
            return s

    def check(self) -> list[str]:
        """Consistency of everything the engine keeps, for tests and for
        recovery: every table word's target exists and is used once, every
        rmap entry points back at its word, the per-cluster and global
        gauges match a recount, and the pool and file accounting sum.
        Returns the problems found (none: an empty list)."""
        bad: list[str] = []
        with self._lock:
            tags = [0, 0, 0, 0]
            huge = 0
            objs: set[tuple[int, int]] = set()
            payload = 0
            phys: dict[tuple[int, int], int] = {}
            for ci, cl in self._clusters.items():
                used = sum(1 for w in cl.table if w)
                pool = sum(1 for w in cl.table if w & E.TAG_MASK == E.POOL)
                if (used, pool) != (cl.used, cl.pool) or not used:
                    bad.append(f"cluster {ci}: used/pool {cl.used}/{cl.pool}, recount {used}/{pool}")
                for idx, w in enumerate(cl.table):
                    if not w:
                        continue
                    slot = ci * CLUSTER_SLOTS + idx
                    t = w & E.TAG_MASK
                    tags[t] += 1
                    if t == E.POOL:
                        obj, length = E.pool_object(w), E.pool_length(w)
                        huge += length == PAGE
                        payload += length
                        key = (size_class(length), obj)
                        if key in objs or not self._pool.holds(obj, length):
                            bad.append(f"slot {slot}: pool object {key} shared or not live")
                        objs.add(key)
                    elif t == E.PHYS:
                        f, p = E.phys_file(w), E.phys_slot(w)
                        bf = self._backing[f]
                        if bf is None or p >= len(bf.rmap) or bf.rmap[p] != slot:
                            bad.append(f"slot {slot}: backing {f} slot {p} does not point back")
                        phys[(f, p)] = slot
                    elif t != E.SAME:
                        bad.append(f"slot {slot}: word {w:#x} has no backend")
            if tags != self.tag_pages or huge != self.huge_pages:
                bad.append(f"gauges {self.tag_pages}/{self.huge_pages}, recount {tags}/{huge}")
            if len(objs) != self._pool.objects or payload != self._pool.payload:
                bad.append(f"pool holds {self._pool.objects} objects of {self._pool.payload} bytes, "
                           f"the tables {len(objs)} of {payload}")
            quarantined = {(bf.index, p) for bf, p in self._deferred}
            for bf in self.backing_files():
                live = 0
                for p, v in enumerate(bf.rmap):
                    if v == -1:
                        continue
                    live += 1
                    if v >= 0 and phys.get((bf.index, p)) != v:
                        bad.append(f"backing {bf.index} slot {p}: rmap says {v}, no such word")
                    elif v == QUARANTINED and (bf.index, p) not in quarantined:
                        bad.append(f"backing {bf.index} slot {p}: quarantined, not deferred")
                    elif v < -1 and v != QUARANTINED:
                        bad.append(f"backing {bf.index} slot {p}: left reserved ({v})")
                if live != bf.live or sum(bf.used) != live:
                    bad.append(f"backing {bf.index}: live {bf.live}, used {sum(bf.used)}, rmap {live}")
        return bad

    def trim(self) -> None:
        """Give back memory kept only to make the next burst cheaper: the
        backing files' write buffers and the spare pool chunks beyond the
        idle mark.  For idle time, after frees."""
        with self._lock:
            for bf in self.backing_files():
                bf.release_buffers()
                bf.tidy()
            self._pool.shed()

    def close(self) -> None:
        """Release all memory and delete the backing files."""
        with self._lock:
            self._clusters.clear()
            self._pool.close()
            for i, bf in enumerate(self._backing):
                if bf is not None:
                    bf.close()
                    self._backing[i] = None
            for bf in self._retired:
                bf.close()
            self._retired = []
            self._deferred = []
            self.tag_pages = [0, 0, 0, 0]
            self.huge_pages = 0
