"""Bring a vswapfs swap up and down: mount, loop, mkswap, swapon and back.

Every step that changes the machine is undone if a later one fails, and
``down`` tears down in the only safe order: swapoff, detach the loop,
unmount, wait for the daemon.  If swapoff fails (not enough memory to take
the pages back), ``down`` stops there and leaves everything working.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import linux, zswap
from ._consts import FSTYPE, PAGE
from ._sizing import mount_warnings
from ._units import human

RUN_DIR = Path("/run/vswapfs")
ZSWAP_STATE = RUN_DIR / "zswap.json"  # zswap's settings as found, and the mounts that want it
IMAGE = "swap"


# What swapon costs the kernel, whatever the area will hold: per 4 KiB slot one
# byte of swap_map, two of swap_cgroup and a share of the cluster table,
# vmalloc'ed at swapon and kept until swapoff (VmallocUsed grew by 3.0 bytes a
# slot for 64 GiB here, 3.19 for 1 and 4 TiB: `python3 -m
# vswapfs_lab.swapon_cost`). The daemon holds nothing for capacity never
# written; the kernel's arrays stay static until the in-kernel virtual swap
# space makes them dynamic.
SWAPON_TENTHS_PER_SLOT = 32  # 3.2 bytes a slot, in tenths
SWAPON_WARN_SHARE = 0.01  # of RAM: above this, up says what the area costs the kernel


class AdminError(Exception):
    """A failure the user gets as one clear line."""


def canonical(path: str) -> str:
    """``path`` with its parent's symlinks resolved, without a system call on
    ``path`` itself: on a mount with a hung daemon, stat(2) would hang."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def mounts() -> list[str]:
    """Mount points of vswapfs file systems."""
    return [mnt for mnt, fstype in linux.mount_table() if fstype == f"fuse.{FSTYPE}"]


def mount_type(path: str) -> str | None:
    """File system type mounted exactly at ``path`` (the last one), or None."""
    path = canonical(path)
    found = None
    for mnt, fstype in linux.mount_table():
        if mnt == path:
            found = fstype
    return found


def require_mount(mnt: str) -> None:
    """Raise AdminError unless a vswapfs file system is mounted at ``mnt``."""
    kind = mount_type(mnt)
    if kind != f"fuse.{FSTYPE}":
        raise AdminError(f"{mnt}: not a vswapfs mount" + (f" ({kind})" if kind else ""))


def image_of(mnt: str) -> str:
    return os.path.join(canonical(mnt), IMAGE)


def loops_of(mnt: str) -> list[str]:
    """Loop devices attached to files of the mount ``mnt``."""
    return linux.loop_devices(canonical(mnt))


def swaps() -> list[str]:
    """Devices swap is on."""
    return list(linux.swap_areas())


def _run(cmd: Sequence[str]) -> str:
    r = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if r.returncode:
        raise AdminError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def check_root() -> None:
    if os.geteuid() != 0:
        raise AdminError("must be run as root (mount, losetup and swapon need it)")


def log_path(mnt: str) -> Path:
    name = canonical(mnt).strip("/").replace("/", "-") or "root"
    return RUN_DIR / f"{name}.log"


def check_mountpoint(mnt: str) -> None:
    if not os.path.isdir(mnt):
        raise AdminError(f"{mnt}: mount point does not exist or is not a directory")
    kind = mount_type(mnt)
    if kind is not None:
        raise AdminError(f"{mnt}: mount point is busy ({kind} is mounted there)")
    if not os.path.exists("/dev/fuse"):
        raise AdminError("/dev/fuse is missing (modprobe fuse)")


def start_daemon(mnt: str, args: Sequence[str], timeout: float = 30.0) -> int:
    """Start a detached daemon for ``mnt``; return its pid once mounted."""
    check_root()
    check_mountpoint(mnt)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    log = log_path(mnt)
    r, w = os.pipe()
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "vswapfs", "mount", mnt, *args, "--foreground",
             "--ready-fd", str(w)],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w,), start_new_session=True)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        ready = pipe.readline()  # EOF if the daemon died
    if ready != b"ready\n":
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise AdminError(f"daemon for {mnt} did not start: " + (" | ".join(tail) or "no log"))
    return proc.pid


def supervisor_pidfile(mnt: str) -> Path:
    """Where the supervisor of ``mnt`` writes its pid."""
    return log_path(mnt).with_suffix(".supervisor")


