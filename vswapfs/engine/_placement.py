"""Placement: where a page is stored, and how it moves between backends.

The store policy (:meth:`Placement.commit`): same-filled pages live in
their table word; pages that compress poorly go to a backing file if
there is one (else raw in the pool); the rest go to the pool, or, when it
is at its limit or has no chunk ready, to a backing file, else
NoSpaceError.  Writeback, evacuation and compaction move pages by
rewriting their table words only; the virtual slot never changes.

:meth:`Placement.to_backing` is the one way pages reach a backing file.

Every method here runs with the engine lock held (the facade,
``_space``, takes it), except :meth:`read_phys`, which a reader may call
without it, and :meth:`replenish`, which takes it for its short steps.
A reader without it is safe because it counts itself in ``phys_readers``
under the lock first: while any is counted, a freed
physical slot is only quarantined (its rmap entry ``QUARANTINED``, the
slot in ``deferred``), never reused, and a removed backing file is only
retired; :meth:`readers_done` frees them when the last reader leaves.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Callable, Sequence
from typing import Final

from mypy_extensions import mypyc_attr

from .._consts import CLUSTER_SLOTS, PAGE
from . import _entry as E
from ._backing import BackingChecksumError, BackingFile, checksum
from ._codec import Codec
from ._pool import CHUNK_BYTES, SPARE_HIGH, Pool, PoolExhausted, size_class
from ._stats import Counters
from ._table import CLUSTER_FOOTPRINT, Table
from ._table import SPARE_HIGH as TABLE_SPARE_HIGH
from ._table import SPARE_LOW as TABLE_SPARE_LOW

# A page or object to store: bytes, or a view of the caller's buffer (a write
# request's), which is copied into the pool or a backing file and never kept.
Page = bytes | memoryview

DEFAULT_ACCEPT_THRESHOLD: Final = 90
WRITEBACK_BATCH: Final = 256
REFILL_BATCH: Final = 8  # spare chunks faulted in per call and handed over at once (512 KiB)
QUARANTINED: Final = -3  # rmap value of a freed physical slot a reader may still read


@mypyc_attr(native_class=False)  # mypyc compiles no subclass of OSError
class NoSpaceError(OSError):
    """The pool is at its limit and no backing file can take the page."""

    def __init__(self, msg: str) -> None:
        super().__init__(errno.ENOSPC, msg)


class Placement:
    """The pool, the backing files and the policy between them."""

    def __init__(self, pool: Pool, codec: Codec, counters: Counters, nslots: int, *,
                 writeback_enabled: bool = True, table_fds: tuple[int, int] | None = None) -> None:
        self.pool = pool
        self.codec = codec
        self.counters = counters
        self.table = Table(self.release, counters, nslots, table_fds, dynamic=pool.dynamic)
        # a backing file's most pages: every slot once, plus what a reader's
        # quarantine and a write in flight may hold besides
        self.max_backing_slots = 2 * nslots + 2 * CLUSTER_SLOTS
        # called with a new backing file's fds before any page goes there, and
        # with the names of a removed one's (a daemon hands them to its supervisor)
        self.keep_fds: Callable[[dict[str, int]], None] | None = None
        self.drop_fds: Callable[[list[str]], None] | None = None
        self.backing: list[BackingFile | None] = [None] * E.MAX_BACKING_FILES
        self.files = 0  # backing files in ``backing`` (kept by _set_backing)
        self.evacuating: set[int] = set()  # backing-file indices being emptied
        self.phys_readers = 0  # reads of backing pages in flight outside the lock
        self.deferred: list[tuple[BackingFile, int]] = []  # physical slots freed meanwhile
        self.retired: list[BackingFile] = []  # removed backing files a reader may still use
        self.pool_limit = 0  # bytes, 0: none
        self.accept_threshold = DEFAULT_ACCEPT_THRESHOLD  # percent of the limit
        self.writeback_enabled = writeback_enabled
        self.pool_full = False  # zswap's hysteresis: set at the limit, cleared below the threshold
        self.short_of_spares = False  # the last commit found no chunk ready (dynamic mode), not the limit
        self.spares_needed = 0  # new chunks the write short of spares needs at once (the refill brings them)
        self.refill_stuck = False  # a write's wait for spares timed out; cleared by the next refill

    # -- freeing -------------------------------------------------------------

    def release(self, word: int) -> None:
        """Free the backend resources of an entry word (never raises).  A
        physical slot is only quarantined while a reader may read it."""
        t = word & E.TAG_MASK
        if t == E.POOL:
            self.pool.free(E.pool_object(word), E.pool_length(word))
        elif t == E.PHYS:
            bf = self.backing[E.phys_file(word)]
            assert bf is not None
            p = E.phys_slot(word)
            if self.phys_readers:
                bf.rmap[p] = QUARANTINED
                self.deferred.append((bf, p))
            else:
                bf.free(p)

    def readers_done(self) -> None:
        """The last unlocked reader is done: free what waited for it."""
        for bf, p in self.deferred:
            bf.free(p)
        self.deferred = []
        for bf in self.retired:
            bf.close()
        self.retired = []

    # -- backing files ---------------------------------------------------------

    def _set_backing(self, index: int, bf: BackingFile | None) -> None:
        self.backing[index] = bf
        self.files = sum(1 for b in self.backing if b is not None)

    def target(self) -> BackingFile | None:
        """The backing file new physical pages go to, if any."""
        if not self.files:
            return None
        for bf in self.backing:
            if bf is not None and bf.index not in self.evacuating:
                return bf
        return None

    def add(self, path: str) -> int:
        """Create a backing file at ``path``; returns its index."""
        if any(bf is not None and bf.path == path for bf in self.backing):
            raise FileExistsError(errno.EEXIST, f"{path} is already a backing file", path)
        try:
            index = self.backing.index(None)
        except ValueError:
            raise OSError(errno.EMFILE, f"at most {E.MAX_BACKING_FILES} backing files") from None
        bf = BackingFile(path, index, self.max_backing_slots)
        if self.keep_fds is not None:
            try:
                self.keep_fds(bf.fds)  # before any page is written to it
            except BaseException:
                bf.close()
                raise
        self._set_backing(index, bf)
        return index

    def to_backing(self, bf: BackingFile, slots: list[int], pages: Sequence[Page]) -> list[int]:
        """Write pages for virtual ``slots`` to ``bf``.  Returns their PHYS
        words; the slots are bound in the rmap, so a caller that then fails
        must release the words.  On failure nothing is bound, the error is
        counted and re-raised."""
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

    def read_phys(self, word: int, bf: BackingFile, *, final: bool = True) -> bytes:
        """Read and verify a backing page of ``bf`` (looked up under the
        lock: a reader without it must not look again, the file may have
        been removed meanwhile).  Errors are counted unless ``final`` is
        false (the caller will look again and count)."""
        p = E.phys_slot(word)
        try:
            page = bf.read(p, bf.csum[p])
        except OSError as e:
            if final:
                self.count_read_error(e)
            raise
        self.counters.bd_reads += 1
        return page

    def count_read_error(self, e: OSError) -> None:
        self.counters.bd_read_errors += 1
        if isinstance(e, BackingChecksumError):
            self.counters.checksum_failures += 1

    # -- the store policy ------------------------------------------------------

    def commit(self, first: int, pages: list[Page], encoded: list[tuple[int, bytes | None]]) -> None:
        """Store encoded pages and point their slots at them (see the module
        docstring for the policy).  All or nothing: whatever was stored
        before a failure is released.

        The usual case, pages for the pool far from its limit, takes the
        short way: the objects are stored at once and only if a chunk
        turns out not to be ready is the store undone and the policy's
        full path (room, writeback, the backing file) taken."""
        self.short_of_spares = False
        self.spares_needed = 0
        table = self.table
        if not table.ready(first, len(pages)):
            self.short_of_spares = True  # a new cluster needs a page faulted in beforehand
            raise NoSpaceError("no spare table page is ready for a new cluster")
        words = [w for w, _ in encoded]
        poor = [i for i, (w, b) in enumerate(encoded) if not w and b is None]
        if poor:
            self.counters.reject_compress_poor += len(poor)
        if (poor and self.files and self.writeback_enabled) or not self._store_short(pages, encoded, words):
            self._store_policy(first, pages, encoded, words, poor)
        table.set_run(first, words, self.codec.two_step)
        self.note_mem()

    def _store_short(self, pages: list[Page], encoded: list[tuple[int, bytes | None]],
                     words: list[int]) -> bool:
        """Store the pool pages of a commit when that needs no decision: the
        pool is well under its limit (every object in a new chunk of its
        own would still fit) and each object's chunk is ready.  False, with
        nothing stored, when the full path must decide."""
        limit = self.pool_limit
        todo = [i for i, w in enumerate(words) if not w]
        if self.pool_full or (limit and self.pool.mem_used + len(todo) * CHUNK_BYTES > limit):
            return False
        pool = self.pool
        if pool.dynamic and len(todo) > pool.spare_chunks:
            # Each page takes one new chunk at most, so only a write of more pages than
            # there are spares can run out of them halfway; and undoing that gives the
            # chunks it took back to the kernel, not to the spares: a write waiting for a
            # refill, trying again at each batch, would use every batch up that way.
            # (A reserve's emptied chunks stay spares; inline, a store faults its own.)
            lengths = [PAGE if (b := encoded[i][1]) is None else len(b) for i in todo]
            if not pool.fits(lengths):
                return False
        done: list[int] = []
        raw = 0
        try:
            for i in todo:
                packed = encoded[i][1]
                blob: Page
                if packed is None:  # poor: kept raw, a huge page
                    blob = pages[i]
                    raw += 1
                else:
                    blob = packed
                words[i] = E.pool_word(pool.store(blob), len(blob))
                done.append(i)
        except PoolExhausted:
            for i in done:
                self.release(words[i])
                words[i] = 0
            return False
        except BaseException:
            for i in done:
                self.release(words[i])
            self.note_mem()
            raise
        self.counters.huge_pages_since += raw
        return True

    def _store_policy(self, first: int, pages: list[Page], encoded: list[tuple[int, bytes | None]],
                      words: list[int], poor: list[int]) -> None:
        """The store policy's full path: poorly compressing pages to a
        backing file, the rest to the pool if there is room (after
        writeback), else to the backing file, else NoSpaceError.  Fills
        ``words``; on failure releases what it stored."""
        target = self.target() if self.writeback_enabled else None
        stored: list[int] = []  # words made here, released again if anything fails

        def to_disk(idx: list[int]) -> None:
            assert target is not None
            phys = self.to_backing(target, [first + i for i in idx], [pages[i] for i in idx])
            stored.extend(phys)
            for i, w in zip(idx, phys, strict=True):
                words[i] = w

        try:
            on_disk: set[int] = set()
            if poor and target is not None:
                try:
                    to_disk(poor)
                    on_disk = set(poor)
                except OSError:
                    pass  # the backing file failed: keep them raw in the pool
            blobs = {i: (b if b is not None else pages[i]) for i, (w, b) in enumerate(encoded)
                     if not w and i not in on_disk}
            if blobs and not self.room([len(b) for b in blobs.values()]):
                if target is None:
                    raise NoSpaceError(self.why_no_room())
                try:  # zswap's reject path: straight to the backing file
                    to_disk(sorted(blobs))
                except OSError:
                    raise NoSpaceError(self.why_no_room() + "; the backing file failed too") from None
                blobs = {}
            for i, blob in blobs.items():
                w = self.store_pool(blob)
                stored.append(w)
                words[i] = w
        except BaseException:
            for w in stored:
                self.release(w)
            self.note_mem()
            raise

    def store_pool(self, blob: Page) -> int:
        """Copy ``blob`` into the pool; its POOL word."""
        try:
            word = E.pool_word(self.pool.store(blob), len(blob))
        except PoolExhausted as e:
            raise NoSpaceError(str(e)) from None
        if len(blob) == PAGE:
            self.counters.huge_pages_since += 1
        return word

    def why_no_room(self) -> str:
        if self.pool_limit and self.pool_full:
            return (f"pool limit {self.pool_limit} bytes reached ({self.pool.mem_used} in use) "
                    "and no backing file took the pages")
        return "no pool chunk is ready for the pages and no backing file took them"

    def room(self, lengths: list[int]) -> bool:
        """True if objects of ``lengths`` fit now: under the limit (after
        writeback, see make_room) and in chunks that need no memory
        faulted in (a reserve's, or the spares, see ``_pool``)."""
        chunks, nbytes = self.pool.new_chunks(lengths)
        if self.pool_limit and not self.make_room(nbytes):
            return False
        if self.pool.fits(lengths, chunks):
            return True
        self.short_of_spares = True
        self.spares_needed = chunks
        return False

    def settle(self, batch: list[tuple[int, int, bytes]], dense: list[bytes | None]) -> bool:
        """Put recompressed objects in place: for each (slot, word, blob)
        of ``batch`` whose ``dense`` object is not None, if the slot still
        holds that word and the pool still holds ``blob`` under it (the
        page was not rewritten meanwhile, even into the same object: the
        bytes say so), store the dense object and point the slot at it,
        in the order of every store (data, word, then the old freed).
        Stops at the first object no chunk is ready for, or that fails to
        store (the rest is marked again for a later look): then returns
        False."""
        pages = saved = 0
        table, pool = self.table, self.pool
        for k, ((slot, word, blob), new) in enumerate(zip(batch, dense, strict=True)):
            if new is None or table.word(slot) != word:
                continue
            if pool.load(E.pool_object(word), E.pool_length(word)) != blob:
                continue
            try:
                w = E.pool_word(pool.store(new), len(new))
            except (MemoryError, OSError):  # no chunk ready (PoolExhausted): the rest waits
                for (later, _, _), d in zip(batch[k:], dense[k:], strict=True):
                    if d is not None:
                        table.mark_fresh(later, 1)
                break
            table.set(slot, w)
            pages += 1
            saved += len(blob) - len(new)
        else:
            k = len(batch)
        self.counters.recompressed_pages += pages
        self.counters.recompress_saved_bytes += saved
        self.note_mem()
        return k == len(batch)

    def make_room(self, need: int) -> bool:
        """True if ``need`` more pool bytes fit under the limit, after writing
        back least-recently-written pages if there is a backing file."""
        limit = self.pool_limit
        if not self.pool_full and self.pool.mem_used + need <= limit:
            return True
        if not self.pool_full:
            self.pool_full = True
            self.counters.pool_limit_hit += 1
        if self.writeback_enabled and self.target() is not None:
            goal = limit * self.accept_threshold // 100 - need
            self.writeback(None, until_below=max(goal, 0))
        self.note_mem()
        return not self.pool_full and self.pool.mem_used + need <= limit

    def note_mem(self) -> None:
        """Track the pool's peak, and leave the full state below the threshold."""
        used = self.pool.mem_used
        if used > self.counters.mem_used_max:
            self.counters.mem_used_max = used
        if self.pool_full and used < self.pool_limit * self.accept_threshold // 100:
            self.pool_full = False

    # -- backend transfer ----------------------------------------------------

    def writeback(self, want: int | None, until_below: int | None = None) -> int:
        """Write up to ``want`` (None: all) pool pages back, oldest cluster
        first, or until the pool uses at most ``until_below`` bytes.  A
        batch that cannot be decompressed or written stays in the pool, and
        the writeback stops there.  Returns the pages moved."""
        moved = 0
        for todo in self.table.pool_words():
            for k in range(0, len(todo), WRITEBACK_BATCH):
                if want is not None and moved >= want:
                    return moved
                if until_below is not None and self.pool.mem_used <= until_below:
                    return moved
                batch = todo[k:k + WRITEBACK_BATCH]
                if want is not None:
                    batch = batch[:want - moved]
                target = self.target()
                if target is None:
                    return moved
                try:
                    pages = [self.codec.decode(self.pool.load(E.pool_object(w), E.pool_length(w)))
                             for _, w in batch]
                    words = self.to_backing(target, [s for s, _ in batch], pages)
                except (OSError, MemoryError):
                    return moved  # the pages stay in the pool
                for (slot, _), word in zip(batch, words, strict=True):
                    self.table.set(slot, word)
                moved += len(batch)
                self.counters.written_back_pages += len(batch)
        return moved

    def evacuate(self, bf: BackingFile) -> None:
        """Move every page of ``bf`` elsewhere, one by one: to another
        backing file, or into the pool when there is none."""
        for pslot, vslot in list(bf.slots_in_use()):
            page = self.read_phys(E.phys_word(bf.index, pslot), bf)
            target = self.target() if self.writeback_enabled else None
            if target is not None:
                word = self.to_backing(target, [vslot], [page])[0]
            else:
                # dense at once: evacuation is background work, and nothing marks
                # these pages for recompression
                word, blob = self.codec.encode(page, self.codec.level)
                if not word:
                    blob = blob if blob is not None else page
                    if not self.room([len(blob)]):
                        raise NoSpaceError("no room in the pool to evacuate into")
                    word = self.store_pool(blob)
            self.table.set(vslot, word)
            self.counters.evacuated_pages += 1

    def compact(self) -> int:
        """Pack sparse pool chunks together; returns the bytes freed.  A move
        that finds no chunk ready ends the compaction early."""
        before = self.pool.mem_used
        try:
            if self.pool.plan_compaction():
                for ci in list(self.table.clusters):
                    if not self.compact_cluster(ci):
                        break
        finally:
            self.end_compaction()
        return max(before - self.pool.mem_used, 0)

    def compact_cluster(self, ci: int) -> bool:
        """Move cluster ``ci``'s pool objects out of the chunks that
        ``Pool.plan_compaction`` marked (each: copy, word, then free, see
        ``_table``).  False if a move found no chunk ready: what moved
        stays moved, the rest stays put, the compaction should end."""
        cl = self.table.clusters.get(ci)
        if cl is None or not cl.pool:
            return True
        pool, table = self.pool, cl.table
        try:
            for idx, w in enumerate(table):
                if w & E.TAG_MASK == E.POOL:
                    obj, length = E.pool_object(w), E.pool_length(w)
                    if pool.draining(obj, length):
                        table[idx] = E.pool_word(pool.copy(obj, length), length)
                        pool.free(obj, length)  # after the word: see ``_table``
        except MemoryError:  # PoolExhausted too
            return False
        return True

    def end_compaction(self) -> None:
        self.pool.end_compaction()
        self.note_mem()

    def remove(self, path: str) -> int:
        """Evacuate the backing file at ``path`` and drop it (see
        ``SwapSpace.remove_backing``); returns the pages moved."""
        bf = next((b for b in self.backing if b is not None and b.path == path), None)
        if bf is None:
            raise FileNotFoundError(errno.ENOENT, f"{path} is not a backing file", path)
        self.evacuating.add(bf.index)
        before = self.counters.evacuated_pages
        try:
            self.evacuate(bf)
        except MemoryError as e:
            raise OSError(errno.ENOMEM, f"out of memory: {e}") from None
        finally:
            self.evacuating.discard(bf.index)
            self.note_mem()
        # quarantined slots may still be read: the file goes when the readers are done
        self.deferred = [(b, p) for b, p in self.deferred if b is not bf]
        self._set_backing(bf.index, None)
        if self.drop_fds is not None:
            self.drop_fds(list(bf.fds))
        if self.phys_readers:
            self.retired.append(bf)
        else:
            bf.close()
        return self.counters.evacuated_pages - before

    def replenish(self, added: threading.Condition, mark: int) -> int:
        """Fault spare chunks in up to ``mark`` (dynamic mode); returns the
        bytes.  The one method that takes the engine lock itself (the lock
        of ``added``), and only for its short steps: the faulting runs
        without it.  Writers waiting on ``added`` are woken.

        The chunks are faulted in REFILL_BATCH at a time, and each batch
        is a spare as soon as it is in.  When the daemon shares a full
        memory cgroup with what swaps to it, faulting a chunk in waits for
        reclaim, and reclaim for the pages it swaps out: stored in the
        spares there are, they free the memory the next batch needs.  A
        refill handed over whole (up to 16 MiB) left the serving threads
        without spares until all of it was in, so they refused the very
        writes that would have freed that memory (measured: see
        docs/safety.md)."""
        with added:
            # at least what a waiting write needs at once (up to a chunk for each of its
            # pages), even past the mark: a refill that stopped short of it would leave
            # that write waiting for chunks that never come
            offs = self.pool.refill_wanted(max(mark, self.spares_needed), self.spares_needed)
            pages = self.table.refill_wanted(TABLE_SPARE_HIGH if mark >= SPARE_HIGH else TABLE_SPARE_LOW)
            files = [bf for bf in self.backing if bf is not None]
        if not offs and not pages and not files:
            return 0
        for bf in files:  # the checksums of the next clusters a file grows by
            with contextlib.suppress(OSError):  # no memory now: growing the file faults them in
                bf.prefault()
        try:
            self.table.fault_in(pages)
        except OSError:
            with added:
                self.table.give_back(pages)
            pages = []
        done = 0
        hand = pages  # the table's pages go with the first batch: a write wants both
        for i in range(0, len(offs), REFILL_BATCH):
            batch = offs[i:i + REFILL_BATCH]
            try:
                self.pool.fault_in(batch)
            except PoolExhausted:
                with added:
                    self.pool.give_back_slots(offs[i:])
                break
            with added:  # spares now, not once the whole refill is in
                self.pool.add_spare(batch)
                self.table.add_spare(hand)
                self.refill_stuck = False
                added.notify_all()
            hand = []
            done += len(batch)
        with added:
            self.table.add_spare(hand)  # no chunk was wanted, or none got in
            if hand:
                self.refill_stuck = False
            added.notify_all()
        return done * CHUNK_BYTES + len(pages) * PAGE

    # -- state -----------------------------------------------------------------

    def gauges(self) -> dict[str, int]:
        """The gauges of ``_stats`` that placement knows (all but disksize)."""
        tp = self.table.tag_pages
        stored = tp[E.SAME] + tp[E.POOL] + tp[E.PHYS]
        backing = [bf for bf in self.backing if bf is not None]
        pool = self.pool
        return {
            "stored_pages": stored,
            "zero_pages": tp[E.SAME],
            "same_pages": tp[E.SAME],
            "pool_pages": tp[E.POOL],
            "phys_pages": tp[E.PHYS],
            "huge_pages": self.table.huge_pages,
            "orig_data_size": stored * PAGE,
            "compr_data_size": pool.payload,
            "mem_used_total": pool.mem_used,
            "mem_limit": self.pool_limit,
            "pool_reserve": pool.reserve,
            "pool_spare": pool.spare_bytes,
            "pool_chunks": pool.chunks,
            "clusters": len(self.table.clusters),
            "metadata_bytes": len(self.table.clusters) * CLUSTER_FOOTPRINT
            + sum(16 * len(bf.rmap) for bf in backing),
            "bd_count": tp[E.PHYS],
            "backing_files": len(backing),
            "backing_allocated_bytes": sum(bf.allocated_bytes() for bf in backing),
            "pool_full": int(self.pool_full),
        }

    def adopt(self, files: dict[int, tuple[str, tuple[int, int, int]]]) -> None:
        """Take over what a previous process left: the table's clusters,
        the pool's chunks and the backing ``files`` (index -> (path, fds)).
        Everything else (allocators, rmaps, gauges) is rebuilt from the
        words; a word whose data is gone is cleared and counted."""
        for i, (path, fds) in files.items():
            self._set_backing(i, BackingFile(path, i, self.max_backing_slots, fds))
        objects: dict[tuple[int, int], dict[int, int]] = {}
        phys: dict[int, dict[int, int]] = {i: {} for i in files}
        lost: list[int] = []
        owner: dict[tuple[int, int], int] = {}
        for slot, w in list(self.table.adopt()):
            t = w & E.TAG_MASK
            if t == E.POOL:
                length = E.pool_length(w)
                c = size_class(length)
                per = self.pool.per_chunk(c)
                obj = E.pool_object(w)
                objects.setdefault((c, obj // per), {})[obj % per] = length
                owner[(c, obj)] = slot
            elif t == E.PHYS:
                f = E.phys_file(w)
                if f in phys:
                    phys[f][E.phys_slot(w)] = slot
                else:
                    lost.append(slot)
            elif t != E.SAME:
                lost.append(slot)
        for key in self.pool.adopt(objects):
            lost.append(owner[key])
        for i, slots in phys.items():
            bf = self.backing[i]
            assert bf is not None
            bf.adopt(slots)
        for slot in lost:  # their words name nothing: a reader would get someone else's data
            ci, idx = divmod(slot, CLUSTER_SLOTS)
            cl = self.table.clusters[ci]
            w = cl.table[idx]
            cl.table[idx] = 0
            self.table.forget(slot, w)
        self.counters.recovery_lost_pages += len(lost)
        tp = self.table.tag_pages
        self.counters.recovered_pages += tp[E.SAME] + tp[E.POOL] + tp[E.PHYS]
        self.note_mem()

    def fds(self) -> dict[str, int]:
        """Every fd a new process needs to take the space over, by name."""
        out = {**self.table.fds, **self.pool.fds}
        for bf in self.backing:
            if bf is not None:
                out.update(bf.fds)
        return out

    def close(self) -> None:
        """Forget every page, release the pool, close and delete the files."""
        self.table.clear()
        self.table.close()
        self.pool.close()
        for i, bf in enumerate(self.backing):
            if bf is not None:
                bf.close()
                self._set_backing(i, None)
        for bf in self.retired:
            bf.close()
        self.retired = []
        self.deferred = []
