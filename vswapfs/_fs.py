"""The vswapfs file system: a swap image and ``control/``, over the engine.

    /swap       the image the kernel swaps into (loop device), mode 0600;
                its size is the virtual space, nothing is preallocated
    /control/   stats, knobs and actions (see ``_control``)

Reads and writes of the image go to the engine; a punch-hole fallocate
(what loop makes of a discard) frees the range.  Served with channel
threads (the default), these run on the thread that read the request (the
``*_blocking`` methods) and never touch the event loop.  What the event
loop serves runs inline in the daemon (``threads=0``: no thread may start
after the mount, see ``_daemon``); given ``threads``, engine calls of more
than a few pages go to that many worker threads instead.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from . import linux
from ._consts import CLUSTER_BYTES, PAGE, SERVING_THREAD
from ._control import ControlFile, build_control_files
from ._ratelimit import RateLimited
from .engine import NoSpaceError, SwapSpace
from .fuse import (
    DEFER,
    FOPEN_DIRECT_IO,
    FOPEN_PARALLEL_DIRECT_WRITES,
    ROOT_ID,
    Attr,
    Context,
    DirEntry,
    Entry,
    FuseError,
    InitInfo,
    Opened,
    Operations,
    PollStats,
    ServiceStats,
    SetattrRequest,
    StatFs,
)

log = logging.getLogger("vswapfs")

SWAP_INO = 2
CONTROL_INO = 3
FIRST_CONTROL_FILE_INO = 16
INLINE_BYTES = 16 * 1024  # requests up to this size skip the thread hop
SWAP_HEADER_BYTES = PAGE  # mkswap's header page: kept so that swapon works again
PUNCH = linux.FALLOC_FL_PUNCH_HOLE | linux.FALLOC_FL_KEEP_SIZE

_T = TypeVar("_T")


class SwapFS(Operations):
    """Serves one :class:`SwapSpace` as ``/swap`` plus ``/control``."""

    def __init__(self, space: SwapSpace, *, threads: int = 2,
                 daemon: dict[str, str] | None = None) -> None:
        self.space = space
        self._limiter = trio.CapacityLimiter(max(threads, 1))
        self._inline_all = threads == 0  # reserve mode: no thread hops at all
        # the transport's per-opcode (requests, bytes, ns), handed over by init()
        self._service_stats: ServiceStats = dict
        # and its channel threads' polling (Session.poll_stats), also from init()
        self._poll_stats: PollStats = lambda: (0, 0, 0, 0, 0, 0)
        self._files = list(build_control_files(space, lambda: self._service_stats(),
                                               daemon or {}, lambda: self._poll_stats()).values())
        self._by_name = {f.name.encode(): i + FIRST_CONTROL_FILE_INO for i, f in enumerate(self._files)}
        self._snapshots: dict[int, bytes] = {}  # control fh -> content read at open
        self._image_requests = 0  # reads and writes of the image (a lost count is harmless)
        self._area_discards = 0  # discards from the page after the swap header on (swapon's)
        self._refusals = RateLimited()  # what the log says of refused writes
        self._next_fh = 1
        self._mtime = int(time.time())
        self.on_change: Callable[[], None] | None = None  # called after a control write took effect

    def requests_seen(self) -> int:
        """Reads and writes of the image so far: housekeeping watches it to
        know when the daemon is busy (discards only free memory)."""
        return self._image_requests

    def area_discards(self) -> int:
        """Discards that began right after the swap header: the whole-area
        discard ``swapon --discard`` sends before it turns the area on (the
        kernel's per-cluster discards begin on 2 MiB boundaries).  Housekeeping
        watches it so that no swapon goes unseen (see ``_daemon.SwapoffWatch``);
        counted before the discard is made, so a count looked at under the
        engine lock has seen every such discard that lock let through."""
        return self._area_discards

    def init(self, info: InitInfo, service_stats: ServiceStats, poll_stats: PollStats) -> None:
        """INIT is done: keep the transport's counts for ``fuse_stat`` and
        ``busy_poll``."""
        self._service_stats, self._poll_stats = service_stats, poll_stats

    def channel_started(self) -> None:
        """On each channel thread: it serves the kernel, so it faults its
        stack in now and asks not to do I/O in its own reclaim (see
        ``_daemon``); named SERVING_THREAD for ps and the checks."""
        linux.set_thread_name(SERVING_THREAD)
        linux.prefault_stack()
        linux.io_flusher()

    # -- inodes ---------------------------------------------------------------

    def _control(self, ino: int) -> ControlFile | None:
        i = ino - FIRST_CONTROL_FILE_INO
        return self._files[i] if 0 <= i < len(self._files) else None

    def _attr(self, ino: int) -> Attr:
        if ino == ROOT_ID:
            return Attr(ino, stat.S_IFDIR | 0o755, nlink=3, mtime=self._mtime)
        if ino == CONTROL_INO:
            return Attr(ino, stat.S_IFDIR | 0o755, nlink=2, mtime=self._mtime)
        if ino == SWAP_INO:
            return Attr(ino, stat.S_IFREG | 0o600, size=self.space.size,
                        blocks=self.space.stored_pages * (PAGE // 512), mtime=self._mtime)
        f = self._control(ino)
        if f is None:
            raise FuseError(errno.ENOENT)
        return Attr(ino, stat.S_IFREG | f.mode, size=PAGE, mtime=self._mtime)

    async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        if parent == ROOT_ID:
            ino = {b"swap": SWAP_INO, b"control": CONTROL_INO}.get(name)
        elif parent == CONTROL_INO:
            ino = self._by_name.get(name)
        else:
            raise FuseError(errno.ENOTDIR)
        if ino is None:
            raise FuseError(errno.ENOENT)
        return Entry(self._attr(ino))

    async def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:
        return self._attr(ino)

    async def setattr(self, ctx: Context, ino: int, req: SetattrRequest) -> Attr:
        attr = self._attr(ino)
        if req.mode is not None or req.uid is not None or req.gid is not None:
            raise FuseError(errno.EPERM)
        if req.size is not None and ino == SWAP_INO and req.size != self.space.size:
            raise FuseError(errno.EPERM, "the image has a fixed size")
        return attr  # O_TRUNC on a control file and time updates are no-ops

    async def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        if ino not in (ROOT_ID, CONTROL_INO):
            raise FuseError(errno.ENOTDIR)
        return Opened()

    async def readdir(self, ctx: Context, ino: int, fh: int, offset: int) -> list[DirEntry]:
        d = stat.S_IFDIR
        if ino == ROOT_ID:
            entries = [DirEntry(ROOT_ID, b".", d), DirEntry(ROOT_ID, b"..", d),
                       DirEntry(SWAP_INO, b"swap", stat.S_IFREG), DirEntry(CONTROL_INO, b"control", d)]
        else:
            entries = [DirEntry(CONTROL_INO, b".", d), DirEntry(ROOT_ID, b"..", d)]
            entries += [DirEntry(ino, name, stat.S_IFREG) for name, ino in self._by_name.items()]
        return entries[offset:]

    async def statfs(self, ctx: Context, ino: int) -> StatFs:
        blocks = self.space.size // PAGE
        free = blocks - self.space.stored_pages
        return StatFs(blocks=blocks, bfree=free, bavail=free, files=len(self._files) + 3)

    # -- open/read/write ------------------------------------------------------------

    async def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        if ino == SWAP_INO:
            return Opened(0, FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES)
        f = self._control(ino)
        if f is None:
            raise FuseError(errno.EISDIR if ino in (ROOT_ID, CONTROL_INO) else errno.ENOENT)
        fh = self._next_fh
        self._next_fh += 1
        if f.read and (flags & os.O_ACCMODE) != os.O_WRONLY:
            self._snapshots[fh] = (await self._run(f.read, self.space)).encode()
        return Opened(fh, FOPEN_DIRECT_IO)

    async def release(self, ctx: Context, ino: int, fh: int) -> None:
        self._snapshots.pop(fh, None)

    async def _run(self, fn: Callable[..., _T], *args: Any, size: int = INLINE_BYTES + 1) -> _T:
        """``fn(*args)`` inline when it is small (or every call, with threads=0),
        else on a worker thread."""
        if size <= INLINE_BYTES or self._inline_all:
            return fn(*args)
        result: _T = await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        return result  # typed: an older trio is untyped to the build's mypy

    # -- the image: blocking helpers, called on channel threads or via _run ---

    def _read_image(self, offset: int, size: int) -> bytes | bytearray | memoryview:
        self._image_requests += 1
        size = max(0, min(size, self.space.size - offset))
        return self.space.read(offset, size) if size else b""

    def _write_image(self, offset: int, data: memoryview) -> int:
        self._image_requests += 1
        room = self.space.size - offset
        if room <= 0:
            raise FuseError(errno.ENOSPC, "write past the end of the image")
        data = data[:room]
        try:
            self.space.write(offset, data)
        except NoSpaceError as e:
            held = self._refusals()  # the kernel retries refused pages relentlessly
            if held is not None:
                log.warning("write of %d bytes at %d refused: %s%s", len(data), offset, e,
                            f" ({held} more refused since the last message)" if held else "")
            raise
        return len(data)

    def _punch(self, offset: int, length: int, mode: int) -> None:
        if mode != PUNCH:
            raise FuseError(errno.EOPNOTSUPP)
        end = min(offset + length, self.space.size)
        if offset == SWAP_HEADER_BYTES:
            self._area_discards += 1
        if end > offset:
            self.space.discard(offset, end - offset)

    def read_blocking(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> object:
        return self._read_image(offset, size) if ino == SWAP_INO else DEFER

    def write_blocking(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview) -> object:
        return self._write_image(offset, data) if ino == SWAP_INO else DEFER

    def fallocate_blocking(self, ctx: Context, ino: int, fh: int, offset: int, length: int,
                           mode: int) -> object:
        if ino != SWAP_INO:
            return DEFER
        self._punch(offset, length, mode)
        return None

    async def read(self, ctx: Context, ino: int, fh: int, offset: int,
                   size: int) -> bytes | bytearray | memoryview:
        if ino == SWAP_INO:
            return await self._run(self._read_image, offset, size, size=size)
        return self._snapshots.get(fh, b"")[offset:offset + size]

    async def write(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview) -> int:
        if ino == SWAP_INO:
            return await self._run(self._write_image, offset, data, size=len(data))
        return await self._control_write(ctx, ino, offset, bytes(data))

    async def _control_write(self, ctx: Context, ino: int, offset: int, data: bytes) -> int:
        f = self._control(ino)
        if f is None:
            raise FuseError(errno.EISDIR)
        if ctx.uid != 0:
            raise FuseError(errno.EACCES)
        if f.write is None:
            raise FuseError(errno.EINVAL, f"{f.name} is read-only")
        try:
            if offset:
                raise ValueError("write the whole value at offset 0")
            text = data.decode("utf-8")
            done = await self._run(f.write, self.space, text)
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("control/%s: rejected %r: %s", f.name, data[:80], e)
            raise FuseError(errno.EINVAL) from None
        except OSError as err:  # (not ``e`` again: mypyc gives a name one type per function)
            log.warning("control/%s: %r failed: %s", f.name, data[:80], err)
            raise
        log.info("control/%s: %s", f.name, done)
        if self.on_change is not None:
            self.on_change()
        return len(data)

    async def fallocate(self, ctx: Context, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        if ino != SWAP_INO:
            raise FuseError(errno.EOPNOTSUPP)
        # a cluster's discard is cheap; bigger ranges walk many clusters
        await self._run(self._punch, offset, length, mode, size=0 if length <= CLUSTER_BYTES else length)

    async def destroy(self) -> None:
        log.info("file system destroyed by the kernel")
