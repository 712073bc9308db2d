"""Reply builders: an Operations method's result becomes a reply payload.

Each builder takes the result and the request's parsed arguments (READDIR
needs its offset and size) and returns what follows ``struct
fuse_out_header``: bytes, or for READ the file system's own buffer,
written out without a copy.
"""

from __future__ import annotations

import errno
import logging
import stat
from typing import Any

from . import _abi as A
from ._reader import MalformedRequest
from ._types import Attr, DirEntry, Entry, FuseError, Opened, StatFs

log = logging.getLogger("vswapfs.fuse")

Args = tuple[Any, ...]


def _attr_fields(a: Attr) -> tuple[int, ...]:
    return (a.ino, a.size, a.blocks, a.mtime, a.mtime, a.mtime, 0, 0, 0,
            a.mode, a.nlink, a.uid, a.gid, 0, a.blksize, 0)


def _split(t: float) -> tuple[int, int]:
    return int(t), int((t - int(t)) * 1e9)


def entry(e: Entry, _: Args = ()) -> bytes:
    es, ens = _split(e.entry_timeout)
    as_, ans = _split(e.attr_timeout)
    return A.ENTRY_OUT.pack(e.attr.ino, 0, es, as_, ens, ans, *_attr_fields(e.attr))


def attr(a: Attr, _: Args = ()) -> bytes:
    return A.ATTR_OUT.pack(1, 0, 0, *_attr_fields(a))


def opened(o: Opened, _: Args = ()) -> bytes:
    return A.OPEN_OUT.pack(o.fh, o.flags, 0)


def created(result: tuple[Entry, Opened], _: Args = ()) -> bytes:
    return entry(result[0]) + opened(result[1])


def written(n: int, _: Args = ()) -> bytes:
    return A.WRITE_OUT.pack(n, 0)


def statfs(s: StatFs, _: Args = ()) -> bytes:
    return A.STATFS_OUT.pack(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen,
                             s.frsize, 0)


def empty(_: object, __: Args = ()) -> bytes:
    return b""


def data(result: Any, _: Args = ()) -> Any:
    """READ: the buffer as the file system returned it (no copy)."""
    return result


def dirents(entries: list[DirEntry], args: Args) -> bytes:
    """READDIR, args (fh, offset, size): the entries, numbered from the
    offset, packed into at most ``size`` bytes."""
    return pack_dirents(entries, args[1], args[2])


def pack_dirents(entries: list[DirEntry], start: int, size: int) -> bytes:
    """Pack entries numbered from ``start`` into at most ``size`` bytes."""
    out = bytearray()
    for k, e in enumerate(entries):
        rec = A.DIRENT.pack(e.ino, start + k + 1, len(e.name), stat.S_IFMT(e.mode) >> 12) + e.name
        rec += b"\0" * (-len(rec) % 8)
        if len(out) + len(rec) > size:
            break
        out += rec
    return bytes(out)


def errno_of(e: BaseException, unique: int, opcode: int) -> int:
    """The errno a failed request is answered with; logs what is not the
    file system's own answer."""
    if isinstance(e, MalformedRequest):
        log.error("request %d (opcode %d) is malformed: %s: EIO", unique, opcode, e)
        return errno.EIO
    if isinstance(e, FuseError):
        return e.errno
    if isinstance(e, OSError):
        return e.errno or errno.EIO
    log.error("request %d (opcode %d) failed: EIO", unique, opcode, exc_info=e)
    return errno.EIO