def supervisor_pid(mnt: str) -> int | None:
    """The pid of the supervisor of ``mnt``, if one runs (its pid file names
    a live process that is one)."""
    try:
        pid = int(supervisor_pidfile(mnt).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"vswapfs._supervisor" in b" ".join(cmdline) else None


def restart(mnt: str, timeout: float = 30.0) -> str:
    """Replace the daemon of ``mnt`` with a new process, which takes the
    swapped-out pages over (swap stays on); returns what happened once the
    new daemon answers."""
    check_root()
    require_mount(mnt)
    sup = supervisor_pid(mnt)
    if sup is None:
        raise AdminError(f"{mnt}: no supervisor runs for it (mounted with --no-supervisor?): "
                         "a restart would lose the swapped-out pages")
    old = daemon_pid_alive(mnt)
    t0 = time.monotonic()
    os.kill(sup, signal.SIGHUP)
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        new = daemon_pid_alive(mnt)
        if new is not None and new != old:
            version = Path(mnt, "control", "version").read_text().strip()
            return (f"{mnt}: daemon {old or '?'} replaced by {new} (version {version}) in "
                    f"{time.monotonic() - t0:.2f} s")
        time.sleep(0.05)
    raise AdminError(f"{mnt}: no new daemon answered within {timeout:.0f} s (see {log_path(mnt)})")


def daemon_pid(mnt: str) -> int | None:
    try:
        return int(Path(mnt, "control", "pid").read_text())
    except (OSError, ValueError):
        return None


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return False


def loop_attrs(dev: str) -> tuple[str, str]:
    """(loop/dio, queue/discard_max_bytes) of a loop device."""
    name = os.path.basename(dev)
    dio = Path(f"/sys/block/{name}/loop/dio").read_text().strip()
    discard = Path(f"/sys/block/{name}/queue/discard_max_bytes").read_text().strip()
    return dio, discard


def attach_loop(mnt: str) -> str:
    """Attach the image of ``mnt`` to a direct-I/O loop device with 4 KiB
    sectors, check that direct I/O and discard took, return the device."""
    dev = _run(["losetup", "--find", "--show", "--direct-io=on", "--sector-size", "4096",
                image_of(mnt)]).strip()
    try:
        # No writeback throttling on this queue: a daemon thread that ends up
        # in reclaim must not wait for I/O that only the daemon can finish.
        Path(f"/sys/block/{os.path.basename(dev)}/queue/wbt_lat_usec").write_text("0")
        dio, discard = loop_attrs(dev)
        if dio != "1":
            raise AdminError(f"{dev}: the kernel did not enable direct I/O (loop/dio={dio})")
        if discard in ("", "0"):
            raise AdminError(f"{dev}: the loop device offers no discard, freed swap would never "
                             "return memory")
    except BaseException:
        subprocess.run(["losetup", "-d", dev], check=False)
        raise
    return dev


def claim_zswap(mnt: str, values: dict[str, str]) -> None:
    """Put zswap in front (``values`` from ``zswap.wanted``), recording what
    it was; ``down`` (or the daemon's exit) puts it back."""
    try:
        zswap.claim(ZSWAP_STATE, canonical(mnt), values)
    except zswap.ZswapError as e:
        raise AdminError(str(e)) from None


def release_zswap(mnt: str) -> str | None:
    """``mnt`` no longer wants zswap; returns a line saying what was restored."""
    try:
        old = zswap.release(ZSWAP_STATE, canonical(mnt), alive=set(mounts()))
    except zswap.ZswapError as e:
        return f"zswap could not be restored: {e}"
    if old is None:
        return None
    return "zswap restored: " + " ".join(f"{k}={v}" for k, v in old.items())


def up(mnt: str, mount_args: Sequence[str] = (), priority: int | None = None,
       zswap_values: dict[str, str] | None = None) -> str:
    """Mount if needed, attach a direct-I/O loop, mkswap, put zswap in front
    if ``zswap_values`` ask for it, swapon --discard (once+pages); returns
    the loop device.  On failure everything done here is undone."""
    check_root()
    kind = mount_type(mnt)
    mounted_here = False
    if kind is None:
        start_daemon(mnt, mount_args)
        mounted_here = True
    elif kind != f"fuse.{FSTYPE}":
        raise AdminError(f"{mnt}: {kind} is mounted there, not vswapfs")
    elif mount_args:
        raise AdminError(f"{mnt} is already mounted: mount options cannot change; "
                         "use its control files")
    dev = None
    swapped = False
    try:
        in_use = loops_of(mnt)
        if in_use:
            raise AdminError(f"{mnt} is already up on {', '.join(in_use)}")
        dev = attach_loop(mnt)
        _run(["mkswap", "-L", "vswapfs", dev])
        if zswap_values is not None:
            claim_zswap(mnt, zswap_values)
        # --discard: once (the whole area at swapon) and pages (each freed cluster)
        cmd = ["swapon", "--discard"] + (["-p", str(priority)] if priority is not None else [])
        image_bytes = os.stat(image_of(mnt)).st_size
        s = status(mnt)  # before swapon: a daemon that does not answer fails up here, undone
        try:
            _run([*cmd, dev])
        except AdminError as e:  # e.g. ENOMEM: say what the area would have cost
            hints = area_warnings(image_bytes, None, linux.mem_total())
            raise AdminError("; ".join([str(e), *hints])) from None
        swapped = True
        for w in [*area_warnings(image_bytes, linux.swap_area_sizes().get(dev), linux.mem_total()),
                  *pool_risks(mnt, s)]:
            print(f"vswapfs: warning: {w}", file=sys.stderr)
        return dev
    finally:
        if not swapped:
            if zswap_values is not None:
                release_zswap(mnt)
            if dev is not None:
                subprocess.run(["losetup", "-d", dev], check=False)
            if mounted_here:
                _unmount_and_wait(mnt)


def swapon_cost(area_bytes: int) -> int:
    """Bytes of kernel memory swapon takes for an area of ``area_bytes``."""
    return area_bytes // PAGE * SWAPON_TENTHS_PER_SLOT // 10


def area_warnings(image_bytes: int, area_kib: int | None, ram: int) -> list[str]:
    """What ``up`` warns of for an image of ``image_bytes`` that the kernel
    swaps on as ``area_kib`` (from /proc/swaps; None before swapon): the
    memory the kernel's per-slot arrays take when that is over
    SWAPON_WARN_SHARE of ``ram``, and an area smaller than the image."""
    usable = image_bytes - PAGE  # the header page
    area = image_bytes if area_kib is None else area_kib * 1024 + PAGE
    out = []
    cost = swapon_cost(area)
    if cost > ram * SWAPON_WARN_SHARE:
        keeps = "would keep" if area_kib is None else "keeps"
        out.append(f"the kernel {keeps} {human(cost)} of RAM ({100 * cost / ram:.1f}%) for this "
                   f"{human(area)} swap area, used or not (about {SWAPON_TENTHS_PER_SLOT / 10} bytes "
                   "a 4 KiB slot: swap_map, swap_cgroup, clusters); a smaller --size costs less")
    if area_kib is not None and area_kib * 1024 < usable:
        out.append(f"the kernel swaps on {human(area)} of the {human(image_bytes)} image (the "
                   "most one swap area takes here): the rest is never used")
    return out


def _unmount_and_wait(mnt: str) -> None:
    pid = daemon_pid(mnt)
    r = subprocess.run(["umount", mnt], capture_output=True, text=True, check=False)
    if r.returncode:
        raise AdminError(f"umount {mnt} failed: {r.stderr.strip()}")
    if pid is not None and not wait_gone(pid):
        raise AdminError(f"daemon {pid} for {mnt} did not exit after unmount")


FUSECTL = Path("/sys/fs/fuse/connections")


def fuse_connection(mnt: str) -> int | None:
    """The FUSE connection number of ``mnt`` (the minor of its device), read
    from mountinfo: stat(2) on the mount would hang with a hung daemon."""
    return linux.mount_devices().get(canonical(mnt))


def abort_connection(mnt: str) -> bool:
    """Abort the FUSE connection of ``mnt`` (its daemon is dead or hung):
    every waiting request fails at once."""
    conn = fuse_connection(mnt)
    if conn is None:
        return False
    if not (FUSECTL / str(conn)).exists():
        subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], capture_output=True, check=False)
    try:
        (FUSECTL / str(conn) / "abort").write_text("1")
    except OSError:
        return False
    return True


