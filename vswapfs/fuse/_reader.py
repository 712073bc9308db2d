"""The request reader: a request's header, and each opcode's body parser.

Requests are parsed defensively: a request shorter than its header or
body says raises :class:`MalformedRequest`, which the session answers
with EIO (or drops, for the opcodes the kernel expects no reply to).
A parser takes the body as a memoryview and returns the arguments the
Operations method takes after ``(ctx, ino)``.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from . import _abi as A
from ._types import Context, SetattrRequest


class MalformedRequest(Exception):
    """The request is shorter than its header or body says."""


class Header(NamedTuple):
    """``struct fuse_in_header``, checked against the bytes read."""

    opcode: int
    unique: int
    nodeid: int
    ctx: Context
    body_end: int  # where the body ends: the length, less the extension's bytes


class MalformedHeader(MalformedRequest):
    """A header that parsed, but does not match the request: answerable."""

    def __init__(self, h: Header, msg: str) -> None:
        super().__init__(msg)
        self.header = h


# Final: compiled, a C static rather than a lookup in the module's dict per use
_HEADER_SIZE: Final = A.IN_HEADER.size
_unpack_header: Final = A.IN_HEADER.unpack_from
_tuple_new: Final = tuple.__new__  # a NamedTuple without its Python-level __new__: once per request


def header(req: memoryview) -> Header:
    """The header of ``req``; MalformedRequest if it does not match the
    bytes read (a request too short for even a header has no ``unique``
    to answer: the caller drops it)."""
    n = len(req)
    if n < _HEADER_SIZE:
        raise MalformedRequest(f"request of {n} bytes is shorter than its header")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = _unpack_header(req)
    body_end = length - extlen * 8
    h: Header = _tuple_new(Header, (opcode, unique, nodeid, _tuple_new(Context, (uid, gid, pid)),
                                    body_end))
    if length != n or body_end < _HEADER_SIZE:
        raise MalformedHeader(h, f"header says {length} bytes, got {n}")
    return h




def need(body: memoryview, n: int) -> None:
    if len(body) < n:
        raise MalformedRequest(f"body of {len(body)} bytes, need {n}")


def p_name(body: memoryview) -> tuple[bytes]:
    raw = bytes(body)
    end = raw.find(b"\0")
    if end <= 0:
        raise MalformedRequest("name is empty or not NUL-terminated")
    return (raw[:end],)


def p_getattr(body: memoryview) -> tuple[int | None]:
    need(body, A.GETATTR_IN.size)
    flags, _, fh = A.GETATTR_IN.unpack_from(body)
    return (fh if flags & A.GETATTR_FH else None,)


def p_setattr(body: memoryview) -> tuple[SetattrRequest]:
    need(body, A.SETATTR_IN.size)
    (valid, _, fh, size, _, _, _, _, _, _, _, mode, _, uid, gid, _) = A.SETATTR_IN.unpack_from(body)
    return (SetattrRequest(
        mode=mode if valid & A.FATTR_MODE else None,
        uid=uid if valid & A.FATTR_UID else None,
        gid=gid if valid & A.FATTR_GID else None,
        size=size if valid & A.FATTR_SIZE else None,
        fh=fh if valid & A.FATTR_FH else None,
        times=bool(valid & (A.FATTR_ATIME | A.FATTR_MTIME)),
    ),)


def p_open(body: memoryview) -> tuple[int]:
    need(body, A.OPEN_IN.size)
    return (A.OPEN_IN.unpack_from(body)[0],)


def p_create(body: memoryview) -> tuple[bytes, int, int]:
    need(body, A.CREATE_IN.size)
    flags, mode, umask, _ = A.CREATE_IN.unpack_from(body)
    return p_name(body[A.CREATE_IN.size:])[0], mode & ~umask, flags


def p_fh(body: memoryview) -> tuple[int]:
    need(body, 8)
    return (A.FORGET_IN.unpack_from(body)[0],)


def p_read(body: memoryview) -> tuple[int, int, int]:
    need(body, A.READ_IN.size)
    fh, offset, size, _ = A.READ_IN.unpack_from(body)
    return fh, offset, size


def p_write(body: memoryview) -> tuple[int, int, memoryview]:
    need(body, A.WRITE_IN.size)
    fh, offset, size, _ = A.WRITE_IN.unpack_from(body)
    data = body[A.WRITE_IN_SIZE:A.WRITE_IN_SIZE + size]
    if len(data) != size:
        raise MalformedRequest(f"WRITE of {size} bytes carries {len(data)}")
    return fh, offset, data


def p_fsync(body: memoryview) -> tuple[int, bool]:
    need(body, A.FSYNC_IN.size)
    fh, flags, _ = A.FSYNC_IN.unpack_from(body)
    return fh, bool(flags & 1)


def p_fallocate(body: memoryview) -> tuple[int, int, int, int]:
    need(body, A.FALLOCATE_IN.size)
    fh, offset, length, mode, _ = A.FALLOCATE_IN.unpack_from(body)
    return fh, offset, length, mode


def p_none(body: memoryview) -> tuple[()]:
    return ()




def p_forget(body: memoryview) -> tuple[int]:
    need(body, A.FORGET_IN.size)
    return (A.FORGET_IN.unpack_from(body)[0],)


def p_batch_forget(body: memoryview) -> tuple[list[tuple[int, int]]]:
    need(body, A.BATCH_FORGET_IN.size)
    count, _ = A.BATCH_FORGET_IN.unpack_from(body)
    need(body, A.BATCH_FORGET_IN.size + count * A.FORGET_ONE.size)
    return ([A.FORGET_ONE.unpack_from(body, A.BATCH_FORGET_IN.size + i * A.FORGET_ONE.size)
             for i in range(count)],)
