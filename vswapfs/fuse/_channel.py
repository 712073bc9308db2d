"""A channel: one /dev/fuse fd, the buffer requests are read into, and
what to do when read(2) fails.

The session's fd is one channel, read by the event loop; clones of it
(FUSE_DEV_IOC_CLONE) are more, each read by its own thread.  The kernel
wants a reply written to the fd its request was read from.

Buffers are allocated and faulted in when a channel is made (and mlocked,
if the process is), so serving a request never waits on reclaim for one.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
import time
from collections.abc import Callable
from typing import Final

import trio

from . import _abi as A

log = logging.getLogger("vswapfs.fuse")

MAX_WRITE: Final = 1 << 20  # the largest WRITE we accept, and so the largest request
BUFFER_BYTES: Final = MAX_WRITE + 4096  # a request: the header, the write's header and its data


def new_buffer() -> bytearray:
    """A request buffer, faulted in."""
    buf = bytearray(BUFFER_BYTES)
    buf[::4096] = bytes(len(range(0, BUFFER_BYTES, 4096)))
    return buf


def clone_fd(fd: int) -> int:
    """A new /dev/fuse fd attached to the same connection as ``fd``."""
    new = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(new, A.DEV_IOC_CLONE, struct.pack("I", fd))
    except BaseException:
        os.close(new)
        raise
    return new


# read(2) on /dev/fuse: these mean the connection is gone (unmounted, or
# aborted through /sys/fs/fuse/connections), these that nothing was read
GONE: Final = frozenset({errno.ENODEV, errno.ECONNABORTED})
AGAIN: Final = frozenset({errno.EINTR, errno.ENOENT, errno.EAGAIN})
RETRY_MAX_S: Final = 1.0  # longest wait before reading again after an unexpected error


class ReadErrors:
    """What to do after read(2) on /dev/fuse failed: GONE ends the channel,
    AGAIN reads again at once, anything else is logged (at most every few
    seconds) and retried after a growing pause: a channel never stops
    serving while its connection lives."""

    def __init__(self) -> None:
        self.pause = 0.0
        self.last_log = -1e9
        self.count = 0  # unexpected errors since the channel started

    def gone(self, err: int, where: str, sleep: bool = True) -> bool:
        """True if the read's errno ``err`` says the connection is gone; else
        wait ``self.pause`` (unless ``sleep`` is false: the event loop awaits
        it instead), then False."""
        if err in GONE:
            return True
        if err in AGAIN:
            return False
        self.count += 1
        now = time.monotonic()
        if now - self.last_log >= 5:
            self.last_log = now
            log.error("%s: read from /dev/fuse failed ([Errno %d] %s); retrying (%d so far)",
                      where, err, os.strerror(err), self.count)
        self.pause = min(max(self.pause * 2, 0.001), RETRY_MAX_S)
        if sleep:
            time.sleep(self.pause)
        return False

    def ok(self) -> None:
        self.pause = 0.0



class BusyPoll:
    """How long a channel thread keeps reading /dev/fuse without blocking
    after it found no request, before it sleeps in poll(2).

    A request that finds its thread asleep pays for waking it: on a VM an
    interrupt to a halted vCPU, tens of µs, on every swap-in whose thread
    had gone to sleep.  Polling a little first catches the request that
    comes soon.  The window adapts as the guest's cpuidle-haltpoll does:
    a sleep that a longer window would have avoided (the request came
    within ``max``) doubles it, a sleep after which nothing came for longer
    than ``max`` halves it (below ``max`` / 8: no polling), so a thread polls only
    while requests keep coming close together and never once they stop:
    an idle daemon sleeps after at most ``max``.

    Two rules keep polling from costing a busy machine its CPU.  A thread
    polls only while most idle spells end within ``max`` (``rate``, a moving
    share over about the last 16, at least ``min_rate``): in a sequential
    read-back two spells in five outlast it, and each such miss burns a
    window of CPU.  And a spell's polling stops the moment a yield between
    tries gave the CPU away for longer than CEDE_S (``serve_thread``): a
    task that was runnable here wants the CPU more than a request that may
    come (on 2 CPUs the swap-out of a write-heavy workload is CPU-bound)."""

    __slots__ = ("max", "window", "caught", "slept", "ceded", "rate", "min_rate")

    MIN_RATE: Final = 0.75  # poll while at least 3 idle spells in 4 end within the maximum
    RATE_WEIGHT: Final = 1 / 16  # of the newest spell in ``rate``

    def __init__(self, max_s: float, min_rate: float = MIN_RATE) -> None:
        self.max = max_s  # seconds a window may grow to; 0: never poll
        self.window = 0.0  # seconds to poll before sleeping, now
        self.caught = 0  # requests read while polling: the sleeps saved
        self.slept = 0  # times the thread slept in poll(2) (0: it is off, read(2) blocks)
        self.ceded = 0  # spells whose polling stopped because a yield gave the CPU away
        self.rate = 0.0  # moving share of idle spells that ended within ``max``
        self.min_rate = min_rate  # below that share: no polling

    def came(self, idle: float, slept: bool) -> None:
        """A request was read ``idle`` seconds after a read found none;
        ``slept``: the thread slept meanwhile."""
        within = idle <= self.max
        self.rate += ((1.0 if within else 0.0) - self.rate) * self.RATE_WEIGHT
        if not slept:
            self.caught += 1
        elif within:  # a longer window would have caught it
            self.window = min(self.max, max(self.window * 2, self.max / 8))
        elif self.window:  # nothing came for longer than polling may last
            self.window = self.window / 2 if self.window > self.max / 8 else 0.0
        if self.rate < self.min_rate:  # too many spells outlast it: polling would mostly miss
            self.window = 0.0


# a yield between polling tries that took longer than this ran someone else here: stop polling
CEDE_S: Final = 20e-6


# Final: compiled, a C static rather than a lookup in the module's dict per use
_monotonic: Final = time.monotonic
_yield: Final = os.sched_yield


# typed here: the build's mypy meets _abi inside the package's import cycle at this point
_OUT_HEADER: Final[struct.Struct] = A.OUT_HEADER  # type: ignore[has-type, unused-ignore]
_pack_out: Final = _OUT_HEADER.pack  # bound once: write_reply runs once a request
_OUT_SIZE: Final = _OUT_HEADER.size
_writev: Final = os.writev


def write_reply(fd: int, unique: int, error: int = 0, payload: bytes | bytearray | memoryview = b"") -> None:
    """Write the reply to request ``unique``: ``-error``, or the payload."""
    n = len(payload)
    hdr = _pack_out(_OUT_SIZE + n, -error, unique)
    try:
        _writev(fd, [hdr, payload] if n else [hdr])
    except OSError as e:  # ENOENT: the request was aborted meanwhile
        if e.errno != errno.ENOENT and e.errno not in GONE:
            reply_failed(unique, e.errno or 0)


def reply_failed(unique: int, err: int) -> None:
    """Say that the reply to request ``unique`` could not be written."""
    log.warning("reply to request %d failed: %s", unique, os.strerror(err))


def notify_resend(fd: int) -> None:
    """Ask the kernel to send again every request that was read from this
    connection but not answered (by a server that died).  Raises OSError
    where the kernel is older than 6.9 (EINVAL)."""
    os.write(fd, A.OUT_HEADER.pack(A.OUT_HEADER.size, A.NOTIFY_RESEND, 0))


def read_into(fd: int, buf: bytearray) -> int:
    """One read(2) of a request into ``buf``: the bytes read, or minus the
    errno.  The Python twin of ``_wire.read_request``, which channel threads
    use where it was built: between requests a non-blocking read finds
    nothing (EAGAIN), and the exception os.readv raises for that cost a
    busy thread 7% of its time (docs/sustained.md)."""
    try:
        return os.readv(fd, [buf])
    except OSError as e:
        return -(e.errno or errno.EIO)


def _native_read() -> Callable[[int, bytearray], int]:
    """``_wire.read_request`` where the C module was built, else ``read_into``."""
    try:
        from . import _wire
    except ImportError:
        return read_into
    return _wire.read_request


_read: Final = _native_read()  # a channel thread's read(2): bytes, or minus the errno
_NOTHING: Final = -errno.EAGAIN  # what _read returns where a non-blocking fd has no request


async def read_request(fd: int, buf: bytearray, errors: ReadErrors) -> int:
    """Read one request into ``buf`` on the event loop (``fd`` is
    non-blocking); 0 when the connection is gone."""
    while True:
        n = _read(fd, buf)
        if n >= 0:
            errors.ok()
            return n
        if n == _NOTHING:
            await trio.lowlevel.wait_readable(fd)
        elif errors.gone(-n, "event loop", sleep=False):
            return 0
        else:
            await trio.sleep(errors.pause)


def serve_thread(fd: int, buf: bytearray, name: str, serve: Callable[[int, memoryview], bool],
                 hand_over: Callable[[bytes, int], bool], poll: BusyPoll) -> None:
    """A channel thread's loop: read a request, ``serve`` it here, or, when
    that returns False, ``hand_over`` a copy (the buffer is reused at
    once); until the connection is gone or ``hand_over`` returns False."""
    mv = memoryview(buf)
    errors = ReadErrors()
    # polling reads without blocking and sleeps in poll(2); else read(2) blocks.  Set
    # either way: a clone handed over by an earlier daemon keeps that one's mode
    os.set_blocking(fd, poll.max <= 0)
    waiter = select.poll()
    waiter.register(fd, select.POLLIN)
    idle_since = -1.0  # when a read last found nothing, -1: the last read found a request
    slept = False  # the thread slept since then
    last_try = -1.0  # when this spell's last try yielded, -1: none yet
    while True:
        n = _read(fd, buf)
        if n == _NOTHING:
            now = _monotonic()
            if idle_since < 0:
                idle_since, slept, last_try = now, False, -1.0
            if not slept and now - idle_since < poll.window:  # poll, until the spell's first sleep
                if last_try < 0 or now - last_try < CEDE_S:
                    last_try = now
                    _yield()  # the CPU to whatever is runnable here: the kernel's side of the next request
                    continue
                poll.ceded += 1  # that yield ran someone else for long: the CPU is wanted
            slept = True
            poll.slept += 1
            waiter.poll()
            continue
        if n < 0:
            if errors.gone(-n, name):
                return
            continue
        if idle_since >= 0:
            poll.came(_monotonic() - idle_since, slept)
            idle_since = -1.0
        if errors.pause:
            errors.ok()
        if not n:
            return
        if not serve(fd, mv[:n]) and not hand_over(bytes(mv[:n]), fd):
            return
