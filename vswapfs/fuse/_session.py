"""A FUSE session: INIT, then one request path, on trio.

Two ways to serve.  With ``channels=0`` the event loop reads /dev/fuse and
runs every request as its own task, so slow ones (I/O in threads) never
hold up the others.  With ``channels=N`` the data path skips the event
loop: N threads each read their own clone of the fd (see ``_channel``)
and serve the opcodes the table (``_opcodes``) marks ``thread`` through
the file system's ``*_blocking`` methods; anything else, or what a
``*_blocking`` method DEFERs, is handed to the event loop as a task.  A
trip through the event loop (epoll, a task, a thread hop for the work)
costs more than serving a 4 KiB page, and the channel threads block in
read(2) and in compression with the GIL released.

Either way a request takes the same path: :meth:`Session._open` checks
the header, looks the opcode up and parses the body; the method is called
(awaited on the loop, called on a thread); :meth:`Session._answer` builds
and writes the reply, or the errno, and counts it.  One shortcut: on a
channel thread, a READ or WRITE whose header and size check is served by
``_wire.serve_data`` (C, ``_wire.c``), or where that was not built by
:meth:`Session._serve_data`, which do the same without the request objects
and the opcode table (the C one without the Python objects of the header
and the reply too: a fifth of a 2-page READ's instructions); a test holds
the paths to the same replies.

Request buffers come from a fixed set, faulted in at start: one per
channel thread, or, when the event loop reads, a pool for it; when all of
the loop's are busy it stops reading, which is the only back-pressure the
kernel needs and keeps memory bounded.

Every request answered is counted with the time it took, from parsing to
the reply written (``service_stats``): how busy the server is, apart from
what the kernel's side of the crossing costs.

A session can outlive its server.  Given ``keep``, :func:`serve` hands
over every fd the connection lives in as soon as it exists, before any
request is answered: the /dev/fuse fd (``fuse``), each channel clone
(``fuse.channel.N``) and a memfd with what INIT settled (``fuse.init``,
written before the INIT reply).  A later process given those fds
(``inherited``) serves the same connection without mounting or INIT: it
sends ``FUSE_NOTIFY_RESEND`` and the kernel queues again what the dead
server had read but not answered.  The clones matter: requests read from
a clone that is closed are failed by the kernel, so whoever keeps the fds
keeps the clones too.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple

import trio

from . import _abi as A
from . import _channel as C
from ._mount import open_and_mount
from ._opcodes import OPS, Op, data_bytes
from ._ops import DEFER, Operations, PollCounts
from ._reader import MalformedHeader, MalformedRequest, _tuple_new, header
from ._replies import errno_of
from ._types import Context, InitInfo

log = logging.getLogger("vswapfs.fuse")

MAX_WRITE: Final = C.MAX_WRITE
MAX_PAGES: Final = MAX_WRITE // 4096
MAX_BACKGROUND: Final = 64
FALLBACK_BUFFERS: Final = 16  # event-loop buffers when channels were asked for but cannot be had
WANTED_FLAGS: Final = A.ASYNC_READ | A.BIG_WRITES | A.ASYNC_DIO | A.MAX_PAGES | A.PARALLEL_DIROPS
OPCODES_TALLIED: Final = 64  # opcodes below this are counted (fuse.h ends at 51; CUSE_INIT is 4096)
HAND_OVER: Final[Any] = object()  # _open's answer on a channel thread: the event loop serves it
# the short path's opcodes, this module's own finals (imported from _opcodes instead,
# a 1-page READ counted 22,733 instructions under callgrind against 22,013)
_READ: Final = int(A.Opcode.READ)
_WRITE: Final = int(A.Opcode.WRITE)
_unpack_data_in: Final = A.DATA_IN.unpack_from
_DATA_IN_SIZE: Final = A.DATA_IN.size
_WRITE_DATA_AT: Final = A.IN_HEADER.size + A.WRITE_IN_SIZE  # where a WRITE's data starts
_pack_written: Final = A.WRITE_OUT.pack
# bound once, and Final: compiled, a Final is a C static, any other global a dict lookup per use
_now_ns: Final = time.perf_counter_ns
# what _wire.serve_data returns (the C module's own constants, which a test compares)
_NOT_MINE: Final = 0
_DEFERRED: Final = 2
_REPLY_FAILED: Final = 1000


def _native_data_path() -> Callable[..., int] | None:
    """``_wire.serve_data``, the short path for READ and WRITE in C, set up;
    None where the module was not built (``Session._serve_data`` serves)."""
    try:
        from . import _wire
    except ImportError:
        return None
    _wire.setup(Context, DEFER)
    return _wire.serve_data


_SERVE_DATA_C: Final = _native_data_path()


class _Tally:
    """Requests answered, the data they moved and the nanoseconds spent on
    them, per opcode, by one thread: each serving thread has its own, so
    counting needs no lock."""

    __slots__ = ("count", "data", "ns")

    def __init__(self) -> None:
        # lists, not arrays: the compiled path indexes a list[int] natively
        self.count: list[int] = [0] * OPCODES_TALLIED
        self.data: list[int] = [0] * OPCODES_TALLIED
        self.ns: list[int] = [0] * OPCODES_TALLIED

    def add(self, opcode: int, t0: int, data: int = 0) -> None:
        if opcode < OPCODES_TALLIED:
            # not ``+=``: compiled, an item's ``+=`` is a generic in-place add, ``x = x + n`` int arithmetic
            count, moved, ns = self.count, self.data, self.ns
            count[opcode] = count[opcode] + 1
            moved[opcode] = moved[opcode] + data
            ns[opcode] = ns[opcode] + (_now_ns() - t0)


class _Request(NamedTuple):
    """A request that parsed: what the method needs and where to answer."""

    opcode: int
    unique: int
    nodeid: int
    ctx: Context
    op: Op
    args: tuple[Any, ...]
    fd: int
    t0: int


class Session:
    """A FUSE connection: a /dev/fuse fd and the file system it serves."""

    def __init__(self, fd: int, ops: Operations, *, buffers: int = 16, channels: int = 0,
                 max_background: int = MAX_BACKGROUND,
                 keep: Callable[[dict[str, int]], None] | None = None,
                 busy_poll_us: int = 0) -> None:
        self.fd = fd
        self.keep = keep  # hands the connection's fds to whoever outlives this process
        self.ops = ops
        self.channels = channels
        self.busy_poll_us = busy_poll_us  # µs a channel thread may poll before it sleeps (C.BusyPoll)
        self._polls: list[C.BusyPoll] = []  # one per channel thread
        self.max_background = max_background
        # opcode -> the ops' *_blocking method, looked up once
        self._blocking = {code: getattr(ops, op.method + "_blocking") for code, op in OPS.items()
                          if op.thread}
        # the short path for READ and WRITE: in C where it was built (None: in Python, as
        # _serve_data; a test takes both), with what it calls bound once
        self._serve_data_c = _SERVE_DATA_C
        self._read_blocking = ops.read_blocking
        self._write_blocking = ops.write_blocking
        self._fail_bound: Callable[..., None] = self._fail
        self.init = InitInfo()
        self.requests = 0  # requests served
        self.malformed = 0  # requests answered EIO (or dropped) because they did not parse
        self._loop_tally = _Tally()  # what the event loop answered
        self._tallies = [self._loop_tally]  # and one per channel thread
        # The I/O path's reserve: allocated and faulted in now (and mlocked, if
        # the process is), so serving a request never waits on reclaim for it.
        self._free = [C.new_buffer() for _ in range(buffers)]
        self._buffers = trio.Semaphore(buffers)
        self._loop_errors = C.ReadErrors()
        self._channel_fds: list[tuple[int, bytearray]] | None = None  # set by prepare()
        os.set_blocking(fd, False)

    def poll_stats(self) -> PollCounts:
        """The channel threads' busy polling (``_channel.BusyPoll``): µs a
        window may grow to, the widest window now in µs, requests caught
        while polling, sleeps in poll(2) and spells whose polling stopped
        because the CPU was wanted, summed; and the highest share, in
        percent, of recent idle spells that ended within the maximum."""
        polls = list(self._polls)
        return (self.busy_poll_us, round(max((p.window for p in polls), default=0.0) * 1e6),
                sum(p.caught for p in polls), sum(p.slept for p in polls), sum(p.ceded for p in polls),
                round(max((p.rate for p in polls), default=0.0) * 100))

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

    # -- INIT ---------------------------------------------------------------

    async def handshake(self) -> InitInfo:
        """Answer INIT (the first request), return what was settled, and
        hand it to the file system (``Operations.init``)."""
        buf = C.new_buffer()  # faulted in: once freed, the next big reply reuses it
        while True:
            n = await C.read_request(self.fd, buf, self._loop_errors)
            if not n:
                raise OSError(errno.ENODEV, "unmounted before INIT")
            _, opcode, unique, *_ = A.IN_HEADER.unpack_from(buf)
            if opcode != A.Opcode.INIT:
                C.write_reply(self.fd, unique, errno.EIO)
                continue
            body = memoryview(buf)[A.IN_HEADER.size:n]
            major, minor, max_readahead, flags = A.INIT_IN.unpack_from(body)
            if major > A.KERNEL_VERSION:  # ask the kernel to speak our major: it sends INIT again
                C.write_reply(self.fd, unique, 0, A.INIT_OUT.pack(
                    A.KERNEL_VERSION, A.KERNEL_MINOR_VERSION, *([0] * (len(A.INIT_OUT_FIELDS) - 2))))
                continue
            if major < A.KERNEL_VERSION or minor < 31:
                C.write_reply(self.fd, unique, errno.EPROTO)
                raise OSError(errno.EPROTO, f"kernel FUSE {major}.{minor} is too old")
            granted = flags & WANTED_FLAGS
            our_minor = min(minor, A.KERNEL_MINOR_VERSION)
            names = [name for bit, name in A.INIT_FLAG_NAMES.items() if granted & bit]
            self.init = InitInfo(major, our_minor, flags, granted, MAX_WRITE, MAX_PAGES,
                                 self.max_background, names)
            if self.keep is not None:  # a server that takes over must know it without INIT
                self.keep({"fuse.init": _init_memfd(self.init)})
            C.write_reply(self.fd, unique, 0, A.INIT_OUT.pack(
                A.KERNEL_VERSION, our_minor, max_readahead, granted,
                self.max_background, self.max_background * 3 // 4, MAX_WRITE, 1, MAX_PAGES, 0, 0,
                *([0] * 7)))
            log.info("FUSE %d.%d (kernel %d.%d): granted %s; max_write %d, max_pages %d, "
                     "max_background %d; missing %s", A.KERNEL_VERSION, our_minor, major, minor,
                     "|".join(names) or "nothing", MAX_WRITE, MAX_PAGES, self.max_background,
                     "|".join(n for b, n in A.INIT_FLAG_NAMES.items()
                              if WANTED_FLAGS & b and not granted & b) or "nothing")
            self.ops.init(self.init, self.service_stats, self.poll_stats)
            return self.init

    def take_over(self, init_fd: int, clones: list[int]) -> InitInfo:
        """Serve a connection a previous server set up: what INIT settled
        is read from ``init_fd``, the channel clones are ``clones``; then
        the kernel is asked to resend what that server left unanswered."""
        raw = os.pread(init_fd, os.fstat(init_fd).st_size, 0)
        self.init = InitInfo(**json.loads(raw))
        self._channel_fds = [(fd, C.new_buffer()) for fd in clones]
        self.channels = len(clones)
        if not clones and not self._free:
            self._free = [C.new_buffer() for _ in range(FALLBACK_BUFFERS)]
            self._buffers = trio.Semaphore(FALLBACK_BUFFERS)
        self.ops.init(self.init, self.service_stats, self.poll_stats)
        try:
            C.notify_resend(self.fd)
        except OSError as e:  # before Linux 6.9: what the old server had read stays unanswered
            log.error("FUSE_NOTIFY_RESEND failed (%s): requests the previous daemon had read "
                      "will never be answered", e)
        return self.init

    # -- the one request path ---------------------------------------------------

    def _open(self, req: memoryview, fd: int, tally: _Tally, *, thread: bool = False) -> Any:
        """Check the header, look the opcode up and parse the body.  Returns
        the :class:`_Request`; None if it was answered (EIO, ENOSYS) or
        dropped here; or, on a channel thread (``thread``), HAND_OVER for
        what only the event loop serves."""
        t0 = _now_ns()
        try:
            h = header(req)
        except MalformedHeader as e:
            op = OPS.get(e.header.opcode)
            if thread and (op is None or not op.thread):
                return HAND_OVER
            self._fail(e, e.header.unique, e.header.opcode, fd, tally, t0, reply=op is None or bool(op.reply))
            return None
        except MalformedRequest as err:  # too short to answer: no unique (not ``e``: see _fs)
            self.malformed += 1
            log.error("%s: dropped", err)
            return None
        op = OPS.get(h.opcode)
        if thread and (op is None or not op.thread):
            return HAND_OVER
        if op is None:
            C.write_reply(fd, h.unique, errno.ENOSYS)
            return None
        try:
            args = op.parse(req[A.IN_HEADER.size:h.body_end])
        except MalformedRequest as err:
            self._fail(err, h.unique, h.opcode, fd, tally, t0, reply=op.reply is not None)
            return None
        return _tuple_new(_Request, (h.opcode, h.unique, h.nodeid, h.ctx, op, args, fd, t0))

    def _answer(self, r: _Request, result: Any, tally: _Tally) -> None:
        """Build and write the reply to a method that returned ``result``."""
        if r.op.reply is None:
            return
        try:
            payload = r.op.reply(result, r.args)
        except Exception as e:
            self._fail(e, r.unique, r.opcode, r.fd, tally, r.t0)
            return
        C.write_reply(r.fd, r.unique, 0, payload)
        tally.add(r.opcode, r.t0, data_bytes(r.opcode, result, payload))

    def _fail(self, e: BaseException, unique: int, opcode: int, fd: int, tally: _Tally, t0: int,
              *, reply: bool = True) -> None:
        """Answer a request that failed with ``e`` with its errno (unless the
        kernel wants no reply to its opcode: then it is only logged)."""
        if isinstance(e, MalformedRequest):
            self.malformed += 1
        if reply:
            C.write_reply(fd, unique, errno_of(e, unique, opcode))
            tally.add(opcode, t0)
        else:
            log.error("opcode %d (no reply) failed: %s", opcode, e)

    async def dispatch(self, req: memoryview | bytes, fd: int | None = None) -> None:
        """Serve one request on the event loop and answer it on ``fd``
        (default: the session's); public for tests and fuzzing."""
        tally = self._loop_tally
        self.requests += 1
        r = self._open(memoryview(req), self.fd if fd is None else fd, tally)
        if r is None:
            return
        try:
            if r.op.call is not None:
                result = await r.op.call(self.ops, r.ctx, r.nodeid, r.args)
            else:
                result = await getattr(self.ops, r.op.method)(r.ctx, r.nodeid, *r.args)
        except Exception as e:
            self._fail(e, r.unique, r.opcode, r.fd, tally, r.t0, reply=r.op.reply is not None)
        else:
            self._answer(r, result, tally)

    def _serve_here(self, tally: _Tally, fd: int, req: memoryview) -> bool:
        """Serve a request on this channel thread; False to hand it over.
        A well-formed READ or WRITE takes the short path: ``_wire.serve_data``
        in C, or :meth:`_serve_data` where that was not built."""
        serve_c = self._serve_data_c
        if serve_c is not None:
            done = serve_c(fd, req, self._read_blocking, self._write_blocking, self._fail_bound, tally,
                           tally.count, tally.data, tally.ns)
            if done != _NOT_MINE:
                if done == _DEFERRED:
                    return False
                if done >= _REPLY_FAILED:
                    C.reply_failed(A.IN_HEADER.unpack_from(req)[2], done - _REPLY_FAILED)
                self.requests += 1
                return True
        elif (n := len(req)) >= _DATA_IN_SIZE:
            t0 = _now_ns()  # busy time counts from parsing, as _open's does
            length, opcode, unique, nodeid, uid, gid, pid, extlen, _, fh, offset, size, _ = \
                _unpack_data_in(req)
            if length == n and not extlen and (
                    opcode == _READ or (opcode == _WRITE and n >= _WRITE_DATA_AT + size)):
                return self._serve_data(tally, fd, req, t0, opcode, unique, nodeid,
                                        _tuple_new(Context, (uid, gid, pid)), fh, offset, size)
        r = self._open(req, fd, tally, thread=True)
        if r is HAND_OVER:
            return False
        if r is not None:
            try:
                result = self._blocking[r.opcode](r.ctx, r.nodeid, *r.args)
            except Exception as e:
                self._fail(e, r.unique, r.opcode, fd, tally, r.t0)
            else:
                if result is DEFER:
                    return False
                self._answer(r, result, tally)
        self.requests += 1
        return True

    def _serve_data(self, tally: _Tally, fd: int, req: memoryview, t0: int, opcode: int,
                    unique: int, nodeid: int, ctx: Context, fh: int, offset: int, size: int) -> bool:
        """A READ or WRITE that parsed (``_serve_here`` checked the header
        and the body's size): what :meth:`_open`, the method and
        :meth:`_answer` do for it, answered the same way, without building
        the request, looking the method up or calling through the opcode
        table.  Nearly every request swap sends is one of these, and a
        request's own Python is what the daemon's time per page is made of
        (docs/sustained.md)."""
        try:
            if opcode == _READ:
                result = self.ops.read_blocking(ctx, nodeid, fh, offset, size)
                if result is DEFER:
                    return False
                payload = result
                moved = len(payload)
            else:
                result = self.ops.write_blocking(ctx, nodeid, fh, offset,
                                                 req[_WRITE_DATA_AT:_WRITE_DATA_AT + size])
                if result is DEFER:
                    return False
                moved = int(result)
                payload = _pack_written(moved, 0)
        except Exception as e:
            self._fail(e, unique, opcode, fd, tally, t0)
        else:
            C.write_reply(fd, unique, 0, payload)
            tally.add(opcode, t0, moved)
        self.requests += 1
        return True

    # -- serving --------------------------------------------------------------

    def prepare(self) -> None:
        """Clone the channel fds and fault their buffers in, or the event
        loop's if the fd cannot be cloned: everything serving needs, so a
        caller can have it in place before it says the mount is ready."""
        if self._channel_fds is not None:
            return
        self._channel_fds = [(fd, C.new_buffer()) for fd in
                             (self._clone_channels() if self.channels else [])]
        if self.keep is not None and self._channel_fds:  # before a request is read from them
            self.keep({f"fuse.channel.{i}": fd for i, (fd, _) in enumerate(self._channel_fds)})
        if not self._channel_fds and not self._free:  # buffers were left to the channels
            self._free = [C.new_buffer() for _ in range(FALLBACK_BUFFERS)]
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
                fds.append(C.clone_fd(self.fd))
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
                    n = await C.read_request(self.fd, buf, self._loop_errors)
                except BaseException:
                    self._give_back(buf)
                    raise
                if not n:
                    self._give_back(buf)
                    break
                nursery.start_soon(self._handle, buf, n)

    def _give_back(self, buf: bytearray) -> None:
        self._free.append(buf)
        self._buffers.release()

    async def _handle(self, buf: bytearray, n: int) -> None:
        try:
            await self.dispatch(memoryview(buf)[:n])
        finally:
            self._give_back(buf)

    async def _serve_channels(self, fds: list[int], bufs: list[bytearray] | None = None) -> None:
        """Run a channel thread on each of ``fds`` and what they hand over;
        return when all have seen the file system go away."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Semaphore(0)
        try:
            async with trio.open_nursery() as nursery:

                def hand_over(req: bytes, fd: int) -> bool:
                    try:
                        trio.from_thread.run_sync(nursery.start_soon, self.dispatch, req, fd,
                                                  trio_token=token)
                        return True
                    except trio.RunFinishedError:
                        return False

                def channel(fd: int, buf: bytearray) -> None:
                    try:
                        self.ops.channel_started()
                        tally = _Tally()
                        self._tallies.append(tally)
                        poll = C.BusyPoll(self.busy_poll_us / 1e6)
                        self._polls.append(poll)
                        C.serve_thread(fd, buf, threading.current_thread().name,
                                       functools.partial(self._serve_here, tally), hand_over, poll)
                    finally:
                        try:
                            trio.from_thread.run_sync(done.release, trio_token=token)
                        except trio.RunFinishedError:
                            pass

                bufs = bufs or [C.new_buffer() for _ in fds]
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


def _init_memfd(info: InitInfo) -> int:
    fd = os.memfd_create("vswapfs-fuse-init", os.MFD_CLOEXEC)
    os.write(fd, json.dumps(dataclasses.asdict(info)).encode())
    return fd


def inherited_connection(fds: Mapping[str, int]) -> bool:
    """True if ``fds`` hold a connection a previous server kept (see the
    module docstring)."""
    return "fuse" in fds and "fuse.init" in fds


async def serve(mountpoint: str, ops: Operations, fstype: str, *, source: str = "none",
                channels: int = 0, busy_poll_us: int = 0,
                task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED,
                keep: Callable[[dict[str, int]], None] | None = None,
                inherited: Mapping[str, int] | None = None) -> None:
    """Mount ``ops`` at ``mountpoint`` and serve it until unmounted, on the
    event loop alone or with ``channels`` threads (see the module docstring),
    which poll for up to ``busy_poll_us`` before they sleep (``_channel.BusyPoll``).
    ``keep``: hand each fd of the connection over as it is made;
    ``inherited``: serve the connection those fds hold instead of mounting.

    ``task_status.started`` is called with the Session once INIT is done,
    so ``await nursery.start(serve, ...)`` returns when the mount is ready.
    """
    if inherited is not None and inherited_connection(inherited):
        fd = inherited["fuse"]
        clones = [inherited[k] for k in sorted((k for k in inherited if k.startswith("fuse.channel.")),
                                               key=lambda k: int(k.rsplit(".", 1)[1]))]
        session = Session(fd, ops, channels=len(clones), buffers=0 if clones else 16, keep=keep,
                          busy_poll_us=busy_poll_us)
        session.take_over(inherited["fuse.init"], clones)
    else:
        fd = open_and_mount(mountpoint, fstype, source=source)
        try:
            if keep is not None:
                keep({"fuse": fd})
            session = Session(fd, ops, channels=channels, buffers=0 if channels else 16, keep=keep,
                              busy_poll_us=busy_poll_us)
            await session.handshake()
            session.prepare()
        except BaseException:
            os.close(fd)
            raise
    try:
        task_status.started(session)
        await session.serve()
    finally:
        os.close(fd)
