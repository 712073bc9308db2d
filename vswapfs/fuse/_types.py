"""What file systems built on the transport exchange with it."""

from __future__ import annotations

import errno
import stat
from dataclasses import dataclass, field
from typing import NamedTuple


class FuseError(Exception):
    """Raise from an operation to answer the request with ``-errno``."""

    def __init__(self, err: int, msg: str = "") -> None:
        super().__init__(msg or errno.errorcode.get(err, str(err)))
        self.errno = err


class Context(NamedTuple):
    """Who sent a request (a tuple: one is made for every request)."""

    uid: int
    gid: int
    pid: int


@dataclass(slots=True)
class Attr:
    """File attributes (``struct fuse_attr``)."""

    ino: int
    mode: int
    size: int = 0
    blocks: int = 0  # 512-byte units
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    blksize: int = 4096

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass(slots=True)
class Entry:
    """A LOOKUP answer: the inode and its attributes, with cache timeouts."""

    attr: Attr
    entry_timeout: float = 1.0
    attr_timeout: float = 1.0


@dataclass(slots=True)
class SetattrRequest:
    """The fields of a SETATTR that the kernel marked valid (others None)."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    fh: int | None = None
    times: bool = False


@dataclass(slots=True)
class StatFs:
    """``struct fuse_kstatfs``."""

    blocks: int
    bfree: int
    bavail: int
    files: int = 0
    ffree: int = 0
    bsize: int = 4096
    namelen: int = 255
    frsize: int = 4096


@dataclass(slots=True)
class DirEntry:
    """One READDIR entry."""

    ino: int
    name: bytes
    mode: int


@dataclass(slots=True)
class Opened:
    """An OPEN/OPENDIR answer: the handle and FOPEN_* flags."""

    fh: int = 0
    flags: int = 0


@dataclass(slots=True)
class InitInfo:
    """What INIT settled, for logging and tests."""

    major: int = 0
    minor: int = 0
    kernel_flags: int = 0
    granted_flags: int = 0
    max_write: int = 0
    max_pages: int = 0
    max_background: int = 0
    names: list[str] = field(default_factory=list)
