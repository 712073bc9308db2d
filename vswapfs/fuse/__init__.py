"""A FUSE transport on trio that speaks the kernel protocol over /dev/fuse.

Knows nothing about swap.  Implement :class:`Operations` and call
:func:`serve`.
"""

from ._abi import (
    FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE,
    FOPEN_NONSEEKABLE,
    FOPEN_PARALLEL_DIRECT_WRITES,
    ROOT_ID,
    Opcode,
)
from ._channel import MAX_WRITE, BusyPoll
from ._mount import open_and_mount, unmount
from ._ops import DEFER, Operations, PollStats, ServiceStats
from ._session import Session, serve
from ._types import Attr, Context, DirEntry, Entry, FuseError, InitInfo, Opened, SetattrRequest, StatFs

__all__ = [
    "DEFER", "FOPEN_DIRECT_IO", "FOPEN_KEEP_CACHE", "FOPEN_NONSEEKABLE", "FOPEN_PARALLEL_DIRECT_WRITES",
    "MAX_WRITE", "ROOT_ID", "BusyPoll", "Attr", "Context", "DirEntry", "Entry", "FuseError", "InitInfo",
    "Opcode", "Opened", "Operations", "PollStats", "ServiceStats", "Session", "SetattrRequest", "StatFs",
    "open_and_mount", "serve", "unmount",
]
