"""Swapped memory survives the daemon: kill -9 under load, and restart.

Real swap on a real mount: a verifying hog holds hundreds of MiB swapped
out through a memory cgroup and keeps faulting pages in and out while the
daemon is killed with SIGKILL, several times, at random moments: while
swap-out writes stream in, and while the kernel discards (a second
process's swap freed at its exit).  The supervisor starts a new daemon
each time, which takes the space over.  The hog must verify every page and
exit 0, ``control/pid`` must name the last new daemon, and the engine's
own consistency check must pass on the state taken over.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root, swap_on

import vswapfs
from vswapfs import admin
from vswapfs.cgroup import MemCgroup

HOG_MIB = 320
LIMIT = 96 << 20


def control(mnt: Path, name: str, timeout: float = 60) -> str:
    """Read a control file; while no daemon serves, the read waits in the
    kernel's queue (a timeout, not a hang, if none ever comes back)."""
    r = subprocess.run(["timeout", "-s", "KILL", str(timeout), "cat", str(mnt / "control" / name)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"control/{name} did not answer within {timeout} s: {r.stderr}"
    return r.stdout.strip()


def fuse_count(mnt: Path, opcode: str) -> int:
    for line in control(mnt, "fuse_stat").splitlines():
        parts = line.split()
        if parts and parts[0] == opcode:
            return int(parts[1])
    return 0


def kill_daemon(mnt: Path) -> tuple[int, float]:
    """SIGKILL the daemon; returns (its pid, seconds until a new one answered)."""
    pid = int(control(mnt, "pid"))
    t0 = time.monotonic()
    os.kill(pid, 9)
    new = int(control(mnt, "pid"))  # queued until the next daemon takes over
    stall = time.monotonic() - t0
    assert new != pid
    return pid, stall


@pytest.fixture
def swap() -> Iterator[Path]:
    for mnt, _ in swap_on(["--size", "2G"]):
        yield mnt


def start_hog(cg: MemCgroup, mib: int, seconds: float, seed: int) -> subprocess.Popen[bytes]:
    return cg.popen([sys.executable, "-m", "vswapfs.workload", "--mib", str(mib), "--pattern", "mix",
                     "--duration", str(seconds), "--seed", str(seed)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def hog_result(hog: subprocess.Popen[bytes]) -> dict[str, object]:
    out, err = hog.communicate(timeout=600)
    assert hog.returncode == 0, (out + err).decode(errors="replace")[-2000:]
    result: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return result


@needs_root
def test_daemon_killed_again_and_again_under_load_loses_no_page(swap: Path) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    first = int(control(swap, "pid"))
    stalls = []
    with MemCgroup("vswapfs-recovery", LIMIT) as cg:
        hog = start_hog(cg, HOG_MIB, 40, 1)
        time.sleep(3 + rng.random() * 2)
        # while swap-out streams in: writes are being served at the kill.  The hog
        # alternates writing its pages and verifying them (reads only): wait for a
        # moment when WRITEs are coming, then kill at once
        for _ in range(2):
            time.sleep(rng.random())
            deadline = time.monotonic() + 30
            before = fuse_count(swap, "WRITE")
            while (now := fuse_count(swap, "WRITE")) == before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert now > before, "no writes for 30 s: the hog does not swap"
            stalls.append(kill_daemon(swap)[1])
        # while the kernel discards: a second process's swap freed as it exits
        for k in range(2):
            # the kernel discards a cluster only once all its slots are free: a churn
            # whose slots share clusters with the hog's may free none; churn again
            for attempt in range(3):
                before = fuse_count(swap, "FALLOCATE")
                hog_result(start_hog(cg, 96, 0, 10 + 3 * k + attempt))
                deadline = time.monotonic() + 10
                while fuse_count(swap, "FALLOCATE") == before and time.monotonic() < deadline:
                    time.sleep(0.01)
                if fuse_count(swap, "FALLOCATE") > before:
                    break
            assert fuse_count(swap, "FALLOCATE") > before, "no discard came after three churns"
            stalls.append(kill_daemon(swap)[1])
        # and at a random moment, twice in quick succession
        time.sleep(rng.random() * 2)
        stalls.append(kill_daemon(swap)[1])
        stalls.append(kill_daemon(swap)[1])
        result = hog_result(hog)
    assert result["bad"] == 0 and result["verified"] >= HOG_MIB * 256
    assert int(control(swap, "pid")) != first
    assert control(swap, "restarts") == str(len(stalls))
    assert control(swap, "check") == "ok"
    assert int(control(swap, "recovery_lost_pages")) == 0
    assert int(control(swap, "recovered_pages")) > 0
    print(f"stalls after kill -9: {', '.join(f'{s:.2f}' for s in stalls)} s")


@needs_root
def test_restart_takes_the_new_code_and_loses_nothing(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``vswapfs restart`` replaces the daemon under load with a process
    that runs the code on disk now: the test installs a copy of the
    package, mounts from it, changes its version string, restarts."""
    copy = tmp_path / "site"
    shutil.copytree(Path(vswapfs.__file__).parent, copy / "vswapfs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("PYTHONPATH", str(copy))
    for mnt, _ in swap_on(["--size", "2G"]):
        assert control(mnt, "version") == vswapfs._consts.VERSION
        old = int(control(mnt, "pid"))
        (mnt / "control" / "pool_limit").write_text("512M")  # tuned: the new daemon keeps it
        with MemCgroup("vswapfs-restart", LIMIT) as cg:
            hog = start_hog(cg, HOG_MIB, 25, 3)
            time.sleep(6)  # pages stored first with lz4 (the default) ...
            (mnt / "control" / "first_comp_algorithm").write_text("zstd")  # ... the rest with zstd
            consts = copy / "vswapfs" / "_consts.py"
            consts.write_text(consts.read_text().replace(
                f'VERSION: Final = "{vswapfs._consts.VERSION}"', 'VERSION: Final = "9.9.9-restart-test"'))
            r = subprocess.run([sys.executable, "-m", "vswapfs", "restart", str(mnt)],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            assert "9.9.9-restart-test" in r.stdout
            result = hog_result(hog)
        assert result["bad"] == 0 and result["verified"] >= HOG_MIB * 256
        assert control(mnt, "version") == "9.9.9-restart-test"
        assert int(control(mnt, "pid")) != old and control(mnt, "restarts") == "1"
        assert control(mnt, "check") == "ok"
        assert control(mnt, "pool_limit") == str(512 << 20)
        assert control(mnt, "first_comp_algorithm") == "lz4 [zstd]"


@needs_root
def test_restart_refuses_a_mount_without_supervisor(mountpoint: Path) -> None:
    admin.start_daemon(str(mountpoint), ["--size", "64M", "--no-supervisor"])
    r = subprocess.run([sys.executable, "-m", "vswapfs", "restart", str(mountpoint)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no supervisor" in r.stderr
    assert control(mountpoint, "supervisor_pid") == "0"


@needs_root
def test_a_new_daemon_serves_the_size_the_first_was_made_with(small_fs: Path, mountpoint: Path) -> None:
    """Without --size, the image's size comes from RAM, the pool limit and
    the backing file system's room, which can change under a running mount;
    a daemon that takes over must serve the image the first one made (its
    table covers that many slots, the loop device that many bytes)."""
    admin.start_daemon(str(mountpoint), ["--pool-limit", "16M", "--backing", str(small_fs / "b0")])
    size = int(control(mountpoint, "disksize"))
    vfs = os.statvfs(small_fs)
    room = vfs.f_bavail * vfs.f_frsize + os.stat(small_fs / "b0").st_blocks * 512
    # the pool's 14 MiB and 7/8 of the room on an 8 MiB ext4 (as it was at start: within a block)
    assert abs(size - (14 << 20) - room * 7 // 8) <= 64 << 10 and 3 << 20 < room < 8 << 20, (size, room)
    page = os.urandom(4096)
    fd = os.open(mountpoint / "swap", os.O_RDWR)
    try:
        os.pwrite(fd, page, size - 4096)
    finally:
        os.close(fd)
    (small_fs / "other").write_bytes(os.urandom(3 << 20))  # the room shrinks
    os.sync()
    kill_daemon(mountpoint)
    assert int(control(mountpoint, "disksize")) == size
    assert (mountpoint / "swap").stat().st_size == size
    fd = os.open(mountpoint / "swap", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, size - 4096) == page
    finally:
        os.close(fd)
    assert control(mountpoint, "restarts") == "1" and control(mountpoint, "check") == "ok"
