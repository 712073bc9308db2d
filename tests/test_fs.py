"""The vswapfs file system through a real FUSE mount."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import classes_apart, needs_root, stats

from vswapfs import PAGE, MiB, _build, admin, linux

pytestmark = needs_root



def test_layout_and_private_image(mnt: Path) -> None:
    assert sorted(os.listdir(mnt)) == ["control", "swap"]
    st = os.stat(mnt / "swap")
    assert st.st_size == 64 * MiB and st.st_mode & 0o777 == 0o600 and st.st_blocks == 0
    assert admin.mount_type(str(mnt)) == "fuse.vswapfs"
    vfs = os.statvfs(mnt)
    assert vfs.f_bsize == PAGE and vfs.f_blocks == 64 * MiB // PAGE


def test_pwrite_pread_aligned_unaligned_and_across_clusters(any_mnt: Path) -> None:
    mnt = any_mnt
    fd = os.open(mnt / "swap", os.O_RDWR)
    try:
        cases = [(0, os.urandom(PAGE)), (1024, b"\xee" * 1024), (2 * MiB - 1000, os.urandom(5000)),
                 (3 * MiB + 7, b"unaligned" * 1000), (10 * MiB, os.urandom(1 * MiB))]
        model = bytearray(16 * MiB)
        for off, data in cases:
            assert os.pwrite(fd, data, off) == len(data)
            model[off:off + len(data)] = data
        for off, data in cases:
            start, n = max(off - 1500, 0), len(data) + 3000
            assert os.pread(fd, n, start) == model[start:start + n]
        assert os.pread(fd, 16 * MiB, 0) == model
        assert stats(mnt)["clusters"] == 3  # clusters 0, 1 and 5 (2 MiB each)
    finally:
        os.close(fd)


def test_a_burst_of_large_writes_after_an_idle_spell_is_stored_not_refused(mnt: Path) -> None:
    """The kernel's swap writes after an idle spell: 128 and 256 pages at
    once (reclaim's batches, large folios), each page in a pool size class
    of its own, so each needs a new chunk, more than the 32 spares an idle
    daemon keeps.  Each write waits for housekeeping's refill and is stored:
    none is refused (ENOSPC, which the kernel logs as a swap write error),
    and every page reads back.  Before, each was refused, every time."""
    fd = os.open(mnt / "swap", os.O_RDWR | os.O_DIRECT)
    try:
        written = []
        for k, n in enumerate((128, 256, 128, 256)):
            time.sleep(0.6)  # idle: the daemon gives its spares back to the low mark
            buf = mmap.mmap(-1, n * PAGE)  # page-aligned, as O_DIRECT wants
            buf[:] = classes_apart(n, seed=k)
            off = (k * 2 + 1) * MiB
            assert os.pwrite(fd, buf, off) == n * PAGE
            written.append((off, buf))
        st = stats(mnt)
        assert st["failed_writes"] == 0 and st["spare_waits"] >= 1
        for off, buf in written:
            assert os.pread(fd, len(buf), off) == buf[:]
    finally:
        os.close(fd)


def test_read_past_end_is_eof_and_write_past_end_is_enospc(any_mnt: Path) -> None:
    mnt = any_mnt
    fd = os.open(mnt / "swap", os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * PAGE, 64 * MiB - PAGE)
        assert os.pread(fd, 3 * PAGE, 64 * MiB - PAGE) == b"x" * PAGE  # short read at EOF
        assert os.pread(fd, PAGE, 64 * MiB + PAGE) == b""
        assert os.pwrite(fd, b"y" * 3 * PAGE, 64 * MiB - PAGE) == PAGE  # short write to the end
        with pytest.raises(OSError) as err:
            os.pwrite(fd, b"z", 64 * MiB)
        assert err.value.errno in (errno.ENOSPC, errno.EFBIG)
        assert os.pread(fd, PAGE, 64 * MiB - PAGE) == b"y" * PAGE
    finally:
        os.close(fd)


def test_punch_hole_frees_pages_and_reads_zero(any_mnt: Path) -> None:
    mnt = any_mnt
    fd = os.open(mnt / "swap", os.O_RDWR)
    try:
        data = b"".join((b"page %d " % i * 600)[:PAGE] for i in range(1024))
        os.pwrite(fd, data, 0)
        assert stats(mnt)["stored_pages"] == 1024
        linux.punch_hole(fd, 100 * PAGE + 10, 200 * PAGE)
        expect = bytearray(data)
        expect[100 * PAGE + 10:300 * PAGE + 10] = bytes(200 * PAGE)
        assert os.pread(fd, len(data), 0) == expect
        s = stats(mnt)
        assert s["notify_free"] == 199 and s["stored_pages"] == 1024 - 199
        linux.punch_hole(fd, 0, 64 * MiB)
        s = stats(mnt)
        assert s["stored_pages"] == 0 and s["clusters"] == 0 and s["mem_used_total"] == 0
        with pytest.raises(OSError) as err:
            linux.fallocate(fd, 0, 0, PAGE)  # preallocation: not supported
        assert err.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)


def test_stat_files_have_zram_columns_and_prometheus_format(mnt: Path) -> None:
    fd = os.open(mnt / "swap", os.O_RDWR)
    os.pwrite(fd, os.urandom(PAGE) + bytes(PAGE) + b"a" * PAGE, 0)
    os.close(fd)
    c = mnt / "control"
    mm = [int(x) for x in (c / "mm_stat").read_text().split()]
    assert len(mm) == 9 and mm[0] == 3 * PAGE and mm[5] == 2  # orig_data_size, same_pages
    assert len((c / "io_stat").read_text().split()) == 7
    assert len((c / "bd_stat").read_text().split()) == 3
    s = stats(mnt)
    for key in ("stored_pages", "zero_pages", "pool_pages", "phys_pages", "orig_data_size",
                "compr_data_size", "mem_used_total", "notify_free", "clusters"):
        assert key in s
        assert int((c / key).read_text()) == s[key]
    metrics = (c / "metrics").read_text()
    assert "# TYPE vswapfs_notify_free counter" in metrics
    assert "vswapfs_stored_pages 3" in metrics
    # and what the transport answered: the pwrite above was one WRITE of three pages
    assert "# TYPE vswapfs_fuse_requests_total counter" in metrics
    assert 'vswapfs_fuse_requests_total{op="WRITE"} 1\n' in metrics
    assert f'vswapfs_fuse_bytes_total{{op="WRITE"}} {3 * PAGE}\n' in metrics
    busy = float(metrics.split('vswapfs_fuse_busy_seconds_total{op="WRITE"} ')[1].split()[0])
    assert 0 < busy < 1


def test_fuse_stat_counts_each_opcode_its_data_and_the_time_spent(any_mnt: Path) -> None:
    """Ten one-page writes and ten reads of the image: each is one request
    (the image is direct I/O), counted with its data and its service time;
    the columns are name, requests, bytes, busy µs, mean µs."""
    def rows() -> dict[str, tuple[int, int, int, float]]:
        out = {}
        for line in (any_mnt / "control" / "fuse_stat").read_text().splitlines():
            name, n, data, busy, mean = line.split()
            out[name] = (int(n), int(data), int(busy), float(mean))
        return out

    before = rows()  # its content is taken at open, after the lookups that led to it
    assert before["LOOKUP"][0] >= 2 and "WRITE" not in before  # control, then fuse_stat
    fd = os.open(any_mnt / "swap", os.O_RDWR)
    try:
        for i in range(10):
            os.pwrite(fd, bytes([i + 1]) * PAGE, i * PAGE)
        for i in range(10):
            assert os.pread(fd, PAGE, i * PAGE) == bytes([i + 1]) * PAGE
    finally:
        os.close(fd)
    read_before = before.get("READ", (0, 0, 0, 0.0))
    after, deadline = rows(), time.monotonic() + 10
    # a channel thread tallies a request just after its reply: the last may land a moment later
    while (after.get("WRITE", (0,))[0] < 10 or after["READ"][0] - read_before[0] < 10) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
        after = rows()
    assert after["WRITE"][:2] == (10, 10 * PAGE) and after["WRITE"][2] > 0
    assert after["READ"][0] - read_before[0] >= 10  # and the first read of fuse_stat
    assert after["READ"][1] - read_before[1] >= 10 * PAGE
    assert after["OPEN"][0] >= 2  # the image, and fuse_stat the first time
    for name, (n, _, busy, mean) in after.items():
        assert n > 0 and busy >= 0 and mean * n == pytest.approx(busy, abs=n), name


def write_control(path: Path, value: str) -> int:
    """Write like `echo value > path`; returns 0 or the errno."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
        return 0
    except OSError as e:
        return e.errno or -1


@pytest.mark.parametrize(("knob", "good", "expect"), [
    ("pool_limit", "64M", "67108864"), ("pool_limit", "0", "0"),
    ("compression_level", "3", "3"), ("compression_level", "-5", "-5"),
    ("first_compression_level", "-3", "-3"),
    ("first_comp_algorithm", "zstd", "lz4 [zstd]"), ("first_comp_algorithm", "lz4", "[lz4] zstd"),
    ("accept_threshold_percent", "80", "80"), ("huge_threshold", "2048", "2048"),
    ("writeback_enabled", "0", "0"),
])
def test_knobs_take_good_values(mnt: Path, knob: str, good: str, expect: str) -> None:
    assert write_control(mnt / "control" / knob, good + "\n") == 0
    assert (mnt / "control" / knob).read_text().strip() == expect


@pytest.mark.parametrize(("knob", "bad"), [
    ("pool_limit", "garbage"), ("pool_limit", "-1"), ("pool_limit", "12Q"), ("pool_limit", "101%"),
    ("pool_limit", "9" * 40), ("compression_level", "0"), ("compression_level", "99"),
    ("compression_level", "1.5"), ("first_compression_level", "0"),
    ("first_compression_level", "-101"), ("first_comp_algorithm", "gzip"),
    ("accept_threshold_percent", "0"), ("huge_threshold", "5000"),
    ("writeback_enabled", "maybe"), ("writeback", "-3"), ("writeback", "lots"),
    ("add_backing", "relative/path"), ("evacuate", "/not/a/backing/file"), ("mm_stat", "1"),
    ("pool_limit", "\xff"),
])
def test_bad_values_get_einval_and_change_nothing(mnt: Path, knob: str, bad: str) -> None:
    before = {k: (mnt / "control" / k).read_text() for k in
              ("pool_limit", "compression_level", "first_compression_level", "first_comp_algorithm",
               "accept_threshold_percent",
               "huge_threshold",
               "writeback_enabled", "backing_files")}
    assert write_control(mnt / "control" / knob, bad) in (errno.EINVAL, errno.ENOENT, errno.ENODEV)
    after = {k: (mnt / "control" / k).read_text() for k in before}
    assert after == before


def test_actions_add_backing_writeback_evacuate_compact(mnt: Path, tmp_path: Path) -> None:
    c = mnt / "control"
    fd = os.open(mnt / "swap", os.O_RDWR)
    data = b"".join((b"%d compressible " % i * 300)[:PAGE] for i in range(2048))
    os.pwrite(fd, data, 0)
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    assert write_control(c / "add_backing", str(a)) == 0
    assert write_control(c / "add_backing", str(a)) == errno.EEXIST
    assert (c / "backing_files").read_text() == f"{a}\n"
    assert oct(os.stat(a).st_mode & 0o777) == "0o600"
    assert write_control(c / "writeback", "100") == 0
    assert stats(mnt)["phys_pages"] == 100
    assert write_control(c / "writeback", "all") == 0
    assert stats(mnt)["phys_pages"] == 2048 and stats(mnt)["pool_pages"] == 0
    assert write_control(c / "add_backing", str(b)) == 0
    assert write_control(c / "evacuate", str(a)) == 0
    assert not a.exists() and stats(mnt)["evacuated_pages"] == 2048
    assert write_control(c / "evacuate", str(b)) == 0  # back into the pool
    assert stats(mnt)["phys_pages"] == 0 and stats(mnt)["pool_pages"] == 2048
    assert write_control(c / "compact", "1") == 0
    assert os.pread(fd, len(data), 0) == data
    os.close(fd)


UNPRIVILEGED = """
import errno, os, sys
os.setgid(65534); os.setuid(65534)
out = []
for path, flags in ((sys.argv[1] + "/swap", os.O_RDONLY), (sys.argv[1] + "/control/pool_limit", os.O_WRONLY)):
    try:
        os.close(os.open(path, flags)); out.append("opened")
    except OSError as e:
        out.append(errno.errorcode[e.errno])
print(" ".join(out))
"""


def test_unprivileged_user_cannot_read_image_or_write_knobs(mnt: Path) -> None:
    r = subprocess.run([sys.executable, "-c", UNPRIVILEGED, str(mnt)], capture_output=True, text=True)
    assert r.stdout.split() == ["EACCES", "EACCES"], r.stderr


def test_unmount_ends_the_daemon_and_its_supervisor(tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    sup = admin.start_daemon(str(mnt), ["--size", "16M"])
    pid = admin.daemon_pid(str(mnt))
    assert admin.supervisor_pid(str(mnt)) == sup and pid is not None and pid != sup
    assert (mnt / "control" / "supervisor_pid").read_text() == f"{sup}\n"
    assert (mnt / "control" / "build").read_text() == f"{_build.kind()}\n"  # what it runs
    assert admin.down(str(mnt)) == [f"umount {mnt}"]
    assert admin.mount_type(str(mnt)) is None
    for p in (pid, sup):
        with pytest.raises(ProcessLookupError):
            os.kill(p, 0)
    assert not admin.supervisor_pidfile(str(mnt)).exists()


def test_lz4_mount_says_so_keeps_data_and_refuses_a_level() -> None:
    """``--algorithm lz4``: comp_algorithm, ``status`` and the data agree;
    compression_level, a zstd knob, reads 0 and takes nothing."""
    from conftest import _mount

    gen = _mount(["--size", "64M", "--algorithm", "lz4"])
    mnt = next(gen)
    try:
        c = mnt / "control"
        assert (c / "comp_algorithm").read_text() == "zstd [lz4]\n"
        assert (c / "compression_level").read_text() == "0\n"
        assert write_control(c / "compression_level", "3") == errno.EINVAL
        data = b"".join(((b"lz4 page %d " % i) * 400)[:PAGE] for i in range(64))
        fd = os.open(mnt / "swap", os.O_RDWR)
        try:
            os.pwrite(fd, data, 0)
            assert os.pread(fd, len(data), 0) == data
        finally:
            os.close(fd)
        s = stats(mnt)
        assert s["pool_pages"] == 64 and s["compr_data_size"] < len(data) // 4
        out = subprocess.run([sys.executable, "-m", "vswapfs", "status", str(mnt)],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        header, row = out[0].split(), out[1].split()
        assert row[header.index("ALGORITHM")] == "lz4"
    finally:
        gen.close()
