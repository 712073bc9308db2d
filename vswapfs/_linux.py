"""Thin ctypes wrappers for the Linux calls the standard library lacks."""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from typing import Final

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02

MCL_CURRENT: Final = 1
MCL_FUTURE: Final = 2
MCL_ONFAULT: Final = 4

PR_SET_IO_FLUSHER: Final = 57
PR_GET_IO_FLUSHER: Final = 58

MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MNT_DETACH: Final = 2

_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def loop_devices(under: str) -> list[str]:
    """Loop devices whose backing file is under directory ``under``, from
    sysfs (``losetup -j`` would stat the file, and hang with a hung FUSE daemon)."""
    prefix = under.rstrip("/") + "/"
    devs = []
    for path in sorted(glob.glob("/sys/block/loop*/loop/backing_file")):
        try:
            with open(path) as f:
                if f.read().strip().startswith(prefix):
                    devs.append("/dev/" + path.split("/")[3])
        except OSError:
            continue
    return devs


def swap_areas() -> dict[str, int]:
    """Active swap areas from /proc/swaps: device -> KiB in use."""
    with open("/proc/swaps") as f:
        return {p[0]: int(p[3]) for p in (line.split() for line in f.readlines()[1:])}


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE): give the blocks of a range back."""
    _check(_libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length),
           "fallocate(PUNCH_HOLE)")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode."""
    _check(_libc.fallocate(fd, mode, offset, length), "fallocate")


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2)."""
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()),
           f"mount {target}")


def umount(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def mlockall(flags: int = MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) -> None:
    """mlockall(2).  MCL_ONFAULT keeps lazily committed pool chunks lazy."""
    _check(_libc.mlockall(flags), "mlockall")


_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.malloc.restype = ctypes.c_void_p
_libc.free.argtypes = [ctypes.c_void_p]


def grow_heap(nbytes: int) -> None:
    """Fault ``nbytes`` into the malloc heap and free them again.  With
    trimming off (see ``_daemon.RESERVE_ENV``) the heap keeps them, so later
    allocations up to that size fault nothing in."""
    p = _libc.malloc(nbytes)
    if not p:
        raise MemoryError(f"malloc({nbytes}) failed")
    ctypes.memset(p, 0, nbytes)
    _libc.free(p)


_libc.malloc_trim.argtypes = [ctypes.c_size_t]
_libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
M_ARENA_MAX: Final = -8


def one_malloc_arena() -> None:
    """Make every thread allocate from the main (brk) arena.  A thread arena
    gives freed memory back with MADV_DONTNEED, which fails on mlocked pages,
    so under mlockall its memory would stay for good; the main heap shrinks
    with brk.  Call before threads start."""
    _libc.mallopt(M_ARENA_MAX, 1)


def malloc_trim() -> None:
    """Give the malloc heap's free pages back to the kernel (all arenas)."""
    _libc.malloc_trim(0)


def prctl(option: int, arg2: int = 0) -> int:
    """prctl(2) with one argument."""
    return _check(_libc.prctl(option, arg2, 0, 0, 0), f"prctl({option})")
