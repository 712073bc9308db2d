"""The vswapfs daemon: protect itself, mount, serve, unmount.

A swap daemon must not be swapped out or OOM-killed, or the memory it
serves dies with it.  Before any thread starts it locks its memory
(mlockall), asks for oom_score_adj -1000 and for PR_SET_IO_FLUSHER (its own
reclaim then does no I/O, so it can never wait on itself).  The last two
need CAP_SYS_RESOURCE; without it the daemon says so once and goes on.

Where PR_SET_IO_FLUSHER is refused, a daemon that shares a memory cgroup
with the processes that swap to it (or a machine under global pressure)
can deadlock: a page it faults in sends it into reclaim, and reclaim on
cgroup v1 writes swap pages to the daemon's own device and waits for them.
So no thread that answers the kernel may fault memory in or wait on
reclaim, by default:

- *the pool* takes new chunks only from spares faulted in beforehand
  (``SwapSpace(dynamic=True)``); when none is ready, a store goes to a
  backing file or is refused with ENOSPC, and never waits;
- *the heap*: Python allocates through glibc malloc (``PYTHONMALLOC=malloc``,
  set by re-executing itself) from one arena, without mmap'd blocks and
  without trimming on free, so freed memory stays faulted in and is reused;
- *the housekeeping thread* keeps both topped up, outside every lock and
  with the GIL released while the kernel faults pages in: spare chunks up
  to the pool's high mark, and HEAP_HEADROOM of free heap (kept by each
  trim, faulted in again when the serving threads grew the heap past it);
  when the daemon is idle it gives the surplus back (spares above the low
  mark, the heap above its headroom), so memory still returns after a
  burst;
- *no thread starts after the mount* (a new stack is new memory): the FUSE
  channel threads, housekeeping and the log writer start with it, and what
  the event loop serves runs inline;
- *the log* is written by a thread of its own from a bounded queue (a file
  write can wait on reclaim), and the serving path rate-limits what it
  logs.

``--reserve`` is the stricter mode: the pool's chunks are committed up
front and never given back, the heap is grown by HEAP_RESERVE at start
and never trimmed, every mapping is populated at once
(MCL_CURRENT|MCL_FUTURE without MCL_ONFAULT).  It costs memory held for
good, for those who want it committed.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import logging.handlers
import os
import queue
import signal
import threading
import time
from collections.abc import Callable

import trio

from . import _build, admin, linux
from ._consts import FSTYPE, VERSION
from ._control import warn_of_the_pool
from ._fs import SWAP_HEADER_BYTES, SwapFS
from ._supervisor import Keeper
from .engine import SwapSpace
from .fuse import Session, serve, unmount

log = logging.getLogger("vswapfs")
HEAP_RESERVE = 48 << 20  # bytes of malloc heap faulted in at start in reserve mode
HEAP_HEADROOM = 16 << 20  # bytes of free heap kept faulted in for the serving threads
# A top-up asks for a block this much smaller than the pad a trim keeps.
HEAP_SLACK = 2 << 20
THREAD_STACK = 512 << 10  # bytes per thread stack (locked; populated in reserve mode)
BUSY_TICK = 0.02  # seconds between top-ups while requests come in
IDLE_TICK = 0.05  # seconds between looks for requests when none came
TRIM_AFTER = 0.3  # seconds without requests (or frees) before memory is given back
# seconds between looks at /proc/swaps (for swapoff; a test may set VSWAPFS_SWAPS_EVERY)
SWAPS_EVERY = float(os.environ.get("VSWAPFS_SWAPS_EVERY", "0.1"))
# seconds a swapon's area discard keeps its latch while the area is not seen on: the
# kernel turns the area on after its discard and a few allocations (see SwapoffWatch)
SWAPON_GRACE = 2.0
SETTLE_SLICE = 0.05  # seconds of recompression between looks for requests, when idle
SETTLE_DUTY = 4  # ... and then a pause of (SETTLE_DUTY - 1) slices: at most a quarter of a CPU
LOG_QUEUE = 1000  # log records waiting for the writer; more are dropped and counted


def protect(reserve: bool = False) -> dict[str, bool]:
    """Lock memory, avoid the OOM killer, mark as I/O flusher; returns what
    took effect.  Call it before any thread starts.  ``reserve``: populate
    all memory now (see the module docstring)."""
    got = {}
    threading.stack_size(THREAD_STACK)
    try:
        if reserve:
            linux.mlockall(linux.MCL_CURRENT | linux.MCL_FUTURE)
            linux.grow_heap(HEAP_RESERVE)
        else:
            linux.mlockall()
            linux.one_malloc_arena()
            linux.grow_heap(HEAP_HEADROOM)
        got["mlockall"] = True
    except OSError as e:
        log.warning("mlockall failed (%s): the daemon's memory can be swapped out", e)
        got["mlockall"] = False
    got["oom_score_adj"] = linux.set_oom_score_adj(-1000)
    got["io_flusher"] = linux.io_flusher()
    missing = [k for k in ("oom_score_adj", "io_flusher") if not got[k]]
    if missing:
        log.warning("could not set %s (needs CAP_SYS_RESOURCE): the daemon relies on its "
                    "pre-faulted memory not to wait on reclaim%s", " and ".join(missing),
                    "" if got["oom_score_adj"] else ", and can be OOM-killed")
    log.info("protection: %s", ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in got.items()))
    return got


def log_through_thread() -> Callable[[], None]:
    """Route every log record through a bounded queue to a writer thread:
    a thread that serves the kernel never writes the log file itself (a
    file write can wait on reclaim, and the handler's lock with it).
    Records beyond LOG_QUEUE are dropped.  Returns a function that
    flushes and stops the writer."""
    root = logging.getLogger()
    q: queue.Queue[logging.LogRecord] = queue.Queue(LOG_QUEUE)

    class DropWhenFull(logging.handlers.QueueHandler):
        def enqueue(self, record: logging.LogRecord) -> None:
            try:
                self.queue.put_nowait(record)
            except queue.Full:
                pass

    listener = logging.handlers.QueueListener(q, *root.handlers, respect_handler_level=True)
    root.handlers = [DropWhenFull(q)]
    listener.start()
    return listener.stop


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
    return set(linux.loop_devices(mountpoint)) & set(linux.swap_areas())


class SwapoffWatch:
    """Whether swap went off the image, from looks at /proc/swaps.

    Swap is known to be on the image from two signs: a look that finds its
    loop device in /proc/swaps, and the discard of the whole area that
    ``swapon --discard`` sends before it turns the area on (the file
    system counts them, ``SwapFS.area_discards``).  Looks come every
    SWAPS_EVERY: a swapon, its swapping and its swapoff can all fall
    between two, but not without the discard, so only a swapon without
    ``--discard`` can go unseen (what its swapoff leaves is then held until
    the slots are written again).  Once either sign was seen and a look
    finds no area on the image, :meth:`look` says to free the space.

    The discard comes before the area is on, so a look just after it finds
    nothing: the latch it sets is kept SWAPON_GRACE, or until a look finds
    the area on, whatever those looks say to free meanwhile.  That is safe
    because the caller frees only if no read or write of the image and no
    area discard came since it began to look (``release_all_but(unless=)``,
    asked under the engine lock): a page of a swap area turned on after the
    look is written after the free, and kept.  If the free was refused,
    :meth:`refused` makes the next look try again.
    """

    def __init__(self) -> None:
        self.was_on = False  # the last look found the area on
        self.discards = 0  # area discards counted so far
        self.latched_at: float | None = None  # when the last area discard was noted

    def note_discards(self, count: int, now: float) -> None:
        """The file system's count of area discards, read before the look."""
        if count != self.discards:
            self.discards, self.latched_at = count, now

    def look(self, on: bool, now: float) -> bool:
        """What a look found; True if the space should be freed now."""
        if on:
            self.was_on, self.latched_at = True, None
            return False
        free = self.was_on or self.latched_at is not None
        self.was_on = False
        if self.latched_at is not None and now - self.latched_at >= SWAPON_GRACE:
            self.latched_at = None
        return free

    def refused(self) -> None:
        """The free :meth:`look` asked for did not happen: ask again next time."""
        self.was_on = True


class Housekeeping(threading.Thread):
    """The daemon's chores, on a thread of its own, started at boot.

    Memory for the serving path: while reads and writes come in (``busy()``
    says so, looked at every IDLE_TICK), every BUSY_TICK it faults spare
    pool chunks in (``replenish``), and at once when a write found none
    (``spares_wanted``: that write waits a moment for them), and if the heap grew past the headroom
    its last trim kept, faults HEAP_HEADROOM in again, so the serving
    threads find what they allocate ready.
    Once no read or write came for TRIM_AFTER it gives the spares above the
    pool's low mark and the backing files' buffers back; once frees
    (discards, swapoff) have stopped for as long, malloc's heap above its
    headroom too, so the daemon shrinks back after a burst as zram does.
    Chunks that empty are given back at once.  Not in reserve mode, whose
    memory is kept on purpose.

    Recompression: once no read or write came for TRIM_AFTER, the pages
    written since stored at the fast first level are compressed again at
    the dense one (``SwapSpace.recompress``), in slices of SETTLE_SLICE
    with pauses between them (a quarter of a CPU at most), stopping the
    moment a request comes; what is left waits for the next idle spell.
    Then the pool is compacted, a cluster at a time (the dense objects
    left the first level's chunks sparse), and memory trimmed again.

    Swapoff: free the whole space (but the swap header) when swap goes
    off it.  The kernel clears SWP_WRITEOK before swapoff frees the slots,
    so it sends no discard for them: without this, every page swapoff
    brought back would stay stored here until the next swapon reused its
    slot.  When swap went off is worked out by ``SwapoffWatch``.

    Faulting memory in and reading /proc and /sys may wait on reclaim:
    here that holds up no one, since this thread holds no lock the
    serving threads need, and the GIL is released while the kernel works.
    """

    def __init__(self, mountpoint: str, space: SwapSpace, busy: Callable[[], int], trim: bool,
                 area_discards: Callable[[], int]) -> None:
        super().__init__(name="housekeeping", daemon=True)
        self.mountpoint, self.space, self.busy, self.trim = mountpoint, space, busy, trim
        self.area_discards = area_discards  # swapon's discards of the whole area so far
        self.stop = threading.Event()

    def run(self) -> None:
        linux.set_thread_name("vswapfs-keeper")
        watch = SwapoffWatch()
        on: set[str] = set()  # the image's swap areas at the last look
        areas: set[str] | None = None  # /proc/swaps devices when on was worked out
        seen_busy, seen_freed = self.busy(), self._freed()
        heap_mark = linux.heap_end()  # where the heap ended after the last trim or top-up
        last_look = last_busy = last_free = 0.0
        shed = trimmed = True
        settling = False  # pages were written since recompression last ran out of work
        tick = IDLE_TICK
        wanted = self.space.spares_wanted  # a write found no spare chunk: it waits for some
        while not self.stop.is_set():
            if wanted.wait(tick):
                wanted.clear()
                if self.trim and not self.stop.is_set():
                    self.space.replenish()  # at once, not at the next tick
            if self.stop.is_set():
                break
            try:
                now = time.monotonic()
                busy, freed = self.busy(), self._freed()
                if busy != seen_busy:  # reads and writes: keep the serving path supplied
                    seen_busy, last_busy, shed, trimmed, tick = busy, now, False, False, BUSY_TICK
                    settling = True
                    if self.trim:
                        self.space.replenish()
                        # the heap keeps its trimmed pad for the serving threads; only
                        # once they grew it past that is the headroom faulted in again
                        # (a top-up on every tick grew the heap by a block that stayed)
                        if linux.heap_end() != heap_mark:
                            linux.heap_headroom(HEAP_HEADROOM - HEAP_SLACK)
                            heap_mark = linux.heap_end()
                elif not shed and now - last_busy >= TRIM_AFTER:
                    if self.trim:  # no more reads or writes: spares, buffers and heap go back
                        self.space.trim()
                        linux.malloc_trim(HEAP_HEADROOM)
                        heap_mark = linux.heap_end()
                    shed, tick = True, IDLE_TICK
                elif shed and settling:
                    settling = self._settle(seen_busy)
                    tick = SETTLE_SLICE * (SETTLE_DUTY - 1) if settling else IDLE_TICK
                    if not settling:  # the dense objects left the first level's chunks sparse
                        self.space.compact(yielding=True, until=functools.partial(self._came, seen_busy))
                        if self.trim:
                            self.space.trim()
                            linux.malloc_trim(HEAP_HEADROOM)
                            heap_mark = linux.heap_end()
                if freed != seen_freed:  # discards, swapoff: the heap can shrink after them
                    seen_freed, last_free, trimmed = freed, now, False
                elif not trimmed and shed and now - last_free >= TRIM_AFTER:
                    if self.trim:
                        self.space.trim()
                        linux.malloc_trim(HEAP_HEADROOM)
                        heap_mark = linux.heap_end()
                    trimmed = True
                if now - last_look >= SWAPS_EVERY:
                    last_look = now
                    # what the free is checked against: counted before /proc/swaps is read
                    looked = (self.busy(), self.area_discards())
                    watch.note_discards(looked[1], now)
                    seen = set(linux.swap_areas())
                    went = on
                    on = on if seen == areas else swapped_on(self.mountpoint)  # sysfs on a change
                    areas = seen
                    if watch.look(bool(on), now):
                        released = self.space.release_all_but(
                            SWAP_HEADER_BYTES, unless=functools.partial(self._touched_since, looked))
                        if released is None:
                            watch.refused()
                        elif released:
                            log.info("swapoff of %s seen: freed %d pages",
                                     ",".join(sorted(went)) or "a swap area not seen on", released)
            except Exception:  # never let housekeeping die silently
                log.exception("housekeeping")

    def _touched_since(self, looked: tuple[int, int]) -> bool:
        """True if a read, a write or an area discard of the image came
        since (``busy()``, ``area_discards()``) said ``looked``."""
        return (self.busy(), self.area_discards()) != looked

    def _came(self, seen_busy: int) -> bool:
        """True if a read or write came since ``busy()`` said ``seen_busy``."""
        return self.busy() != seen_busy

    def _settle(self, seen_busy: int) -> bool:
        """Recompress for up to SETTLE_SLICE while no request comes; True
        if there may be more to do."""
        start = time.monotonic()
        while time.monotonic() - start < SETTLE_SLICE:
            if self._came(seen_busy) or self.stop.is_set():
                return True
            if self.trim:  # dense objects go to chunks of their own size class
                self.space.replenish(busy=False)
            if not self.space.recompress():
                return False
        return True

    def _freed(self) -> int:
        c = self.space.counters
        return c.notify_free + c.swapoff_freed_pages


async def run(mountpoint: str, space: SwapSpace, ready_fd: int | None = None,
              *, channels: int = 1, busy_poll_us: int = 0, trim: bool = True,
              keeper: Keeper | None = None) -> None:
    """Mount ``space`` at ``mountpoint`` and serve it until unmounted.
    ``channels``: FUSE channel threads that serve the image's I/O (0: the
    event loop serves it), which poll for a request for up to
    ``busy_poll_us`` before they sleep (``fuse.BusyPoll``); ``trim``: top
    memory up while busy and give it back when idle (see Housekeeping; off
    in reserve mode).  Whatever the event loop serves runs inline: no
    thread starts after the mount.

    ``keeper``: the supervisor (see ``_supervisor``).  The connection's fds
    go to it as they are made; if it handed a connection over, that one is
    served (no mount, no INIT).  Unless the file system was unmounted, the
    space is left as it is when this returns or fails, for the next daemon."""
    stop_log = log_through_thread()
    fs = SwapFS(space, threads=0, daemon=daemon_info(keeper))
    if keeper is not None:  # what control/ tuned outlives this process too
        fs.on_change = lambda: keeper.put({"settings": settings_memfd(space)})
    unmounted = False
    space.replenish(busy=False)  # the first spares, before the first request
    housekeeping = Housekeeping(mountpoint, space, fs.requests_seen, trim, fs.area_discards)
    housekeeping.start()
    try:
        async with trio.open_nursery() as nursery:

            async def serving(task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED) -> None:
                nonlocal unmounted
                await serve(mountpoint, fs, FSTYPE, source=FSTYPE, channels=channels,
                            busy_poll_us=busy_poll_us,
                            task_status=task_status, keep=keeper.put if keeper else None,
                            inherited=keeper.inherited if keeper else None)
                unmounted = True
                nursery.cancel_scope.cancel()  # unmounted: stop watching signals

            await nursery.start(serving)
            if trim:  # the idle footprint, in place before the first request rather than after it
                linux.heap_headroom(HEAP_HEADROOM - HEAP_SLACK)
                linux.malloc_trim(HEAP_HEADROOM)
            if keeper is not None and keeper.generation:
                log.info("%s: took over from daemon %d of this mount: %d pages, %d backing files",
                         mountpoint, keeper.generation, space.stored_pages, len(space.backing_files()))
            log.info("%s: serving %d bytes of virtual swap (pid %d, %d backing files, %s build)",
                     mountpoint, space.size, os.getpid(), len(space.backing_files()), _build.kind())
            warn_of_the_pool(space, mountpoint)
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            nursery.start_soon(_on_signals, mountpoint)
    finally:
        housekeeping.stop.set()
        space.spares_wanted.set()  # wake it
        housekeeping.join()
        s = space.stats()
        if unmounted or keeper is None:
            log.info("%s: stopped with %d pages stored; releasing memory and backing files",
                     mountpoint, s["stored_pages"])
            space.close()
            restored = admin.release_zswap(mountpoint)  # unmounted without `down`: zswap as it was
            if restored:
                log.info("%s: %s", mountpoint, restored)
        else:  # still mounted: the pages are the next daemon's to serve
            log.error("%s: the daemon fails with %d pages stored; its supervisor starts a new one, "
                      "which takes them over", mountpoint, s["stored_pages"])
        stop_log()


SETTINGS = ("pool_limit", "accept_threshold", "huge_threshold", "writeback_enabled", "level", "first_level",
            "first_algorithm")
ZSTD_SETTINGS = ("level", "first_level", "first_algorithm")  # a zstd space's only


def settings_memfd(space: SwapSpace) -> int:
    """A memfd with the settings control/ can change, as JSON, for the
    daemon that takes over (:func:`apply_settings`)."""
    values = {k: getattr(space, k) for k in SETTINGS if k not in ZSTD_SETTINGS or space.codec == "zstd"}
    fd = os.memfd_create("vswapfs-settings", os.MFD_CLOEXEC)
    os.write(fd, json.dumps(values).encode())
    return fd


def apply_settings(space: SwapSpace, fd: int) -> None:
    """Apply what :func:`settings_memfd` kept (after a takeover)."""
    space.configure(**json.loads(os.pread(fd, os.fstat(fd).st_size, 0)))


def daemon_info(keeper: Keeper | None) -> dict[str, str]:
    """What control/ says of the daemon: its version, its build (mypyc or
    python), its supervisor's pid (0: none) and how many daemons served the
    mount before it."""
    return {"version": VERSION, "build": _build.kind(), "supervisor_pid": str(os.getppid() if keeper else 0),
            "restarts": str(keeper.generation if keeper else 0)}
