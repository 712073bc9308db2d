"""The control files (``_control``) on a real mount: knobs under concurrent writers,
warnings of a pool that can fill before the kernel's swap area."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import needs_root

from vswapfs import MiB, admin


@needs_root
def test_concurrent_control_writers_leave_a_valid_value(mnt: Path) -> None:
    knob = mnt / "control" / "pool_limit"
    good = [f"{n}M" for n in range(1, 33)]
    bad = ["-1", "x", "9" * 50, "5Z"]
    results: dict[str, int] = {}

    def writer(value: str) -> None:
        for _ in range(20):
            try:
                with open(knob, "w") as f:
                    f.write(value)
                results[value] = 0
            except OSError as e:
                results[value] = e.errno or -1

    threads = [threading.Thread(target=writer, args=(v,)) for v in good + bad]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[v] == 0 for v in good)
    assert all(results[v] == errno.EINVAL for v in bad)
    assert int(knob.read_text()) in {int(v[:-1]) * MiB for v in good}




def _status(mnt: Path) -> tuple[list[str], list[str]]:
    """``vswapfs status`` of ``mnt``: its warnings on stderr, and the same
    from ``--json``."""
    r = subprocess.run([sys.executable, "-m", "vswapfs", "status", str(mnt)], capture_output=True,
                       text=True, timeout=60, check=True)
    j = subprocess.run([sys.executable, "-m", "vswapfs", "status", "--json", str(mnt)],
                       capture_output=True, text=True, timeout=60, check=True)
    return r.stderr.splitlines(), json.loads(j.stdout)[str(mnt)]["warnings"]


@needs_root
def test_a_pool_limit_lowered_below_the_image_is_warned_of_by_status_and_the_log(
        mnt: Path, tmp_path: Path) -> None:
    """The pool must not fill before the kernel's swap area (see _sizing):
    what ``up`` checks once, a lower limit or an evacuated backing file can
    undo later; ``status`` and the daemon's log say so, and stop saying it
    once the image fits again."""
    control, log = mnt / "control", admin.log_path(str(mnt))
    assert _status(mnt) == ([], [])  # 64 MiB against the default limit, 20% of RAM
    logged = log.read_text().count("with no backing file")
    (control / "pool_limit").write_text("16M")
    lines, warnings = _status(mnt)
    assert len(lines) == 1 and lines[0].startswith(f"vswapfs: warning: {mnt}: with no backing file, "
                                                   "the pool's 16M keeps 14M of pages"), lines
    assert "raise the pool's limit to 74M or more" in lines[0], lines[0]
    assert lines[0].endswith(warnings[0]) and len(warnings) == 1
    (control / "pool_limit").write_text("74M")  # 8/7 of 64 MiB, rounded up to a MiB
    assert _status(mnt) == ([], [])
    (control / "pool_limit").write_text("73M")
    assert len(_status(mnt)[1]) == 1
    (control / "add_backing").write_text(str(tmp_path / "backing"))
    assert _status(mnt) == ([], [])  # pages past the limit go to disk
    (control / "evacuate").write_text(str(tmp_path / "backing"))
    assert len(_status(mnt)[1]) == 1
    time.sleep(0.5)  # the log writer thread
    text = log.read_text()
    assert text.count("with no backing file") - logged == 3, text[-2000:]
    assert "control/pool_limit: with no backing file, the pool's 16M" in text
    assert "control/evacuate: with no backing file, the pool's 73M" in text


@needs_root
def test_backing_files_on_a_file_system_with_too_little_room_are_warned_of(
        mnt: Path, small_fs: Path) -> None:
    """A backing file grows on demand: on a file system with less room than
    the image needs past the pool, the pool and the disk fill before the
    kernel's swap area does, as with no backing file at all."""
    control, log = mnt / "control", admin.log_path(str(mnt))
    (control / "pool_limit").write_text("16M")
    (control / "add_backing").write_text(str(small_fs / "b0"))  # an 8 MiB file system
    lines, warnings = _status(mnt)
    assert len(warnings) == 1 and lines[0].endswith(warnings[0]), lines
    assert warnings[0].startswith("the pool's 16M keeps 14M of pages that do not compress and the "
                                  "backing files' file systems have room for "), warnings[0]
    (control / "pool_limit").write_text("74M")  # the pool alone keeps the 64 MiB image
    assert _status(mnt) == ([], [])
    time.sleep(0.5)  # the log writer thread
    assert "control/add_backing: the pool's 16M keeps 14M" in log.read_text()
