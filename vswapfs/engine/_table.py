"""The cluster table: the RFC's ``virtual_table`` for every live cluster.

Slot ``s`` belongs to cluster ``s // 512``.  A cluster exists only while
one of its slots holds data: it is created by the first word stored in it
and dropped when its last slot is freed, so unused capacity costs nothing
(a dict keyed by cluster index plays the kernel's xarray).  Each
cluster's ``table`` is one 64-bit entry word per slot (see ``_entry``),
8 bytes a slot: one 4 KiB page.

**Pages that outlive the process, and are ready before they are needed.**
The pages live in a memfd, the *table arena*, with a small second memfd,
the *owners*, that says which cluster each page of the arena holds (8
bytes a page, faulted in whole at start: 8 bytes per 2 MiB of space).  A
new daemon maps both again and finds every cluster (:meth:`Table.adopt`).
A new cluster takes a page from a list of *spares*, faulted in beforehand
(:meth:`Table.refill_wanted` and the housekeeping thread, as for the pool's
chunks), because a thread that serves the kernel must not fault memory in
(see ``_daemon``); a dropped cluster's page, zeroed, becomes a spare again,
or is punched out beyond the spare list's mark.  ``dynamic`` False (a
library user, a reserve): a page is faulted in on the spot when no spare
is left.

Crash order.  A word is the commit point of everything it points at: the
data is stored first, then the word (one aligned 8-byte store), and what
the old word pointed at is released only after.  A cluster's owner entry
is written before its first word and cleared before what its words held
is released.  A process killed at any instruction leaves every word that
an owner entry makes visible pointing at data that is whole.

The dict's order is the writeback LRU: a cluster written to moves to the
young end (:meth:`Table.touch`), writeback starts at the old end.

The table does not own the backends: replacing or freeing a word calls
the ``release`` function it was made with, which frees what the word
pointed at.  Every method runs with the engine lock held, except
:meth:`fault_in`.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Callable, Iterator
from typing import Final

from mypy_extensions import mypyc_attr

from .. import linux
from .._consts import CLUSTER_SLOTS, PAGE
from . import _entry as E
from . import _inject
from ._stats import Counters

_ARMED: Final = _inject.armed  # changed in place, never rebound; Final: a C static when compiled

TABLE_PAGE: Final = 8 * CLUSTER_SLOTS  # bytes of one cluster's words: one 4 KiB page
# Dynamic mode: spare pages kept while idle (256 KiB, for 128 MiB of new clusters), and
# refilled to while busy (4 MiB, for 2 GiB): under memory pressure housekeeping may wait
# on reclaim for seconds, and every write that finds no page for its new cluster waits
# and is refused meanwhile (a cluster's words used to come from the heap's headroom)
SPARE_LOW: Final = 64
SPARE_HIGH: Final = 1024
_ZERO_PAGE: Final = memoryview(bytes(TABLE_PAGE)).cast("Q")


@mypyc_attr(native_class=False)  # mypyc compiles no subclass of MemoryError
class TableExhausted(MemoryError):
    """No spare page is ready for a new cluster (dynamic mode)."""


class Cluster:
    """A dynamic cluster: its virtual_table and how many slots are in use."""

    __slots__ = ("table", "page", "used", "pool", "fresh")

    def __init__(self, table: memoryview, page: int) -> None:
        self.table = table  # the virtual_table, 8 bytes a slot, in the table arena
        self.page = page  # which page of the arena
        self.used = 0  # slots whose word is not NONE
        self.pool = 0  # slots whose word is POOL (writeback skips clusters at 0)
        self.fresh = 0  # bit i: slot i was written since recompression last looked


# Bytes one live cluster costs: its page of words, the object, its view and its dict entry.
CLUSTER_FOOTPRINT: Final = (TABLE_PAGE + sys.getsizeof(Cluster(memoryview(b""), 0)) + 200 + 3 * 8)


class Table:
    """Every live cluster, and the per-backend gauges kept from their words."""

    def __init__(self, release: Callable[[int], None], counters: Counters, nslots: int,
                 fds: tuple[int, int] | None = None, *, dynamic: bool = False) -> None:
        """A table for ``nslots`` slots in new memfds, or, given ``fds``
        (arena, owners), in those as a previous process left them (then
        :meth:`adopt` its clusters)."""
        self.npages = -(-nslots // CLUSTER_SLOTS)  # at most one page per cluster
        if fds is None:
            fds = (os.memfd_create("vswapfs-table", os.MFD_CLOEXEC),
                   os.memfd_create("vswapfs-table-owners", os.MFD_CLOEXEC))
            os.ftruncate(fds[0], self.npages * TABLE_PAGE)
            os.ftruncate(fds[1], self.npages * 8)
        self.fd, self.owners_fd = fds  # the arena, the owners
        self.dynamic = dynamic
        self._map = mmap.mmap(self.fd, self.npages * TABLE_PAGE)
        self._base = linux.buffer_address(self._map)
        self._words = memoryview(self._map).cast("Q")
        self._owner_map = mmap.mmap(self.owners_fd, self.npages * 8)
        linux.populate(linux.buffer_address(self._owner_map), self.npages * 8, owned=False)  # adopted: live
        self._owner = memoryview(self._owner_map).cast("Q")  # page -> cluster index + 1, 0: free
        self._spare: list[int] = []  # pages faulted in, zero, owned by no cluster
        self._holes: list[int] = []  # pages below _next_page owned by nothing, not faulted in
        self._next_page = 0  # pages from here on were never used
        self.clusters: dict[int, Cluster] = {}  # cluster index -> cluster, oldest write first
        self.tag_pages = [0, 0, 0, 0]  # slots per backend, indexed by tag
        self.huge_pages = 0  # POOL pages kept raw (4096 bytes)
        self._release = release  # frees what a word points at; never raises
        self._counters = counters

    @property
    def fds(self) -> dict[str, int]:
        """The memfds the table lives in, by name."""
        return {"table": self.fd, "table.owners": self.owners_fd}

    # -- pages ------------------------------------------------------------

    def _take_pages(self, n: int) -> list[int]:
        out: list[int] = []
        while self._holes and len(out) < n:
            out.append(self._holes.pop())
        while len(out) < n and self._next_page < self.npages:
            out.append(self._next_page)
            self._next_page += 1
        return out

    def refill_wanted(self, mark: int = SPARE_HIGH) -> list[int]:
        """Pages to fault in so that the spares reach ``mark`` (dynamic
        mode); fault them in with :meth:`fault_in` without the lock, then
        :meth:`add_spare`."""
        if not self.dynamic or len(self._spare) >= mark * 3 // 4:
            return []
        return self._take_pages(mark - len(self._spare))

    def fault_in(self, pages: list[int]) -> None:
        """Fault pages in (no lock needed: they belong to no one yet)."""
        linux.populate_all(self._base, [p * TABLE_PAGE for p in pages], TABLE_PAGE)

    def add_spare(self, pages: list[int]) -> None:
        self._spare.extend(pages)

    def give_back(self, pages: list[int]) -> None:
        """Pages from :meth:`refill_wanted` that could not be faulted in."""
        for p in pages:
            self._punch(p)

    def shed(self, keep: int = SPARE_LOW) -> None:
        """Give spare pages beyond ``keep`` back (when idle)."""
        while len(self._spare) > keep:
            self._punch(self._spare.pop())

    def ready(self, first: int, count: int) -> bool:
        """True if storing slots ``first .. first+count-1`` gets a page for
        every cluster it creates without faulting memory in."""
        lo, hi = first // CLUSTER_SLOTS, (first + count - 1) // CLUSTER_SLOTS
        if not self.dynamic or len(self._spare) > hi - lo:  # the usual case: no counting
            return True
        span = range(lo, hi + 1)
        return sum(1 for ci in span if ci not in self.clusters) <= len(self._spare)

    def _new_cluster(self, ci: int) -> Cluster:
        if self._spare:
            page = self._spare.pop()
        else:
            if self.dynamic:
                raise TableExhausted("no spare table page is ready (the refill is behind)")
            pages = self._take_pages(1)
            if not pages:
                raise TableExhausted("the table arena is full")  # one page per cluster: never
            page = pages[0]
        self._owner[page] = ci + 1  # before its first word: the page now names the cluster
        return Cluster(self._words[page * CLUSTER_SLOTS:(page + 1) * CLUSTER_SLOTS], page)

    def _retire(self, cl: Cluster, clear: bool) -> None:
        """Give a dropped cluster's page back: zeroed (``clear``: its words
        are not all 0 yet), as a spare, or punched beyond the spare mark."""
        if len(self._spare) < SPARE_HIGH:
            if clear:
                cl.table[:] = _ZERO_PAGE
            self._spare.append(cl.page)
        else:
            self._punch(cl.page)

    def _punch(self, page: int) -> None:
        try:
            linux.punch_hole(self.fd, page * TABLE_PAGE, TABLE_PAGE)
        except OSError:  # shmem always can; if not, zero it: the page stays until reused
            self._words[page * CLUSTER_SLOTS:(page + 1) * CLUSTER_SLOTS] = _ZERO_PAGE
        self._holes.append(page)

    # -- words ------------------------------------------------------------

    def word(self, slot: int) -> int:
        """The word of ``slot`` (0, NONE, if its cluster does not exist)."""
        cl = self.clusters.get(slot // CLUSTER_SLOTS)
        return cl.table[slot % CLUSTER_SLOTS] if cl else 0

    def _account(self, word: int, delta: int) -> None:
        t = word & E.TAG_MASK
        tp = self.tag_pages
        tp[t] = tp[t] + delta
        if t == E.POOL and E.pool_length(word) == PAGE:
            self.huge_pages += delta

    def set(self, slot: int, word: int) -> None:
        """Point ``slot`` at ``word``, releasing what it held; creates and
        drops its cluster as needed.  The caller has stored the data."""
        ci = slot // CLUSTER_SLOTS  # not divmod: compiled, // and % stay native int arithmetic
        idx = slot % CLUSTER_SLOTS
        cl = self.clusters.get(ci)
        if cl is None:
            if not word:
                return
            cl = self.clusters[ci] = self._new_cluster(ci)
            self._counters.clusters_created += 1
        old = cl.table[idx]
        cl.table[idx] = word  # the commit point: the data is in place, the old still whole
        if _ARMED:
            _inject.point("table.set")
        if old:
            self._release(old)  # only now: a crash before this leaks, never loses
            self._account(old, -1)
            cl.used -= 1
            cl.pool -= (old & E.TAG_MASK) == E.POOL
        if word:
            t = word & E.TAG_MASK  # _account(word, 1), inline: once per page written
            tp = self.tag_pages
            tp[t] = tp[t] + 1  # not ``+=`` on the item: compiled, that is a generic in-place add
            if t == E.POOL:
                cl.pool += 1
                if E.pool_length(word) == PAGE:
                    self.huge_pages += 1
            cl.used += 1
        elif not cl.used:
            del self.clusters[ci]
            self._owner[cl.page] = 0
            self._retire(cl, clear=False)  # every word is 0 already
            self._counters.clusters_freed += 1

    def set_run(self, first: int, words: list[int], fresh: bool = False) -> None:
        """:meth:`set` the slots from ``first`` on to ``words``, then make
        their clusters the youngest (:meth:`touch`): what a write does.
        ``fresh``: mark the slots for recompression (:meth:`fresh_words`)."""
        for i, w in enumerate(words):
            self.set(first + i, w)  # a direct call, compiled; a bound method in a local is not
        if fresh:
            self.mark_fresh(first, len(words))
        self.touch(first, len(words))

    def mark_fresh(self, first: int, count: int) -> None:
        """Mark slots ``first .. first+count-1`` for :meth:`fresh_words`."""
        clusters = self.clusters
        end = first + count
        while first < end:  # a cluster's run of slots at a time
            ci = first // CLUSTER_SLOTS
            idx = first % CLUSTER_SLOTS
            n = min(end - first, CLUSTER_SLOTS - idx)
            cl = clusters.get(ci)
            if cl is not None:  # None: its slots hold nothing
                cl.fresh |= ((1 << n) - 1) << idx
            first += n

    def fresh_words(self, want: int) -> list[tuple[int, int]]:
        """Up to ``want`` (slot, word) of compressed pool pages written since
        the last look, oldest cluster first; their marks are cleared (a
        write marks its slots again)."""
        out: list[tuple[int, int]] = []
        for ci, cl in self.clusters.items():
            m = cl.fresh
            if not m:
                continue
            base, table = ci * CLUSTER_SLOTS, cl.table
            while m and len(out) < want:
                low = m & -m
                m ^= low
                idx = low.bit_length() - 1
                w = table[idx]
                if w & E.TAG_MASK == E.POOL and E.pool_length(w) < PAGE:
                    out.append((base + idx, w))
            cl.fresh = m
            if len(out) >= want:
                break
        return out

    def forget(self, slot: int, word: int) -> None:
        """Take back the gauges of a word that was cleared without release
        (at takeover, a word whose data was gone)."""
        ci = slot // CLUSTER_SLOTS
        cl = self.clusters[ci]
        self._account(word, -1)
        cl.used -= 1
        cl.pool -= (word & E.TAG_MASK) == E.POOL
        if not cl.used:
            del self.clusters[ci]
            self._owner[cl.page] = 0
            self._retire(cl, clear=False)

    def touch(self, first: int, count: int) -> None:
        """Move the clusters of slots ``first .. first+count-1`` to the
        young end of the writeback LRU."""
        lo, hi = first // CLUSTER_SLOTS, (first + count - 1) // CLUSTER_SLOTS
        if lo == hi and self.clusters and next(reversed(self.clusters)) == lo:
            return  # the youngest already: a write next to the last one
        for ci in range(lo, hi + 1):
            cl = self.clusters.pop(ci, None)
            if cl is not None:
                self.clusters[ci] = cl

    def free(self, lo: int, hi: int) -> int:
        """Free slots ``lo .. hi-1``; returns how many held data."""
        freed = 0
        c_lo, c_hi = lo // CLUSTER_SLOTS, (hi - 1) // CLUSTER_SLOTS
        if c_hi - c_lo + 1 > len(self.clusters):
            cis = sorted(c for c in self.clusters if c_lo <= c <= c_hi)
        else:
            cis = [c for c in range(c_lo, c_hi + 1) if c in self.clusters]
        for ci in cis:
            cl = self.clusters[ci]
            base = ci * CLUSTER_SLOTS
            a, b = max(lo - base, 0), min(hi - base, CLUSTER_SLOTS)
            if a == 0 and b == CLUSTER_SLOTS:  # what the kernel discards: a whole cluster
                freed += self._drop(ci, cl)
                continue
            table = cl.table
            for idx in range(a, b):
                if table[idx]:
                    self.set(base + idx, 0)
                    freed += 1
                    if ci not in self.clusters:
                        break
        return freed

    def _drop(self, ci: int, cl: Cluster) -> int:
        """Free every slot of cluster ``ci`` and drop it; returns how many
        held data.  :meth:`set` slot by slot, the bookkeeping summed once."""
        release = self._release
        per_tag = [0, 0, 0, 0]
        huge = 0
        words = cl.table.tolist()
        del self.clusters[ci]
        self._owner[cl.page] = 0  # the whole cluster is gone at once, before what it held
        if _ARMED:
            _inject.point("table.drop")
        for w in words:
            if w:
                release(w)
                t = w & E.TAG_MASK
                per_tag[t] += 1
                huge += t == E.POOL and E.pool_length(w) == PAGE
        for t, n in enumerate(per_tag):
            self.tag_pages[t] -= n
        self.huge_pages -= huge
        self._retire(cl, clear=True)
        self._counters.clusters_freed += 1
        return cl.used

    def pool_words(self) -> Iterator[list[tuple[int, int]]]:
        """Per cluster that holds pool pages, oldest first: its (slot, word)
        pairs of POOL words, read when the cluster's turn comes (callers
        may change the table between clusters)."""
        for ci in list(self.clusters):
            cl = self.clusters.get(ci)
            if cl is None or not cl.pool:
                continue
            base = ci * CLUSTER_SLOTS
            yield [(base + i, w) for i, w in enumerate(cl.table) if w & E.TAG_MASK == E.POOL]

    def words(self) -> Iterator[tuple[int, int]]:
        """Every (slot, word) that holds data."""
        for ci, cl in self.clusters.items():
            base = ci * CLUSTER_SLOTS
            for idx, w in enumerate(cl.table):
                if w:
                    yield base + idx, w

    def check(self) -> list[str]:
        """Problems in the per-cluster and global gauges against a recount."""
        bad: list[str] = []
        tags = [0, 0, 0, 0]
        huge = 0
        for ci, cl in self.clusters.items():
            used = sum(1 for w in cl.table if w)
            pool = sum(1 for w in cl.table if w & E.TAG_MASK == E.POOL)
            if (used, pool) != (cl.used, cl.pool) or not used:
                bad.append(f"cluster {ci}: used/pool {cl.used}/{cl.pool}, recount {used}/{pool}")
            for w in cl.table:
                if w:
                    tags[w & E.TAG_MASK] += 1
                    huge += w & E.TAG_MASK == E.POOL and E.pool_length(w) == PAGE
        if tags != self.tag_pages or huge != self.huge_pages:
            bad.append(f"gauges {self.tag_pages}/{self.huge_pages}, recount {tags}/{huge}")
        return bad

    def adopt(self) -> Iterator[tuple[int, int]]:
        """Take over the clusters a previous process left: yields every
        (slot, word) that holds data, by cluster index, and rebuilds the
        gauges and the page lists.  A page whose owner entry is set but
        whose words are all 0 (a process killed between the last free and
        the owner's clear), or that names a cluster another page holds, is
        given back."""
        owned = sorted((ci - 1, p) for p, ci in enumerate(self._owner.tolist()) if ci)
        used: set[int] = set()
        for ci, p in owned:
            cl = Cluster(self._words[p * CLUSTER_SLOTS:(p + 1) * CLUSTER_SLOTS], p)
            words = cl.table.tolist()
            if ci in self.clusters or ci >= self.npages or not any(words):
                self._owner[p] = 0
                continue
            self.clusters[ci] = cl
            used.add(p)
            cl.fresh = (1 << CLUSTER_SLOTS) - 1  # which pages are dense is not kept: look at all
            base = ci * CLUSTER_SLOTS
            for idx, w in enumerate(words):
                if w:
                    cl.used += 1
                    cl.pool += (w & E.TAG_MASK) == E.POOL
                    self._account(w, 1)
                    yield base + idx, w
        self._next_page = max(used) + 1 if used else 0
        if self._next_page < self.npages:
            linux.punch_hole(self.fd, self._next_page * TABLE_PAGE,
                             (self.npages - self._next_page) * TABLE_PAGE)
        for p in range(self._next_page):
            if p not in used:
                self._punch(p)

    def clear(self) -> None:
        """Forget every cluster without releasing anything (at close), and
        give the words' memory back."""
        self.clusters.clear()
        self.tag_pages = [0, 0, 0, 0]
        self.huge_pages = 0
        if self.fd >= 0:
            linux.punch_hole(self.fd, 0, self.npages * TABLE_PAGE)
            linux.punch_hole(self.owners_fd, 0, self.npages * 8)

    def close(self) -> None:
        """Unmap the words and close the memfd (after :meth:`clear`, or to
        leave them to a new process that holds the memfd too)."""
        self.clusters.clear()
        try:
            self._words.release()
            self._map.close()
            self._owner.release()
            self._owner_map.close()
        except BufferError:  # a view is still held somewhere: the GC unmaps it
            pass
        os.close(self.fd)
        os.close(self.owners_fd)
        self.fd = self.owners_fd = -1
