"""Shared fixtures.  Under CI (``CI`` set) a skipped test is a failure: the
real-swap tests must run there.  The tests refuse to start on compiled
modules built from other source than is here (an editable install edited
since ``pip install -e .``): they would test the old code."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vswapfs import _build


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = _build.stale_modules()
    if stale:
        pytest.exit(f"compiled modules built from older source: {', '.join(stale)}; run "
                    "`python3 -m pip install -e .` again (with VSWAPFS_PURE=1 for a pure build)",
                    returncode=2)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, which counts as a failure: {report.longrepr}"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB ext4 file system on a loop device, mounted at a
    temporary directory: a backing file there runs out of space for real."""
    image = tmp_path / "ext4.img"
    mnt = Path(tempfile.mkdtemp(prefix="vswapfs-ext4-"))
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        os.rmdir(mnt)


def stats(mnt: Path) -> dict[str, int]:
    """Every counter of a vswapfs mount, from control/stats.json."""
    import json

    return json.loads((mnt / "control" / "stats.json").read_text())


def classes_apart(n: int, seed: int = 1) -> bytes:
    """``n`` pages whose lz4 objects each fall in a pool size class of their
    own (for ``n`` up to about 240): random bytes at the head of each page,
    more page by page, zeros after."""
    import random

    rnd = random.Random(seed)
    return b"".join(rnd.randbytes(k) + bytes(4096 - k) for k in (40 + i * 3900 // n for i in range(n)))


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="needs root and /dev/fuse")


@contextlib.contextmanager
def empty_mountpoint() -> Iterator[Path]:
    """A new empty directory; whatever vswapfs is on it at the end (swap,
    loop, mount) is taken down, forced if need be, also when the test failed."""
    from vswapfs import admin

    mnt = Path(tempfile.mkdtemp(prefix="vswapfs-mnt-"))
    try:
        yield mnt
    finally:
        if admin.mount_type(str(mnt)) is not None:
            try:
                admin.down(str(mnt))
            except admin.AdminError:
                admin.down(str(mnt), force=True)
        mnt.rmdir()


@pytest.fixture
def mountpoint() -> Iterator[Path]:
    """An empty mount point, taken down after the test (see empty_mountpoint)."""
    with empty_mountpoint() as mnt:
        yield mnt


def _mount(args: list[str]) -> Iterator[Path]:
    from vswapfs import admin

    with empty_mountpoint() as mnt:
        admin.start_daemon(str(mnt), args)
        yield mnt


@pytest.fixture
def mnt() -> Iterator[Path]:
    """A real vswapfs mount of 64 MiB, torn down after the test."""
    yield from _mount(["--size", "64M"])


@pytest.fixture(params=["1", "3", "0"], ids=["1-channel", "3-channels", "event-loop"])
def any_mnt(request: pytest.FixtureRequest) -> Iterator[Path]:
    """``mnt`` served each way: channel threads, or the event loop alone."""
    yield from _mount(["--size", "64M", "--channels", request.param])


def swap_on(args: list[str]) -> Iterator[tuple[Path, str]]:
    """``vswapfs up`` on a temporary mount point for a fixture: yields (mount,
    loop device); afterwards no swap area, loop device or mount is left,
    also when the test failed."""
    from vswapfs import admin

    mnt = Path(tempfile.mkdtemp(prefix="vswapfs-swap-"))
    try:
        with admin.swap_up(str(mnt), args) as dev:
            yield mnt, dev
        assert dev not in admin.swaps() and admin.loops_of(str(mnt)) == []
    finally:
        assert admin.mount_type(str(mnt)) is None
        mnt.rmdir()


@pytest.fixture
def faultfs(tmp_path: Path) -> Iterator[Path]:
    """A real fault-injecting FUSE file system (vswapfs_lab.faultfs) mounted at a
    temporary directory; arm faults by writing to ``<mnt>/.faults``."""
    import subprocess
    import sys

    mnt, store = tmp_path / "faultfs", tmp_path / "store"
    mnt.mkdir()
    store.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "vswapfs_lab.faultfs", str(mnt), str(store)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline() != b"ready\n":
        proc.kill()
        raise RuntimeError(f"faultfs did not start: {proc.communicate()[1].decode()[-500:]}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        proc.wait(10)
