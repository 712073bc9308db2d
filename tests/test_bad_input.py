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

from vswapfs import _admin
from vswapfs._fs import SwapFS
from vswapfs.engine import SwapSpace
from vswapfs.fuse import Session
from vswapfs.fuse._abi import IN_HEADER, OUT_HEADER, Opcode

MiB = 1 << 20


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
    assert _admin.mount_type(str(tmp_path)) is None


@pytest.mark.parametrize(("opt", "word"), [("--channels=-1", "0..64"), ("--channels=65", "0..64"),
                                           ("--channels=two", "0..64"), ("--reserve=1K", "smaller than one"),
                                           ("--reserve=lots", "not a size"),
                                           ("--algorithm=lzo", "choose from 'zstd', 'lz4'")])
def test_cli_bad_channels_reserve_and_algorithm(tmp_path: Path, opt: str, word: str) -> None:
    r = cli("mount", str(tmp_path), opt)
    assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr
    assert _admin.mount_type(str(tmp_path)) is None


@needs_root
def test_reserve_below_a_chunk_or_the_pool_limit_is_one_clear_line(tmp_path: Path) -> None:
    one_clear_line(cli("mount", str(tmp_path), "--reserve=1M", "--pool-limit=2M"), "larger than --reserve")
    one_clear_line(cli("up", str(tmp_path), "--reserve=8K"), "less than one 64 KiB pool chunk")
    one_clear_line(cli("mount", str(tmp_path), "--algorithm=lz4", "--level=3"), "lz4 has no levels")
    assert _admin.mount_type(str(tmp_path)) is None


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