def down(mnt: str, force: bool = False) -> list[str]:
    """swapoff, detach the loop, unmount, wait for the daemon; returns what
    was done.  ``force`` also recovers from a dead or hung daemon: it aborts
    the FUSE connection (swapoff then fails fast on pages nobody can read
    back) and unmounts lazily if it must."""
    check_root()
    require_mount(mnt)
    done = []
    pid = daemon_pid_alive(mnt)
    sup = supervisor_pid(mnt)
    if force and pid is None and abort_connection(mnt):
        done.append("aborted the FUSE connection (the daemon does not answer)")
    for dev in loops_of(mnt):
        if dev in swaps():
            r = subprocess.run(["swapoff", dev], capture_output=True, text=True, check=False)
            if r.returncode and not force:
                raise AdminError(f"swapoff {dev} failed: {r.stderr.strip()}; {mnt} stays up "
                                 "(free some memory and retry)")
            done.append(f"swapoff {dev}" + (f" failed: {r.stderr.strip()}" if r.returncode else ""))
        subprocess.run(["losetup", "-d", dev], check=False)
        done.append(f"losetup -d {dev}")
    left = [d for d in loops_of(mnt) if d in swaps()]
    if left:  # never leave a swap area behind its daemon's mount
        raise AdminError(f"swap is still on {', '.join(left)} (swapoff failed); {mnt} stays mounted")
    restored = release_zswap(mnt)
    if restored:
        done.append(restored)
    r = subprocess.run(["umount", mnt], capture_output=True, text=True, check=False)
    if r.returncode:
        if not force:
            raise AdminError(f"umount {mnt} failed: {r.stderr.strip()}")
        abort_connection(mnt)
        subprocess.run(["umount", "-l", mnt], check=False)
    done.append(f"umount {mnt}")
    if pid is not None and not wait_gone(pid):
        raise AdminError(f"daemon {pid} for {mnt} did not exit after unmount")
    if sup is not None and not wait_gone(sup):
        raise AdminError(f"supervisor {sup} of {mnt} did not exit after unmount")
    return done


