"""The file-system interface: override what you serve, the rest is ENOSYS."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, Final

from mypy_extensions import mypyc_attr

from ._types import Attr, Context, DirEntry, Entry, FuseError, InitInfo, Opened, SetattrRequest, StatFs

# What the transport hands Operations.init (Session.service_stats, Session.poll_stats):
# per opcode name (requests, bytes of file data, ns spent); and the channel threads'
# polling: max_us, window_us, caught, slept, ceded, within_pct (control/busy_poll's columns)
ServiceStats = Callable[[], dict[str, tuple[int, int, int]]]
PollCounts = tuple[int, int, int, int, int, int]
PollStats = Callable[[], PollCounts]

DEFER: Final[Any] = type("Defer", (), {"__repr__": lambda self: "DEFER"})()
"""Returned by a ``*_blocking`` method: serve this request with the async
method on the event loop instead."""


@mypyc_attr(allow_interpreted_subclasses=True)  # compiled (setup.py), subclassed by file systems
class Operations:
    """Base class for a file system served by :func:`serve`.

    Every method may raise :class:`FuseError` (or OSError) to answer with
    an errno.  Methods are called concurrently from the trio event loop;
    blocking work belongs in ``trio.to_thread``.

    The data path may skip the event loop: when the session serves with
    channel threads, ``read``, ``write`` and ``fallocate`` requests first go
    to ``read_blocking``, ``write_blocking`` and ``fallocate_blocking``,
    called on the thread that read the request, with the async method's
    arguments.  They may block and must be thread-safe; returning
    :data:`DEFER` (the default) hands the request to the async method.
    """

    def init(self, info: InitInfo, service_stats: ServiceStats, poll_stats: PollStats) -> None:
        """Called once INIT is answered, before any other request: what was
        settled with the kernel, and functions that return the
        transport's counts per opcode (requests, bytes of file data, ns
        spent) and its channel threads' polling (``Session.poll_stats``),
        for the file system to show."""

    def channel_started(self) -> None:
        """Called on each channel thread before it reads its first request
        (to set per-thread state, such as PR_SET_IO_FLUSHER)."""

    def read_blocking(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> Any:
        return DEFER

    def write_blocking(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview) -> Any:
        return DEFER

    def fallocate_blocking(self, ctx: Context, ino: int, fh: int, offset: int, length: int,
                           mode: int) -> Any:
        return DEFER

    async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        raise FuseError(errno.ENOSYS)

    def forget(self, ino: int, nlookup: int) -> None:
        """The kernel dropped ``nlookup`` references (no reply is sent)."""

    async def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:
        raise FuseError(errno.ENOSYS)

    async def setattr(self, ctx: Context, ino: int, req: SetattrRequest) -> Attr:
        raise FuseError(errno.ENOSYS)

    async def create(self, ctx: Context, parent: int, name: bytes, mode: int,
                     flags: int) -> tuple[Entry, Opened]:
        raise FuseError(errno.ENOSYS)

    async def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        raise FuseError(errno.ENOSYS)

    async def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        raise FuseError(errno.ENOSYS)

    async def read(self, ctx: Context, ino: int, fh: int, offset: int,
                   size: int) -> bytes | bytearray | memoryview:
        raise FuseError(errno.ENOSYS)

    async def write(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview) -> int:
        """Store ``data`` (valid only until this returns); return bytes written."""
        raise FuseError(errno.ENOSYS)

    async def fallocate(self, ctx: Context, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        raise FuseError(errno.ENOSYS)

    async def statfs(self, ctx: Context, ino: int) -> StatFs:
        raise FuseError(errno.ENOSYS)

    async def flush(self, ctx: Context, ino: int, fh: int) -> None:
        return None

    async def fsync(self, ctx: Context, ino: int, fh: int, datasync: bool) -> None:
        return None

    async def release(self, ctx: Context, ino: int, fh: int) -> None:
        return None

    async def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        raise FuseError(errno.ENOSYS)

    async def readdir(self, ctx: Context, ino: int, fh: int, offset: int) -> list[DirEntry]:
        """All entries from index ``offset`` on; the transport packs what fits."""
        raise FuseError(errno.ENOSYS)

    async def releasedir(self, ctx: Context, ino: int, fh: int) -> None:
        return None

    async def destroy(self) -> None:
        """The file system is being unmounted."""
