"""How large an image a bounded pool (and the disk behind it) keeps, and
what to warn of when they keep less: the rule behind the default image size
and the warnings of ``up``, ``status`` and the daemon's log.  Knows neither
FUSE nor the engine (``status`` loads no engine): it works on the mount's
numbers and the backing files' paths alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from ._consts import PAGE, MiB
from ._units import human

# A pool with no backing file behind it must not fill before the kernel's swap
# area does.  The kernel takes a refused swap write for a passing error: it
# keeps the page dirty and writes it again, hundreds of thousands of times, for
# minutes, before (if ever) the OOM killer acts; a full area instead makes it
# stop swapping out, and the OOM killer acts at once, as with a full zram.  A
# slot holds one page at most, so an image no larger than what the pool keeps
# when no page compresses never meets the limit: 7/8 of it, the last eighth
# for chunks partly filled.  (A 32 MiB pool: 128 MiB of random pages through a
# 32 MiB cgroup with a 1 GiB image, 105,030 writes refused in 60 s and the
# hog still alive; with 28 MiB, the hog OOM-killed after 0.2 s, none refused.)
POOL_HOLDS_EIGHTHS = 7


def pool_holds(limit: int) -> int:
    """Bytes of image a pool limited to ``limit`` bytes keeps whole even if
    no page compresses (see POOL_HOLDS_EIGHTHS), in whole pages."""
    return limit * POOL_HOLDS_EIGHTHS // 8 // PAGE * PAGE


def limit_for(image_bytes: int) -> int:
    """The smallest pool limit, in whole MiB, that keeps an image of
    ``image_bytes`` (the inverse of ``pool_holds``)."""
    need = -(-image_bytes * 8 // POOL_HOLDS_EIGHTHS)
    return -(-need // MiB) * MiB


def bounding_limit(pool_limit: int, reserve: int) -> int:
    """What bounds the pool: its limit or its reserve (the smaller if both
    are set), 0 if neither does."""
    return min((v for v in (pool_limit, reserve) if v), default=0)


def default_size(ram: int, bound: int, room: int | None) -> int:
    """The image's size when none is given, for a pool bounded by
    ``bound`` bytes (0: no bound) and backing files with ``room`` bytes
    (``backing_room``; None: no backing file).  Without a backing file, what
    the pool keeps if no page compresses (``pool_holds``): the kernel then
    finds its swap full before the pool refuses a write.  With one, 2x RAM
    (pages past the pool's limit go to disk, and capacity never written
    costs nothing), but no more than the pool and 7/8 of the room keep (the
    last eighth for whatever else writes there).  With no bound, half of
    RAM (zram-generator's zram-size): the pool may grow to the image."""
    if not bound:
        return ram // 2 // PAGE * PAGE
    if room is not None:
        return min(ram * 2, pool_holds(bound) + room * POOL_HOLDS_EIGHTHS // 8) // PAGE * PAGE
    return pool_holds(bound)


def backing_room(paths: Sequence[str]) -> int:
    """Bytes the backing files at ``paths`` can hold at most: what they
    take now and what their file systems have free (each file system
    once; a file not made yet counts its directory's).  A snapshot:
    whatever else writes there takes from it too."""
    room, seen = 0, set()
    for p in paths:
        try:
            try:
                st = os.stat(p)
                room += st.st_blocks * 512
            except FileNotFoundError:  # not made yet: the room of its directory
                p = os.path.dirname(os.path.abspath(p))
                st = os.stat(p)
            if st.st_dev not in seen:
                seen.add(st.st_dev)
                vfs = os.statvfs(p)
                room += vfs.f_bavail * vfs.f_frsize
        except OSError:  # unreadable, or no directory either: no room
            continue
    return room


def pool_warnings(image_bytes: int, bound: int, backing_files: int, ram: int,
                  room: int | None = None) -> list[str]:
    """What to warn of for an image of ``image_bytes`` and a pool bounded
    by ``bound`` (its limit or reserve, 0 for none): a pool that can fill
    before the kernel's area does with no backing file to take what does
    not fit, or with backing files whose file systems have less ``room``
    (``backing_room``; None: not known) than the rest; and a pool with no
    bound that may take more than half of ``ram``."""
    if not bound:
        if image_bytes <= ram // 2:
            return []
        return [f"the pool has no limit: pages that do not compress may take up to this "
                f"{human(image_bytes)} image's worth of RAM ({100 * image_bytes / ram:.0f}%); "
                "set a limit (--pool-limit or control/pool_limit; the default is 20% of RAM)"]
    holds = pool_holds(bound)
    if image_bytes <= holds or (backing_files and (room is None or image_bytes <= holds + room)):
        return []
    refused = ("past that the kernel's swap writes are refused, and it retries them, which can "
               "stall its users for minutes where a full swap area makes the OOM killer act")
    if backing_files:
        assert room is not None
        return [f"the pool's {human(bound)} keeps {human(holds)} of pages that do not compress and "
                f"the backing files' file systems have room for {human(room)} (what the files take "
                f"and what is free), together less than this {human(image_bytes)} image: {refused}; "
                f"free {human(image_bytes - holds - room)} or more there, add a backing file on "
                "another file system (control/add_backing), or raise the pool's limit "
                "(--pool-limit or control/pool_limit)"]
    enough = limit_for(image_bytes)
    return [f"with no backing file, the pool's {human(bound)} keeps {human(holds)} of pages that do "
            f"not compress, less than this {human(image_bytes)} image: {refused}; add a backing "
            f"file (--backing or control/add_backing), raise the pool's limit to {enough // MiB}M "
            f"or more (--pool-limit or control/pool_limit), or use an image of {human(holds)} "
            "(leave --size out)"]


def mount_warnings(stats: Mapping[str, int], ram: int, backing_paths: Sequence[str]) -> list[str]:
    """``pool_warnings`` for a mount, from its counters (``stats.json``)
    and its backing files' paths: what changed since ``up`` (a lower pool
    limit, a backing file evacuated, a file system filled) shows here."""
    return pool_warnings(stats["disksize"], bounding_limit(stats["mem_limit"], stats["pool_reserve"]),
                         stats["backing_files"], ram, backing_room(backing_paths))
