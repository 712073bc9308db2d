"""Thin ctypes wrappers for the Linux calls the standard library lacks."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import os
import struct
from collections.abc import Iterable
from typing import Final

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02

MCL_CURRENT: Final = 1
MCL_FUTURE: Final = 2
MCL_ONFAULT: Final = 4

PR_SET_NAME: Final = 15
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


def _proc_swaps(column: int) -> dict[str, int]:
    """One numeric column of /proc/swaps by device (2: Size, 3: Used, in KiB)."""
    with open("/proc/swaps") as f:
        return {p[0]: int(p[column]) for p in (line.split() for line in f.readlines()[1:])}


def swap_areas() -> dict[str, int]:
    """Active swap areas from /proc/swaps: device -> KiB in use."""
    return _proc_swaps(3)


def swap_area_sizes() -> dict[str, int]:
    """Active swap areas from /proc/swaps: device -> KiB the kernel uses
    (the area less its header page, and less what the kernel cannot
    address)."""
    return _proc_swaps(2)


def meminfo(key: str) -> int:
    """A /proc/meminfo field in bytes (0 if the kernel has no such field)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def mem_total() -> int:
    """Bytes of RAM (MemTotal)."""
    total = meminfo("MemTotal")
    if not total:
        raise OSError("no MemTotal in /proc/meminfo")
    return total


def _unescape(field: str) -> str:
    """A path as /proc/*/mounts writes it (space, tab, newline, backslash octal-escaped)."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mount_table() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount, in mount order."""
    with open("/proc/self/mounts") as f:
        return [(_unescape(p[1]), p[2]) for p in (line.split() for line in f)]


def mount_devices() -> dict[str, int]:
    """Mount point -> the minor of its device (for FUSE: the connection
    number), from mountinfo; stat(2) on a mount would hang with a hung
    FUSE daemon."""
    with open("/proc/self/mountinfo") as f:
        return {_unescape(p[4]): int(p[2].split(":")[1]) for p in (line.split() for line in f)}


def own_cgroup(controller: str | None) -> str:
    """This process's cgroup path for ``controller`` (None: the v2 unified one)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if (controller is None and ctrls == "") or (controller and controller in ctrls.split(",")):
                return path.lstrip("/")
    raise OSError("own cgroup not found in /proc/self/cgroup")


def vmstat() -> dict[str, int]:
    """/proc/vmstat, by name."""
    with open("/proc/vmstat") as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


_TICK: Final = os.sysconf("SC_CLK_TCK")


def cpu_busy_s() -> float:
    """Seconds the machine's CPUs have spent busy since boot, all of them
    together (/proc/stat: every state but idle and iowait; guest time is
    already in user).  Its growth over a phase, over the CPU count, is the
    shortest that phase's work could take on this machine."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICK


def process_status(pid: int | str, key: str) -> int:
    """A number field of /proc/PID/status (VmRSS, VmLck: in KiB); 0 if absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def page_faults(pid: int | str) -> int:
    """Minor plus major page faults of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[7]) + int(fields[9])


