"""A physical backing file: sparse, grown on demand, slot-allocated by cluster.

Each physical slot is one 4 KiB page at ``slot * 4096``.  Slots are handed out
from 512-slot clusters as the kernel's swap allocator does: the current
cluster first, then partly used clusters, then the lowest free one, and only
then is the file grown.  A cluster that empties is hole-punched, and free
clusters at the end are cut off with ftruncate, so the file's allocated
blocks follow the live data.

For every slot the file keeps, in memory, an rmap entry (the virtual slot it
holds, -1 when free) and the xxh3-64 checksum of its page, checked on every
read: a mismatch is an I/O error, never wrong data.  The checksums live in
a sparse memfd of their own, so that they outlive the process: a new
daemon that is handed the file, its directory and that memfd rebuilds the
rmap and the allocator from the table's words (:meth:`BackingFile.adopt`).

The file is opened with O_DIRECT when its file system allows it, so backing
pages never sit in the page cache; otherwise pages are dropped from the cache
with posix_fadvise after each transfer.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import threading
from array import array
from collections.abc import Iterator, Sequence
from typing import Final

import xxhash

from .. import linux
from .._consts import CLUSTER_BYTES, CLUSTER_SLOTS, PAGE
from . import _inject

_ARMED: Final = _inject.armed  # changed in place, never rebound; Final: a C static when compiled

_STAGE_PAGES: Final = 256
_FREE_RMAP: Final = array("q", [-1] * CLUSTER_SLOTS)

checksum = xxhash.xxh3_64_intdigest


class BackingChecksumError(OSError):
    """A backing page did not match its checksum."""


def runs(slots: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """Split ``slots`` into runs of consecutive values, at most 256 long:
    yields (first index in ``slots``, first slot, length)."""
    i, n = 0, len(slots)
    while i < n:
        j = i + 1
        while j < n and j - i < _STAGE_PAGES and slots[j] == slots[j - 1] + 1:
            j += 1
        yield i, slots[i], j - i
        i = j


def _unsafe_dir(st: os.stat_result, uid: int) -> str | None:
    """Why a directory on the way to a backing file is unsafe, or None."""
    if st.st_uid not in (0, uid):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return "writable by others"
    return None


def open_parent(path: str) -> tuple[int, str]:
    """Open the directory that is to hold backing file ``path`` and return
    (its fd, the file's name in it), after checking that no one but root
    can meddle: every directory on the way is owned by root (or by us) and
    not writable by others, except sticky ones such as /tmp on the way,
    and the last one may not be writable by others even if sticky (anyone
    could take the name first).  Symlinks in the directories are resolved
    once, here; the fd then pins the directory."""
    if not os.path.isabs(path) or path.endswith("/"):
        raise ValueError(f"{path!r}: a backing file needs an absolute path to a file")
    parent, name = os.path.split(path)
    if name in ("", ".", ".."):
        raise ValueError(f"{path!r}: not a file name")
    real = os.path.realpath(parent)
    uid = os.geteuid()
    fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        why = _unsafe_dir(st, uid)
        if why is None and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            why = "writable by others (sticky or not: anyone could create the name first)"
        if why:
            raise PermissionError(errno.EACCES, f"{real}: unsafe directory for a backing file: {why}")
        up = os.path.dirname(real)
        while True:
            why = _unsafe_dir(os.stat(up), uid)
            if why:
                raise PermissionError(errno.EACCES, f"{up}: unsafe directory above a backing file: {why}")
            if up == "/":
                break
            up = os.path.dirname(up)
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def _create(dir_fd: int, name: str, path: str) -> tuple[int, bool]:
    """Create the file, 0600, refusing any name that exists already, a
    symlink included; then O_DIRECT where the file system allows it.
    Returns (fd, direct)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"{path}: exists already (a backing file must be "
                              "new: vswapfs creates it)", path) from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PermissionError(errno.EACCES, f"{path}: created with owner {st.st_uid} and mode "
                                  f"{st.st_mode & 0o777:o}, not ours and 0600")
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
            direct = True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            direct = False
    except BaseException:
        os.close(fd)
        os.unlink(name, dir_fd=dir_fd)
        raise
    return fd, direct