def daemon_pid_alive(mnt: str) -> int | None:
    """The daemon's pid if it answers (reading control/pid needs it alive)."""
    r = subprocess.run(["timeout", "-s", "KILL", "2", "cat", os.path.join(mnt, "control", "pid")],
                       capture_output=True, text=True, check=False)
    try:
        return int(r.stdout) if r.returncode == 0 else None
    except ValueError:
        return None


def algorithm(mnt: str) -> str:
    """The mount's compressor: the bracketed word of ``control/comp_algorithm``."""
    words = Path(mnt, "control", "comp_algorithm").read_text().split()
    return next((w[1:-1] for w in words if w.startswith("[")), "?")


def backing_paths(mnt: str) -> list[str]:
    """The mount's backing files (``control/backing_files``)."""
    return Path(mnt, "control", "backing_files").read_text().splitlines()


def pool_risks(mnt: str, stats: dict[str, int]) -> list[str]:
    """What ``up`` and ``status`` warn of for the mount whose counters are
    ``stats``: a pool that can fill before the kernel's swap area (see
    ``_sizing``)."""
    return mount_warnings(stats, linux.mem_total(), backing_paths(mnt))


def status(mnt: str) -> dict[str, int]:
    """Every counter and gauge of the mount (``control/stats.json``)."""
    require_mount(mnt)
    try:
        stats: dict[str, int] = json.loads(Path(mnt, "control", "stats.json").read_text())
        return stats
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise AdminError(f"{mnt}: the daemon is gone (use 'vswapfs down --force {mnt}')") from None
        raise


@contextlib.contextmanager
def mounted(mnt: str, mount_args: Sequence[str] = ()) -> Iterator[str]:
    """A vswapfs mount for the duration of a with-block; whatever is on it
    (swap, loop devices) is torn down at the end, also on failure."""
    start_daemon(mnt, mount_args)
    try:
        yield mnt
    finally:
        try:
            down(mnt)
        except AdminError:
            down(mnt, force=True)


@contextlib.contextmanager
def swap_up(mnt: str, mount_args: Sequence[str] = (), priority: int | None = None) -> Iterator[str]:
    """``up`` for the duration of a with-block, ``down`` (forced if need be)
    at its end, also when the block fails."""
    dev = up(mnt, mount_args, priority)
    try:
        yield dev
    finally:
        try:
            down(mnt)
        except AdminError:
            down(mnt, force=True)
