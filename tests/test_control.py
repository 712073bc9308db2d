"""The control files (``_control``) on a real mount: knobs under concurrent writers."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

from conftest import needs_root

from vswapfs import MiB


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


