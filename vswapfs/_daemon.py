"""The vswapfs daemon: protect itself, mount, serve, unmount.

A swap daemon must not be swapped out or OOM-killed, or the memory it
serves dies with it.  Before any thread starts it locks its memory
(mlockall; MCL_ONFAULT so the pool's lazily committed chunks stay lazy),
asks for oom_score_adj -1000 and PR_SET_IO_FLUSHER (its own reclaim then
does no I/O).  The last two need CAP_SYS_RESOURCE; without it the daemon
says so once and goes on.

Reserve mode (``--reserve``) is for a daemon that shares a memory cgroup
with the processes that swap to it.  There, any page the daemon faults in
while the cgroup is full sends it into memcg reclaim, and reclaim on
cgroup v1 writes and waits for swap pages: to the daemon's own device.  If
the thread in reclaim is the one that serves requests, nothing moves again.
So in reserve mode the daemon faults everything in at start and nothing
afterwards: the pool's chunks are committed up front (``Pool(reserve)``),
Python allocates through glibc malloc (``PYTHONMALLOC=malloc``) from one
arena that never shrinks and was grown at start, every mapping is locked
and populated (MCL_CURRENT|MCL_FUTURE without MCL_ONFAULT), and no thread
is started after the mount (a new thread's stack would be new memory): the
FUSE channel threads and the housekeeping thread start with it, and what
the event loop serves runs inline, without worker threads.  What it does
not cover: the kernel memory a system call may charge (housekeeping's
reads of /proc run on their own thread for that reason), and
PR_SET_IO_FLUSHER, the kernel's real answer, stays refused without
CAP_SYS_RESOURCE.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading

import trio

from . import _linux
from ._fs import SwapFS
from .engine import SwapSpace
from .fuse import Session, serve, unmount

log = logging.getLogger("vswapfs")
FSTYPE = "vswapfs"
SWAP_HEADER_BYTES = 4096  # mkswap's header page: kept so that swapon works again
HEAP_RESERVE = 48 << 20  # bytes of malloc heap faulted in at start in reserve mode
THREAD_STACK = 512 << 10  # bytes per thread stack in reserve mode (locked and populated)
# The environment a reserve-mode daemon runs in: every Python object from
# glibc malloc, one arena, no mmap'd blocks and no trimming, so memory once
# faulted in is reused and never handed back and faulted again.
RESERVE_ENV = {
    "PYTHONMALLOC": "malloc",
    "GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                      "glibc.malloc.trim_threshold=4294967295",
}


def reserve_env_missing() -> bool:
    """True if this process does not run with RESERVE_ENV (it must be set
    before the interpreter starts, so the caller re-executes)."""
    return any(os.environ.get(k) != v for k, v in RESERVE_ENV.items())


def protect(reserve: bool = False) -> dict[str, bool]:
    """Lock memory, avoid the OOM killer, mark as I/O flusher; returns what
    took effect.  ``reserve``: populate all memory now (see the module
    docstring); call it before any thread starts."""
    got = {}
    try:
        if reserve:
            threading.stack_size(THREAD_STACK)
            _linux.mlockall(_linux.MCL_CURRENT | _linux.MCL_FUTURE)
            _linux.grow_heap(HEAP_RESERVE)
        else:
            _linux.mlockall()
            _linux.one_malloc_arena()
        got["mlockall"] = True
    except OSError as e:
        log.warning("mlockall failed (%s): the daemon's memory can be swapped out", e)
        got["mlockall"] = False
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
        with open("/proc/self/oom_score_adj") as f:
            got["oom_score_adj"] = f.read().strip() == "-1000"
    except OSError:
        got["oom_score_adj"] = False
    try:
        _linux.prctl(_linux.PR_SET_IO_FLUSHER, 1)
        got["io_flusher"] = _linux.prctl(_linux.PR_GET_IO_FLUSHER) == 1
    except OSError:
        got["io_flusher"] = False
    missing = [k for k in ("oom_score_adj", "io_flusher") if not got[k]]
    if missing:
        log.warning("could not set %s (needs CAP_SYS_RESOURCE): under memory pressure the "
                    "daemon can be OOM-killed or recurse into reclaim I/O", " and ".join(missing))
    log.info("protection: %s", ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in got.items()))
    return got


async def _on_signals(mountpoint: str) -> None:
    """SIGTERM/SIGINT: unmount, which ends the serve loop.  While the image
    is in use (a loop device, swap on it) unmounting fails and the daemon
    keeps serving: exiting would take the swapped-out memory with it."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            try:
                await trio.to_thread.run_sync(unmount, mountpoint)
                log.info("%s: unmounted on %s", mountpoint, signal.Signals(signum).name)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    log.warning("%s is in use (swap on a loop device?): not exiting; run "
                                "'vswapfs down %s' first", mountpoint, mountpoint)
                else:
                    log.error("unmounting %s failed: %s", mountpoint, e)