def pagemap(addr: int, pages: int) -> tuple[int, ...]:
    """This process's /proc/self/pagemap words of ``pages`` pages from
    ``addr`` (bit 63: present, bit 62: swapped out)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // 4096 * 8)
        raw = f.read(pages * 8)
    return struct.unpack(f"<{pages}Q", raw)


def set_oom_score_adj(value: int) -> bool:
    """Ask the OOM killer to spare (or prefer) this process; True if it took
    (lowering it needs CAP_SYS_RESOURCE)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
        with open("/proc/self/oom_score_adj") as f:
            return f.read().strip() == str(value)
    except OSError:
        return False


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
    trimming off (see ``_consts.DAEMON_ENV``) the heap keeps them, so later
    allocations up to that size fault nothing in."""
    p = _libc.malloc(nbytes)
    if not p:
        raise MemoryError(f"malloc({nbytes}) failed")
    ctypes.memset(p, 0, nbytes)
    _libc.free(p)


_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_POPULATE_WRITE: Final = 23  # Linux 5.14+: fault a range in, writable, now


def madvise(addr: int, length: int, advice: int) -> None:
    """madvise(2).  Through ctypes, so the GIL is released while the kernel
    works: a thread that faults memory in here holds up no other thread."""
    _check(_libc.madvise(addr, length, advice), "madvise")


def buffer_address(buf: object) -> int:
    """The address of a writable buffer (an mmap, a bytearray).  Only valid
    while ``buf`` is neither closed nor resized."""
    ref = ctypes.c_char.from_buffer(buf)  # type: ignore[arg-type]
    try:
        return ctypes.addressof(ref)
    finally:
        del ref


def populate(addr: int, length: int, *, owned: bool = True) -> None:
    """Fault ``length`` bytes at ``addr`` in, writable, with the GIL
    released.  OSError if the kernel cannot (ENOMEM: no memory for them).

    Kernels before 5.14 have no MADV_POPULATE_WRITE (EINVAL): there every
    page is touched instead, by writing a zero byte to it where ``owned``
    (the range holds nobody's data yet: a fresh chunk, a freed heap block),
    else by reading it (a live directory or owner page, a stack in use:
    a write would destroy what is there).  No other failure falls back: a
    write into memory the kernel just refused is a SIGBUS or a zeroed word."""
    try:
        madvise(addr, length, MADV_POPULATE_WRITE)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        for off in range(0, length, 4096):
            if owned:
                ctypes.memset(addr + off, 0, 1)
            else:
                ctypes.string_at(addr + off, 1)


def populate_all(base: int, offsets: Iterable[int], length: int, *, owned: bool = True) -> None:
    """:func:`populate` ``length`` bytes at each of ``base + offsets``, a
    run of adjacent ones in one call.  Each call gives the GIL up and takes
    it back, and a thread that serves requests meanwhile waits for it every
    time: one call per run rather than per piece leaves it alone."""
    start = end = -1
    for off in sorted(set(offsets)):
        if off != end:
            if end > start:
                populate(base + start, end - start, owned=owned)
            start = off
        end = off + length
    if end > start:
        populate(base + start, end - start, owned=owned)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_libc.mallinfo2.restype = _MallInfo2


def heap_free() -> tuple[int, int]:
    """(free bytes in malloc's heap, of which the top chunk): what the
    next allocations can have without asking the kernel for memory."""
    m = _libc.mallinfo2()
    return m.fordblks, m.keepcost


def heap_headroom(nbytes: int) -> None:
    """Make sure ``nbytes`` of free heap are faulted in: allocate a block
    that big, fault its pages in (cheap for pages that are in already),
    free it.  With trimming off it stays in the heap, ready for the next
    allocations, which then fault nothing in.  Runs with the GIL released."""
    p = _libc.malloc(nbytes)
    if not p:
        return
    try:
        start = (p + 4095) & ~4095
        end = (p + nbytes) & ~4095
        if end > start:
            populate(start, end - start)
    finally:
        _libc.free(p)


_libc.sbrk.argtypes = [ctypes.c_long]
_libc.sbrk.restype = ctypes.c_void_p


def heap_end() -> int:
    """The end of malloc's main heap (``sbrk(0)``: libc's cached break, no
    system call): it moves only when the heap grows or is trimmed."""
    return _libc.sbrk(0) or 0


_libc.malloc_trim.argtypes = [ctypes.c_size_t]
_libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
M_ARENA_MAX: Final = -8


def one_malloc_arena() -> None:
    """Make every thread allocate from the main (brk) arena.  A thread arena
    gives freed memory back with MADV_DONTNEED, which fails on mlocked pages,
    so under mlockall its memory would stay for good; the main heap shrinks
    with brk.  Call before threads start."""
    _libc.mallopt(M_ARENA_MAX, 1)


def malloc_trim(pad: int = 0) -> None:
    """Give the malloc heap's free memory back to the kernel, but ``pad``
    bytes at its top (kept faulted in for the next allocations)."""
    _libc.malloc_trim(pad)


_libc.pthread_self.restype = ctypes.c_ulong
_libc.pthread_getattr_np.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
_libc.pthread_attr_getstack.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                        ctypes.POINTER(ctypes.c_size_t)]
_libc.pthread_attr_destroy.argtypes = [ctypes.c_void_p]


def prefault_stack() -> int:
    """Fault the calling thread's whole stack in now (it is locked with the
    rest), so that calls deeper than any before take no page fault later.
    Returns the bytes faulted in, 0 if the stack could not be found."""
    attr = ctypes.create_string_buffer(128)  # pthread_attr_t is 56 bytes on x86-64
    if _libc.pthread_getattr_np(_libc.pthread_self(), attr):
        return 0
    try:
        addr, size = ctypes.c_void_p(), ctypes.c_size_t()
        if _libc.pthread_attr_getstack(attr, ctypes.byref(addr), ctypes.byref(size)) or not addr.value:
            return 0
        # the lowest page may be the guard: start one page up
        populate(addr.value + 4096, size.value - 4096, owned=False)  # its top is in use
        return size.value - 4096
    except OSError:
        return 0
    finally:
        _libc.pthread_attr_destroy(attr)


def io_flusher() -> bool:
    """PR_SET_IO_FLUSHER for the calling thread (its reclaim then does no
    I/O; needs CAP_SYS_RESOURCE); True if it took."""
    try:
        prctl(PR_SET_IO_FLUSHER, 1)
        return prctl(PR_GET_IO_FLUSHER) == 1
    except OSError:
        return False


def set_thread_name(name: str) -> None:
    """Name the calling thread (its ``comm``, 15 bytes), as ps and
    /proc/PID/task/TID/stat show it."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0)


def task_faults(pid: int) -> dict[int, tuple[str, int]]:
    """(name, page faults (minor + major) so far) of each thread of process
    ``pid``, by thread id."""
    out: dict[int, tuple[str, int]] = {}
    for task in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            with open(task) as f:
                text = f.read()
        except OSError:
            continue  # the thread is gone
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        out[int(task.split("/")[-2])] = (name, int(fields[7]) + int(fields[9]))
    return out


def prctl(option: int, arg2: int = 0) -> int:
    """prctl(2) with one argument."""
    return _check(_libc.prctl(option, arg2, 0, 0, 0), f"prctl({option})")
