"""zswap in front of vswapfs (``zswap``, ``up --zswap``): on at up, as it was
after down, also when up fails halfway; pages zswap writes back into
vswapfs come back intact; ``status`` shows both tiers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import empty_mountpoint, needs_root

from vswapfs import MiB, admin, zswap
from vswapfs.cgroup import MemCgroup

pytestmark = [needs_root, pytest.mark.skipif(not zswap.available(), reason="no zswap in this kernel")]

# A state unlike what --zswap sets, so that "restored" cannot pass by accident.
BEFORE = {"compressor": "lzo", "max_pool_percent": "17", "accept_threshold_percent": "90",
          "shrinker_enabled": "N", "enabled": "N"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vswapfs", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def known_zswap() -> Iterator[dict[str, str]]:
    """zswap set to BEFORE for the test, and put back as it was after it."""
    found = zswap.params()
    zswap.apply(BEFORE)
    try:
        yield zswap.params()
    finally:
        zswap.apply(found)


@contextlib.contextmanager
def debugfs() -> Iterator[None]:
    """debugfs mounted for the block (zswap's own counters live there)."""
    mounted = zswap.DEBUGFS.parent.joinpath("zswap").is_dir()
    if not mounted:
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], check=True)
    try:
        yield
    finally:
        if not mounted:
            subprocess.run(["umount", "/sys/kernel/debug"], check=False)


def test_up_with_zswap_turns_it_on_and_down_restores_what_was_there(
        known_zswap: dict[str, str], mountpoint: Path) -> None:
    r = cli("up", str(mountpoint), "--size", "256M", "--zswap", "--zswap-max-pool-percent", "7",
            "--zswap-shrinker")
    assert r.returncode == 0, r.stderr
    assert "every swap device" in r.stdout
    now = zswap.params()
    assert now["enabled"] == "Y" and now["max_pool_percent"] == "7" and now["shrinker_enabled"] == "Y"
    assert now["compressor"] == zswap.choose(None)  # the fastest the kernel has
    assert now["compressor"] in zswap.FASTEST
    assert zswap.owners(admin.ZSWAP_STATE) == [admin.canonical(str(mountpoint))]
    status = json.loads(cli("status", str(mountpoint), "--json").stdout)[str(mountpoint)]
    assert status["zswap_enabled"] == 1 and set(status["tiers"]) == {"zswap", "pool", "backing", "zero"}
    table = cli("status", str(mountpoint)).stdout
    assert "in front of every swap device" in table and "swapped pages in zswap" in table
    r = cli("down", str(mountpoint))
    assert r.returncode == 0, r.stderr
    assert "zswap restored" in r.stdout
    assert zswap.params() == known_zswap
    assert not admin.ZSWAP_STATE.exists()


def test_up_that_fails_after_setting_zswap_puts_it_back(known_zswap: dict[str, str],
                                                        mountpoint: Path) -> None:
    """swapon refuses a priority above 32767: up fails after zswap was set,
    and undoes everything, zswap included."""
    r = cli("up", str(mountpoint), "--size", "64M", "--zswap", "--priority", "40000")
    assert r.returncode == 1 and "swapon" in r.stderr, r.stderr
    assert zswap.params() == known_zswap
    assert admin.mount_type(str(mountpoint)) is None and not admin.ZSWAP_STATE.exists()


def test_zswap_options_are_refused_in_one_clear_line(known_zswap: dict[str, str],
                                                      mountpoint: Path) -> None:
    for args, words in [(["--zswap", "no-such-codec"], "no no-such-codec compressor"),
                        (["--zswap", "--zswap-max-pool-percent", "0"], "1..100"),
                        (["--zswap-shrinker"], "need --zswap")]:
        r = cli("up", str(mountpoint), "--size", "64M", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and words in lines[0], r.stderr
        assert admin.mount_type(str(mountpoint)) is None
    assert zswap.params() == known_zswap


def test_two_mounts_share_zswap_and_the_last_down_restores_it(known_zswap: dict[str, str]) -> None:
    with empty_mountpoint() as a, empty_mountpoint() as b:
        admin.up(str(a), ["--size", "64M"], zswap_values=zswap.wanted(None, None, False))
        admin.up(str(b), ["--size", "64M"], zswap_values=zswap.wanted(None, None, False))
        admin.down(str(a))
        assert zswap.params()["enabled"] == "Y"  # b still has it in front
        admin.down(str(b))
        assert zswap.params() == known_zswap


def test_an_owner_whose_mount_is_gone_does_not_keep_zswap_on(known_zswap: dict[str, str],
                                                             mountpoint: Path) -> None:
    """A mount that asked for zswap and vanished without ``down`` (its record
    left behind) does not stop the next ``down`` from restoring zswap."""
    admin.up(str(mountpoint), ["--size", "64M"], zswap_values=zswap.wanted(None, None, False))
    state = admin.ZSWAP_STATE.read_text()
    admin.ZSWAP_STATE.write_text(state.replace('"owners": [', '"owners": ["/no/such/mount", ', 1))
    assert zswap.owners(admin.ZSWAP_STATE)[0] == "/no/such/mount"
    admin.down(str(mountpoint))
    assert zswap.params() == known_zswap and not admin.ZSWAP_STATE.exists()


def test_pages_zswap_writes_back_into_vswapfs_all_verify(known_zswap: dict[str, str],
                                                        mountpoint: Path) -> None:
    """zswap capped at 1% of RAM with its shrinker on, so it writes back into
    vswapfs; a process pushes 768 MiB of mixed pages through a 128 MiB
    cgroup and verifies every page."""
    with debugfs():
        before = zswap.stats()
        admin.up(str(mountpoint), ["--size", "2G"], zswap_values=zswap.wanted(None, 1, True))
        try:
            with MemCgroup(f"vswapfs-zswap-test-{os.getpid()}", 128 * MiB) as cg:
                proc = cg.popen([sys.executable, "-m", "vswapfs.workload", "--mib", "768", "--files",
                                 "--pattern", "mix", "--rounds", "3"], stdout=-1, stderr=-1)
                out, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, err.decode()[-2000:]
            result = json.loads(out.decode().strip().splitlines()[-1])
            after = zswap.stats()
            mine = admin.status(str(mountpoint))
        finally:
            admin.down(str(mountpoint))
    assert result["bad"] == 0 and result["verified"] > 0
    written_back = after["zswap_written_back_pages"] - before["zswap_written_back_pages"]
    assert written_back > 0
    assert "zswap_pool_limit_hit" in after  # debugfs was read
    # the daemon's stats.json carries zswap's counters beside its own
    assert mine["zswap_written_back_pages"] >= before["zswap_written_back_pages"] + written_back
    assert mine["clusters_created"] > 0 and mine["bd_read_errors"] == 0  # vswapfs held pages
    assert zswap.params() == known_zswap
