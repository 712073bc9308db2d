"""Faults against the real mount: backing-file I/O errors, a full backing
file system, a full pool, a killed daemon.  Nothing stored may be lost, and
every fault is counted."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _mount, needs_root, stats, swap_on

from vswapfs import PAGE, MiB, admin
from vswapfs.cgroup import MemCgroup

pytestmark = needs_root



@pytest.fixture
def backed_on_faultfs(faultfs: Path) -> Iterator[tuple[Path, Path]]:
    """vswapfs whose backing file lives on the fault-injecting file system."""
    for mnt in _mount(["--size", "64M", "--backing", str(faultfs / "backing0")]):
        yield mnt, faultfs


def arm(faultfs: Path, line: str) -> None:
    with open(faultfs / ".faults", "w") as f:
        f.write(line + "\n")


def test_backing_read_eio_fails_that_page_only(backed_on_faultfs: tuple[Path, Path]) -> None:
    mnt, ffs = backed_on_faultfs
    pages = [os.urandom(PAGE) for _ in range(64)]  # incompressible: they go to the backing file
    fd = os.open(mnt / "swap", os.O_RDWR)
    try:
        os.pwrite(fd, b"".join(pages), 0)  # one request: physical slots 0..63 in order
        assert stats(mnt)["phys_pages"] == 64
        arm(ffs, f"read EIO {17 * PAGE} {PAGE}")
        for i, p in enumerate(pages):
            if i == 17:
                with pytest.raises(OSError) as err:
                    os.pread(fd, PAGE, i * PAGE)
                assert err.value.errno == errno.EIO
            else:
                assert os.pread(fd, PAGE, i * PAGE) == p
        s = stats(mnt)
        assert s["failed_reads"] == 1 and s["bd_read_errors"] == 1 and s["checksum_failures"] == 0
        io = (mnt / "control" / "io_stat").read_text().split()
        assert io[0] == "1" and io[4] == "1"  # failed_reads, bd_read_errors
        arm(ffs, "clear")
        assert os.pread(fd, PAGE, 17 * PAGE) == pages[17]  # the fault was transient: nothing lost
    finally:
        os.close(fd)


def test_backing_write_eio_keeps_pages_in_the_pool(backed_on_faultfs: tuple[Path, Path]) -> None:
    mnt, ffs = backed_on_faultfs
    arm(ffs, "write EIO 0 -1")
    pages = [os.urandom(PAGE) for _ in range(32)]
    fd = os.open(mnt / "swap", os.O_RDWR)
    try:
        os.pwrite(fd, b"".join(pages), 0)
        s = stats(mnt)
        assert s["bd_write_errors"] == 1 and s["phys_pages"] == 0 and s["huge_pages"] == 32
        assert s["failed_writes"] == 0  # the kernel never saw an error
        assert (mnt / "control" / "io_stat").read_text().split()[5] == "1"  # bd_write_errors
        assert os.pread(fd, 32 * PAGE, 0) == b"".join(pages)
        # on-demand writeback fails the same way, and the pages stay put
        text = b"".join((b"%d text " % i * 600)[:PAGE] for i in range(32))
        os.pwrite(fd, text, 32 * PAGE)
        with open(mnt / "control" / "writeback", "w") as f:
            f.write("all")
        s = stats(mnt)
        assert s["bd_write_errors"] == 2 and s["pool_pages"] == 64
        assert os.pread(fd, 64 * PAGE, 0) == b"".join(pages) + text
    finally:
        os.close(fd)


@pytest.fixture
def backed_on_small_fs(small_fs: Path) -> Iterator[Path]:
    yield from _mount(["--size", "256M", "--backing", str(small_fs / "backing0")])


def test_full_backing_file_system_keeps_every_page(backed_on_small_fs: Path) -> None:
    mnt = backed_on_small_fs
    data = os.urandom(16 * MiB)  # twice what the 8 MiB ext4 holds
    fd = os.open(mnt / "swap", os.O_RDWR)
    try:
        for off in range(0, len(data), MiB):
            assert os.pwrite(fd, data[off:off + MiB], off) == MiB
        s = stats(mnt)
        assert s["bd_write_errors"] >= 1 and s["phys_pages"] > 0 and s["huge_pages"] > 0
        assert s["phys_pages"] + s["huge_pages"] == 16 * MiB // PAGE
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)


def run_in_cgroup(limit_mib: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    with MemCgroup(f"vswapfs-fault-{os.getpid()}", limit_mib * MiB) as cg:
        proc = cg.popen([sys.executable, "-m", "vswapfs.workload", *args], stdout=-1, stderr=-1)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def swap_with(request: pytest.FixtureRequest) -> Iterator[tuple[Path, str]]:
    yield from swap_on(list(request.param))


@pytest.mark.parametrize("swap_with", [["--size", "1G", "--pool-limit", "8M"]], indirect=True)
def test_pool_limit_without_backing_is_a_clean_out_of_space(swap_with: tuple[Path, str]) -> None:
    mnt, _ = swap_with
    # An image larger than the pool keeps (up warns of it, see the next test).
    # The kernel gets ENOSPC for what does not fit, keeps those pages in RAM and
    # retries them (hundreds of thousands of times, for minutes, until the
    # cgroup's OOM killer acts), so the workload is stopped after 20 s.
    r = run_in_cgroup(32, "--mib", "48", "--mix", "0:1:1", timeout=20)
    s = stats(mnt)
    # it either finished with every page right or was killed (by the OOM killer or us)
    if r.returncode == 0:
        assert json.loads(r.stdout)["bad"] == 0
    else:
        assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-500:]
    assert s["pool_limit_hit"] >= 1 and s["failed_writes"] >= 1
    assert s["mem_used_max"] <= 8 * MiB
    assert admin.daemon_pid_alive(str(mnt)) is not None
    # and swap still works once there is room again
    r = run_in_cgroup(32, "--mib", "40", "--mix", "1:1:0")
    assert r.returncode == 0 and json.loads(r.stdout)["bad"] == 0


def test_without_a_backing_file_the_default_image_fills_before_the_pool_and_nothing_is_refused(
        capfd: pytest.CaptureFixture[str]) -> None:
    """The default size with no backing file is what the pool keeps if no
    page compresses (7/8 of its limit): the kernel's swap area fills first,
    so a hog that does not fit is OOM-killed at once, as with a full zram,
    instead of the kernel retrying refused writes for minutes (the test
    above).  An image larger than that draws a warning from up."""
    for _ in swap_on(["--size", "1G", "--pool-limit", "32M"]):
        err = capfd.readouterr().err
        assert "with no backing file, the pool's 32M keeps 28M of pages that do not compress, " \
               "less than this 1G image" in err, err
    for mnt, _ in swap_on(["--pool-limit", "32M"]):
        assert "no backing file" not in capfd.readouterr().err
        assert stats(mnt)["disksize"] == 28 * MiB
        start = time.monotonic()
        r = run_in_cgroup(32, "--mib", "128", "--mix", "0:0:1", timeout=60)
        took = time.monotonic() - start
        s = stats(mnt)
        # killed by the cgroup's OOM killer well before our timeout would have
        assert r.returncode == -signal.SIGKILL and took < 30, (r.returncode, took)
        assert s["failed_writes"] == 0 and s["pool_limit_hit"] == 0, s
        # the area was used (most of it: the cgroup's OOM killer may act while its last
        # writes are still in flight: 17.4 of its 28 MiB once in CI), the pool never filled
        assert 14 * MiB < s["mem_used_max"] <= 32 * MiB
        # the daemon serves on, every table word consistent with the pool
        assert admin.daemon_pid_alive(str(mnt)) is not None
        assert (mnt / "control" / "check").read_text().strip() == "ok"
        assert stats(mnt)["failed_writes"] == 0


@pytest.mark.parametrize("how", ["no-supervisor", "supervisor-killed-first"])
def test_sigkill_of_a_daemon_nobody_restarts_fails_its_users_and_down_force_recovers(how: str) -> None:
    """What the supervisor prevents (see test_recovery), when there is
    none or it was killed first: the pages die with the daemon, a process
    that needs one dies rather than hangs, and ``down --force`` cleans up."""
    mnt = Path(tempfile.mkdtemp(prefix="vswapfs-kill-"))
    cg = None
    try:
        dev = admin.up(str(mnt), ["--size", "1G"] + (["--no-supervisor"] if how == "no-supervisor" else []))
        pid = admin.daemon_pid(str(mnt))
        assert pid
        sup = admin.supervisor_pid(str(mnt))
        assert (sup is None) == (how == "no-supervisor")
        cg = MemCgroup(f"vswapfs-kill-{os.getpid()}", 32 * MiB)
        proc = cg.popen([sys.executable, "-m", "vswapfs.workload", "--mib", "96", "--hold"],
                        stdin=-1, stdout=-1, stderr=-1)
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == b"filled\n"
        assert stats(mnt)["stored_pages"] > 8 * MiB // PAGE
        if sup is not None:
            os.kill(sup, signal.SIGKILL)
            assert admin.wait_gone(sup, 10)
        os.kill(pid, signal.SIGKILL)
        assert admin.wait_gone(pid, 10)
        t0 = time.monotonic()
        try:  # it may already be dead: its own interpreter pages were swapped out too
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        proc.wait(60)  # it touches swapped-out pages nobody can serve: it must die, not hang
        assert proc.returncode != 0 and time.monotonic() - t0 < 60
        with pytest.raises(admin.AdminError):
            admin.status(str(mnt))
        done = admin.down(str(mnt), force=True)
        assert any("umount" in d for d in done)
        assert dev not in admin.swaps() and admin.loops_of(str(mnt)) == []
        assert admin.mount_type(str(mnt)) is None
    finally:
        if cg is not None:
            cg.close()
        if admin.mount_type(str(mnt)):
            admin.down(str(mnt), force=True)
        mnt.rmdir()


def test_daemon_sharing_a_memory_cgroup_with_its_hog_faults_nothing_and_never_hangs() -> None:
    """The daemon (with --reserve) and a hog in one full memory cgroup: the
    hog swaps through the daemon and verifies every page, the daemon takes
    no page fault while serving, and nothing hangs (a hang is aborted and
    fails the check, see checks.same_cgroup)."""
    from vswapfs_lab import checks

    r = checks.same_cgroup(reserve_mib=64, limit_mib=320, hog_mib=384, seconds=240, rounds=2)
    assert r["ok"], r
    assert not r["hung"] and r["daemon_in_cgroup"] and r["bad"] == 0
    assert r["daemon_faults_while_serving"] == 0 and r["daemon_rss_growth_kib"] <= 0
    assert r["stats"]["notify_free"] > 50_000  # type: ignore[index]  # ~200 MiB really went through swap
    assert admin.mounts() == []


def test_default_daemon_in_its_hogs_cgroup_ten_runs_in_a_row_never_hangs() -> None:
    """Issue: with the default options (no --reserve), the daemon in the
    same memory cgroup as a verifying hog that swaps several times the
    limit through it.  Ten runs in a row must finish with every page
    right; a hang would be aborted after 240 s and fail the run."""
    from vswapfs_lab import checks

    results = []
    for _ in range(10):
        r = checks.same_cgroup(reserve_mib=0, limit_mib=320, hog_mib=512, seconds=240, rounds=2)
        results.append(r)
        assert r["ok"] and not r["hung"] and r["bad"] == 0, r
        assert r["daemon_in_cgroup"] and r["verified"] == 2 * 512 * 256
        assert r["stats"]["notify_free"] > 100_000  # type: ignore[index]  # it really swapped
    assert admin.mounts() == []
    print("serving-thread faults per run:", [r["serving_thread_faults"] for r in results],
          "daemon faults:", [r["daemon_faults_while_serving"] for r in results],
          "seconds:", [r["seconds"] for r in results],
          "writes refused:", [r["stats"]["failed_writes"] for r in results])  # type: ignore[index]


def test_refused_writes_are_logged_a_few_times_not_each_time(tmp_path: Path) -> None:
    """At the pool limit the kernel retries refused pages relentlessly; the
    log (on tmpfs, in RAM) says so a few times per interval, with a count."""
    for mnt in _mount(["--size", "64M", "--pool-limit", "128K"]):
        log = admin.log_path(str(mnt))
        before = log.read_text().count("refused")
        fd = os.open(mnt / "swap", os.O_RDWR)
        try:
            refused = 0
            for i in range(2000):
                try:
                    os.pwrite(fd, os.urandom(PAGE), (i % 1000) * PAGE)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    refused += 1
        finally:
            os.close(fd)
        assert refused > 1500 and stats(mnt)["failed_writes"] == refused
        time.sleep(0.5)  # the log writer thread
        lines = log.read_text().count("refused") - before
        assert 1 <= lines <= 10, lines


def test_an_aborted_connection_ends_the_daemon_cleanly(tmp_path: Path) -> None:
    """An abort through /sys/fs/fuse/connections makes /dev/fuse reads fail
    with ECONNABORTED: a shutdown, not an error that kills a channel
    thread and leaves the daemon half alive."""
    mnt = tmp_path / "m"
    mnt.mkdir()
    pid = admin.start_daemon(str(mnt), ["--size", "16M", "--channels", "2"])
    try:
        log = admin.log_path(str(mnt))
        start = len(log.read_text())
        assert admin.abort_connection(str(mnt))
        assert admin.wait_gone(pid, 20), "the daemon did not end after the abort"
        text = log.read_text()[start:]
        assert "read from /dev/fuse failed" not in text and "Traceback" not in text, text
    finally:
        if admin.mount_type(str(mnt)):
            admin.down(str(mnt), force=True)


def test_mapping_count_does_not_grow_with_gigabytes_written(tmp_path: Path) -> None:
    """Three GiB written through the image: the pool lives in one mapping,
    so the daemon's mappings (vm.max_map_count caps them) stay put."""
    for mnt in _mount(["--size", "4G"]):
        pid = admin.daemon_pid(str(mnt))
        maps = Path(f"/proc/{pid}/maps")
        before = maps.read_text().count("\n")
        block = b"".join((b"%08d mapping count " % i * 200)[:PAGE] for i in range(256))  # 1 MiB
        fd = os.open(mnt / "swap", os.O_RDWR)
        try:
            for off in range(0, 3 << 30, MiB):
                os.pwrite(fd, block, off)
            assert os.pread(fd, MiB, (3 << 30) - MiB) == block
        finally:
            os.close(fd)
        s = stats(mnt)
        assert s["stored_pages"] == 3 * 256 * 1024 and s["pool_chunks"] > 100
        after = maps.read_text().count("\n")
        assert after - before <= 4, (before, after)


def test_the_default_pool_limit_is_zswaps_20_percent_and_status_shows_it(tmp_path: Path) -> None:
    from vswapfs._units import parse_limit

    for mnt in _mount(["--size", "64M"]):
        assert int((mnt / "control" / "pool_limit").read_text()) == parse_limit("20%")
        out = subprocess.run([sys.executable, "-m", "vswapfs", "status", str(mnt)],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        header, row = out[0].split(), out[1].split()
        assert row[header.index("LIMIT")] != "-"
    for mnt in _mount(["--size", "64M", "--pool-limit", "0"]):
        assert (mnt / "control" / "pool_limit").read_text() == "0\n"
