# The C module vswapfs/fuse/_wire.c (see there): a channel thread's READ and WRITE.
from collections.abc import Callable
from typing import Any, Final

NOT_MINE: Final[int]  # serve_data's codes: not a READ or WRITE that checks
SERVED: Final[int]  # answered and counted
DEFERRED: Final[int]  # the method returned DEFER: to be handed over
REPLY_FAILED: Final[int]  # and the errno added: the reply could not be written

def read_request(fd: int, buf: bytearray | memoryview, /) -> int: ...
def setup(context_type: type, defer: object, /) -> None: ...
def serve_data(fd: int, req: memoryview, read: Callable[..., Any], write: Callable[..., Any],
               fail: Callable[..., None], tally: object, count: list[int], data: list[int],
               ns: list[int], /) -> int: ...