class BackingFile:
    """One backing file of at most ``max_slots`` pages; callers serialise
    every method but :meth:`read`.  ``fds`` (file, directory, checksums):
    take over a file a previous process made (then call :meth:`adopt`)."""

    def __init__(self, path: str, index: int, max_slots: int,
                 fds: tuple[int, int, int] | None = None) -> None:
        self.path = path
        self.index = index  # the 5-bit file index stored in PHYS entries
        self.max_clusters = -(-max_slots // CLUSTER_SLOTS)  # the file never grows past this
        self._name = os.path.basename(path)
        if fds is None:
            self._dir_fd, self._name = open_parent(path)
            try:
                self.fd, self.direct = _create(self._dir_fd, self._name, path)
                self.csum_fd = os.memfd_create("vswapfs-csum", os.MFD_CLOEXEC)
                os.ftruncate(self.csum_fd, 8 * self.max_clusters * CLUSTER_SLOTS)
            except BaseException:
                os.close(self._dir_fd)
                raise
        else:
            self.fd, self._dir_fd, self.csum_fd = fds
            self.direct = bool(fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_DIRECT)
            self.max_clusters = os.fstat(self.csum_fd).st_size // (8 * CLUSTER_SLOTS)
        st = os.fstat(self.fd)
        self._ident = (st.st_dev, st.st_ino)  # what close() deletes, and nothing else
        self.rmap = array("q")  # physical slot -> virtual slot, -1: free
        self._csum_map = mmap.mmap(self.csum_fd, 8 * self.max_clusters * CLUSTER_SLOTS)
        self.csum = memoryview(self._csum_map).cast("Q")  # physical slot -> xxh3-64 of its page
        self.used = array("H")  # cluster -> slots in use
        self.partial: set[int] = set()  # clusters with 0 < used < 512
        self.free_clusters: set[int] = set()  # clusters with used == 0
        self.unpunched: set[int] = set()  # free clusters whose hole punch failed
        self.cursor = -1  # cluster being filled, -1: none
        self.live = 0  # slots in use
        self._stage: mmap.mmap | None = None  # aligned write buffer, made on first write
        self._tls = threading.local()

    # -- allocation -----------------------------------------------------

    def alloc(self, n: int) -> list[int]:
        """Reserve ``n`` slots (contiguous where possible); rmap is set by
        :meth:`bind`.  Reserved slots hold -2 in the rmap.  If the file
        cannot grow, nothing stays reserved and the error is raised."""
        out: list[int] = []
        try:
            self._alloc(n, out)
        except BaseException:
            for p in out:
                self.free(p)
            raise
        return out

    def _alloc(self, n: int, out: list[int]) -> None:
        rmap = self.rmap
        while len(out) < n:
            c = self.cursor
            if c < 0 or self.used[c] >= CLUSTER_SLOTS:
                c = self.cursor = self._next_cluster()
            base = c * CLUSTER_SLOTS
            s = rmap.index(-1, base, base + CLUSTER_SLOTS)
            while len(out) < n and self.used[c] < CLUSTER_SLOTS:
                if rmap[s] == -1:
                    rmap[s] = -2
                    out.append(s)
                    self.used[c] += 1
                    self.live += 1
                s += 1
            self.partial.discard(c)
            self.free_clusters.discard(c)

    def _next_cluster(self) -> int:
        old = self.cursor
        if old >= 0 and 0 < self.used[old] < CLUSTER_SLOTS:
            self.partial.add(old)
        if self.partial:
            return self.partial.pop()
        if self.free_clusters:
            c = min(self.free_clusters)
            self.free_clusters.discard(c)
            return c
        c = len(self.used)
        if _ARMED:
            _inject.point("backing.grow")
        if c >= self.max_clusters:
            raise OSError(errno.ENOSPC, f"{self.path}: {c} clusters, the most it may hold")
        os.ftruncate(self.fd, (c + 1) * CLUSTER_BYTES)
        self.used.append(0)
        self.rmap.extend(_FREE_RMAP)
        return c

    def bind(self, pslot: int, vslot: int, csum: int) -> None:
        """Record that ``pslot`` now holds virtual slot ``vslot``."""
        self.rmap[pslot] = vslot
        self.csum[pslot] = csum
        if _ARMED:
            _inject.point("backing.bind")

    def free(self, pslot: int) -> None:
        """Release a slot; an emptied cluster is punched, a free tail cut.
        Never raises: a file system that cannot punch or truncate keeps
        the blocks, and the file gives them back at the next chance."""
        self.rmap[pslot] = -1
        self.live -= 1
        c = pslot // CLUSTER_SLOTS
        self.used[c] -= 1
        if self.used[c]:
            if c != self.cursor:
                self.partial.add(c)
            return
        self.partial.discard(c)
        if c == self.cursor:
            self.cursor = -1
        self.free_clusters.add(c)
        self._punch(c)
        self._cut_tail()

    def _punch(self, c: int) -> None:
        try:
            if _ARMED:
                _inject.point("backing.punch")
            linux.punch_hole(self.fd, c * CLUSTER_BYTES, CLUSTER_BYTES)
            self.unpunched.discard(c)
        except OSError:
            self.unpunched.add(c)  # the blocks stay allocated: tidy() tries again

    def tidy(self) -> None:
        """Give back what a failed punch or truncate kept: punch the free
        clusters again and cut the free tail.  For idle time."""
        for c in sorted(self.unpunched & self.free_clusters):
            self._punch(c)
        self.unpunched &= self.free_clusters
        self._cut_tail()

    def _cut_tail(self) -> None:
        n = len(self.used)
        while n and self.used[n - 1] == 0 and self.cursor != n - 1:
            n -= 1
            self.free_clusters.discard(n)
        if n == len(self.used):
            return
        try:
            if _ARMED:
                _inject.point("backing.cut")
            os.ftruncate(self.fd, n * CLUSTER_BYTES)
        except OSError:
            return  # the free clusters stay in free_clusters; the next free tries again
        del self.used[n:]
        del self.rmap[n * CLUSTER_SLOTS:]
        if n < self.max_clusters:
            linux.punch_hole(self.csum_fd, 8 * n * CLUSTER_SLOTS, 8 * (len(self.csum) - n * CLUSTER_SLOTS))

    def prefault(self, clusters: int = 2) -> None:
        """Fault in the checksum pages of the next ``clusters`` clusters the
        file would grow by (a page per cluster), so that growing it faults
        no memory in on the serving path.  No lock needed: a page fault."""
        c = len(self.used)
        n = min(clusters, self.max_clusters - c)
        if n > 0:
            linux.populate(linux.buffer_address(self._csum_map) + c * CLUSTER_SLOTS * 8,
                           n * CLUSTER_SLOTS * 8, owned=False)

    def adopt(self, slots: dict[int, int]) -> None:
        """Rebuild the rmap and the allocator of a file taken over, from
        ``slots`` (physical slot -> virtual slot, read off the table).
        Slots no word names are free (a crash between a write and its word
        leaves some); clusters left empty are punched, a free tail cut."""
        n = -(-os.fstat(self.fd).st_size // CLUSTER_BYTES)
        if slots:
            n = max(n, max(slots) // CLUSTER_SLOTS + 1)
        self.used = array("H", bytes(2 * n))
        self.rmap = array("q", [-1]) * (n * CLUSTER_SLOTS)
        for p, v in slots.items():
            self.rmap[p] = v
            self.used[p // CLUSTER_SLOTS] += 1
        self.live = len(slots)
        self.cursor = -1
        self.partial = {c for c in range(n) if 0 < self.used[c] < CLUSTER_SLOTS}
        self.free_clusters = {c for c in range(n) if not self.used[c]}
        for c in sorted(self.free_clusters):
            self._punch(c)
        self._cut_tail()

    @property
    def fds(self) -> dict[str, int]:
        """What a new process needs to take the file over, by name."""
        return {f"backing.{self.index}.file": self.fd, f"backing.{self.index}.dir": self._dir_fd,
                f"backing.{self.index}.csum": self.csum_fd}

    def slots_in_use(self) -> Iterator[tuple[int, int]]:
        """(physical slot, virtual slot) for every bound slot."""
        for p, v in enumerate(self.rmap):
            if v >= 0:
                yield p, v

    # -- I/O ------------------------------------------------------------

    def write(self, pslots: Sequence[int], pages: Sequence[bytes | memoryview]) -> None:
        """Write one page into each slot, coalescing runs into one pwrite."""
        if self._stage is None:
            self._stage = mmap.mmap(-1, _STAGE_PAGES * PAGE)
        stage = memoryview(self._stage)
        for i, first, n in runs(pslots):
            for k in range(n):
                stage[k * PAGE:(k + 1) * PAGE] = pages[i + k]
            self._pwrite(stage[:n * PAGE], first * PAGE)

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        if _ARMED:
            _inject.point("backing.write")
        done = os.pwritev(self.fd, [buf], offset)
        if done != len(buf):
            raise OSError(errno.EIO, f"{self.path}: short write at {offset}")
        if not self.direct:
            os.posix_fadvise(self.fd, offset, len(buf), os.POSIX_FADV_DONTNEED)

    def read(self, pslot: int, expect: int) -> bytes:
        """Read one page and check it against checksum ``expect``.

        Safe to call without the owner's lock: the buffer is per thread."""
        buf = getattr(self._tls, "buf", None)
        if buf is None:
            buf = self._tls.buf = mmap.mmap(-1, PAGE)
        if _ARMED:
            _inject.point("backing.read")
        got = os.preadv(self.fd, [buf], pslot * PAGE)
        if got != PAGE:
            raise OSError(errno.EIO, f"{self.path}: short read of slot {pslot}")
        if not self.direct:
            os.posix_fadvise(self.fd, pslot * PAGE, PAGE, os.POSIX_FADV_DONTNEED)
        page = buf[:]
        if checksum(page) != expect:
            raise BackingChecksumError(errno.EIO, f"{self.path}: checksum mismatch in slot {pslot}")
        return page

    def release_buffers(self) -> None:
        """Give the write buffer's memory back (1 MiB once a writeback has
        used it); the next write makes it again."""
        if self._stage is not None:
            self._stage.close()
            self._stage = None

    # -- state ----------------------------------------------------------

    def allocated_bytes(self) -> int:
        """Bytes the file system has allocated to the file (st_blocks)."""
        return os.fstat(self.fd).st_blocks * 512

    def size(self) -> int:
        """The file's apparent size."""
        return os.fstat(self.fd).st_size

    def close(self, unlink: bool = True) -> None:
        """Close the file; by default remove it (its data is private).  It is
        removed through the directory it was created in, and only if the
        name there is still this file: a path resolved again now could
        name something else."""
        try:
            if unlink:
                try:
                    st = os.stat(self._name, dir_fd=self._dir_fd, follow_symlinks=False)
                    if (st.st_dev, st.st_ino) == self._ident:
                        os.unlink(self._name, dir_fd=self._dir_fd)
                except FileNotFoundError:
                    pass
        finally:
            os.close(self.fd)
            os.close(self._dir_fd)
            self.release_buffers()
            self.csum.release()
            self._csum_map.close()
            os.close(self.csum_fd)
