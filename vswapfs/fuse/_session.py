"""Mounting, INIT, and the request loop over /dev/fuse on trio.

One table maps each opcode we serve to the parser of its body, the
Operations method, and the builder of its reply.  Requests are parsed
defensively: a short or malformed one is answered EIO and logged; an
unknown opcode gets ENOSYS.

Two ways to serve.  With ``channels=0`` the event loop reads /dev/fuse and
runs every request as its own task, so slow ones (I/O in threads) never
hold up the others.  With ``channels=N`` the data path skips the event
loop: N threads each read their own clone of the fd
(FUSE_DEV_IOC_CLONE), serve READ, WRITE and FALLOCATE through the file
system's ``*_blocking`` methods and reply on the fd that read the request,
as the kernel requires; anything else, or what a ``*_blocking`` method
DEFERs, is handed to the event loop as a task.  A trip through the event
loop (epoll, a task, a thread hop for the work) costs more than serving a
4 KiB page, and the channel threads block in read(2) and in compression
with the GIL released.

Request buffers come from a fixed set, faulted in at start: one per
channel thread, or, when the event loop reads, a pool for it; when all of
the loop's are busy it stops reading, which is the only back-pressure the
kernel needs and keeps memory bounded.

Every request answered is counted with the time it took, from parsing to
the reply written (``service_stats``): how busy the server is, apart from
what the kernel's side of the crossing costs.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from array import array
from collections.abc import Callable
from typing import Any, Final

import trio

from .. import _linux
from . import _abi as A
from ._ops import DEFER, Operations
from ._types import Attr, Context, DirEntry, Entry, FuseError, InitInfo, Opened, SetattrRequest, StatFs

log = logging.getLogger("vswapfs.fuse")

MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
MAX_BACKGROUND = 64
FALLBACK_BUFFERS = 16  # event-loop buffers when channels were asked for but cannot be had
WANTED_FLAGS = A.ASYNC_READ | A.BIG_WRITES | A.ASYNC_DIO | A.MAX_PAGES | A.PARALLEL_DIROPS


OPCODES_TALLIED = 64  # opcodes below this are counted (fuse.h here ends at 51; CUSE_INIT is 4096)


class _Tally:
    """Requests answered, the data they moved and the nanoseconds spent on
    them, per opcode, by one thread: each serving thread has its own, so
    counting needs no lock."""

    __slots__ = ("count", "data", "ns")

    def __init__(self) -> None:
        self.count = array("Q", bytes(8 * OPCODES_TALLIED))
        self.data = array("Q", bytes(8 * OPCODES_TALLIED))
        self.ns = array("Q", bytes(8 * OPCODES_TALLIED))

    def add(self, opcode: int, t0: int, data: int = 0) -> None:
        if opcode < OPCODES_TALLIED:
            self.count[opcode] += 1
            self.data[opcode] += data
            self.ns[opcode] += time.perf_counter_ns() - t0


def _data_bytes(opcode: int, result: Any, payload: Any) -> int:
    """Bytes of file data a successful request moved: written or read."""
    if opcode == A.Opcode.WRITE:
        return int(result)
    if opcode == A.Opcode.READ:
        return len(payload)
    return 0


# read(2) on /dev/fuse: these mean the connection is gone (unmounted, or
# aborted through /sys/fs/fuse/connections), these that nothing was read
GONE: Final = frozenset({errno.ENODEV, errno.ECONNABORTED})
AGAIN: Final = frozenset({errno.EINTR, errno.ENOENT, errno.EAGAIN})
RETRY_MAX_S: Final = 1.0  # longest wait before reading again after an unexpected error


class _ReadErrors:
    """What to do after read(2) on /dev/fuse failed: GONE ends the channel,
    AGAIN reads again at once, anything else is logged (at most every few
    seconds) and retried after a growing pause: a channel never stops
    serving while its connection lives."""

    def __init__(self) -> None:
        self.pause = 0.0
        self.last_log = -1e9
        self.count = 0  # unexpected errors since the channel started

    def gone(self, e: OSError, where: str, sleep: bool = True) -> bool:
        """True if the connection is gone; else wait ``self.pause`` (unless
        ``sleep`` is false: the event loop awaits it instead), then False."""
        if e.errno in GONE:
            return True
        if e.errno in AGAIN:
            return False
        self.count += 1
        now = time.monotonic()
        if now - self.last_log >= 5:
            self.last_log = now
            log.error("%s: read from /dev/fuse failed (%s); retrying (%d so far)", where, e, self.count)
        self.pause = min(max(self.pause * 2, 0.001), RETRY_MAX_S)
        if sleep:
            time.sleep(self.pause)
        return False

    def ok(self) -> None:
        self.pause = 0.0


class MalformedRequest(Exception):
    """The request is shorter than its header or body says."""


# -- body parsers: memoryview of the body -> positional arguments -----------

def _need(body: memoryview, n: int) -> None:
    if len(body) < n:
        raise MalformedRequest(f"body of {len(body)} bytes, need {n}")


def _p_name(body: memoryview) -> tuple[bytes]:
    raw = bytes(body)
    end = raw.find(b"\0")
    if end <= 0:
        raise MalformedRequest("name is empty or not NUL-terminated")
    return (raw[:end],)


def _p_getattr(body: memoryview) -> tuple[int | None]:
    _need(body, A.GETATTR_IN.size)
    flags, _, fh = A.GETATTR_IN.unpack_from(body)
    return (fh if flags & A.GETATTR_FH else None,)


def _p_setattr(body: memoryview) -> tuple[SetattrRequest]:
    _need(body, A.SETATTR_IN.size)
    (valid, _, fh, size, _, _, _, _, _, _, _, mode, _, uid, gid, _) = A.SETATTR_IN.unpack_from(body)
    return (SetattrRequest(
        mode=mode if valid & A.FATTR_MODE else None,
        uid=uid if valid & A.FATTR_UID else None,
        gid=gid if valid & A.FATTR_GID else None,
        size=size if valid & A.FATTR_SIZE else None,
        fh=fh if valid & A.FATTR_FH else None,
        times=bool(valid & (A.FATTR_ATIME | A.FATTR_MTIME)),
    ),)


def _p_open(body: memoryview) -> tuple[int]:
    _need(body, A.OPEN_IN.size)
    return (A.OPEN_IN.unpack_from(body)[0],)


def _p_create(body: memoryview) -> tuple[bytes, int, int]:
    _need(body, A.CREATE_IN.size)
    flags, mode, umask, _ = A.CREATE_IN.unpack_from(body)
    return _p_name(body[A.CREATE_IN.size:])[0], mode & ~umask, flags


def _p_fh(body: memoryview) -> tuple[int]:
    _need(body, 8)
    return (A.FORGET_IN.unpack_from(body)[0],)


def _p_read(body: memoryview) -> tuple[int, int, int]:
    _need(body, A.READ_IN.size)
    fh, offset, size, _ = A.READ_IN.unpack_from(body)
    return fh, offset, size


def _p_write(body: memoryview) -> tuple[int, int, memoryview]:
    _need(body, A.WRITE_IN.size)
    fh, offset, size, _ = A.WRITE_IN.unpack_from(body)
    data = body[A.WRITE_IN_SIZE:A.WRITE_IN_SIZE + size]
    if len(data) != size:
        raise MalformedRequest(f"WRITE of {size} bytes carries {len(data)}")
    return fh, offset, data


def _p_fsync(body: memoryview) -> tuple[int, bool]:
    _need(body, A.FSYNC_IN.size)
    fh, flags, _ = A.FSYNC_IN.unpack_from(body)
    return fh, bool(flags & 1)


def _p_fallocate(body: memoryview) -> tuple[int, int, int, int]:
    _need(body, A.FALLOCATE_IN.size)
    fh, offset, length, mode, _ = A.FALLOCATE_IN.unpack_from(body)
    return fh, offset, length, mode


def _p_none(body: memoryview) -> tuple[()]:
    return ()


# -- reply builders: result -> payload ---------------------------------------

def _attr_fields(a: Attr) -> tuple[int, ...]:
    return (a.ino, a.size, a.blocks, a.mtime, a.mtime, a.mtime, 0, 0, 0,
            a.mode, a.nlink, a.uid, a.gid, 0, a.blksize, 0)


def _split(t: float) -> tuple[int, int]:
    return int(t), int((t - int(t)) * 1e9)


def _r_entry(e: Entry) -> bytes:
    es, ens = _split(e.entry_timeout)
    as_, ans = _split(e.attr_timeout)
    return A.ENTRY_OUT.pack(e.attr.ino, 0, es, as_, ens, ans, *_attr_fields(e.attr))


def _r_attr(a: Attr) -> bytes:
    return A.ATTR_OUT.pack(1, 0, 0, *_attr_fields(a))


def _r_open(o: Opened) -> bytes:
    return A.OPEN_OUT.pack(o.fh, o.flags, 0)


def _r_create(result: tuple[Entry, Opened]) -> bytes:
    return _r_entry(result[0]) + _r_open(result[1])


def _r_write(n: int) -> bytes:
    return A.WRITE_OUT.pack(n, 0)


def _r_statfs(s: StatFs) -> bytes:
    return A.STATFS_OUT.pack(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen,
                             s.frsize, 0)


def _r_empty(_: object) -> bytes:
    return b""


def _r_data(data: Any) -> Any:
    return data


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


# opcode -> (Operations method name, body parser, reply builder); the
# opcodes in BLOCKING also have a ``<name>_blocking`` method (see Operations)
TABLE: dict[int, tuple[str, Callable[[memoryview], tuple[Any, ...]], Callable[[Any], Any]]] = {
    A.Opcode.LOOKUP: ("lookup", _p_name, _r_entry),
    A.Opcode.GETATTR: ("getattr", _p_getattr, _r_attr),
    A.Opcode.SETATTR: ("setattr", _p_setattr, _r_attr),
    A.Opcode.OPEN: ("open", _p_open, _r_open),
    A.Opcode.CREATE: ("create", _p_create, _r_create),
    A.Opcode.UNLINK: ("unlink", _p_name, _r_empty),
    A.Opcode.READ: ("read", _p_read, _r_data),
    A.Opcode.WRITE: ("write", _p_write, _r_write),
    A.Opcode.STATFS: ("statfs", _p_none, _r_statfs),
    A.Opcode.RELEASE: ("release", _p_fh, _r_empty),
    A.Opcode.FSYNC: ("fsync", _p_fsync, _r_empty),
    A.Opcode.FLUSH: ("flush", _p_fh, _r_empty),
    A.Opcode.OPENDIR: ("opendir", _p_open, _r_open),
    A.Opcode.RELEASEDIR: ("releasedir", _p_fh, _r_empty),
    A.Opcode.FALLOCATE: ("fallocate", _p_fallocate, _r_empty),
}
BLOCKING: Final = frozenset({A.Opcode.READ, A.Opcode.WRITE, A.Opcode.FALLOCATE})


def _errno_of(e: BaseException, unique: int, opcode: int) -> int:
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


def clone_fd(fd: int) -> int:
    """A new /dev/fuse fd attached to the same connection as ``fd``."""
    new = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(new, A.DEV_IOC_CLONE, struct.pack("I", fd))
    except BaseException:
        os.close(new)
        raise
    return new


class Session:
    """A FUSE connection: a /dev/fuse fd and the file system it serves."""

    def __init__(self, fd: int, ops: Operations, *, buffers: int = 16, channels: int = 0,
                 max_background: int = MAX_BACKGROUND) -> None:
        self.fd = fd
        self.ops = ops
        self.channels = channels
        self.max_background = max_background
        # opcode -> (the ops' *_blocking method, parser, builder), looked up once
        self._blocking = {op: (getattr(ops, TABLE[op][0] + "_blocking"), *TABLE[op][1:])
                          for op in BLOCKING}
        self.init = InitInfo()
        self.requests = 0  # requests served
        self.malformed = 0  # requests answered EIO because they did not parse
        self._loop_tally = _Tally()  # what the event loop answered
        self._tallies = [self._loop_tally]  # and one per channel thread
        self._bufsize = MAX_WRITE + 4096
        # The I/O path's reserve: allocated and faulted in now (and mlocked, if
        # the process is), so serving a request never waits on reclaim for it.
        self._free = [self._new_buffer() for _ in range(buffers)]
        self._buffers = trio.Semaphore(buffers)
        self._dirs: dict[int, list[DirEntry]] = {}
        self._loop_errors = _ReadErrors()
        self._channel_fds: list[tuple[int, bytearray]] | None = None  # set by prepare()
        os.set_blocking(fd, False)

    def service_stats(self) -> dict[str, tuple[int, int, int]]:
        """Per opcode answered so far: (requests, bytes of file data they
        wrote or read, nanoseconds from parsing the request to writing the
        reply), summed."""
        out: dict[str, tuple[int, int, int]] = {}
        for op in range(OPCODES_TALLIED):
            n = sum(t.count[op] for t in self._tallies)
            if n:
                try:
                    name = A.Opcode(op).name
                except ValueError:
                    name = str(op)
                out[name] = (n, sum(t.data[op] for t in self._tallies),
                             sum(t.ns[op] for t in self._tallies))
        return out

    def _new_buffer(self) -> bytearray:
        buf = bytearray(self._bufsize)
        buf[::4096] = bytes(len(range(0, self._bufsize, 4096)))  # fault it in
        return buf

    # -- wire ---------------------------------------------------------------

    def _reply(self, unique: int, error: int = 0, payload: Any = b"", fd: int | None = None) -> None:
        n = len(payload)
        hdr = A.OUT_HEADER.pack(A.OUT_HEADER.size + n, -error, unique)
        try:
            os.writev(self.fd if fd is None else fd, [hdr, payload] if n else [hdr])
        except OSError as e:  # ENOENT: the request was aborted meanwhile
            if e.errno != errno.ENOENT and e.errno not in GONE:
                log.warning("reply to request %d failed: %s", unique, e)

    async def _read_request(self, buf: bytearray) -> int:
        """Read one request into ``buf``; 0 when the file system is gone."""
        errors = self._loop_errors
        while True:
            try:
                n = os.readv(self.fd, [buf])
                errors.ok()
                return n
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)
            except OSError as e:
                if e.errno in GONE:
                    return 0
                if e.errno not in AGAIN:
                    errors.gone(e, "event loop", sleep=False)  # logs, then read again after a pause
                    await trio.sleep(errors.pause)

    # -- INIT ---------------------------------------------------------------

    async def handshake(self) -> InitInfo:
        """Answer INIT (the first request) and return what was settled."""
        buf = self._new_buffer()  # faulted in: once freed, the next big reply reuses it
        while True:
            n = await self._read_request(buf)
            if not n:
                raise OSError(errno.ENODEV, "unmounted before INIT")
            _, opcode, unique, *_ = A.IN_HEADER.unpack_from(buf)
            if opcode != A.Opcode.INIT:
                self._reply(unique, errno.EIO)
                continue
            body = memoryview(buf)[A.IN_HEADER.size:n]
            major, minor, max_readahead, flags = A.INIT_IN.unpack_from(body)
            if major > A.KERNEL_VERSION:  # ask the kernel to speak our major: it sends INIT again
                self._reply(unique, 0, A.INIT_OUT.pack(
                    A.KERNEL_VERSION, A.KERNEL_MINOR_VERSION, *([0] * (len(A.INIT_OUT_FIELDS) - 2))))
                continue
            if major < A.KERNEL_VERSION or minor < 31:
                self._reply(unique, errno.EPROTO)
                raise OSError(errno.EPROTO, f"kernel FUSE {major}.{minor} is too old")
            granted = flags & WANTED_FLAGS
            our_minor = min(minor, A.KERNEL_MINOR_VERSION)
            self._reply(unique, 0, A.INIT_OUT.pack(
                A.KERNEL_VERSION, our_minor, max_readahead, granted,
                self.max_background, self.max_background * 3 // 4, MAX_WRITE, 1, MAX_PAGES, 0, 0,
                *([0] * 7)))
            names = [name for bit, name in A.INIT_FLAG_NAMES.items() if granted & bit]
            self.init = InitInfo(major, our_minor, flags, granted, MAX_WRITE, MAX_PAGES,
                                 self.max_background, names)
            log.info("FUSE %d.%d (kernel %d.%d): granted %s; max_write %d, max_pages %d, "
                     "max_background %d; missing %s", A.KERNEL_VERSION, our_minor, major, minor,
                     "|".join(names) or "nothing", MAX_WRITE, MAX_PAGES, self.max_background,
                     "|".join(n for b, n in A.INIT_FLAG_NAMES.items()
                              if WANTED_FLAGS & b and not granted & b) or "nothing")
            return self.init

    # -- the loop -------------------------------------------------------------

    def prepare(self) -> None:
        """Clone the channel fds and fault their buffers in, or the event
        loop's if the fd cannot be cloned: everything serving needs, so a
        caller can have it in place before it says the mount is ready."""
        if self._channel_fds is not None:
            return
        self._channel_fds = [(fd, self._new_buffer()) for fd in
                             (self._clone_channels() if self.channels else [])]
        if not self._channel_fds and not self._free:  # buffers were left to the channels
            self._free = [self._new_buffer() for _ in range(FALLBACK_BUFFERS)]
            self._buffers = trio.Semaphore(FALLBACK_BUFFERS)

    async def serve(self) -> None:
        """Serve requests until the file system is unmounted.  If the fd
        cannot be cloned, the event loop serves everything."""
        self.prepare()
        assert self._channel_fds is not None
        if self._channel_fds:
            await self._serve_channels([fd for fd, _ in self._channel_fds],
                                       [buf for _, buf in self._channel_fds])
        else:
            await self._serve_loop()
        await self.ops.destroy()

    def _clone_channels(self) -> list[int]:
        fds: list[int] = []
        try:
            for _ in range(self.channels):
                fds.append(clone_fd(self.fd))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            log.warning("cannot clone the /dev/fuse fd (%s): the event loop serves every request", e)
            self.channels = 0
            return []
        return fds

    async def _serve_loop(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await self._buffers.acquire()
                buf = self._free.pop()
                try:
                    n = await self._read_request(buf)
                except BaseException:
                    self._give_back(buf)
                    raise
                if not n:
                    self._give_back(buf)
                    break
                nursery.start_soon(self._handle, buf, n)

    async def _serve_channels(self, fds: list[int], bufs: list[bytearray] | None = None) -> None:
        """Run a channel thread on each of ``fds`` and what they hand over;
        return when all have seen the file system go away."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Semaphore(0)
        try:
            async with trio.open_nursery() as nursery:

                def channel(fd: int, buf: bytearray) -> None:
                    try:
                        self._channel(fd, buf, nursery, token)
                    finally:
                        try:
                            trio.from_thread.run_sync(done.release, trio_token=token)
                        except trio.RunFinishedError:
                            pass

                bufs = bufs or [self._new_buffer() for _ in fds]
                threads = [threading.Thread(target=channel, args=(fd, buf), daemon=True,
                                            name=f"fuse-channel-{i}")
                           for i, (fd, buf) in enumerate(zip(fds, bufs, strict=True))]
                for t in threads:
                    t.start()
                for _ in threads:
                    await done.acquire()
        finally:
            for fd in fds:
                os.close(fd)

    def _channel(self, fd: int, buf: bytearray, nursery: trio.Nursery,
                 token: trio.lowlevel.TrioToken) -> None:
        """One channel thread: read, serve or hand over, until the
        connection is gone (unmounted or aborted)."""
        self.ops.channel_started()
        mv = memoryview(buf)
        tally = _Tally()
        self._tallies.append(tally)
        errors = _ReadErrors()
        name = threading.current_thread().name
        while True:
            try:
                n = os.readv(fd, [buf])
                errors.ok()
            except OSError as e:
                if errors.gone(e, name):
                    return
                continue
            if not n:
                return
            if self._serve_blocking(fd, mv[:n], tally):
                continue
            copy = bytes(mv[:n])  # the buffer is reused at once
            try:
                trio.from_thread.run_sync(nursery.start_soon, self.dispatch, copy, fd, trio_token=token)
            except trio.RunFinishedError:
                return

    def _serve_blocking(self, fd: int, req: memoryview, tally: _Tally) -> bool:
        """Serve a data request on this thread; False to hand it over."""
        t0 = time.perf_counter_ns()
        if len(req) < A.IN_HEADER.size:
            return False
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = A.IN_HEADER.unpack_from(req)
        if opcode not in BLOCKING or length != len(req) or extlen:
            return False
        method, parse, build = self._blocking[opcode]
        try:
            result = method(Context(uid, gid, pid), nodeid, *parse(req[A.IN_HEADER.size:]))
            if result is DEFER:
                return False
            payload = build(result)
        except Exception as e:
            self._fail(e, unique, opcode, fd)
            tally.add(opcode, t0)
        else:
            self._reply(unique, 0, payload, fd=fd)
            tally.add(opcode, t0, _data_bytes(opcode, result, payload))
        self.requests += 1
        return True

    def _fail(self, e: BaseException, unique: int, opcode: int, fd: int | None) -> None:
        """Answer a request that failed with ``e`` with its errno."""
        if isinstance(e, MalformedRequest):
            self.malformed += 1
        self._reply(unique, _errno_of(e, unique, opcode), fd=fd)

    def _give_back(self, buf: bytearray) -> None:
        self._free.append(buf)
        self._buffers.release()

    async def _handle(self, buf: bytearray, n: int) -> None:
        try:
            await self.dispatch(memoryview(buf)[:n])
        finally:
            self._give_back(buf)

    async def dispatch(self, req: memoryview | bytes, fd: int | None = None) -> None:
        """Parse one request and answer it on ``fd`` (default: the session's);
        public for tests and fuzzing."""
        t0 = time.perf_counter_ns()
        req = memoryview(req)
        self.requests += 1
        if len(req) < A.IN_HEADER.size:
            self.malformed += 1
            log.error("request of %d bytes is shorter than its header: dropped", len(req))
            return
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = A.IN_HEADER.unpack_from(req)
        if opcode in (A.Opcode.FORGET, A.Opcode.BATCH_FORGET, A.Opcode.INTERRUPT):
            self._no_reply(opcode, nodeid, req[A.IN_HEADER.size:])
            return
        if length != len(req) or length < A.IN_HEADER.size + extlen * 8:
            self.malformed += 1
            log.error("request %d (opcode %d): header says %d bytes, got %d: EIO",
                      unique, opcode, length, len(req))
            self._reply(unique, errno.EIO, fd=fd)
            return
        body = req[A.IN_HEADER.size:length - extlen * 8]
        ctx = Context(uid, gid, pid)
        result: Any = None
        try:
            if opcode == A.Opcode.DESTROY:
                await self.ops.destroy()
                self._reply(unique, fd=fd)
                return
            if opcode == A.Opcode.READDIR:
                payload: Any = await self._readdir(ctx, nodeid, body)
            else:
                entry = TABLE.get(opcode)
                if entry is None:
                    self._reply(unique, errno.ENOSYS, fd=fd)
                    return
                name, parse, build = entry
                args = parse(body)
                result = await getattr(self.ops, name)(ctx, nodeid, *args)
                payload = build(result)
        except Exception as e:
            self._fail(e, unique, opcode, fd)
            self._loop_tally.add(opcode, t0)
        else:
            self._reply(unique, 0, payload, fd=fd)
            self._loop_tally.add(opcode, t0, _data_bytes(opcode, result, payload))

    def _no_reply(self, opcode: int, nodeid: int, body: memoryview) -> None:
        try:
            if opcode == A.Opcode.FORGET:
                _need(body, 8)
                self.ops.forget(nodeid, A.FORGET_IN.unpack_from(body)[0])
            elif opcode == A.Opcode.BATCH_FORGET:
                _need(body, A.BATCH_FORGET_IN.size)
                count, _ = A.BATCH_FORGET_IN.unpack_from(body)
                _need(body, A.BATCH_FORGET_IN.size + count * A.FORGET_ONE.size)
                for i in range(count):
                    ino, nl = A.FORGET_ONE.unpack_from(body, A.BATCH_FORGET_IN.size + i * A.FORGET_ONE.size)
                    self.ops.forget(ino, nl)
            # INTERRUPT: swap I/O is never interrupted and our requests are short.
        except MalformedRequest as e:
            self.malformed += 1
            log.error("malformed opcode %d (no reply): %s", opcode, e)

    async def _readdir(self, ctx: Context, nodeid: int, body: memoryview) -> bytes:
        fh, offset, size = _p_read(body)
        entries = await self.ops.readdir(ctx, nodeid, fh, offset)
        return pack_dirents(entries, offset, size)