def swapped_on(mountpoint: str) -> set[str]:
    """Loop devices on files of ``mountpoint`` that swap is on now."""
    return set(_linux.loop_devices(mountpoint)) & set(_linux.swap_areas())


def _housekeeping(mountpoint: str, space: SwapSpace, stop: threading.Event, trim: bool,
                  interval: float = 0.5) -> None:
    """Two chores, every ``interval`` seconds, on a thread of their own.

    Swapoff: free the whole space (but the swap header) when swap goes off
    it.  The kernel clears SWP_WRITEOK before swapoff frees the slots, so
    it sends no discard for them: without this, every page swapoff brought
    back would stay stored here until the next swapon reused its slot.

    Trim (``trim``): once pages were freed and an interval passed with no
    more frees, drop the backing files' write buffers and hand malloc's
    free heap pages back to the kernel, so the daemon shrinks back after a
    burst as zram does.  (Not in reserve mode, whose heap is kept on
    purpose.)

    Reading /proc and /sys charges kernel memory, which must never stall
    the event loop in reclaim: hence a thread, started at boot."""
    was_on: set[str] = set()
    areas: set[str] | None = None  # /proc/swaps devices when was_on was worked out
    freed_seen = 0
    pending_trim = False
    while not stop.wait(interval):
        try:
            seen = set(_linux.swap_areas())
            now = was_on if seen == areas else swapped_on(mountpoint)  # sysfs only on a change
            areas = seen
            if was_on and not now:
                before = space.stored_pages
                space.release_all_but(SWAP_HEADER_BYTES)
                log.info("swapoff of %s seen: freed %d pages", ",".join(sorted(was_on)),
                         before - space.stored_pages)
            was_on = now
            c = space.counters
            freed = c.notify_free + c.swapoff_freed_pages
            if freed != freed_seen:
                freed_seen, pending_trim = freed, True
            elif pending_trim and trim:
                space.trim()
                _linux.malloc_trim()
                pending_trim = False
        except Exception:  # never let housekeeping die silently
            log.exception("housekeeping")


async def run(mountpoint: str, space: SwapSpace, ready_fd: int | None = None,
              *, channels: int = 1, threads: int = 2, trim: bool = True) -> None:
    """Mount ``space`` at ``mountpoint`` and serve it until unmounted.
    ``channels``: FUSE channel threads that serve the image's I/O (0: the
    event loop serves it); ``threads``: worker threads the event loop hands
    large engine calls to (0: none, all inline); ``trim``: give free heap
    memory back after frees (see _housekeeping)."""
    fs = SwapFS(space, threads=threads)
    stop = threading.Event()
    watcher = threading.Thread(target=_housekeeping, args=(mountpoint, space, stop, trim),
                               name="housekeeping", daemon=True)
    watcher.start()
    try:
        async with trio.open_nursery() as nursery:

            async def serving(task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED) -> None:
                await serve(mountpoint, fs, FSTYPE, source=FSTYPE, channels=channels,
                            task_status=task_status)
                nursery.cancel_scope.cancel()  # unmounted: stop watching signals

            session = await nursery.start(serving)
            fs.service_stats = session.service_stats
            log.info("%s: serving %d bytes of virtual swap (pid %d, %d backing files)",
                     mountpoint, space.size, os.getpid(), len(space.backing_files()))
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            nursery.start_soon(_on_signals, mountpoint)
    finally:
        stop.set()
        watcher.join()
        s = space.stats()
        log.info("%s: stopped with %d pages stored; releasing memory and backing files",
                 mountpoint, s["stored_pages"])
        space.close()
