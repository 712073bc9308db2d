"""The FUSE transport (``vswapfs.fuse``) over a stub file system: the
request path, the opcode table, INIT, the channel threads and the read
errors policy.  Nothing here knows swap: the stub keeps one 4 MiB file."""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import needs_root
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vswapfs import MiB, _build, linux
from vswapfs.fuse import (
    DEFER,
    FOPEN_DIRECT_IO,
    ROOT_ID,
    Attr,
    Context,
    DirEntry,
    Entry,
    FuseError,
    InitInfo,
    Opened,
    Operations,
    Session,
    StatFs,
    _channel,
    _session,
    serve,
    unmount,
)
from vswapfs.fuse import _abi as A
from vswapfs.fuse._abi import IN_HEADER, OUT_HEADER, Opcode
from vswapfs.fuse._channel import ReadErrors
from vswapfs.fuse._opcodes import OPS

FILE_INO = 2
FILE_BYTES = 4 * MiB


class StubFS(Operations):
    """One file, ``data``, of 4 MiB in memory; read, write and fallocate
    are served on channel threads too."""

    def __init__(self) -> None:
        self.data = bytearray(FILE_BYTES)
        self.punched: list[tuple[int, int]] = []
        self.stats: Any = None

    def init(self, info: InitInfo, service_stats: Any, poll_stats: Any) -> None:
        self.stats = service_stats

    def _attr(self, ino: int) -> Attr:
        if ino == ROOT_ID:
            return Attr(ino, 0o40755, nlink=2)
        if ino == FILE_INO:
            return Attr(ino, 0o100600, size=FILE_BYTES)
        raise FuseError(errno.ENOENT)

    async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        if parent == ROOT_ID and name == b"file":
            return Entry(self._attr(FILE_INO))
        raise FuseError(errno.ENOENT)

    async def getattr(self, ctx: Context, ino: int, fh: int | None) -> Attr:
        return self._attr(ino)

    async def open(self, ctx: Context, ino: int, flags: int) -> Opened:
        self._attr(ino)
        return Opened(1, FOPEN_DIRECT_IO)

    async def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        return Opened(1)

    async def readdir(self, ctx: Context, ino: int, fh: int, offset: int) -> list[DirEntry]:
        return [DirEntry(FILE_INO, b"file", 0o100600)][offset:]

    async def statfs(self, ctx: Context, ino: int) -> StatFs:
        return StatFs(blocks=FILE_BYTES // 4096, bfree=0, bavail=0, files=1, ffree=0)

    def read_blocking(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> Any:
        if ino != FILE_INO or offset < 0 or offset + size > FILE_BYTES:
            raise FuseError(errno.EINVAL)
        return bytes(self.data[offset:offset + size])

    def write_blocking(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview) -> Any:
        if ino != FILE_INO or offset < 0 or offset + len(data) > FILE_BYTES:
            raise FuseError(errno.EFBIG)
        self.data[offset:offset + len(data)] = data
        return len(data)

    def fallocate_blocking(self, ctx: Context, ino: int, fh: int, offset: int, length: int,
                           mode: int) -> Any:
        if ino != FILE_INO or offset < 0 or offset + length > FILE_BYTES:
            raise FuseError(errno.EINVAL)
        self.data[offset:offset + length] = bytes(length)
        self.punched.append((offset, length))
        return None

    async def read(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> bytes:
        result: bytes = self.read_blocking(ctx, ino, fh, offset, size)
        return result

    async def write(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview) -> int:
        n: int = self.write_blocking(ctx, ino, fh, offset, data)
        return n

    async def fallocate(self, ctx: Context, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        self.fallocate_blocking(ctx, ino, fh, offset, length, mode)


def test_every_opcode_a_channel_thread_serves_has_a_blocking_method() -> None:
    """The opcode table is the one place that says what a thread may serve:
    each such opcode's method has its ``_blocking`` twin, DEFER by default."""
    threaded = {code for code, op in OPS.items() if op.thread}
    assert threaded == {Opcode.READ, Opcode.WRITE, Opcode.FALLOCATE}
    for code in threaded:
        assert callable(getattr(Operations, OPS[code].method + "_blocking"))
    assert {code for code, op in OPS.items() if op.reply is None} == {
        Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT}


@needs_root
def test_a_stub_fs_mounted_for_real_reads_writes_punches_and_counts(tmp_path: Path) -> None:
    """The transport alone, on a real /dev/fuse mount: what is written reads
    back, a punched hole reads as zeros, and the file system got the
    transport's counts through ``init``."""
    fs = StubFS()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    payload = os.urandom(3 * 4096)
    seen: dict[str, Any] = {}

    def io() -> None:
        fd = os.open(mnt / "file", os.O_RDWR)
        try:
            os.pwrite(fd, payload, 8192)
            linux.punch_hole(fd, 8192 + 4096, 4096)  # FUSE_FALLOCATE, mode PUNCH_HOLE|KEEP_SIZE
            seen["data"] = os.pread(fd, 3 * 4096, 8192)
        finally:
            os.close(fd)
        seen["names"] = os.listdir(mnt)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, str(mnt), fs, "vswapfs-stub", channels=1))
            try:
                await trio.to_thread.run_sync(io)
            finally:
                await trio.to_thread.run_sync(unmount, str(mnt))

    trio.run(main)
    assert seen["data"] == payload[:4096] + bytes(4096) + payload[8192:]
    assert seen["names"] == ["file"] and fs.punched == [(8192 + 4096, 4096)]
    counts = fs.stats()
    assert counts["WRITE"][1] == 3 * 4096 and counts["READ"][1] == 3 * 4096
    assert counts["FALLOCATE"][0] == 1


# -- the FUSE request parser ---------------------------------------------------

# The channel thread's short path for READ and WRITE: the C module's (vswapfs/fuse/_wire.c),
# or the session's Python (Session._serve_data), which serves where the module was not built
SHORT_PATHS = ["c", "python"]


def short_path(session: Session, path: str) -> bool:
    """Make ``session`` serve READ and WRITE on a channel thread by ``path``;
    False for "c" in a pure build, which has no C module (that is checked in
    test_the_c_data_path_is_built_with_the_compiled_modules)."""
    if path == "python":
        session._serve_data_c = None
    return session._serve_data_c is not None


async def answer(raw: bytes, fs: StubFS | None = None, *, on_thread: bool = False,
                 path: str = "c") -> list[tuple[int, int, bytes]]:
    """Feed one raw request to a real Session over a stub file system; return the
    replies (error, unique, payload) it wrote (to a pipe, as to /dev/fuse).
    ``on_thread``: serve it as a channel thread does, not on the event loop,
    a READ or WRITE by the short ``path`` ("c" or "python")."""
    r, w = os.pipe()
    try:
        session = Session(w, StubFS() if fs is None else fs, buffers=1)
        short_path(session, path)
        if on_thread:
            assert session._serve_here(session._loop_tally, w, memoryview(raw)), "handed over"
        else:
            await session.dispatch(memoryview(raw))
        if fs is not None:
            fs.stats = session.service_stats
        os.close(w)
        w = -1
        out = b""
        while chunk := os.read(r, 1 << 20):
            out += chunk
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    replies = []
    while out:
        length, error, unique = OUT_HEADER.unpack_from(out)
        replies.append((error, unique, out[OUT_HEADER.size:length]))
        out = out[length:]
    return replies


def request(opcode: int, body: bytes, unique: int = 7, nodeid: int = 2, length: int | None = None) -> bytes:
    n = IN_HEADER.size + len(body) if length is None else length
    return IN_HEADER.pack(n, opcode, unique, nodeid, 0, 0, 1, 0, 0) + body


def test_malformed_requests_get_eio() -> None:
    cases = [
        request(Opcode.READ, b"\0" * 8),  # body shorter than fuse_read_in
        request(Opcode.WRITE, struct.pack("<QQII", 0, 0, 4096, 0) + b"\0" * 24 + b"x" * 10),  # short data
        request(Opcode.LOOKUP, b"no-terminator", nodeid=1),
        request(Opcode.GETATTR, b"\0" * 16, length=999),  # header length lies
        request(Opcode.FALLOCATE, b"\0" * 4),
    ]
    for raw in cases:
        assert trio.run(answer, raw) == [(-errno.EIO, 7, b"")]


def _read_body(offset: int, size: int) -> bytes:
    return struct.pack("<QQII", 0, offset, size, 0) + bytes(16)


def _write_body(offset: int, data: bytes, size: int | None = None) -> bytes:
    return struct.pack("<QQII", 0, offset, len(data) if size is None else size, 0) + bytes(24) + data


def test_the_c_data_path_is_built_with_the_compiled_modules() -> None:
    """Where the request path is compiled, so is a channel thread's READ and
    WRITE in C (no library needed), and sessions take it; its codes are the
    ones the session reads."""
    if os.environ.get("VSWAPFS_PURE") == "1":
        assert not _build.native_wire() and _session._SERVE_DATA_C is None
        return
    from vswapfs.fuse import _wire
    assert _build.native_wire() and _session._SERVE_DATA_C is _wire.serve_data
    r, w = os.pipe()
    try:
        assert Session(w, StubFS(), buffers=0)._serve_data_c is _wire.serve_data
    finally:
        os.close(r)
        os.close(w)
    assert (_wire.NOT_MINE, _wire.DEFERRED, _wire.REPLY_FAILED) == (
        _session._NOT_MINE, _session._DEFERRED, _session._REPLY_FAILED)
    assert _wire.SERVED not in (_wire.NOT_MINE, _wire.DEFERRED) and _wire.SERVED < _wire.REPLY_FAILED


@pytest.mark.parametrize("path", SHORT_PATHS)
def test_a_channel_thread_answers_reads_and_writes_as_the_event_loop_does(path: str) -> None:
    """On a channel thread a READ or WRITE whose header and size check takes
    a short path (``_wire.serve_data`` in C, or ``Session._serve_data``)
    instead of the request objects and the opcode table: every such
    request, well-formed or not, gets the same reply, leaves the file the
    same and is counted the same as through the general path."""
    if path == "c" and _session._SERVE_DATA_C is None:
        return  # a pure build: no C path (see the test above)
    data = os.urandom(8192)
    extension = IN_HEADER.pack(IN_HEADER.size + 24 + 8, Opcode.READ, 7, 2, 0, 0, 1, 1, 0)
    cases = [
        request(Opcode.READ, _read_body(4096, 8192)),
        request(Opcode.READ, _read_body(FILE_BYTES - 4096, 8192)),  # past the end: the fs says EINVAL
        request(Opcode.READ, _read_body(0, 4096), nodeid=3),  # another inode: EINVAL
        request(Opcode.READ, _read_body(0, 4096)[:20]),  # body shorter than fuse_read_in: EIO
        request(Opcode.READ, _read_body(0, 4096), length=999),  # the header's length lies: EIO
        extension + _read_body(0, 4096)[:24] + bytes(8),  # with an extension (extlen 1)
        request(Opcode.WRITE, _write_body(4096, data)),
        request(Opcode.WRITE, _write_body(4096, data, size=4096)),  # more data than size: ignored
        request(Opcode.WRITE, _write_body(4096, data[:4000], size=4096)),  # less: EIO
        request(Opcode.WRITE, _write_body(FILE_BYTES, data[:4096])),  # past the end: EFBIG
        request(Opcode.WRITE, _write_body(0, b"")),  # nothing
    ]
    for raw in cases:
        on_loop, on_thread = StubFS(), StubFS()
        on_loop.data[:] = on_thread.data[:] = os.urandom(FILE_BYTES)
        assert trio.run(partial(answer, raw, on_loop)) == trio.run(
            partial(answer, raw, on_thread, on_thread=True, path=path)), raw[:64]
        assert on_loop.data == on_thread.data
        assert {op: c[:2] for op, c in on_loop.stats().items()} == {
            op: c[:2] for op, c in on_thread.stats().items()}


@pytest.mark.parametrize("path", SHORT_PATHS)
def test_a_read_the_file_system_defers_is_handed_to_the_event_loop(path: str) -> None:
    """``read_blocking`` returning DEFER on a channel thread: nothing is
    answered there, and the request goes to the event loop."""

    class Deferring(StubFS):
        def read_blocking(self, ctx: Context, ino: int, fh: int, offset: int, size: int) -> Any:
            return DEFER

    r, w = os.pipe()
    with os.fdopen(r, "rb") as reader, os.fdopen(w, "wb") as writer:
        session = Session(writer.fileno(), Deferring(), buffers=1)
        if not short_path(session, path):
            return  # a pure build
        raw = memoryview(request(Opcode.READ, _read_body(0, 4096)))
        assert not session._serve_here(session._loop_tally, writer.fileno(), raw)
        assert session.requests == 0 and session.service_stats() == {}
        os.set_blocking(reader.fileno(), False)
        assert reader.read() is None  # no reply was written


@pytest.mark.parametrize("path", SHORT_PATHS)
def test_a_reply_that_cannot_be_written_is_logged_and_the_request_counted(
        path: str, caplog: pytest.LogCaptureFixture) -> None:
    """A reply whose write fails (here EPIPE: nobody reads the fd) is logged
    with the request's unique and the errno; the request still counts as
    served, on either short path."""
    r, w = os.pipe()
    os.close(r)
    try:
        fs = StubFS()
        session = Session(w, fs, buffers=0)
        if not short_path(session, path):
            return  # a pure build
        for raw in (request(Opcode.READ, _read_body(0, 4096), unique=41),
                    request(Opcode.WRITE, struct.pack("<QQII", 0, 0, 4096, 0) + bytes(16) + b"x" * 4096,
                            unique=42)):  # fuse_write_in is 40 bytes, then the data
            assert session._serve_here(session._loop_tally, w, memoryview(raw))
    finally:
        os.close(w)
    failed = [rec.getMessage() for rec in caplog.records if "reply to request" in rec.getMessage()]
    assert failed == ["reply to request 41 failed: Broken pipe", "reply to request 42 failed: Broken pipe"]
    assert session.requests == 2 and fs.data[:4096] == b"x" * 4096
    assert {op: c[:2] for op, c in session.service_stats().items()} == {
        "READ": (1, 4096), "WRITE": (1, 4096)}


@pytest.mark.parametrize("path", SHORT_PATHS)
def test_what_is_not_an_error_goes_up_through_either_short_path(path: str) -> None:
    """A method that raises an Exception is answered with its errno; one that
    raises what is not an Exception (KeyboardInterrupt, SystemExit) is not
    caught: it goes up out of the channel thread's call, unanswered."""

    class Stop(BaseException):
        pass

    class Stopping(StubFS):
        def write_blocking(self, ctx: Context, ino: int, fh: int, offset: int, data: memoryview) -> Any:
            raise Stop()

    r, w = os.pipe()
    try:
        session = Session(w, Stopping(), buffers=0)
        if not short_path(session, path):
            return  # a pure build
        with pytest.raises(Stop):
            session._serve_here(session._loop_tally, w, memoryview(
                request(Opcode.WRITE, _write_body(0, b"y" * 4096))))
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 100)  # nothing was answered
    finally:
        os.close(r)
        os.close(w)


def test_unknown_opcode_gets_enosys_and_forget_gets_no_reply() -> None:
    assert trio.run(answer, request(Opcode.SYMLINK, b"a\0b\0")) == [(-errno.ENOSYS, 7, b"")]
    assert trio.run(answer, request(9999, b"")) == [(-errno.ENOSYS, 7, b"")]
    assert trio.run(answer, request(Opcode.FORGET, struct.pack("<Q", 1))) == []
    assert trio.run(answer, request(Opcode.BATCH_FORGET, struct.pack("<II", 1000, 0))) == []
    assert trio.run(answer, b"\1\2\3") == []  # shorter than a header: nothing to answer


def test_a_valid_request_still_works_after_garbage() -> None:
    body = struct.pack("<QQII", 0, 0, 4096, 0) + b"\0" * 24
    replies = trio.run(answer, request(Opcode.READ, body))
    assert replies == [(0, 7, bytes(4096))]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(opcode=st.sampled_from([int(o) for o in Opcode] + [0, 77, 4096]),
       nodeid=st.sampled_from([0, 1, 2, 3, 16, 20, 999]), body=st.binary(max_size=200),
       lie=st.one_of(st.none(), st.integers(0, 300)))
def test_fuzzed_requests_never_crash_the_session(opcode: int, nodeid: int, body: bytes,
                                                 lie: int | None) -> None:
    if opcode in (Opcode.INIT, Opcode.DESTROY):
        return
    replies = trio.run(answer, request(opcode, body, nodeid=nodeid, length=lie))
    assert len(replies) <= 1
    for error, unique, _ in replies:
        assert unique == 7 and error <= 0


def test_session_whose_fd_cannot_be_cloned_serves_from_the_event_loop() -> None:
    """Channels asked for on an fd that is no FUSE connection (a socket here):
    the clone is refused, and the event loop serves the request instead."""

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        session = Session(a.fileno(), StubFS(), channels=2, buffers=0)
        b.send(IN_HEADER.pack(IN_HEADER.size, Opcode.STATFS, 77, 1, 0, 0, 0, 0, 0))
        b.shutdown(socket.SHUT_WR)  # the session then reads EOF, as after an unmount
        trio.run(session.serve)
        reply = b.recv(4096)
    length, error, unique = OUT_HEADER.unpack_from(reply)
    assert session.channels == 0 and session.requests == 1
    assert (error, unique, length) == (0, 77, OUT_HEADER.size + A.STATFS_OUT.size)
    assert A.STATFS_OUT.unpack_from(reply, OUT_HEADER.size)[5] == 4096  # f_bsize


# -- INIT, aborts and the channel-thread path ----------------------------------------

def _init_request(major: int, minor: int, unique: int = 1) -> bytes:
    body = A.INIT_IN.pack(major, minor, 1 << 17, 0xFFFFFFFF) + bytes(A.INIT_IN_FLAGS2.size + 44)
    return IN_HEADER.pack(IN_HEADER.size + len(body), Opcode.INIT, unique, 0, 0, 0, 0, 0, 0) + body


def test_init_from_a_newer_major_asks_for_ours_with_a_whole_reply() -> None:
    """A kernel that speaks major 8 gets fuse_init_out with our major (7),
    all 18 fields, and sends INIT again in it; the handshake then ends."""

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        session = Session(a.fileno(), StubFS(), buffers=1)
        b.send(_init_request(8, 0, unique=1))
        b.send(_init_request(7, 45, unique=2))
        info = trio.run(session.handshake)
        first, second = b.recv(4096), b.recv(4096)
    length, error, unique = OUT_HEADER.unpack_from(first)
    assert (error, unique, length) == (0, 1, OUT_HEADER.size + A.INIT_OUT.size)
    assert A.INIT_OUT.unpack_from(first, OUT_HEADER.size)[:2] == (7, A.KERNEL_MINOR_VERSION)
    assert OUT_HEADER.unpack_from(second)[1:] == (0, 2) and (info.major, info.minor) == (7, 38)


def test_every_request_through_a_channel_thread_gets_exactly_its_answer() -> None:
    """The channel-thread path (the one swap I/O takes) under fuzzed
    requests: every request that needs an answer gets exactly one, with its
    own unique, and FORGET, BATCH_FORGET and INTERRUPT get none.  A request
    left unanswered would hang a kernel task for good: it fails here."""
    rng = random.Random(7)
    opcodes = [int(o) for o in Opcode if o not in (Opcode.INIT, Opcode.DESTROY)] + [0, 77, 4096]
    no_reply = {Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT}
    main, main_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    chan, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # the channel's "clone"
    got: list[int] = []

    def collect() -> None:
        while reply := kernel.recv(1 << 21):
            length, error, unique = OUT_HEADER.unpack_from(reply)
            assert length == len(reply) and error <= 0
            got.append(unique)

    with main, main_peer, chan, kernel:
        session = Session(main.fileno(), StubFS(), channels=1, buffers=0)
        server = threading.Thread(target=trio.run, args=(session._serve_channels, [os.dup(chan.fileno())]))
        reader = threading.Thread(target=collect)
        server.start()
        reader.start()
        expected: set[int] = set()
        for unique in range(1, 600):
            op = rng.choice(opcodes)
            body = rng.randbytes(rng.randrange(0, 120))
            if op in (Opcode.READ, Opcode.WRITE, Opcode.FALLOCATE) and rng.random() < 0.6:
                off = rng.randrange(0, 4 * MiB, 4096)  # well-formed data requests on the image
                if op == Opcode.READ:
                    body = struct.pack("<QQII", 0, off, 4096, 0) + bytes(16)
                elif op == Opcode.WRITE:
                    body = struct.pack("<QQII", 0, off, 4096, 0) + bytes(24) + rng.randbytes(4096)
                else:
                    body = struct.pack("<QQQII", 0, off, 4096, 3, 0)
            lie = rng.choice([None, None, None, rng.randrange(0, 300)])
            raw = request(op, body, unique=unique, nodeid=rng.choice([1, 2, 3, 16, 999]), length=lie)
            if len(raw) < IN_HEADER.size:
                continue
            kernel.send(raw)
            if op not in no_reply:  # never these, even malformed: the kernel expects no answer
                expected.add(unique)
        kernel.shutdown(socket.SHUT_WR)  # the channel reads EOF, as after an unmount
        server.join(30)
        chan.shutdown(socket.SHUT_WR)
        reader.join(10)
    assert not server.is_alive() and not reader.is_alive()
    assert sorted(got) == sorted(expected), "requests answered twice or not at all"
    assert len(expected) > 400


def _read_paths() -> list[Any]:
    """The reads a channel thread may use: the Python twin, and the C one where built."""
    if os.environ.get("VSWAPFS_PURE") == "1":
        return [_channel.read_into]
    from vswapfs.fuse import _wire
    return [_channel.read_into, _wire.read_request]


def test_a_channel_thread_reads_with_the_c_read_where_the_data_path_is_built() -> None:
    if os.environ.get("VSWAPFS_PURE") == "1":
        assert _channel._read is _channel.read_into
    else:
        from vswapfs.fuse import _wire
        assert _channel._read is _wire.read_request


@pytest.mark.parametrize("read", _read_paths(), ids=lambda f: f.__module__.rsplit(".", 1)[-1])
def test_a_channel_read_returns_the_bytes_read_or_minus_the_errno_and_raises_for_neither(read: Any) -> None:
    """Bytes read into the buffer's start; EAGAIN from a non-blocking fd with
    nothing to read, and EBADF, as minus the errno (no exception: a channel
    thread meets EAGAIN between every two requests); 0 at end of file."""
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        buf = bytearray(64)
        assert read(r, buf) == -errno.EAGAIN
        os.write(w, b"request")
        assert read(r, buf) == 7 and bytes(buf[:7]) == b"request"
        os.write(w, bytes(range(100)))
        assert read(r, buf) == 64 and bytes(buf) == bytes(range(64))  # no more than the buffer
        assert read(r, buf) == 36 and bytes(buf[:36]) == bytes(range(64, 100))
        os.close(w)
        w = -1
        assert read(r, buf) == 0
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert read(r, buf) == -errno.EBADF  # closed above
    if read is not _channel.read_into:  # the C one checks its arguments
        with pytest.raises(BufferError):  # not writable
            read(r, b"read-only")
        with pytest.raises(ValueError):
            read(-1, buf)


def test_read_errors_end_a_channel_only_when_the_connection_is_gone(caplog: pytest.LogCaptureFixture) -> None:
    """ENODEV (unmounted) and ECONNABORTED (aborted) end a channel; EINTR,
    ENOENT and EAGAIN read again at once; anything else is logged, at most
    every few seconds, and read again after a short pause that grows."""
    errors = ReadErrors()
    for err in (errno.ENODEV, errno.ECONNABORTED):
        assert errors.gone(err, "test")
    for err in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
        assert not errors.gone(err, "test")
    assert errors.count == 0 and errors.pause == 0
    t0 = time.monotonic()
    for _ in range(5):
        assert not errors.gone(errno.EIO, "test")
    assert errors.count == 5 and 0.01 <= time.monotonic() - t0 < 1
    assert sum("read from /dev/fuse failed" in r.getMessage() for r in caplog.records) == 1
    errors.ok()
    assert errors.pause == 0