# -- mounting -------------------------------------------------------------------

def open_and_mount(mountpoint: str, fstype: str, *, source: str = "none",
                   allow_other: bool = True) -> int:
    """Open /dev/fuse and mount it on ``mountpoint`` as ``fuse.<fstype>``;
    returns the fd.  Needs root (mount(2))."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions"
    if allow_other:
        opts += ",allow_other"
    try:
        _linux.mount(source, mountpoint, f"fuse.{fstype}", _linux.MS_NOSUID | _linux.MS_NODEV, opts)
    except BaseException:
        os.close(fd)
        raise
    return fd


def unmount(mountpoint: str) -> None:
    """umount(2); raises OSError(EBUSY) while the mount is in use."""
    _linux.umount(mountpoint)


async def serve(mountpoint: str, ops: Operations, fstype: str, *, source: str = "none",
                channels: int = 0,
                task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED) -> None:
    """Mount ``ops`` at ``mountpoint`` and serve it until unmounted, on the
    event loop alone or with ``channels`` threads (see the module docstring).

    ``task_status.started`` is called with the Session once INIT is done,
    so ``await nursery.start(serve, ...)`` returns when the mount is ready.
    """
    fd = open_and_mount(mountpoint, fstype, source=source)
    try:
        session = Session(fd, ops, channels=channels, buffers=0 if channels else 16)
        await session.handshake()
        session.prepare()
        task_status.started(session)
        await session.serve()
    finally:
        os.close(fd)
