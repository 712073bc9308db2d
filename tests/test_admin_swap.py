"""Real swap through vswapfs: loop device, mkswap, swapon, a memory cgroup.

A process limited to L MiB writes 3L MiB of mixed pages (zero, text,
random) and verifies every one; the kernel has to swap through vswapfs.
Afterwards the kernel's discards must give the memory back, and ``down``
must leave no swap area, loop device or mount, also when the test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_root, stats, swap_on

from vswapfs import PAGE, MiB, _sizing, admin, linux
from vswapfs._units import human
from vswapfs.cgroup import MemCgroup

pytestmark = needs_root
LIMIT_MIB = 64



@pytest.fixture
def swap_mnt() -> Iterator[tuple[Path, str]]:
    yield from swap_on(["--size", "1G"])


@pytest.fixture(params=["zstd", "lz4"])
def any_codec_swap_mnt(request: pytest.FixtureRequest) -> Iterator[tuple[Path, str]]:
    """swap_mnt with each compressor."""
    yield from swap_on(["--size", "1G", "--algorithm", request.param])


class Sampler(threading.Thread):
    """Polls stats.json, keeping the largest value of each key."""

    def __init__(self, mnt: Path) -> None:
        super().__init__(daemon=True)
        self.mnt, self.peak, self.stop = mnt, {}, threading.Event()  # type: dict[str, int]

    def run(self) -> None:
        while not self.stop.wait(0.1):
            for k, v in stats(self.mnt).items():
                self.peak[k] = max(v, self.peak.get(k, 0))


def run_workload(mib: int, limit_mib: int, *extra: str) -> dict[str, object]:
    with MemCgroup(f"vswapfs-test-{os.getpid()}", limit_mib * MiB) as cg:
        proc = cg.popen([sys.executable, "-m", "vswapfs.workload", "--mib", str(mib), *extra],
                        stdout=-1, stderr=-1)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
        return json.loads(out)


def test_swap_up_checks_direct_io_and_discard(swap_mnt: tuple[Path, str]) -> None:
    mnt, dev = swap_mnt
    assert dev in admin.swaps()
    assert admin.loop_attrs(dev)[0] == "1" and int(admin.loop_attrs(dev)[1]) > 0
    with pytest.raises(admin.AdminError, match="already up"):
        admin.up(str(mnt))


def test_up_of_an_image_past_one_swap_area_warns_of_the_kernels_cost_and_the_cut(
        capfd: pytest.CaptureFixture[str]) -> None:
    """A 20 TiB image: mkswap's header addresses 16 TiB at most and this
    kernel swaps on less; up says so, and says what the kernel's per-slot
    arrays take, which the kernel is seen to allocate at swapon and give
    back at swapoff."""
    before = linux.meminfo("VmallocUsed")
    for _, dev in swap_on(["--size", "20T"]):
        area = linux.swap_area_sizes()[dev] * 1024
        during = linux.meminfo("VmallocUsed")
        err = capfd.readouterr().err
    cost = admin.swapon_cost(area)
    assert area < 16 << 40
    assert f"the kernel swaps on {human(area + 4096)} of the 20T image" in err, err
    assert f"the kernel keeps {human(cost)} of RAM" in err, err
    assert during - before >= 0.8 * cost, (during - before, cost)
    assert linux.meminfo("VmallocUsed") - before < 0.2 * cost


def test_default_size_is_what_the_pool_keeps_raw_unless_a_backing_file_or_no_limit() -> None:
    ram = 24 << 30
    assert _sizing.default_size(ram, 32 << 20, None) == 28 << 20
    assert _sizing.default_size(ram, 4915 << 20, None) % PAGE == 0
    assert _sizing.default_size(ram, 32 << 20, 100 << 30) == 2 * ram  # room for 2x RAM on disk
    # a backing file on a disk with less room: what the pool and 7/8 of the room keep
    assert _sizing.default_size(ram, 32 << 20, 1 << 30) == (28 << 20) + (896 << 20)
    assert _sizing.default_size(ram, 32 << 20, 0) == 28 << 20
    assert _sizing.default_size(ram, 0, None) == ram // 2  # no limit: zram-generator's size
    assert _sizing.default_size(ram, 0, 1 << 30) == ram // 2  # no limit, no writeback: the same
    assert _sizing.bounding_limit(0, 0) == 0
    assert _sizing.bounding_limit(0, 1 << 30) == 1 << 30  # a reserve is its own limit
    assert _sizing.bounding_limit(512 << 20, 1 << 30) == 512 << 20


def test_pool_warnings_with_backing_files_only_when_their_file_systems_lack_room() -> None:
    ram, holds = 24 << 30, 28 * MiB  # a 32 MiB pool
    assert _sizing.pool_warnings(1 << 30, 32 * MiB, 1, ram, room=None) == []  # not known
    assert _sizing.pool_warnings(1 << 30, 32 * MiB, 2, ram, room=(1 << 30) - holds) == []
    (w,) = _sizing.pool_warnings(1 << 30, 32 * MiB, 2, ram, room=(1 << 30) - holds - MiB)
    assert w.startswith("the pool's 32M keeps 28M of pages that do not compress and the backing "
                        "files' file systems have room for 995M"), w
    assert "free 1M or more there" in w and "with no backing file" not in w, w


@needs_root
def test_backing_room_is_what_the_files_take_and_each_file_systems_free_space_once(
        small_fs: Path) -> None:
    a, b = small_fs / "a", small_fs / "b"
    a.write_bytes(os.urandom(MiB))
    os.sync()
    with open(b, "wb") as f:
        f.truncate(64 * MiB)  # sparse: takes nothing
    vfs = os.statvfs(small_fs)
    one = _sizing.backing_room([str(a)])
    assert one == os.stat(a).st_blocks * 512 + vfs.f_bavail * vfs.f_frsize
    assert MiB <= one < 8 * MiB
    assert _sizing.backing_room([str(a), str(b)]) == one
    # a file not made yet: its directory's file system (counted once)
    assert _sizing.backing_room([str(a), str(small_fs / "new")]) == one
    assert _sizing.backing_room([str(small_fs / "new")]) == vfs.f_bavail * vfs.f_frsize
    assert _sizing.backing_room([str(small_fs / "no-dir" / "new")]) == 0
    assert _sizing.backing_room([]) == 0


def test_limit_for_is_the_least_whole_mib_limit_whose_pool_keeps_the_image() -> None:
    for image in (PAGE, 28 * MiB, 28 * MiB + PAGE, 64 * MiB, 4 << 30, 4 << 40):
        limit = _sizing.limit_for(image)
        assert limit % MiB == 0
        assert _sizing.pool_holds(limit) >= image > _sizing.pool_holds(limit - MiB), image


def test_pool_warnings_only_for_an_image_the_pool_cannot_keep_and_no_backing_file() -> None:
    ram = 24 << 30
    assert _sizing.pool_warnings(28 << 20, 32 << 20, 0, ram) == []
    assert _sizing.pool_warnings(1 << 30, 32 << 20, 1, ram) == []
    (w,) = _sizing.pool_warnings((28 << 20) + PAGE, 32 << 20, 0, ram)
    assert "the pool's 32M keeps 28M of pages" in w, w
    assert "raise the pool's limit to 33M or more" in w and "use an image of 28M (leave --size out)" in w, w
    assert _sizing.pool_warnings(ram // 2, 0, 0, ram) == []  # no limit: the image bounds the pool
    (w,) = _sizing.pool_warnings(2 * ram, 0, 1, ram)
    assert w.startswith("the pool has no limit: pages that do not compress may take up to this 48G "
                        "image's worth of RAM (200%)"), w


def test_area_warnings_none_for_the_default_size_and_a_cost_past_one_percent_of_ram() -> None:
    ram = 24 << 30
    assert admin.area_warnings(2 * ram, None, ram) == []  # up's default size with a backing file: 2x RAM
    assert admin.area_warnings(2 * ram, 2 * ram // 1024 - 4, ram) == []
    one_pct = int(ram * admin.SWAPON_WARN_SHARE) * 10 // admin.SWAPON_TENTHS_PER_SLOT * 4096
    assert admin.area_warnings(one_pct, None, ram) == []
    (w,) = admin.area_warnings(one_pct + (1 << 30), None, ram)
    assert w.startswith("the kernel would keep 246.6M of RAM (1.0%) for this 308.2G swap area")


def test_pages_swapped_through_vswapfs_are_all_intact_and_freed(
        any_codec_swap_mnt: tuple[Path, str]) -> None:
    mnt, dev = any_codec_swap_mnt
    sampler = Sampler(mnt)
    sampler.start()
    try:
        result = run_workload(3 * LIMIT_MIB, LIMIT_MIB)
    finally:
        sampler.stop.set()
        sampler.join()
    assert result["bad"] == 0, result
    assert result["verified"] == 3 * LIMIT_MIB * MiB // 4096
    peak = sampler.peak
    # well over a limit's worth of pages went through the daemon
    assert peak["stored_pages"] > LIMIT_MIB * MiB // 4096, peak
    assert peak["pool_pages"] > 0 and peak["compr_data_size"] < peak["orig_data_size"]
    # after the process exits, the kernel's discards empty the space
    deadline = time.monotonic() + 20
    while stats(mnt)["stored_pages"] > 1 and time.monotonic() < deadline:  # 1: the swap header
        time.sleep(0.1)
    s = stats(mnt)
    # a slot the kernel itself still uses (a swap-cache page no reclaim has
    # dropped yet: /proc/swaps counts it) keeps its 512-slot cluster from
    # being discarded; only those clusters may stay
    pinned = linux.swap_areas().get(dev, 0) // 4
    if pinned:
        assert s["stored_pages"] <= 1 + pinned * 512, (s, pinned)
    else:
        assert s["stored_pages"] <= 1 and s["notify_free"] >= peak["stored_pages"] - 1, s
        assert s["mem_used_total"] <= 64 * 1024, s
    assert s["failed_reads"] == 0 and s["failed_writes"] == 0


def test_idle_recompression_makes_swapped_pages_denser_and_loses_none(
        swap_mnt: tuple[Path, str]) -> None:
    """Pages swapped out are stored fast first (lz4); once the daemon
    is idle its housekeeping recompresses them at the level and compacts
    the pool: less payload and less pool memory, and every page still reads
    back as written."""
    mnt, _ = swap_mnt
    assert (mnt / "control" / "first_comp_algorithm").read_text().strip() == "[lz4] zstd"
    with MemCgroup(f"vswapfs-test-{os.getpid()}", LIMIT_MIB * MiB) as cg:
        proc = cg.popen([sys.executable, "-m", "vswapfs.workload", "--mib", str(3 * LIMIT_MIB),
                         "--files", "--hold"], stdin=-1, stdout=-1, stderr=-1)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline().strip() == b"filled"
            held = stats(mnt)  # the pages are out, the daemon about to be idle
            deadline = time.monotonic() + 60
            settled = held
            while time.monotonic() < deadline:
                time.sleep(1)
                now = stats(mnt)
                if now["recompressed_pages"] and now["recompressed_pages"] == settled["recompressed_pages"] \
                        and now["mem_used_total"] == settled["mem_used_total"]:
                    break  # recompression and the compaction after it are done
                settled = now
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err.decode()[-500:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["bad"] == 0 and result["verified"] == 3 * LIMIT_MIB * MiB // 4096, result
    assert settled["recompressed_pages"] > held["pool_pages"] // 10, (held, settled)
    assert settled["recompress_saved_bytes"] > 0
    assert settled["compr_data_size"] < held["compr_data_size"], (held, settled)
    assert settled["mem_used_total"] <= held["mem_used_total"], (held, settled)
    assert settled["failed_reads"] == 0 and settled["failed_writes"] == 0


def _writes(mnt: Path) -> tuple[int, int]:
    """(WRITE requests, bytes written) so far, from control/fuse_stat."""
    for line in (mnt / "control" / "fuse_stat").read_text().splitlines():
        name, requests, data = line.split()[:3]
        if name == "WRITE":
            return int(requests), int(data)
    return 0, 0


def test_zero_pages_between_others_keep_the_kernels_swap_writes_near_two_pages(
        swap_mnt: tuple[Path, str]) -> None:
    """The kernel writes no zero page to swap: when every third page is
    zero (the workload's default mix), a write carries the 2 pages between
    two zero ones (a few more where reclaim's order strays from the
    pages'); in runs of 16 pages of one kind, the kernel merges its writes
    into much larger requests.  Every page is verified either way."""
    mnt, _ = swap_mnt
    per_write = {}
    for run in (1, 16):
        n0, b0 = _writes(mnt)
        result = run_workload(3 * LIMIT_MIB, LIMIT_MIB, "--files", "--kind-run", str(run))
        assert result["bad"] == 0 and result["verified"] == 3 * LIMIT_MIB * MiB // 4096, result
        n1, b1 = _writes(mnt)
        assert n1 > n0
        per_write[run] = (b1 - b0) / 4096 / (n1 - n0)
    assert per_write[1] < 2.5, per_write  # 2.03 at the sustained size, 2.18 here
    assert per_write[16] >= 4 * per_write[1], per_write


def test_a_swapon_and_swapoff_between_two_looks_at_proc_swaps_still_free_the_space(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The daemon looks at /proc/swaps every SWAPS_EVERY; here every 15 s, and a
    whole swapon, swapping and swapoff falls between its first two looks.
    The area discard of ``swapon --discard`` is what tells it swap was on:
    the pages swapoff brought back are freed at the next look."""
    every = 15.0
    monkeypatch.setenv("VSWAPFS_SWAPS_EVERY", str(every))  # the daemon inherits it
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    with admin.mounted(mnt, ["--size", "1G"]):
        t0 = time.monotonic()  # the daemon's first look is at its start
        dev = admin.attach_loop(mnt)
        subprocess.run(["mkswap", dev], check=True, capture_output=True)
        time.sleep(0.5)
        subprocess.run(["swapon", "--discard", dev], check=True)
        with MemCgroup(f"vswapfs-test-{os.getpid()}", 24 * MiB) as cg:
            proc = cg.popen([sys.executable, "-m", "vswapfs.workload", "--mib", "48", "--hold"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline() == b"filled\n"
            held = stats(Path(mnt))["stored_pages"]
            cg.set_limit(4096 * MiB)
            subprocess.run(["swapoff", dev], check=True)
            cycle = time.monotonic() - t0
            proc.stdin.write(b"verify\n")
            proc.stdin.close()
            result = json.loads(proc.stdout.read())
            proc.wait(60)
        assert result["bad"] == 0 and result["verified"] == 48 * MiB // PAGE, result
        assert held > 1000, held  # the hog's pages went through the daemon
        assert cycle < every - 2, f"the cycle took {cycle:.1f} s: it did not fit between two looks"
        deadline = t0 + 2 * every + 5
        while (s := stats(Path(mnt)))["stored_pages"] > 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s["stored_pages"] <= 1 and s["swapoff_freed_pages"] > 0, s
        assert time.monotonic() - t0 > every - 1  # freed at the second look, not before


def test_swapoff_watch_frees_after_an_area_seen_on_or_discarded_goes_and_never_while_one_comes() -> None:
    from vswapfs._daemon import SWAPON_GRACE, SwapoffWatch

    w = SwapoffWatch()
    assert not w.look(False, 0.0)  # nothing was ever on: data written to the image is kept
    assert not w.look(True, 1.0) and w.look(False, 1.1)  # seen on, then off: free
    assert not w.look(False, 1.2)  # once
    w.note_discards(1, 2.0)  # swapon's area discard, the area not on yet
    assert w.look(False, 2.0)  # a free now is safe (the caller checks no write came) ...
    assert w.look(False, 2.0 + SWAPON_GRACE - 0.1)  # ... and the latch holds through the grace
    assert w.look(False, 2.0 + SWAPON_GRACE)  # on and off between two looks: still freed
    assert not w.look(False, 2.1 + SWAPON_GRACE)
    w.note_discards(1, 9.0)  # no new discard: no new latch
    assert not w.look(False, 9.0)
    w.note_discards(2, 10.0)
    assert not w.look(True, 10.1)  # seen on: the latch is spent
    assert w.look(False, 10.2)
    w.refused()  # a write came meanwhile: look again
    assert w.look(False, 10.3) and not w.look(False, 10.4)
