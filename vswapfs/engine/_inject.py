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
"""

from __future__ import annotations

import errno
import os
from typing import Final

POINTS: Final = ("pool.chunk", "pool.move", "backing.grow", "backing.write", "backing.read", "backing.punch",
                 "backing.cut", "codec.compress", "codec.decompress")

armed: dict[str, int] = {}  # point -> errno it fails with
_ALLOCATIONS: Final = ("pool.", "codec.")  # there ENOMEM is a MemoryError, elsewhere an OSError


def point(name: str) -> None:
    """Fail here if ``name`` is armed.  Call as ``if armed: point(name)``."""
    err = armed.get(name)
    if err is None:
        return
    if err == errno.ENOMEM and name.startswith(_ALLOCATIONS):
        raise MemoryError(f"injected ENOMEM at {name}")
    raise OSError(err, f"injected {errno.errorcode.get(err, err)} at {name}: {os.strerror(err)}")
