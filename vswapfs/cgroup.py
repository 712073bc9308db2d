"""A child memory cgroup to run a workload under a memory limit.

cgroup v1 (``memory.limit_in_bytes``, as on the test machines) and v2
(``memory.max``, most distributions).  The child is made under the
caller's own cgroup, so the daemon, which stays outside, is never limited.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from . import linux

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")


def _own_path(controller: str | None) -> str:
    return linux.own_cgroup(controller)


class MemCgroup:
    """A memory cgroup named ``name`` limited to ``limit`` bytes."""

    def __init__(self, name: str, limit: int) -> None:
        if V1_ROOT.is_dir():
            self.version = 1
            self.path = V1_ROOT / _own_path("memory") / name
        elif (V2_ROOT / "cgroup.controllers").exists():
            self.version = 2
            parent = V2_ROOT / _own_path(None)
            self.path = parent / name
            with contextlib.suppress(OSError):  # may already be on, or delegated differently
                (parent / "cgroup.subtree_control").write_text("+memory")
        else:
            raise OSError("no memory cgroup controller mounted")
        self.path.mkdir(exist_ok=True)
        self.set_limit(limit)

    def _file(self, v1: str, v2: str) -> Path:
        return self.path / (v1 if self.version == 1 else v2)

    def set_limit(self, limit: int) -> None:
        self._file("memory.limit_in_bytes", "memory.max").write_text(str(limit))

    def usage(self) -> int:
        """Memory charged now, bytes."""
        return int(self._file("memory.usage_in_bytes", "memory.current").read_text())

    def peak(self) -> int:
        """Highest memory usage seen, bytes (0 if the kernel does not tell)."""
        f = self._file("memory.max_usage_in_bytes", "memory.peak")
        return int(f.read_text()) if f.exists() else 0

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def popen(self, cmd: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside the cgroup (it joins before exec)."""
        procs = str(self.path / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        proc: subprocess.Popen[bytes] = subprocess.Popen(list(cmd), preexec_fn=join, **kw)  # type: ignore[call-overload]
        return proc

    def close(self) -> None:
        """Kill what is left inside and remove the cgroup."""
        for _ in range(100):
            pids = self.pids() if self.path.exists() else []
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        raise OSError(f"could not remove cgroup {self.path}")

    def __enter__(self) -> MemCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
