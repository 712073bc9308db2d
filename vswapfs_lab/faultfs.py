"""A small fault-injecting file system on vswapfs's own FUSE transport.

It passes files through to a store directory and fails chosen I/O for
real: reads or writes overlapping an armed byte range get EIO (or any
errno), so the swap engine's backing-file error paths can be tested with
real system calls instead of mocks.  Arm faults by writing lines to
``MNT/.faults``::

    read EIO 1048576 4096      fail reads overlapping [1 MiB, 1 MiB + 4 KiB)
    write ENOSPC 0 -1          fail every write (-1: to the end of the file)
    clear                      remove all faults

Reading ``.faults`` lists the armed faults and how often each fired.

    python -m vswapfs_lab.faultfs MNT STORE_DIR
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import sys

import trio

from vswapfs import linux
from vswapfs.fuse import (
    FOPEN_DIRECT_IO,
    ROOT_ID,
    Attr,
    Context,
    DirEntry,
    Entry,
    FuseError,
    Opened,
    Operations,
    SetattrRequest,
    StatFs,
    serve,
)

FAULTS_INO = 2
CONTROL = b".faults"


class Fault:
    __slots__ = ("op", "err", "start", "end", "hits")

    def __init__(self, op: str, err: int, start: int, end: int) -> None:
        self.op, self.err, self.start, self.end, self.hits = op, err, start, end, 0

    def matches(self, op: str, offset: int, size: int) -> bool:
        return op == self.op and offset < self.end and offset + size > self.start

    def __str__(self) -> str:
        end = -1 if self.end == 1 << 63 else self.end - self.start
        return f"{self.op} {errno.errorcode[self.err]} {self.start} {end} hits={self.hits}"


def parse_fault(line: str) -> Fault:
    parts = line.split()
    if len(parts) != 4 or parts[0] not in ("read", "write") or not hasattr(errno, parts[1]):
        raise ValueError(f"bad fault {line!r}: want 'read|write ERRNO START LENGTH'")
    start, length = int(parts[2]), int(parts[3])
    return Fault(parts[0], getattr(errno, parts[1]), start, 1 << 63 if length < 0 else start + length)


class FaultFS(Operations):
    """Pass-through of one flat directory, plus ``.faults``."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.faults: list[Fault] = []
        self._ino: dict[bytes, int] = {}
        self._name: dict[int, bytes] = {}
        self._next = 16

    def _path(self, ino: int) -> str:
        name = self._name.get(ino)
        if name is None:
            raise FuseError(errno.ENOENT)
        return os.path.join(self.store, os.fsdecode(name))

    def _inode(self, name: bytes) -> int:
        if name not in self._ino:
            self._ino[name], self._name[self._next] = self._next, name
            self._next += 1
        return self._ino[name]

    def _attr(self, ino: int) -> Attr:
        if ino == ROOT_ID:
            return Attr(ino, stat.S_IFDIR | 0o755, nlink=2)
        if ino == FAULTS_INO:
            return Attr(ino, stat.S_IFREG | 0o600, size=4096)
        st = os.stat(self._path(ino))
        return Attr(ino, st.st_mode, size=st.st_size, blocks=st.st_blocks, uid=st.st_uid,
                    gid=st.st_gid, mtime=int(st.st_mtime))

    async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        if name == CONTROL:
            return Entry(self._attr(FAULTS_INO), 0, 0)
        if not os.path.exists(os.path.join(self.store, os.fsdecode(name))):
            raise FuseError(errno.ENOENT)
        return Entry(self._attr(self._inode(name)), 0, 0)

    async def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:
        return self._attr(ino)

    async def setattr(self, ctx: Context, ino: int, req: SetattrRequest) -> Attr:
        if ino not in (ROOT_ID, FAULTS_INO):
            if req.size is not None:
                os.truncate(self._path(ino), req.size)
            if req.mode is not None:
                os.chmod(self._path(ino), req.mode & 0o7777)
        return self._attr(ino)

    async def create(self, ctx: Context, parent: int, name: bytes, mode: int,
                     flags: int) -> tuple[Entry, Opened]:
        path = os.path.join(self.store, os.fsdecode(name))
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, mode & 0o7777))
        ino = self._inode(name)
        return Entry(self._attr(ino), 0, 0), await self.open(ctx, ino, flags)

    async def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        os.unlink(os.path.join(self.store, os.fsdecode(name)))

    async def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        if ino == FAULTS_INO:
            return Opened(0, FOPEN_DIRECT_IO)
        fd = os.open(self._path(ino), os.O_RDWR)
        return Opened(fd, FOPEN_DIRECT_IO)

    async def release(self, ctx: Context, ino: int, fh: int) -> None:
        if ino != FAULTS_INO:
            os.close(fh)

    def _check(self, op: str, offset: int, size: int) -> None:
        for f in self.faults:
            if f.matches(op, offset, size):
                f.hits += 1
                raise FuseError(f.err)

    async def read(self, ctx: Context, ino: int, fh: int, offset: int,
                   size: int) -> bytes | bytearray | memoryview:
        if ino == FAULTS_INO:
            return "".join(f"{f}\n" for f in self.faults).encode()[offset:offset + size]
        self._check("read", offset, size)
        return os.pread(fh, size, offset)

    async def write(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview) -> int:
        if ino == FAULTS_INO:
            try:
                for line in bytes(data).decode().splitlines():
                    if line.strip() == "clear":
                        self.faults.clear()
                    elif line.strip():
                        self.faults.append(parse_fault(line))
            except ValueError as e:
                logging.warning("%s", e)
                raise FuseError(errno.EINVAL) from None
            return len(data)
        self._check("write", offset, len(data))
        return os.pwrite(fh, data, offset)

    async def fallocate(self, ctx: Context, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        linux.fallocate(fh, mode, offset, length)

    async def statfs(self, ctx: Context, ino: int) -> StatFs:
        st = os.statvfs(self.store)
        return StatFs(st.f_blocks, st.f_bfree, st.f_bavail, bsize=st.f_bsize, frsize=st.f_frsize)

    async def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        return Opened()

    async def readdir(self, ctx: Context, ino: int, fh: int, offset: int) -> list[DirEntry]:
        d = stat.S_IFDIR
        entries = [DirEntry(ROOT_ID, b".", d), DirEntry(ROOT_ID, b"..", d),
                   DirEntry(FAULTS_INO, CONTROL, stat.S_IFREG)]
        entries += [DirEntry(self._inode(os.fsencode(n)), os.fsencode(n), stat.S_IFREG)
                    for n in sorted(os.listdir(self.store))]
        return entries[offset:]


async def _main(mnt: str, store: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, mnt, FaultFS(store), "faultfs")
        print("ready", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mountpoint")
    p.add_argument("store")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    trio.run(_main, a.mountpoint, a.store)


if __name__ == "__main__":
    main()
