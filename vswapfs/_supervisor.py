"""The supervisor: holds what the swapped-out pages live in, so that they
outlive the daemon, and starts a new daemon when one dies.

A FUSE connection lives as long as one /dev/fuse fd of it is open, so a
process that only holds the fds keeps the mount, the loop device and swap
working while the daemon is gone: the kernel queues the requests meanwhile.
The daemon hands over (``SCM_RIGHTS`` on a socket it inherits) every fd
its state lives in before it uses it: the /dev/fuse fd and its channel
clones, the memfds of the table, the pool and its directory, each backing
file, its directory and its checksums, and a memfd with what INIT settled.
When the daemon dies (a crash, ``kill -9``) or is replaced (``vswapfs
restart``: SIGHUP here), the supervisor starts the same command again and
passes it every fd it holds; the new daemon takes the space over (see
``engine._space``), asks the kernel to resend what the old one had read
but not answered (``FUSE_NOTIFY_RESEND``, Linux 6.9+), and serves on.

It is meant to be smaller than what it guards, and not a new single point
of failure: it imports no engine, no trio, no FUSE code, allocates nothing
after its start but an entry per fd, locks its memory and never reads the
/dev/fuse fd.  If it is killed itself, the fds close and the pages are
lost, as with the daemon before it existed: the README says so.

The daemon side is :class:`Keeper`: ``put`` (hand over fds) and ``drop``
(a backing file removed), each answered before the daemon goes on.
"""

from __future__ import annotations

import array
import ctypes
import errno
import json
import os
import select
import signal
import socket
import sys
import time
from typing import Final

ENV_SOCKET: Final = "VSWAPFS_SUPERVISOR_FD"  # the daemon's end of the socket
ENV_FDS: Final = "VSWAPFS_FDS"  # JSON: name -> fd number, what the daemon takes over
ENV_GENERATION: Final = "VSWAPFS_GENERATION"  # 0 for the first daemon, +1 per restart
ENV_READY: Final = "VSWAPFS_READY_FD"  # the first daemon says "ready" there
MAX_MSG: Final = 4096
RESPAWN_MIN_S: Final = 0.05  # pause before restarting a daemon that died young
RESPAWN_MAX_S: Final = 5.0  # the pause doubles up to this while it keeps dying young
YOUNG_S: Final = 5.0  # a daemon that dies sooner than this after its start died young
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4


class Keeper:
    """The daemon's handle on its supervisor: hands fds over and back."""

    def __init__(self, sock: socket.socket, inherited: dict[str, int], generation: int) -> None:
        self._sock = sock
        self.inherited = inherited  # what a previous daemon handed over (empty for the first)
        self.generation = generation  # daemons before this one

    @classmethod
    def from_env(cls) -> Keeper | None:
        """The supervisor this process runs under, if any (its environment
        says so, and the variables are removed: children do not inherit them)."""
        fd = os.environ.pop(ENV_SOCKET, None)
        fds = json.loads(os.environ.pop(ENV_FDS, "{}"))
        generation = int(os.environ.pop(ENV_GENERATION, "0"))
        if fd is None:
            return None
        for n in fds.values():
            os.set_inheritable(n, False)
        return cls(socket.socket(fileno=int(fd)), fds, generation)

    def _ask(self, msg: bytes, fds: list[int] | None = None) -> None:
        if fds:
            self._sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self._sock.send(msg)
        if self._sock.recv(16) != b"ok":
            raise OSError(errno.EPIPE, "the supervisor did not take the fds")

    def put(self, fds: dict[str, int]) -> None:
        """Hand ``fds`` to the supervisor (it keeps its own copies), one
        message per fd; returns once it holds them."""
        for name, fd in fds.items():
            self._ask(b"put " + name.encode(), [fd])

    def drop(self, names: list[str]) -> None:
        """The supervisor closes its copies of these (a removed backing file)."""
        for name in names:
            self._ask(b"drop " + name.encode())


