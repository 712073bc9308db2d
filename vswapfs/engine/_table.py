"""The cluster table: the RFC's ``virtual_table`` for every live cluster.

Slot ``s`` belongs to cluster ``s // 512``.  A cluster exists only while
one of its slots holds data: it is created by the first word stored in it
and dropped when its last slot is freed, so unused capacity costs nothing
(a dict keyed by cluster index plays the kernel's xarray).  Each
cluster's ``table`` is one 64-bit entry word per slot (see ``_entry``),
8 bytes a slot, in a flat ``array('Q')``.

The dict's order is the writeback LRU: a cluster written to moves to the
young end (:meth:`Table.touch`), writeback starts at the old end.

The table does not own the backends: replacing or freeing a word calls
the ``release`` function it was made with, which frees what the word
pointed at.  Every method runs with the engine lock held.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable, Iterator
from typing import Final

from .._consts import CLUSTER_SLOTS, PAGE
from . import _entry as E
from ._stats import Counters

_EMPTY_TABLE: Final = bytes(8 * CLUSTER_SLOTS)


class Cluster:
    """A dynamic cluster: its virtual_table and how many slots are in use."""

    __slots__ = ("table", "used", "pool")

    def __init__(self) -> None:
        self.table = array("Q", _EMPTY_TABLE)  # the virtual_table, 8 bytes a slot
        self.used = 0  # slots whose word is not NONE
        self.pool = 0  # slots whose word is POOL (writeback skips clusters at 0)


# Bytes one live cluster costs: the object, its table and its dict entry.
CLUSTER_FOOTPRINT: Final = (sys.getsizeof(Cluster()) + sys.getsizeof(array("Q", _EMPTY_TABLE))
                            + 3 * 8)


class Table:
    """Every live cluster, and the per-backend gauges kept from their words."""

    def __init__(self, release: Callable[[int], None], counters: Counters) -> None:
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
            cl = self.clusters[ci] = Cluster()
            self._counters.clusters_created += 1
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
            del self.clusters[ci]
            self._counters.clusters_freed += 1

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
        for w in cl.table:
            if w:
                release(w)
                t = w & E.TAG_MASK
                per_tag[t] += 1
                huge += t == E.POOL and E.pool_length(w) == PAGE
        for t, n in enumerate(per_tag):
            self.tag_pages[t] -= n
        self.huge_pages -= huge
        del self.clusters[ci]
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

    def clear(self) -> None:
        """Forget every cluster without releasing anything (at close)."""
        self.clusters.clear()
        self.tag_pages = [0, 0, 0, 0]
        self.huge_pages = 0
