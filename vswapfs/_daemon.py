"""The vswapfs daemon: protect itself, mount, serve, unmount.

A swap daemon must not be swapped out or OOM-killed, or the memory it
serves dies with it.  Before any thread starts it locks its memory
(mlockall; MCL_ONFAULT so the pool's lazily committed chunks stay lazy),
asks for oom_score_adj -1000 and PR_SET_IO_FLUSHER (its own reclaim then
does no I/O).  The last two need CAP_SYS_RESOURCE; without it the daemon
says so once and goes on.
"""

from __future__ import annotations

import errno
import logging
import os
import signal

import trio

from . import _linux
from ._fs import SwapFS
from .engine import SwapSpace
from .fuse import serve, unmount

log = logging.getLogger("vswapfs")
FSTYPE = "vswapfs"
SWAP_HEADER_BYTES = 4096  # mkswap's header page: kept so that swapon works again


def protect() -> dict[str, bool]:
    """Lock memory, avoid the OOM killer, mark as I/O flusher; returns what
    took effect."""
    got = {}
    try:
        _linux.mlockall()
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


async def _watch_swapoff(mountpoint: str, space: SwapSpace, interval: float = 0.5) -> None:
    """Free the whole space (but the swap header) when swap goes off it.

    The kernel clears SWP_WRITEOK before swapoff frees the slots, so it
    sends no discard for them: without this, every page swapoff brought back
    would stay stored here until the next swapon reused its slot."""
    was_on: set[str] = set()
    while True:
        now = await trio.to_thread.run_sync(swapped_on, mountpoint)
        if was_on and not now:
            before = space.stored_pages
            await trio.to_thread.run_sync(space.release_all_but, SWAP_HEADER_BYTES)
            log.info("swapoff of %s seen: freed %d pages", ",".join(sorted(was_on)),
                     before - space.stored_pages)
        was_on = now
        await trio.sleep(interval)


async def run(mountpoint: str, space: SwapSpace, ready_fd: int | None = None) -> None:
    """Mount ``space`` at ``mountpoint`` and serve it until unmounted."""
    fs = SwapFS(space)
    try:
        async with trio.open_nursery() as nursery:

            async def serving(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                await serve(mountpoint, fs, FSTYPE, source=FSTYPE, task_status=task_status)
                nursery.cancel_scope.cancel()  # unmounted: stop watching signals

            await nursery.start(serving)
            log.info("%s: serving %d bytes of virtual swap (pid %d, %d backing files)",
                     mountpoint, space.size, os.getpid(), len(space.backing_files()))
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            nursery.start_soon(_on_signals, mountpoint)
            nursery.start_soon(_watch_swapoff, mountpoint, space)
    finally:
        s = space.stats()
        log.info("%s: stopped with %d pages stored; releasing memory and backing files",
                 mountpoint, s["stored_pages"])
        space.close()