def _protect() -> None:
    """Lock memory (what is mapped now and later, as faulted) and ask the
    OOM killer to spare us; where refused, say so and go on."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        print(f"vswapfs supervisor: mlockall failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError:
        pass
    libc.prctl(15, b"vswapfs-super", 0, 0, 0)  # PR_SET_NAME


def _log(msg: str) -> None:
    print(time.strftime("%Y-%m-%d %H:%M:%S") + f" vswapfs-supervisor[{os.getpid()}] {msg}",
          file=sys.stderr, flush=True)


def _connection_gone(fd: int) -> bool:
    """True once the FUSE connection of ``fd`` is unmounted or aborted
    (poll says POLLERR); it never reads a request."""
    p = select.poll()
    p.register(fd, select.POLLERR)
    return any(ev & select.POLLERR for _, ev in p.poll(0))


class Supervisor:
    """Runs the daemon command ``argv`` and keeps what it hands over."""

    def __init__(self, argv: list[str], ready_fd: int | None, pidfile: str | None) -> None:
        self.argv = argv
        self.ready_fd = ready_fd
        self.pidfile = pidfile
        self.held: dict[str, int] = {}  # name -> our copy of the fd
        self.generation = 0
        self.restart = False  # SIGHUP: replace the daemon
        self.stop_signal = 0  # SIGTERM/SIGINT: passed on to the daemon

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self.restart = True
        else:
            self.stop_signal = signum

    def run(self) -> int:
        _protect()
        if self.pidfile:
            with open(self.pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)
        pause = RESPAWN_MIN_S
        try:
            while True:
                started = time.monotonic()
                code = self._run_once(wake_r)
                if code == 0 and not self.restart:
                    return 0  # the daemon unmounted and exited: done
                fuse = self.held.get("fuse")
                if fuse is None:  # it died before it mounted: nothing to keep alive
                    _log(f"daemon exited with {code} before it mounted")
                    return code or 1
                if _connection_gone(fuse):
                    _log(f"daemon exited with {code}; the mount is gone")
                    return 0 if code == 0 else code
                if self.restart:
                    self.restart = False
                    pause = RESPAWN_MIN_S
                    _log(f"restarting the daemon (generation {self.generation + 1})")
                else:
                    _log(f"daemon died ({_describe(code)}); starting a new one, which takes over "
                         f"{len(self.held)} fds")
                    if time.monotonic() - started < YOUNG_S:
                        time.sleep(pause)
                        pause = min(pause * 2, RESPAWN_MAX_S)
                    else:
                        pause = RESPAWN_MIN_S
                self.generation += 1
        finally:
            for fd in self.held.values():
                os.close(fd)
            if self.pidfile:
                try:
                    os.unlink(self.pidfile)
                except OSError:
                    pass

    def _run_once(self, wake_r: int) -> int:
        """Start one daemon and serve its requests until it exits; its exit
        code (negative: the signal that killed it)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env[ENV_SOCKET] = str(theirs.fileno())
        env[ENV_FDS] = json.dumps(self.held)
        env[ENV_GENERATION] = str(self.generation)
        pass_fds = [theirs.fileno(), *self.held.values()]
        if self.ready_fd is not None:
            env[ENV_READY] = str(self.ready_fd)
            pass_fds.append(self.ready_fd)
        for fd in pass_fds:  # what the daemon inherits; every other fd is close-on-exec
            os.set_inheritable(fd, True)
        pid = os.posix_spawn(self.argv[0], self.argv, env)
        theirs.close()
        for fd in self.held.values():
            os.set_inheritable(fd, False)
        if self.ready_fd is not None:  # only the first daemon says it is ready
            os.close(self.ready_fd)
            self.ready_fd = None
        pidfd = os.pidfd_open(pid)
        try:
            while True:
                if self.stop_signal:
                    os.kill(pid, self.stop_signal)
                    self.stop_signal = 0
                if self.restart:
                    os.kill(pid, signal.SIGKILL)  # the new daemon takes over whatever it left
                    os.waitpid(pid, 0)
                    return -signal.SIGKILL
                ready, _, _ = select.select([mine.fileno(), pidfd, wake_r], [], [])
                if wake_r in ready:
                    try:
                        while os.read(wake_r, 64):
                            pass
                    except BlockingIOError:
                        pass
                if mine.fileno() in ready:
                    self._message(mine)
                if pidfd in ready:
                    while self._message(mine, block=False):
                        pass  # what it said before it died still counts
                    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        finally:
            os.close(pidfd)
            mine.close()

    def _message(self, sock: socket.socket, block: bool = True) -> bool:
        """Serve one message from the daemon; False if there was none."""
        try:
            msg, anc, _, _ = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(4 * 4),
                                          0 if block else socket.MSG_DONTWAIT)
        except (BlockingIOError, ConnectionResetError):
            return False
        if not msg:
            return False
        got = [fd for level, kind, data in anc if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
               for fd in array.array("i", data[:len(data) - len(data) % 4])]
        for fd in got:
            os.set_inheritable(fd, False)  # passed on to a daemon only when one starts
        verb, _, name = msg.decode(errors="replace").partition(" ")
        if verb == "put" and len(got) == 1:
            old = self.held.pop(name, None)
            if old is not None:
                os.close(old)
            self.held[name] = got[0]
        elif verb == "drop":
            old = self.held.pop(name, None)
            if old is not None:
                os.close(old)
        else:
            for fd in got:
                os.close(fd)
            _log(f"unknown message {msg[:60]!r}")
        try:
            sock.send(b"ok")
        except OSError:
            pass
        return True


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def supervise(argv: list[str], ready_fd: int | None = None, pidfile: str | None = None) -> int:
    """Run the daemon command ``argv`` under a supervisor (this process)
    until it unmounts; returns the exit status."""
    return Supervisor(argv, ready_fd, pidfile).run()


def command(daemon: list[str], ready_fd: int | None, pidfile: str) -> list[str]:
    """The command line of a supervisor that runs ``daemon``: a fresh
    interpreter without ``site`` (a third less memory than one that loaded
    the command line's modules), which finds this package where it is now."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.path.insert(0, {pkg_parent!r}); "
            "from vswapfs._supervisor import main; sys.exit(main(sys.argv[1:]))")
    ready = [] if ready_fd is None else ["--ready-fd", str(ready_fd)]
    return [sys.executable, "-P", "-S", "-c", code, "--pidfile", pidfile, *ready, "--", *daemon]


def main(argv: list[str]) -> int:
    """``--pidfile P [--ready-fd N] -- DAEMON...`` (see :func:`command`)."""
    sep = argv.index("--")
    opts, daemon = argv[:sep], argv[sep + 1:]
    values = dict(zip(opts[::2], opts[1::2], strict=True))
    ready = values.get("--ready-fd")
    return supervise(daemon, int(ready) if ready is not None else None, values["--pidfile"])
