"""The cluster table: the RFC's ``virtual_table`` for every live cluster.

Slot ``s`` belongs to cluster ``s // 512``.  A cluster exists only while
one of its slots holds data: it is created by the first word stored in it
and dropped when its last slot is freed, so unused capacity costs nothing
(a dict keyed by cluster index plays the kernel's xarray).  Each
cluster's ``table`` is one 64-bit entry word per slot (see ``_entry``),
8 bytes a slot: one 4 KiB page of a sparse memfd that spans the whole
space, so a cluster's words cost a page of memory only while it exists
(dropping it punches the page out) and they outlive the process that
wrote them: a new daemon maps the same memfd again (see ``_recover``).

Crash order.  A word is the commit point of everything it points at: the
data is stored first, then the word (one aligned 8-byte store), and what
the old word pointed at is released only after.  A process killed at any
instruction leaves every word pointing at data that is whole.

The dict's order is the writeback LRU: a cluster written to moves to the
young end (:meth:`Table.touch`), writeback starts at the old end.

The table does not own the backends: replacing or freeing a word calls
the ``release`` function it was made with, which frees what the word
pointed at.  Every method runs with the engine lock held.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Callable, Iterator
from typing import Final

from .. import linux
from .._consts import CLUSTER_SLOTS, PAGE
from . import _entry as E
from . import _inject
from ._stats import Counters

TABLE_PAGE: Final = 8 * CLUSTER_SLOTS  # bytes of one cluster's words: one 4 KiB page


class Cluster:
    """A dynamic cluster: its virtual_table and how many slots are in use."""

    __slots__ = ("table", "used", "pool")

    def __init__(self, table: memoryview) -> None:
        self.table = table  # the virtual_table, 8 bytes a slot, in the table memfd
        self.used = 0  # slots whose word is not NONE
        self.pool = 0  # slots whose word is POOL (writeback skips clusters at 0)


# Bytes one live cluster costs: its page of words, the object, its view and its dict entry.
CLUSTER_FOOTPRINT: Final = (TABLE_PAGE + sys.getsizeof(Cluster(memoryview(b""))) + 200 + 3 * 8)


def table_bytes(nslots: int) -> int:
    """Size of the table memfd of a space of ``nslots`` slots."""
    return -(-nslots // CLUSTER_SLOTS) * TABLE_PAGE


class Table:
    """Every live cluster, and the per-backend gauges kept from their words."""

    def __init__(self, release: Callable[[int], None], counters: Counters, nslots: int,
                 fd: int | None = None) -> None:
        """A table for ``nslots`` slots in a new memfd, or, given ``fd``, in
        that one as a previous process left it (then :meth:`adopt` its clusters)."""
        if fd is None:
            fd = os.memfd_create("vswapfs-table", os.MFD_CLOEXEC)
            os.ftruncate(fd, table_bytes(nslots))
        self.fd = fd  # the memfd the words live in
        self._map = mmap.mmap(fd, table_bytes(nslots))
        self._words = memoryview(self._map).cast("Q")  # every slot's word, 0 where no cluster
        self.clusters: dict[int, Cluster] = {}  # cluster index -> cluster, oldest write first
        self.tag_pages = [0, 0, 0, 0]  # slots per backend, indexed by tag
        self.huge_pages = 0  # POOL pages kept raw (4096 bytes)
        self._release = release  # frees what a word points at; never raises
        self._counters = counters

    def word(self, slot: int) -> int:
        """The word of ``slot`` (0, NONE, if its cluster does not exist)."""
        cl = self.clusters.get(slot // CLUSTER_SLOTS)
        return cl.table[slot % CLUSTER_SLOTS] if cl else 0

    def _account(self, word: int, delta: int) -> None:
        t = word & E.TAG_MASK
        self.tag_pages[t] += delta
        if t == E.POOL and E.pool_length(word) == PAGE:
            self.huge_pages += delta

    def set(self, slot: int, word: int) -> None:
        """Point ``slot`` at ``word``, releasing what it held; creates and
        drops its cluster as needed.  The caller has stored the data."""
        ci, idx = divmod(slot, CLUSTER_SLOTS)
        cl = self.clusters.get(ci)
        if cl is None:
            if not word:
                return
            cl = self.clusters[ci] = self._cluster(ci)
            self._counters.clusters_created += 1
        old = cl.table[idx]
        cl.table[idx] = word  # the commit point: the data is in place, the old still whole
        if _inject.armed:
            _inject.point("table.set")
        if old:
            self._release(old)  # only now: a crash before this leaks, never loses
            self._account(old, -1)
            cl.used -= 1
            cl.pool -= (old & E.TAG_MASK) == E.POOL
        if word:
            self._account(word, 1)
            cl.used += 1
            cl.pool += (word & E.TAG_MASK) == E.POOL
        elif not cl.used:
            del self.clusters[ci]
            self._punch(ci)
            self._counters.clusters_freed += 1

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
            self._punch(ci)

    def _cluster(self, ci: int) -> Cluster:
        return Cluster(self._words[ci * CLUSTER_SLOTS:(ci + 1) * CLUSTER_SLOTS])

    def _punch(self, ci: int) -> None:
        """Give a dropped cluster's page of words back (they read as 0)."""
        try:
            linux.punch_hole(self.fd, ci * TABLE_PAGE, TABLE_PAGE)
        except OSError:  # shmem always can; if not, zeros cost the page until reused
            self._words[ci * CLUSTER_SLOTS:(ci + 1) * CLUSTER_SLOTS] = memoryview(
                bytes(TABLE_PAGE)).cast("Q")

    def touch(self, first: int, count: int) -> None:
        """Move the clusters of slots ``first .. first+count-1`` to the
        young end of the writeback LRU."""
        for ci in range(first // CLUSTER_SLOTS, (first + count - 1) // CLUSTER_SLOTS + 1):
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
        self._punch(ci)  # every word 0 at once, before anything they held is released
        if _inject.armed:
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
        """Take over the clusters a previous process left in the memfd:
        yields every (slot, word) that holds data, oldest cluster first
        by index, and rebuilds the gauges.  Pages of words that are all 0
        (a process killed between the last free and the punch) are
        punched now."""
        size = len(self._words) * 8
        off = 0
        while off < size:
            try:
                off = os.lseek(self.fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after off
                break
            end = os.lseek(self.fd, off, os.SEEK_HOLE)
            for ci in range(off // TABLE_PAGE, -(-end // TABLE_PAGE)):
                cl = self._cluster(ci)
                words = cl.table.tolist()
                if not any(words):
                    self._punch(ci)
                    continue
                self.clusters[ci] = cl
                base = ci * CLUSTER_SLOTS
                for idx, w in enumerate(words):
                    if w:
                        cl.used += 1
                        cl.pool += (w & E.TAG_MASK) == E.POOL
                        self._account(w, 1)
                        yield base + idx, w
            off = end

    def clear(self) -> None:
        """Forget every cluster without releasing anything (at close), and
        give the words' memory back."""
        self.clusters.clear()
        self.tag_pages = [0, 0, 0, 0]
        self.huge_pages = 0
        if self.fd >= 0:
            linux.punch_hole(self.fd, 0, len(self._words) * 8)

    def close(self) -> None:
        """Unmap the words and close the memfd (after :meth:`clear`, or to
        leave them to a new process that holds the memfd too)."""
        self.clusters.clear()
        try:
            self._words.release()
            self._map.close()
        except BufferError:  # a view is still held somewhere: the GC unmaps it
            pass
        os.close(self.fd)
        self.fd = -1
