"""The command line (``cli``): bad input gets one clear line, nothing starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_root

from vswapfs import _build, admin
from vswapfs._consts import VERSION

AS_NOBODY = """
import os, sys
from vswapfs.cli import main  # imported as root: nobody cannot read root's Python
os.setgid(65534); os.setuid(65534)
sys.exit(main(sys.argv[1:]))
"""


def cli(*args: str, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = ["-c", AS_NOBODY] if as_nobody else ["-m", "vswapfs"]
    return subprocess.run([sys.executable, *cmd, *args], capture_output=True, text=True, timeout=60)


def one_clear_line(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("command", ["", "mount", "up", "restart", "down", "stress",
                                     "install-helpers", "status"])
def test_cli_help_of_every_command_prints_and_exits_0(command: str) -> None:
    r = cli(*([command] if command else []), "--help")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-500:]
    assert r.stdout.startswith("usage: ")
    if command in ("mount", "up"):  # the options' defaults, % signs included
        assert "default 20% (zswap's max_pool_percent)" in " ".join(r.stdout.split())


@needs_root
@pytest.mark.parametrize(("size", "word"), [("12Q", "not a size"), ("-1G", "not a size"),
                                            ("100", "smaller than one"), ("lots", "not a size")])
def test_cli_bad_sizes(tmp_path: Path, size: str, word: str) -> None:
    r = cli("mount", str(tmp_path), f"--size={size}")
    assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr
    assert admin.mount_type(str(tmp_path)) is None


@pytest.mark.parametrize(("opt", "word"), [("--channels=-1", "0..64"), ("--channels=65", "0..64"),
                                           ("--channels=two", "0..64"), ("--busy-poll=-5", "0..1000"),
                                           ("--busy-poll=1001", "0..1000"), ("--busy-poll=5us", "0..1000"),
                                           ("--reserve=1K", "smaller than one"),
                                           ("--reserve=lots", "not a size"),
                                           ("--algorithm=lzo", "choose from 'zstd', 'lz4'")])
def test_cli_bad_channels_busy_poll_reserve_and_algorithm(tmp_path: Path, opt: str, word: str) -> None:
    r = cli("mount", str(tmp_path), opt)
    assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr
    assert admin.mount_type(str(tmp_path)) is None


@pytest.mark.parametrize(("opt", "word"), [("--workers=0", "1..64"), ("--workers=-2", "1..64"),
                                           ("--workers=65", "1..64"), ("--rounds=-1", "0..1000000"),
                                           ("--rounds=many", "0..1000000"),
                                           ("--multiple=0", "above 0"), ("--multiple=nan", "above 0"),
                                           ("--duration=-5", "above 0"), ("--duration=1h", "above 0"),
                                           ("--mix=0:0:0", "three non-negative"),
                                           ("--mix=1:x:1", "three non-negative"),
                                           ("--mix=1:1", "three non-negative"),
                                           ("--mix=1:-1:1", "three non-negative"),
                                           ("--limit=lots", "not a size")])
def test_cli_bad_stress_options_are_one_clear_line_before_any_worker(tmp_path: Path, opt: str,
                                                                     word: str) -> None:
    r = cli("stress", str(tmp_path), opt)  # not a mount either: the options are checked first
    assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "not a vswapfs mount" not in r.stderr


def test_the_workload_refuses_a_bad_mix_in_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "vswapfs.workload", "--mib", "1", "--mix", "1:x:1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--mix: weights must be three non-negative" in r.stderr


@needs_root
def test_reserve_below_a_chunk_or_the_pool_limit_is_one_clear_line(tmp_path: Path) -> None:
    one_clear_line(cli("mount", str(tmp_path), "--reserve=1M", "--pool-limit=2M"), "larger than --reserve")
    one_clear_line(cli("up", str(tmp_path), "--reserve=8K"), "less than one 64 KiB pool chunk")
    one_clear_line(cli("mount", str(tmp_path), "--algorithm=lz4", "--level=3"), "lz4 has no levels")
    one_clear_line(cli("mount", str(tmp_path), "--algorithm=lz4", "--first-level=-1"), "lz4 has no levels")
    one_clear_line(cli("mount", str(tmp_path), "--first-level=0"), "non-zero zstd level")
    one_clear_line(cli("mount", str(tmp_path), "--algorithm=lz4", "--first-algorithm=lz4"), "one step")
    one_clear_line(cli("mount", str(tmp_path), "--level=23"), "non-zero zstd level in -100..22")
    assert admin.mount_type(str(tmp_path)) is None


@needs_root
def test_cli_missing_and_busy_mount_points(tmp_path: Path, mnt: Path) -> None:
    one_clear_line(cli("mount", str(tmp_path / "nope")), "does not exist")
    one_clear_line(cli("mount", str(mnt)), "busy", "fuse.vswapfs")
    one_clear_line(cli("up", "/proc"), "proc", "not vswapfs")


@needs_root
def test_cli_down_on_something_that_is_not_vswapfs(tmp_path: Path) -> None:
    one_clear_line(cli("down", str(tmp_path)), "not a vswapfs mount")
    one_clear_line(cli("down", "/proc"), "not a vswapfs mount", "proc")


def test_cli_status_of_something_that_is_not_vswapfs(tmp_path: Path) -> None:
    one_clear_line(cli("status", str(tmp_path)), "not a vswapfs mount")
    one_clear_line(cli("status", "/proc", "--json"), "not a vswapfs mount", "proc")


@needs_root
def test_cli_restart_and_stress_on_something_that_is_not_vswapfs(tmp_path: Path) -> None:
    one_clear_line(cli("restart", str(tmp_path)), "not a vswapfs mount")
    one_clear_line(cli("stress", str(tmp_path), "--rounds", "1"), "not a vswapfs mount")


@needs_root
def test_cli_not_root(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o777)
    for cmd in (("mount", str(tmp_path)), ("up", str(tmp_path)), ("down", str(tmp_path))):
        one_clear_line(cli(*cmd, as_nobody=True), "root")




@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["down", "/nonexistent-vswapfs-mount"]])
def test_status_and_down_load_neither_trio_nor_zstandard(args: list[str]) -> None:
    """The admin commands import only what they use: no event loop, no
    codec, no engine (``python3 -X importtime -m vswapfs status``)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "vswapfs", *args],
                       capture_output=True, text=True, timeout=60)
    loaded = {line.split("|")[-1].strip() for line in r.stderr.splitlines()
              if line.startswith("import time:")}
    assert "vswapfs.cli" in loaded and "vswapfs.admin" in loaded, r.stderr[-500:]
    heavy = {m for m in loaded if m.split(".")[0] in ("trio", "zstandard", "lz4", "xxhash")
             or m.startswith(("vswapfs.engine", "vswapfs.fuse", "vswapfs._daemon"))}
    assert not heavy, heavy


