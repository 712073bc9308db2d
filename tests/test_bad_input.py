"""Bad input: the CLI, concurrent control writers, malformed FUSE requests."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio
from conftest import needs_root
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vswapfs import MiB, admin
from vswapfs._fs import SwapFS
from vswapfs.engine import SwapSpace
from vswapfs.fuse import Session
from vswapfs.fuse._abi import IN_HEADER, OUT_HEADER, Opcode

AS_NOBODY = """
import os, sys
from vswapfs.cli import main  # imported as root: nobody cannot read root's Python
os.setgid(65534); os.setuid(65534)
sys.exit(main(sys.argv[1:]))
"""


def cli(*args: str, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = ["-c", AS_NOBODY] if as_nobody else ["-m", "vswapfs"]
    return subprocess.run([sys.executable, *cmd, *args], capture_output=True, text=True, timeout=60)


def one_clear_line(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@needs_root
@pytest.mark.parametrize(("size", "word"), [("12Q", "not a size"), ("-1G", "not a size"),
                                            ("100", "smaller than one"), ("lots", "not a size")])
def test_cli_bad_sizes(tmp_path: Path, size: str, word: str) -> None:
    r = cli("mount", str(tmp_path), f"--size={size}")
    assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr
    assert admin.mount_type(str(tmp_path)) is None


@pytest.mark.parametrize(("opt", "word"), [("--channels=-1", "0..64"), ("--channels=65", "0..64"),
                                           ("--channels=two", "0..64"), ("--reserve=1K", "smaller than one"),
                                           ("--reserve=lots", "not a size"),
                                           ("--algorithm=lzo", "choose from 'zstd', 'lz4'")])
def test_cli_bad_channels_reserve_and_algorithm(tmp_path: Path, opt: str, word: str) -> None:
    r = cli("mount", str(tmp_path), opt)
    assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr
    assert admin.mount_type(str(tmp_path)) is None


@needs_root
def test_reserve_below_a_chunk_or_the_pool_limit_is_one_clear_line(tmp_path: Path) -> None:
    one_clear_line(cli("mount", str(tmp_path), "--reserve=1M", "--pool-limit=2M"), "larger than --reserve")
    one_clear_line(cli("up", str(tmp_path), "--reserve=8K"), "less than one 64 KiB pool chunk")
    one_clear_line(cli("mount", str(tmp_path), "--algorithm=lz4", "--level=3"), "lz4 has no levels")
    assert admin.mount_type(str(tmp_path)) is None


@needs_root
def test_cli_missing_and_busy_mount_points(tmp_path: Path, mnt: Path) -> None:
    one_clear_line(cli("mount", str(tmp_path / "nope")), "does not exist")
    one_clear_line(cli("mount", str(mnt)), "busy", "fuse.vswapfs")
    one_clear_line(cli("up", "/proc"), "proc", "not vswapfs")


@needs_root
def test_cli_down_on_something_that_is_not_vswapfs(tmp_path: Path) -> None:
    one_clear_line(cli("down", str(tmp_path)), "not a vswapfs mount")
    one_clear_line(cli("down", "/proc"), "not a vswapfs mount", "proc")


@needs_root
def test_cli_not_root(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o777)
    for cmd in (("mount", str(tmp_path)), ("up", str(tmp_path)), ("down", str(tmp_path))):
        one_clear_line(cli(*cmd, as_nobody=True), "root")


@needs_root
def test_concurrent_control_writers_leave_a_valid_value(mnt: Path) -> None:
    knob = mnt / "control" / "pool_limit"
    good = [f"{n}M" for n in range(1, 33)]
    bad = ["-1", "x", "9" * 50, "5Z"]
    results: dict[str, int] = {}

    def writer(value: str) -> None:
        for _ in range(20):
            try:
                with open(knob, "w") as f:
                    f.write(value)
                results[value] = 0
            except OSError as e:
                results[value] = e.errno or -1

    threads = [threading.Thread(target=writer, args=(v,)) for v in good + bad]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[v] == 0 for v in good)
    assert all(results[v] == errno.EINVAL for v in bad)
    assert int(knob.read_text()) in {int(v[:-1]) * MiB for v in good}


# -- the FUSE request parser ---------------------------------------------------

async def answer(raw: bytes) -> list[tuple[int, int, bytes]]:
    """Feed one raw request to a real Session over a real SwapFS; return the
    replies (error, unique, payload) it wrote (to a pipe, as to /dev/fuse)."""
    r, w = os.pipe()
    try:
        session = Session(w, SwapFS(SwapSpace(4 * MiB)), buffers=1)
        await session.dispatch(memoryview(raw))
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
    import socket

    from vswapfs.fuse import _abi as A

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        session = Session(a.fileno(), SwapFS(SwapSpace(4 * MiB)), channels=2, buffers=0)
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
    from vswapfs.fuse import _abi as A

    body = A.INIT_IN.pack(major, minor, 1 << 17, 0xFFFFFFFF) + bytes(A.INIT_IN_FLAGS2.size + 44)
    return IN_HEADER.pack(IN_HEADER.size + len(body), Opcode.INIT, unique, 0, 0, 0, 0, 0, 0) + body


def test_init_from_a_newer_major_asks_for_ours_with_a_whole_reply() -> None:
    """A kernel that speaks major 8 gets fuse_init_out with our major (7),
    all 18 fields, and sends INIT again in it; the handshake then ends."""
    import socket

    from vswapfs.fuse import _abi as A

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        session = Session(a.fileno(), SwapFS(SwapSpace(4 * MiB)), buffers=1)
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
    import random
    import socket

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
        session = Session(main.fileno(), SwapFS(SwapSpace(4 * MiB)), channels=1, buffers=0)
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


def test_read_errors_end_a_channel_only_when_the_connection_is_gone(caplog: pytest.LogCaptureFixture) -> None:
    """ENODEV (unmounted) and ECONNABORTED (aborted) end a channel; EINTR,
    ENOENT and EAGAIN read again at once; anything else is logged, at most
    every few seconds, and read again after a short pause that grows."""
    import time

    from vswapfs.fuse._channel import ReadErrors

    errors = ReadErrors()
    for err in (errno.ENODEV, errno.ECONNABORTED):
        assert errors.gone(OSError(err, "x"), "test")
    for err in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
        assert not errors.gone(OSError(err, "x"), "test")
    assert errors.count == 0 and errors.pause == 0
    t0 = time.monotonic()
    for _ in range(5):
        assert not errors.gone(OSError(errno.EIO, "x"), "test")
    assert errors.count == 5 and 0.01 <= time.monotonic() - t0 < 1
    assert sum("read from /dev/fuse failed" in r.getMessage() for r in caplog.records) == 1
    errors.ok()
    assert errors.pause == 0
