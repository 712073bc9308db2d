"""Fault injection at the engine's allocation and I/O points, for tests.

As the kernel's ``failslab``/``fail_make_request`` knobs: every place where
the engine allocates memory or does I/O calls :func:`point` with its name,
and a test arms names with an errno.  Real failures of the same calls are
tested for real where they can be had (EIO from a fault-injecting file
system, ENOSPC from a full ext4); ENOMEM and the rest cannot be produced on
demand, hence this.  Disarmed, which is always the case in a daemon, a
point costs one truth test of an empty dict.

Points: ``pool.chunk`` (a chunk faulted in), ``pool.move`` (an object
copied by compaction), ``backing.grow`` (a backing
file extended), ``backing.write``, ``backing.read``, ``backing.punch``,
``backing.cut`` (a free tail truncated), ``codec.compress``,
``codec.decompress``.

Crashes, for the recovery tests: :func:`crash_after` makes the process
exit (``os._exit``, as a ``kill -9`` would end it) at the n-th point it
passes from now, counting the points above and the ones that lie between
two updates of state that outlives the process (CRASH_POINTS): after a
table word is stored and before what it replaced is released, after a
cluster's words are punched, after a chunk enters or leaves the pool's
directory, after an object or a checksum is stored.
"""

from __future__ import annotations

import errno
import os
from typing import Final

POINTS: Final = ("pool.chunk", "pool.move", "backing.grow", "backing.write", "backing.read", "backing.punch",
                 "backing.cut", "codec.compress", "codec.decompress")

CRASH_POINTS: Final = ("table.set", "table.drop", "pool.new", "pool.store", "pool.drop",
                       "backing.bind")
CRASH_EXIT: Final = 86  # the exit status of a process crashed by crash_after

armed: dict[str, int] = {}  # point -> errno it fails with
_crash_in = 0  # points to pass before the process exits; 0: never


def crash_after(n: int) -> None:
    """Exit the process at the ``n``-th point from now (tests only)."""
    global _crash_in
    _crash_in = n
    armed.setdefault("crash", 0)  # makes every `if armed:` call point()
_ALLOCATIONS: Final = ("pool.", "codec.")  # there ENOMEM is a MemoryError, elsewhere an OSError


def point(name: str) -> None:
    """Fail here if ``name`` is armed.  Call as ``if armed: point(name)``."""
    global _crash_in
    if _crash_in:
        _crash_in -= 1
        if not _crash_in:
            os._exit(CRASH_EXIT)
    err = armed.get(name)
    if err is None:
        return
    if err == errno.ENOMEM and name.startswith(_ALLOCATIONS):
        raise MemoryError(f"injected ENOMEM at {name}")
    raise OSError(err, f"injected {errno.errorcode.get(err, err)} at {name}: {os.strerror(err)}")