def test_the_serving_path_is_compiled_unless_a_pure_build_was_asked_for() -> None:
    """setup.py compiles the request path with mypyc where a C compiler and
    Python.h are (the test script installs both): the tests then test the
    compiled modules, which is what ``pip install .`` gives users."""
    want = "python" if os.environ.get("VSWAPFS_PURE") == "1" else "mypyc"
    assert _build.kind() == want, (_build.compiled_modules(), _build.SERVING_MODULES)
    import vswapfs.engine._space as space_module
    assert space_module.__file__ is not None
    assert space_module.__file__.endswith(".py") == (want == "python")
    r = subprocess.run([sys.executable, "-m", "vswapfs", "--version"], capture_output=True, text=True,
                       timeout=60)
    # see test_engine_codec and test_fuse_session: the C modules built with the compiled ones
    says = "python build" if want == "python" else "mypyc build, lz4 and data path in C"
    assert r.returncode == 0 and r.stdout == f"vswapfs {VERSION} ({says})\n", r


def test_the_serving_path_type_checks_where_its_dependencies_are_not_installed_yet() -> None:
    """On a fresh machine pip runs setup.py, and so mypyc's type check, before
    it installs zstandard and trio: to that mypy their calls return Any.  The
    compiled modules must type-check then too, or the build falls back to pure
    Python (it once failed the install outright)."""
    repo = Path(__file__).resolve().parent.parent
    sources = [name.replace(".", "/") + ".py" for name in _build.SERVING_MODULES]
    r = subprocess.run([sys.executable, "-m", "mypy", "--no-site-packages", "--ignore-missing-imports",
                        "--no-incremental", *sources], cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:]
