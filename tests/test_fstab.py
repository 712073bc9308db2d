"""mount.fuse.vswapfs and the systemd unit, run for real."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_root

from vswapfs import admin
from vswapfs._fstab import helper_main, install_helpers, options_to_args

ROOT = Path(__file__).resolve().parent.parent


def test_fstab_options_translate_and_unknown_ones_are_named() -> None:
    assert options_to_args("size=8G,pool_limit=25%,backing=/a,backing=/b,noauto,x-systemd.foo=1,"
                           "algorithm=lz4") == [
        "--size", "8G", "--pool-limit", "25%", "--backing", "/a", "--backing", "/b", "--algorithm", "lz4"]
    with pytest.raises(ValueError, match="bogus"):
        options_to_args("size=1G,bogus=2")
    assert options_to_args("zswap,zswap_max_pool_percent=5,zswap_shrinker") == [
        "--zswap", "--zswap-max-pool-percent", "5", "--zswap-shrinker"]
    assert options_to_args("zswap=lzo-rle") == ["--zswap", "lzo-rle"]
    assert options_to_args("level=3,first_level=-2") == ["--level", "3", "--first-level", "-2"]
    assert options_to_args("first_algorithm=zstd") == ["--first-algorithm", "zstd"]
    assert options_to_args("channels=2,busy_poll=0") == ["--channels", "2", "--busy-poll", "0"]
    with pytest.raises(ValueError, match="zswap_shrinker=1"):
        options_to_args("zswap_shrinker=1")
    assert helper_main(["vswapfs", "/mnt/x", "-o", "rw,size=1G"]) == ["mount", "/mnt/x", "--size", "1G"]
    with pytest.raises(ValueError, match="usage"):
        helper_main(["/mnt/x"])


def test_install_helpers_fills_in_the_interpreter(tmp_path: Path) -> None:
    paths = install_helpers(str(tmp_path))
    assert len(paths) == 3
    helper = (tmp_path / "sbin" / "mount.fuse.vswapfs").read_text()
    assert helper.startswith(f"#!{sys.executable}\n") and "@PYTHON@" not in helper
    assert os.stat(tmp_path / "sbin" / "mount.fuse.vswapfs").st_mode & 0o777 == 0o755
    unit = (tmp_path / "etc" / "systemd" / "system" / "vswapfs@.service").read_text()
    assert f"ExecStart={sys.executable} -m vswapfs up %f" in unit


@needs_root
def test_mount_t_fuse_vswapfs_uses_the_helper(tmp_path: Path) -> None:
    helper = Path("/sbin/mount.fuse.vswapfs")
    saved = helper.read_bytes() if helper.exists() else None
    root = tmp_path / "root"
    install_helpers(str(root))
    shutil.copy(root / "sbin" / "mount.fuse.vswapfs", helper)
    mnt = tmp_path / "m"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "fuse.vswapfs", "vswapfs", str(mnt), "-o", "size=32M,noauto"],
                           capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        assert r.returncode == 0, r.stderr
        assert admin.mount_type(str(mnt)) == "fuse.vswapfs"
        assert os.stat(mnt / "swap").st_size == 32 << 20
    finally:
        if admin.mount_type(str(mnt)):
            admin.down(str(mnt))
        if saved is None:
            helper.unlink()
        else:
            helper.write_bytes(saved)


@needs_root
def test_systemd_unit_commands_bring_swap_up_reload_the_daemon_and_down(tmp_path: Path) -> None:
    install_helpers(str(tmp_path / "root"))
    unit = (tmp_path / "root" / "etc" / "systemd" / "system" / "vswapfs@.service").read_text()
    mnt = tmp_path / "unit-mnt"
    opts = "--size 64M --priority 7"

    def command(key: str) -> list[str]:
        line = re.search(rf"^{key}=(.*)$", unit, re.M)
        assert line, key
        text = line.group(1).replace("%f", str(mnt)).replace("$VSWAPFS_OPTIONS", opts)
        return shlex.split(text)

    try:
        for key in ("ExecStartPre", "ExecStart"):
            r = subprocess.run(command(key), capture_output=True, text=True, cwd="/")
            assert r.returncode == 0, r.stderr
        dev = admin.loops_of(str(mnt))[0]
        with open("/proc/swaps") as f:
            assert any(line.split()[0] == dev and line.split()[-1] == "7" for line in f)
        old = (mnt / "control" / "pid").read_text()
        r = subprocess.run(command("ExecReload"), capture_output=True, text=True, cwd="/")
        assert r.returncode == 0, r.stderr  # a new daemon, swap still on
        assert (mnt / "control" / "pid").read_text() != old and dev in admin.swaps()
        assert (mnt / "control" / "restarts").read_text() == "1\n"
        r = subprocess.run(command("ExecStop"), capture_output=True, text=True, cwd="/")
        assert r.returncode == 0, r.stderr
        assert admin.mount_type(str(mnt)) is None and dev not in admin.swaps()
    finally:
        if admin.mount_type(str(mnt)):
            admin.down(str(mnt), force=True)
