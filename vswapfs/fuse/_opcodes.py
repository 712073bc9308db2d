"""The opcode table: for every opcode served, how it is parsed, called and
answered, and whether a channel thread may serve it.

This is the transport's one dispatch table (go-fuse's ``opcodeData``):
an opcode not in it is answered ENOSYS.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, NamedTuple

from . import _abi as A
from . import _reader as R
from . import _replies as P
from ._ops import Operations
from ._types import Context

Args = tuple[Any, ...]
Caller = Callable[[Operations, Context, int, Args], Awaitable[Any]]


class Op(NamedTuple):
    """How one opcode is served."""

    method: str  # the Operations method
    parse: Callable[[memoryview], Args]  # body -> the method's arguments after (ctx, ino)
    reply: Callable[[Any, Args], Any] | None  # (result, arguments) -> payload; None: no reply
    thread: bool = False  # a channel thread may serve it, through ``<method>_blocking``
    call: Caller | None = None  # how to call the method, if not method(ctx, ino, *arguments)


async def _destroy(ops: Operations, ctx: Context, ino: int, args: Args) -> None:
    await ops.destroy()


async def _readdir(ops: Operations, ctx: Context, ino: int, args: Args) -> Any:
    fh, offset, _ = args  # the size is the reply's
    return await ops.readdir(ctx, ino, fh, offset)


async def _forget(ops: Operations, ctx: Context, ino: int, args: Args) -> None:
    ops.forget(ino, args[0])


async def _batch_forget(ops: Operations, ctx: Context, ino: int, args: Args) -> None:
    for node, nlookup in args[0]:
        ops.forget(node, nlookup)


async def _interrupt(ops: Operations, ctx: Context, ino: int, args: Args) -> None:
    """Swap I/O is never interrupted and our requests are short."""


OPS: dict[int, Op] = {
    A.Opcode.LOOKUP: Op("lookup", R.p_name, P.entry),
    A.Opcode.FORGET: Op("forget", R.p_forget, None, call=_forget),
    A.Opcode.BATCH_FORGET: Op("forget", R.p_batch_forget, None, call=_batch_forget),
    A.Opcode.INTERRUPT: Op("interrupt", R.p_none, None, call=_interrupt),
    A.Opcode.GETATTR: Op("getattr", R.p_getattr, P.attr),
    A.Opcode.SETATTR: Op("setattr", R.p_setattr, P.attr),
    A.Opcode.OPEN: Op("open", R.p_open, P.opened),
    A.Opcode.CREATE: Op("create", R.p_create, P.created),
    A.Opcode.UNLINK: Op("unlink", R.p_name, P.empty),
    A.Opcode.READ: Op("read", R.p_read, P.data, thread=True),
    A.Opcode.WRITE: Op("write", R.p_write, P.written, thread=True),
    A.Opcode.FALLOCATE: Op("fallocate", R.p_fallocate, P.empty, thread=True),
    A.Opcode.STATFS: Op("statfs", R.p_none, P.statfs),
    A.Opcode.RELEASE: Op("release", R.p_fh, P.empty),
    A.Opcode.FSYNC: Op("fsync", R.p_fsync, P.empty),
    A.Opcode.FLUSH: Op("flush", R.p_fh, P.empty),
    A.Opcode.OPENDIR: Op("opendir", R.p_open, P.opened),
    A.Opcode.READDIR: Op("readdir", R.p_read, P.dirents, call=_readdir),
    A.Opcode.RELEASEDIR: Op("releasedir", R.p_fh, P.empty),
    A.Opcode.DESTROY: Op("destroy", R.p_none, P.empty, call=_destroy),
}


_WRITE: Final = int(A.Opcode.WRITE)  # plain ints: compared per request
_READ: Final = int(A.Opcode.READ)


def data_bytes(opcode: int, result: Any, payload: Any) -> int:
    """Bytes of file data a successful request moved: written or read."""
    if opcode == _WRITE:
        return int(result)
    if opcode == _READ:
        return len(payload)
    return 0
