"""Side-by-side swap benchmark: vswapfs against zram, zswap and a swapfile.

Every backend is set up and torn down by the harness, all with
``swapon --discard``.  Workloads run in a child memory cgroup (the vswapfs
daemon stays outside it) and verify every page:

- usemem: write 3x the limit of realistic pages (zero / cut from real
  files / random), read back and verify; write, verify and free times;
- memhog: the same shape with pages of one repeated value;
- latency: after swap-out, touch random swapped-out pages one at a time
  (pagemap says which): p50 and p99 in microseconds;
- pyheap: a Python program with a heap over the limit (1.5x: build, sort,
  sum a list of objects): wall time;
- kv: redis (Debian's ``redis-server``) with a heap 3x its 256 MiB cgroup,
  loaded with real-file text, then random GETs from ``redis-benchmark``:
  requests per second and p99, a sample of values checked (``kv``).

For each backend the memory it holds is sampled: the daemon's RSS for
vswapfs, ``mm_stat`` for zram, the zswap pool (``Zswap:`` in meminfo);
how much of it comes back within 2 s of the workload's exit, and how soon
99% of it is back (to the 20 ms the sampler waits between looks).  So is
the swapped data it holds, before compression (vswapfs ``orig_data_size``,
zram's ``mm_stat`` column 1, ``Zswapped:``, the swapfile's used space):
how much the kernel keeps on the device differs between backends.  For
vswapfs, ``control/fuse_stat`` read before and after usemem gives the
WRITE and READ requests the daemon answered and the time it was busy with
them: its own share of the time, apart from the kernel's side.

One more backend is a yardstick, not a contender: ``fuse-floor-c``
(``vswapfs_lab/fuse_floor.c``, built with cc), a minimal C FUSE server that
stores pages raw and does nothing else, attached like vswapfs.  It is the
loop+FUSE path's own cost in this run; the verdicts on time and latency
also say how far vswapfs is from it.  ``vswapfs-fastest`` (zstd level
-100, run only when named in ``--only``) splits that distance into what
compression costs and what the rest of the daemon does;
``vswapfs-lz4`` (also only when named) is vswapfs with ``--algorithm lz4``;
``fuse-floor-c-uring`` (also only when named) is the yardstick served over
FUSE-over-io_uring, the other transport this kernel has;
``fuse-floor-c-lz4`` (also only when named) is the yardstick storing pages
as vswapfs's first store does (same-filled ones as their value, the rest
lz4), in C: what a daemon as dense as that pays with no Python at all, one
thread doing the work a request brings; ``vswapfs-onestep``
(also only when named) stores pages at zstd level 1 at once, without the
fast first store and the recompression when idle; ``vswapfs-small-image``
(also only when named) is vswapfs on a 2.5 GiB image instead of 4 GiB, which
the sustained run fills past half (see docs/sustained.md, "Memory").

With zswap: ``zswap-swapfile`` is zswap in front of a preallocated
swapfile, ``vswapfs-zswap`` is ``vswapfs up --zswap`` (the RFC's setup),
``vswapfs-zswap-tier`` the same with zswap's pool capped at 1% of RAM, so
that it writes back into vswapfs: the cold tier.  zswap gets the same
compressor in each (the fastest the kernel has), and its settings are
restored after each.  The memory a zswap backend holds is zswap's pool
(``Zswap:``) plus the daemon's RSS.

``--sustained`` runs the size that shows where the time goes: 2 GiB of
pages through a 512 MiB cgroup (usemem and latency), and kv; small runs
hide it.  Its targets are against the C floor (and zram) of the same run,
printed under "against the floor".

Rounds are interleaved across backends (the order rotates each round) so
the machine's drift cancels; medians are compared (single runs swing by a
third here).  Results: a Markdown table, a JSON file and, with matplotlib,
a PNG chart; ``--render`` writes them again from a saved JSON file, as this
version summarizes its rounds, without measuring anything.

    python3 -m vswapfs_lab.bench [--rounds 3] [--limit 64] [--out bench-results] [--only a,b]
    python3 -m vswapfs_lab.bench --sustained --only zram-lzo-rle,zswap-swapfile,vswapfs-zswap,...
    python3 -m vswapfs_lab.bench --render bench-results/bench.json [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vswapfs import MiB, _build, admin, linux, zswap
from vswapfs.cgroup import MemCgroup
from vswapfs.linux import meminfo

from . import kv

ZRAM = Path("/sys/block/zram0")
REFERENCE = "zram-lzo-rle"
BENCH_DIR = "/var/lib/vswapfs-bench"  # backing files: a directory only root can write (not /var/tmp)

PYHEAP = """
import sys, time
n = int(sys.argv[1]) * (1 << 20) // 230  # ~230 bytes an item: tuple, str, list, int
t = time.perf_counter()
heap = [("item %d" % i, i * 7 % 1000003, [i]) for i in range(n)]
heap.sort(key=lambda x: x[1])
total = sum(x[1] for x in heap)
print(time.perf_counter() - t)
"""


def rss(pid: int) -> int:
    return linux.process_status(pid, "VmRSS") * 1024


@dataclass
class Backend:
    """A swap backend: how to bring it up and down, and what memory it holds."""

    name: str
    up: Callable[[], object]
    down: Callable[[], None]
    memory: Callable[[], int]  # bytes of memory the backend holds now
    held: Callable[[], int] = lambda: 0  # bytes of swapped data it holds, before compression
    available: Callable[[], str | None] = lambda: None  # why not, or None
    state: dict[str, object] = field(default_factory=dict)
    # per FUSE opcode, (requests, bytes, busy µs) the daemon has answered (vswapfs's fuse_stat),
    # and under REFUSED (the writes it refused, 0, 0): its control/failed_writes
    served: Callable[[], dict[str, tuple[int, int, int]]] | None = None


REFUSED = "refused"  # the key of ``served()``'s count of writes refused (ENOSPC, EIO)


def parse_fuse_stat(text: str) -> dict[str, tuple[int, int, int]]:
    """``control/fuse_stat`` (name, requests, bytes, busy µs, mean µs per
    line) as name -> (requests, bytes, busy µs)."""
    out = {}
    for line in text.splitlines():
        name, n, data, busy, _ = line.split()
        out[name] = (int(n), int(data), int(busy))
    return out


def _run(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True)


PRIORITY = 100  # every backend's swap priority (only one is on at a time)


def _swapon(dev: str) -> None:
    _run("swapon", "--discard", "-p", str(PRIORITY), dev)


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` set while the block runs (a daemon
    started in it inherits them), as it was before after."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def pure_copy() -> str:
    """A copy of the installed package's source without its compiled modules
    (see setup.py), in a new directory: a daemon started with it first on
    PYTHONPATH runs pure Python."""
    where = tempfile.mkdtemp(prefix="vswapfs-pure-")
    shutil.copytree(Path(admin.__file__).parent, Path(where, "vswapfs"),
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return where


def vswapfs_backend(name: str, args: list[str], zswap_pool_percent: int | None = None,
                    zswap_front: bool = False, zswap_shrinker: bool = False,
                    pure: bool = False) -> Backend:
    """vswapfs from ``vswapfs up MNT ARGS``; with ``zswap_front``, ``up --zswap``
    (and ``zswap_pool_percent`` as its pool limit, ``zswap_shrinker`` its
    shrinker): the memory it holds is then the daemon's and zswap's pool
    together, the data both hold.  ``pure``: the daemon runs the package as
    pure Python, not the compiled modules ``pip install`` built."""
    st: dict[str, Any] = {}
    front = zswap_front or zswap_pool_percent is not None

    def available() -> str | None:
        return "no zswap in this kernel" if front and not zswap.available() else None

    def up() -> None:
        mnt = tempfile.mkdtemp(prefix="vswapfs-bench-")
        backing = [a for a in args if a.startswith("/")]
        for b in backing:
            os.makedirs(os.path.dirname(b), mode=0o700, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(b)
        st["mnt"] = mnt
        values = zswap.wanted(None, zswap_pool_percent, zswap_shrinker) if front else None
        extra = {}
        if pure:
            st["pure"] = extra["PYTHONPATH"] = pure_copy()
        with environ(**extra):
            admin.up(mnt, args, priority=PRIORITY, zswap_values=values)
        build = Path(mnt, "control", "build").read_text().strip()
        if build != ("python" if pure else _build.kind()):
            down()  # nothing left mounted or swapped on by a run that cannot go on
            raise RuntimeError(f"{name}: the daemon runs the {build} build")
        st["pid"] = admin.daemon_pid(mnt)
        st["sup"] = admin.supervisor_pid(mnt) or 0

    def down() -> None:
        mnt = str(st.pop("mnt"))
        admin.down(mnt)
        os.rmdir(mnt)
        if "pure" in st:
            shutil.rmtree(st.pop("pure"))

    def held() -> int:
        data = int(Path(str(st["mnt"]), "control", "orig_data_size").read_text())
        return data + (meminfo("Zswapped") if front else 0)

    def memory() -> int:
        # the daemon, and what its supervisor holds of its own (its interpreter's
        # file pages are the daemon's too)
        sup = int(st.get("sup") or 0)
        own = linux.process_status(sup, "RssAnon") * 1024 if sup else 0
        return rss(int(st["pid"])) + own + (meminfo("Zswap") if front else 0)

    def served() -> dict[str, tuple[int, int, int]]:
        control = Path(str(st["mnt"]), "control")
        out = parse_fuse_stat((control / "fuse_stat").read_text())
        out[REFUSED] = (int((control / "failed_writes").read_text()), 0, 0)
        return out

    return Backend(name, up, down, memory, held, available, state=st, served=served)


def zram_backend(alg: str, size: str = "4G") -> Backend:
    def available() -> str | None:
        if not ZRAM.exists():
            return "no /sys/block/zram0 (zram not built in or loaded)"
        if alg not in (ZRAM / "comp_algorithm").read_text().replace("[", "").replace("]", "").split():
            return f"zram has no {alg}"
        return None

    def up() -> None:
        (ZRAM / "reset").write_text("1")
        (ZRAM / "comp_algorithm").write_text(alg)
        (ZRAM / "disksize").write_text(size)
        _run("mkswap", "/dev/zram0")
        _swapon("/dev/zram0")

    def down() -> None:
        _run("swapoff", "/dev/zram0")
        (ZRAM / "reset").write_text("1")

    def memory() -> int:
        return int((ZRAM / "mm_stat").read_text().split()[2])

    def held() -> int:
        return int((ZRAM / "mm_stat").read_text().split()[0])

    return Backend(f"zram-{alg}", up, down, memory, held, available)


def swapfile_backend(front: bool, path: str = "/var/tmp/vswapfs-bench.swap", size: str = "4G") -> Backend:
    """A preallocated swapfile, with zswap in front (``front``: the
    compressor vswapfs-zswap gets, zswap's settings restored after)."""
    saved: dict[str, str] = {}

    def available() -> str | None:
        return "zswap not built in" if front and not zswap.available() else None

    def up() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _run("fallocate", "-l", size, path)
        os.chmod(path, 0o600)
        _run("mkswap", path)
        if front:
            saved.update(zswap.params())
            zswap.apply(zswap.wanted(None, None, False))
        _swapon(path)

    def down() -> None:
        _run("swapoff", path)
        if front:
            zswap.apply(saved)
        os.unlink(path)

    def held() -> int:
        return meminfo("Zswapped") if front else linux.swap_areas().get(path, 0) * 1024

    memory = (lambda: meminfo("Zswap")) if front else (lambda: 0)
    return Backend("zswap-swapfile" if front else "swapfile", up, down, memory, held, available)


FLOOR_SOURCE = Path(__file__).resolve().parent / "fuse_floor.c"  # shipped with the package
FLOOR = "fuse-floor-c"
FLOOR_LZ4 = FLOOR + "-lz4"  # the floor with --lz4
ENABLE_URING = Path("/sys/module/fuse/parameters/enable_uring")


def start_floor(work: str, size: int, *, uring: bool = False,
                lz4: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    """Build ``fuse_floor.c`` in ``work`` and serve its ``size``-byte file
    "swap" at ``work``/mnt: (the server, the mountpoint).  RuntimeError if it
    does not mount, the server ended."""
    exe, mnt = os.path.join(work, "fuse_floor"), os.path.join(work, "mnt")
    os.mkdir(mnt)
    _run(shutil.which("cc") or "gcc", "-O2", "-pthread", "-o", exe, str(FLOOR_SOURCE),
         *(["-Wl,--no-as-needed", "-l:liblz4.so.1"] if lz4 else []))  # see fuse_floor.c
    cmd = [exe, *(["--uring"] if uring else []), *(["--lz4"] if lz4 else []), mnt, str(size)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while admin.mount_type(mnt) != "fuse.vswapfloor":
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-300:]  # type: ignore[union-attr]
            raise RuntimeError(f"fuse_floor did not mount: {err}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError("fuse_floor did not mount in 10 s")
        time.sleep(0.02)
    return proc, mnt


def floor_backend(size: int = 4 << 30, uring: bool = False, lz4: bool = False) -> Backend:
    """The yardstick: ``vswapfs_lab/fuse_floor.c``, a minimal C server on raw
    /dev/fuse that stores pages raw and does nothing else, attached exactly
    as vswapfs is.  What it measures is the kernel's loop+FUSE path alone:
    no daemon, in any language, does less per request.  ``uring``: the same
    over FUSE-over-io_uring (``enable_uring`` is turned on while it runs).
    ``lz4``: pages kept as vswapfs's first store keeps them (same-filled as
    their value, else lz4, raw past 3/4 of a page), in C: what that density
    costs with no Python, on one thread (no CPU is idle to compress on
    another: docs/sustained.md)."""
    st: dict[str, Any] = {}

    def available() -> str | None:
        if not FLOOR_SOURCE.exists():
            return f"no {FLOOR_SOURCE} (not a source checkout)"
        if uring and not ENABLE_URING.exists():
            return "this kernel has no FUSE-over-io_uring (no fuse enable_uring parameter)"
        cc = shutil.which("cc") or shutil.which("gcc")
        if lz4 and ctypes.util.find_library("lz4") is None:
            return "no liblz4.so.1 to link the floor's --lz4 with"
        return None if cc else "no C compiler (cc) to build vswapfs_lab/fuse_floor.c"

    def up() -> None:
        work = tempfile.mkdtemp(prefix="vswapfs-floor-")
        st["work"] = work
        if uring:
            st["enable_uring"] = ENABLE_URING.read_text().strip()
            ENABLE_URING.write_text("1")
        try:
            st["proc"], st["mnt"] = start_floor(work, size, uring=uring, lz4=lz4)
            dev = admin.attach_loop(st["mnt"])
            st["dev"] = dev
            _run("mkswap", dev)
            _swapon(dev)
            st["swapped"] = True
        except BaseException:
            down()
            raise

    def down() -> None:
        """swapoff, losetup -d, umount, in that order; each only if it was done."""
        if st.pop("swapped", None):
            _run("swapoff", str(st["dev"]))
        if dev := st.pop("dev", None):
            subprocess.run(["losetup", "-d", str(dev)], check=False)
        proc = st.pop("proc", None)
        if proc is not None:
            if admin.mount_type(str(st["mnt"])) == "fuse.vswapfloor":
                subprocess.run(["umount", str(st["mnt"])], check=False)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if was := st.pop("enable_uring", None):
            ENABLE_URING.write_text("1" if was == "Y" else "0")
        if work := st.pop("work", None):
            shutil.rmtree(str(work), ignore_errors=True)

    def held() -> int:
        v = os.statvfs(str(st["mnt"]))
        return (v.f_blocks - v.f_bfree) * v.f_frsize

    return Backend(FLOOR + ("-uring" if uring else "") + ("-lz4" if lz4 else ""), up, down,
                   lambda: rss(st["proc"].pid), held, available, st)


# Run only when named in --only: what the default run's figures are made of.
EXTRA = ("vswapfs-fastest", "vswapfs-lz4", "fuse-floor-c-uring", "fuse-floor-c-lz4",
         "vswapfs-zswap-tier-noshrink", "vswapfs-zswap-tier-disk", "vswapfs-onestep",
         "vswapfs-small-image", "vswapfs-pure", "vswapfs-zstd-first")


def backends() -> list[Backend]:
    """Every backend, the extras (EXTRA) last."""
    return [
        vswapfs_backend("vswapfs", ["--size", "4G"]),
        vswapfs_backend("vswapfs-backed", ["--size", "4G", "--pool-limit", "32M",
                                           "--backing", f"{BENCH_DIR}/backing0"]),
        zram_backend("lzo-rle"),
        zram_backend("lz4"),
        swapfile_backend(front=True),
        swapfile_backend(front=False),
        # the RFC's setup: zswap in front of vswapfs
        vswapfs_backend("vswapfs-zswap", ["--size", "4G"], zswap_front=True),
        # zswap capped at 1% of RAM: it writes back into vswapfs, the cold tier
        vswapfs_backend("vswapfs-zswap-tier", ["--size", "4G"], zswap_pool_percent=1, zswap_shrinker=True),
        floor_backend(),
        # zstd's fastest level: compression costs next to nothing, so the gap
        # to fuse-floor-c left is the daemon's own Python
        vswapfs_backend("vswapfs-fastest", ["--size", "4G", "--level", "-100"]),
        # the other compressor: lz4, for speed over ratio
        vswapfs_backend("vswapfs-lz4", ["--size", "4G", "--algorithm", "lz4"]),
        # the yardstick over FUSE-over-io_uring: would the other transport lift the floor?
        floor_backend(uring=True),
        # the yardstick storing pages as vswapfs's first store does (lz4, same-filled pages
        # as their value), in C: what that density costs a daemon with no Python at all
        floor_backend(lz4=True),
        # the cold tier without zswap's shrinker: zswap writes back only when its pool is full
        vswapfs_backend("vswapfs-zswap-tier-noshrink", ["--size", "4G"], zswap_pool_percent=1),
        # zstd in one step (--first-level = --level): no fast first store, no recompression
        vswapfs_backend("vswapfs-onestep", ["--size", "4G", "--first-level", "1"]),
        # the first store with zstd at level -1 (the default before lz4), recompressed as the default is
        vswapfs_backend("vswapfs-zstd-first", ["--size", "4G", "--first-algorithm", "zstd"]),
        # an image the sustained run fills past half: the kernel then frees the slot of a
        # page it reads back (vm_swap_full), and the slot's reuse frees the daemon's copy
        vswapfs_backend("vswapfs-small-image", ["--size", "2560M"]),
        # the daemon as pure Python, where pip install compiled it with mypyc (setup.py)
        vswapfs_backend("vswapfs-pure", ["--size", "4G"], pure=True),
        # the cold tier on disk: past a 128 MiB pool, the oldest pages go to a backing file
        vswapfs_backend("vswapfs-zswap-tier-disk", ["--size", "4G", "--pool-limit", "128M",
                                                    "--backing", f"{BENCH_DIR}/tier0"],
                        zswap_pool_percent=1, zswap_shrinker=True),
    ]


class Sampler(threading.Thread):
    """Samples ``read()`` every ``interval`` seconds until stopped."""

    def __init__(self, read: Callable[[], int], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.read, self.samples, self.halt = read, [], threading.Event()  # type: ignore[var-annotated]
        self.interval = interval

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.monotonic(), self.read()))


def returned(samples: list[tuple[float, int]], baseline: int, exit_at: float, within: float = 2.0) -> float:
    """Percent of the peak (above ``baseline``) given back within ``within``
    seconds of ``exit_at``."""
    peak = max((m for _, m in samples), default=baseline) - baseline
    if peak <= 0:
        return 100.0
    after = [m for t, m in samples if exit_at <= t <= exit_at + within]
    low = min(after, default=peak + baseline) - baseline
    return round(100 * (1 - max(low, 0) / peak), 1)


def give_back_s(samples: list[tuple[float, int]], baseline: int, exit_at: float,
                share: float = 0.99) -> float | None:
    """Seconds from ``exit_at`` until ``share`` of the peak (above
    ``baseline``) was given back; None if that did not happen while sampling."""
    peak = max((m for _, m in samples), default=baseline) - baseline
    if peak <= 0:
        return 0.0
    return next((round(max(t - exit_at, 0.0), 3) for t, m in samples
                 if t >= exit_at and m - baseline <= peak * (1 - share)), None)


@contextlib.contextmanager
def sampled(b: Backend, sample_held: bool = False) -> Iterator[dict[str, float]]:
    """Sample ``b``'s memory (and, with ``sample_held``, the data it holds)
    while the block runs and for 2.2 s after it ends; the dict yielded is
    then filled with the peak, the data held at the peak, and how much of
    the memory came back after the block ended.  ``sample_held`` reads, for
    vswapfs, a control file through the mount, 10 times a second."""
    baseline = b.memory()
    sampler = Sampler(b.memory)
    held = Sampler(b.held if sample_held else (lambda: 0), 0.1)
    sampler.start()
    held.start()
    mem: dict[str, float] = {}
    try:
        yield mem
        exit_at = time.monotonic()
        time.sleep(2.2)
    finally:
        for s in (sampler, held):
            s.halt.set()
            s.join()
    peak = max((m for _, m in sampler.samples), default=baseline)
    mem.update(peak_mem_mib=round(peak / MiB, 1),
               held_mib=round(max((h for _, h in held.samples), default=0) / MiB, 1),
               returned_pct=returned(sampler.samples, baseline, exit_at))
    soon = give_back_s(sampler.samples, baseline, exit_at)
    if soon is not None:  # not within the window: the round has no figure
        mem["return99_s"] = soon


def run_workload(b: Backend, limit_mib: int, cmd: list[str],
                 sample_held: bool = False) -> tuple[dict[str, Any], dict[str, float]]:
    """Run ``cmd`` in a cgroup of ``limit_mib``; returns (its JSON, memory
    figures: :func:`sampled`'s)."""
    with sampled(b, sample_held) as mem, MemCgroup(f"vswapfs-bench-{os.getpid()}", limit_mib * MiB) as cg:
        proc = cg.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{b.name}: {' '.join(cmd[:4])} failed ({proc.returncode}): {err.decode()[-500:]}")
    text = out.decode().strip().splitlines()[-1]
    result = json.loads(text) if text.startswith("{") else {"seconds": float(text)}
    return result, mem


WORKLOADS = ("usemem", "memhog", "latency", "pyheap", "kv")
SUSTAINED = {"limit": 512, "mib": 2048, "workloads": "usemem,latency,kv"}  # 2 GiB through 512 MiB
KV_LIMIT = 256  # MiB: the key-value server's cgroup (its heap 3x that) in every run
KV_LEFT_OVER = 32 * MiB  # more held from the workloads before redis: no redis memory figure


def one_round(b: Backend, limit_mib: int, mib: int | None = None,
              workloads: tuple[str, ...] = WORKLOADS, kind_run: int = 1) -> dict[str, float]:
    """One round of ``workloads`` on ``b``; ``kind_run``: usemem's pages of one
    kind (zero, text, random) come in runs of that many (see
    ``vswapfs.workload.use_kind_run``)."""
    py = sys.executable
    mib = mib or 3 * limit_mib
    row: dict[str, float] = {}
    fresh = b.memory()  # what the backend holds before the first workload
    if "usemem" in workloads:
        row.update(_usemem(b, limit_mib, mib, kind_run))
    if "memhog" in workloads:
        r, _ = run_workload(b, limit_mib, [py, "-m", "vswapfs.workload", "--mib", str(mib), "--fill"])
        if r["bad"]:
            raise RuntimeError(f"{b.name}: memhog found {r['bad']} bad pages")
        row.update(memhog_write_s=float(r["write_s"]), memhog_verify_s=float(r["verify_s"]))
    if "latency" in workloads:
        r, _ = run_workload(b, limit_mib, [py, "-m", "vswapfs.workload", "--mib", str(mib), "--mix",
                                           "0:1:1", "--latency", "2000"])
        lat = r["latency"]
        row.update(swapin_p50_us=float(lat["p50_us"]), swapin_p99_us=float(lat["p99_us"]))
    if "pyheap" in workloads:
        try:
            r, _ = run_workload(b, limit_mib, [py, "-c", PYHEAP, str(int(limit_mib * 1.5))])
            row.update(pyheap_s=round(float(r["seconds"]), 3))
        except RuntimeError as e:  # the cgroup's OOM killer can end it on any backend: record, go on
            print(f"{b.name}: pyheap did not finish: {str(e).splitlines()[-1]}", flush=True)
    if "kv" in workloads:
        served = b.served() if b.served else {}
        left = b.memory() - fresh  # what the workloads before left held (the C floors keep their heap)
        with sampled(b, sample_held=True) as mem:  # the second workload for the memory target
            row.update(kv.run(KV_LIMIT))
        row.update(kv_held_mib=mem["held_mib"])
        if left <= KV_LEFT_OVER:
            row.update(kv_peak_mem_mib=mem["peak_mem_mib"])
        else:  # redis's objects reuse that memory: its peak would say nothing of redis
            print(f"{b.name}: no redis memory figure: it still held {left / MiB:.0f} MiB from the "
                  "workloads before", flush=True)
        if b.served:
            row.update(served_delta(served, b.served(), "kv"))
    return row


def _usemem(b: Backend, limit_mib: int, mib: int, kind_run: int = 1) -> dict[str, float]:
    """Write ``mib`` of zero, file and random pages, verify, free; with the
    memory the backend held and gave back, and what the daemon served."""
    py = sys.executable
    row: dict[str, float] = {}
    served = b.served() if b.served else {}
    r, mem = run_workload(b, limit_mib, [py, "-m", "vswapfs.workload", "--mib", str(mib), "--files",
                                         "--kind-run", str(kind_run)], sample_held=True)
    if r["bad"]:
        raise RuntimeError(f"{b.name}: usemem found {r['bad']} bad pages")
    if b.served:
        row.update(served_delta(served, b.served()))
    row.update(usemem_write_s=float(r["write_s"]), usemem_verify_s=float(r["verify_s"]),
               usemem_write_cpu_s=float(r["write_cpu_s"]), usemem_verify_cpu_s=float(r["verify_cpu_s"]),
               usemem_free_s=float(r["free_s"]), peak_mem_mib=mem["peak_mem_mib"],
               held_mib=mem["held_mib"],
               returned_pct=mem["returned_pct"])
    if "return99_s" in mem:
        row["return99_s"] = mem["return99_s"]
    return row


def served_delta(before: dict[str, tuple[int, int, int]],
                 after: dict[str, tuple[int, int, int]], workload: str = "usemem") -> dict[str, float]:
    """What the daemon answered between two fuse_stat readings: WRITE and
    READ requests, pages per request and the seconds it was busy with them."""
    row = {}
    for op, key in (("WRITE", "write"), ("READ", "read")):
        n0, b0, us0 = before.get(op, (0, 0, 0))
        n1, b1, us1 = after.get(op, (0, 0, 0))
        row[f"{workload}_{key}_requests"] = float(n1 - n0)
        if n1 > n0:
            row[f"{workload}_{key}_pages_per_request"] = round((b1 - b0) / 4096 / (n1 - n0), 2)
        row[f"{workload}_{key}_busy_s"] = round((us1 - us0) / 1e6, 3)
    if REFUSED in after:  # each is a swap-out that freed nothing (the kernel logs a write error)
        row[f"{workload}_write_refused"] = float(after[REFUSED][0] - before.get(REFUSED, (0, 0, 0))[0])
    return row


# What the daemon itself spent during usemem and redis (fuse_stat; vswapfs
# only): no ratio to zram, no chart.
DAEMON_METRICS = {
    f"{w}_{m}": (f"{label}: {what}", lower, None)
    for w, label in (("usemem", "usemem"), ("kv", "redis"))
    for m, what, lower in (
        ("write_requests", "WRITE requests the daemon answered", True),
        ("write_pages_per_request", "pages per WRITE", False),
        ("write_busy_s", "daemon busy on WRITE (s)", True),
        ("write_refused", "WRITEs the daemon refused (ENOSPC: the kernel keeps the page)", True),
        ("read_requests", "READ requests the daemon answered", True),
        ("read_pages_per_request", "pages per READ", False),
        ("read_busy_s", "daemon busy on READ (s)", True))
}
METRICS = {  # name -> (label, lower is better, target as a ratio to zram, or None)
    "usemem_write_s": ("usemem write (s)", True, 1.0),
    "usemem_verify_s": ("usemem verify (s)", True, 1.0),
    "usemem_write_cpu_s": ("usemem write: CPU time of the whole machine (CPU-s)", True, None),
    "usemem_verify_cpu_s": ("usemem verify: CPU time of the whole machine (CPU-s)", True, None),
    "usemem_free_s": ("usemem free (s)", True, None),
    "memhog_write_s": ("memhog write (s)", True, None),
    "memhog_verify_s": ("memhog verify (s)", True, None),
    "swapin_p50_us": ("random swap-in p50 (µs)", True, 7.7),
    "swapin_p99_us": ("random swap-in p99 (µs)", True, 0.5),
    "pyheap_s": ("Python heap program (s)", True, None),
    "kv_rps": ("redis random GETs per second (heap 3x its cgroup)", False, None),
    "kv_p99_ms": ("redis GET p99 (ms)", True, None),
    "kv_load_s": ("redis load of the heap (s)", True, None),
    "kv_get_cpu_s": ("redis GETs: CPU time of the whole machine (CPU-s)", True, None),
    "kv_peak_mem_mib": ("redis: memory at peak (MiB)", True, None),
    "kv_held_mib": ("redis: swapped data held at peak (MiB, uncompressed)", True, None),
    "peak_mem_mib": ("memory at peak (MiB)", True, 0.75),
    "held_mib": ("swapped data held at peak (MiB, uncompressed)", True, None),
    "returned_pct": ("memory returned within 2 s (%)", False, None),
    "return99_s": ("time to give back 99% of it after exit (s, sampled every 20 ms)", True, None),
    **DAEMON_METRICS,
}


# How memory comes back: zram gives it all back at once, and the sampler
# looks every 20 ms, so a ratio to zram says nothing (none in the table or chart).
NO_RATIO = ("returned_pct", "return99_s")

# Figures the kernel's loop+FUSE path bounds: verdicts on them also compare
# with the C floor measured in the same run (its memory is raw pages, no yardstick).
FLOOR_METRICS = ("usemem_write_s", "usemem_verify_s", "swapin_p50_us", "swapin_p99_us")


def summarize(rows: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """backend -> metric -> mean, stdev, median, ratio to the reference median."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, rs in rows.items():
        out[name] = {}
        for m in METRICS:
            vals = [r[m] for r in rs if m in r]
            if not vals:
                continue
            out[name][m] = {"mean": statistics.fmean(vals),
                            "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                            "median": statistics.median(vals), "n": len(vals)}
    ref = out.get(REFERENCE, {})
    for metrics in out.values():
        for m, s in metrics.items():
            base = ref.get(m, {}).get("median")
            s["ratio"] = round(s["median"] / base, 3) if base else float("nan")
    return out


def markdown(summary: dict[str, dict[str, dict[str, float]]], missing: dict[str, str]) -> str:
    names = list(summary)
    lines = ["| metric | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for m, (label, _, target) in METRICS.items():
        cells = []
        for n in names:
            s = summary[n].get(m)
            if s is None:
                cells.append("-")
                continue
            bare = n == REFERENCE or m in NO_RATIO or s["ratio"] != s["ratio"]
            ratio = "" if bare else f" ({s['ratio']:.2f}x)"
            if m.endswith("_requests"):  # counts: every digit
                cells.append(f"{s['median']:,.0f} ± {s['stdev']:,.0f}{ratio}")
            else:
                cells.append(f"{s['median']:.3g} ± {s['stdev']:.2g}{ratio}")
        tgt = f" — target ≤ {target}x zram" if target else ""
        lines.append(f"| {label}{tgt} | " + " | ".join(cells) + " |")
    for n, why in missing.items():
        lines.append(f"\n{n}: missing on this kernel ({why})")
    return "\n".join(lines) + "\n"


def verdicts(summary: dict[str, dict[str, dict[str, float]]], backend: str = "vswapfs") -> list[str]:
    """One honest line per target for ``backend``."""
    out = []
    s = summary.get(backend, {})
    for m, (label, lower, target) in METRICS.items():
        if target is None or m not in s or math.isnan(s[m]["ratio"]):  # NaN: no zram in the run
            continue
        r = s[m]["ratio"]
        ok = r <= target if lower else r >= target
        line = f"{'MET   ' if ok else 'MISSED'} {label}: {r:.2f}x zram (target ≤ {target}x)"
        floor = summary.get(FLOOR, {}).get(m)
        if floor and m in FLOOR_METRICS and floor["median"]:
            line += (f"; the C floor {floor['ratio']:.2f}x zram, {backend} "
                     f"{s[m]['median'] / floor['median']:.2f}x the floor")
        out.append(line)
    if "returned_pct" in s:
        v = s["returned_pct"]["median"]
        soon = s.get("return99_s")
        when = f", 99% of it back {soon['median']:.3f} s after exit" if soon else ""
        out.append(f"{'MET   ' if v >= 99 else 'MISSED'} memory returned within 2 s: {v:.1f}% "
                   f"(target ≥ 99%){when}")
    return out


# The targets of the sustained run (2 GiB through 512 MiB): against the C
# floor measured in the same run (the loop+FUSE path's own cost) or zram.
FLOOR_TARGETS = {  # metric -> (bound on the ratio, measured against)
    "usemem_write_s": (1.25, FLOOR),
    "usemem_verify_s": (1.25, FLOOR),
    "swapin_p50_us": (1.2, FLOOR),
    "swapin_p99_us": (0.6, REFERENCE),
    "peak_mem_mib": (1.1, REFERENCE),
    "kv_rps": (0.9, FLOOR),
}


# The machine's CPU time during a target's phase (whole machine, every process
# and the kernel): over the CPU count it bounds the phase, however the work is spread.
CPU_OF = {"usemem_write_s": "usemem_write_cpu_s", "usemem_verify_s": "usemem_verify_cpu_s",
          "kv_rps": "kv_get_cpu_s"}


def cpu_bound(summary: dict[str, dict[str, dict[str, float]]], backend: str, m: str,
              against: str, ncpu: int | None = None) -> str:
    """What the CPU time of ``m``'s phase allows ``backend`` at best (every CPU
    busy throughout), as a ratio to ``against``'s figure, and how many CPUs
    each kept busy; "" without the figures.  A time can be no shorter than
    the phase's CPU-seconds over the CPUs, GETs a second no more than the
    GETs over that."""
    cpu_m = CPU_OF.get(m)
    mine, theirs = summary.get(backend, {}), summary.get(against, {})
    if cpu_m is None or cpu_m not in mine or cpu_m not in theirs or m not in theirs:
        return ""
    ncpu = ncpu or os.cpu_count() or 1
    cpu, base = mine[cpu_m]["median"], theirs[m]["median"]
    if m == "kv_rps":
        best = kv.REQUESTS * ncpu / cpu
        busy = cpu / (kv.REQUESTS / mine[m]["median"]), theirs[cpu_m]["median"] / (kv.REQUESTS / base)
        unit = f"{best:,.0f} GETs/s"
    else:
        best = cpu / ncpu
        busy = cpu / mine[m]["median"], theirs[cpu_m]["median"] / base
        unit = f"{best:.2f} s"
    name = "the floor" if against == FLOOR else against
    return (f"; its CPU time ({cpu:.1f} CPU-s on {ncpu} CPUs) allows at best {unit}, "
            f"{best / base:.2f}x {name} (CPUs busy: {busy[0]:.2f}, {name} {busy[1]:.2f})")


def floor_verdicts(summary: dict[str, dict[str, dict[str, float]]], backend: str = "vswapfs") -> list[str]:
    """One line per sustained-run target whose figures are all in ``summary``:
    the ratio of medians, the bound, and how far from it."""
    out = []
    s = summary.get(backend, {})
    for m, (bound, against) in FLOOR_TARGETS.items():
        base = summary.get(against, {}).get(m, {}).get("median")
        if m not in s or not base:
            continue
        label, lower, _ = METRICS[m]
        r = s[m]["median"] / base
        ok = r <= bound if lower else r >= bound
        sign = "≤" if lower else "≥"
        name = "the floor" if against == FLOOR else against
        gap = "" if ok else f", {abs(r / bound - 1) * 100:.0f}% {'over' if lower else 'short of'} it"
        out.append(f"{'MET   ' if ok else 'MISSED'} {label}: {r:.2f}x {name} (target {sign} {bound}x{gap})"
                   + cpu_bound(summary, backend, m, against))
    return out


def all_verdicts(summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The verdicts for vswapfs, then for the other compressor if it ran,
    and the sustained targets for the floor with lz4 if it ran: what no
    daemon storing pages that densely does better than here."""
    lines = verdicts(summary)
    if sustained := floor_verdicts(summary):
        lines += ["", "against the floor (the sustained run's targets):", *sustained]
    if FLOOR_LZ4 in summary and (dense := floor_verdicts(summary, FLOOR_LZ4)):
        lines += ["", f"{FLOOR_LZ4} (pages stored as vswapfs's first store does, in C, no Python):", *dense]
    if "vswapfs-lz4" in summary:
        lines += ["", "vswapfs-lz4 (--algorithm lz4):", *verdicts(summary, "vswapfs-lz4")]
    return lines


def chart(summary: dict[str, dict[str, dict[str, float]]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = [m for m in METRICS if m not in NO_RATIO and m not in DAEMON_METRICS]
    names = list(summary)
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ratios = [summary[n].get(m, {}).get("ratio", float("nan")) for m in metrics]
        ax.bar([k + i * width for k in range(len(metrics))], ratios, width, label=n)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(metrics))])
    ax.set_xticklabels([METRICS[m][0] for m in metrics], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(f"median, ratio to {REFERENCE} (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


@contextlib.contextmanager
def brought_up(b: Backend) -> Iterator[None]:
    b.up()
    try:
        yield
    finally:
        b.down()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=int, default=64, help="cgroup limit in MiB (workloads use 3x)")
    p.add_argument("--mib", type=int, default=None, help="workload size in MiB (default: 3x the limit)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, of {', '.join(WORKLOADS)} (default: all)")
    p.add_argument("--sustained", action="store_true",
                   help="the sustained size: 2 GiB of pages through a 512 MiB cgroup, usemem and "
                        "latency (--limit 512 --mib 2048 --workloads usemem,latency)")
    p.add_argument("--kind-run", type=int, default=1, metavar="PAGES",
                   help="usemem's pages of one kind in runs of PAGES (default 1: the kind changes every "
                        "page, so the kernel, which writes no zero page, sends about 2 pages a write)")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--only", help="comma-separated backend names (default: all but "
                   + ", ".join(EXTRA) + ")")
    p.add_argument("--render", metavar="BENCH_JSON",
                   help="measure nothing: write the report again from a saved run's bench.json")
    a = p.parse_args(argv)
    if a.kind_run < 1:
        p.error(f"--kind-run takes a number of pages of at least 1, not {a.kind_run}")
    if a.sustained:
        a.limit, a.mib, a.workloads = SUSTAINED["limit"], SUSTAINED["mib"], SUSTAINED["workloads"]
    workloads = tuple(w for w in str(a.workloads).split(",") if w)
    if unknown_w := [w for w in workloads if w not in WORKLOADS]:
        print(f"bench: no workload {', '.join(unknown_w)}; there are {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    if "kv" in workloads and not a.render and (why := kv.available()):
        print(f"bench: no kv workload: {why}", file=sys.stderr)
        workloads = tuple(w for w in workloads if w != "kv")
        if not workloads:  # rounds of nothing would print a table of dashes
            return 2
    if a.render:
        try:
            render(Path(a.render), Path(a.out))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"bench: cannot render {a.render}: {e!r}", file=sys.stderr)
            return 2
        return 0
    if os.geteuid() != 0:
        print("bench: must be run as root", file=sys.stderr)
        return 1
    names = a.only.split(",") if a.only else None
    known = [b.name for b in backends()]
    if names and (unknown := [n for n in names if n not in known]):
        print(f"bench: no backend {', '.join(unknown)}; there are {', '.join(known)}", file=sys.stderr)
        return 2
    chosen = [b for b in backends() if (b.name in names if names else b.name not in EXTRA)]
    missing = {b.name: why for b in chosen if (why := b.available())}
    chosen = [b for b in chosen if b.name not in missing]
    if admin.swaps():
        print(f"bench: swap is already on ({', '.join(admin.swaps())}); swapoff first", file=sys.stderr)
        return 1
    rows: dict[str, list[dict[str, float]]] = {b.name: [] for b in chosen}
    for rnd in range(a.rounds):
        order = chosen[rnd % len(chosen):] + chosen[:rnd % len(chosen)]
        for b in order:
            with brought_up(b):
                row = one_round(b, a.limit, a.mib, workloads, a.kind_run)
            rows[b.name].append(row)
            print(f"round {rnd + 1}/{a.rounds} {b.name}: " + json.dumps(row), flush=True)
    machine = f"{os.uname().release}, {os.cpu_count()} CPUs, {meminfo('MemTotal') >> 30} GiB RAM"
    report(Path(a.out), machine, a.limit, rows, missing, a.mib or 3 * a.limit, a.kind_run)
    return 0


def report(out: Path, machine: str, limit_mib: int, rows: dict[str, list[dict[str, float]]],
           missing: dict[str, str], mib: int | None = None, kind_run: int = 1) -> None:
    """Summarize the rounds and write bench.md, bench.json and bench.png to ``out``."""
    summary = summarize(rows)
    out.mkdir(exist_ok=True)
    table = markdown(summary, missing)
    n = max((len(rs) for rs in rows.values()), default=0)
    mib = mib or 3 * limit_mib
    runs = f" (usemem: pages of one kind in runs of {kind_run})" if kind_run > 1 else ""
    header = (f"Machine: {machine}. Limit {limit_mib} MiB, workloads {mib} MiB{runs}, {n} interleaved "
              f"rounds; median ± stdev, (ratio to {REFERENCE} median).\n\n")
    lines = all_verdicts(summary)
    (out / "bench.md").write_text(header + table + "\n" + "\n".join(lines) + "\n")
    (out / "bench.json").write_text(json.dumps({"machine": machine, "limit_mib": limit_mib, "mib": mib,
                                                "kind_run": kind_run, "rounds": rows,
                                                "summary": summary, "missing": missing}, indent=1))
    drew = chart(summary, out / "bench.png")
    print("\n" + header + table)
    print("\n".join(lines))
    print(f"\nwrote {out}/bench.md, bench.json" + (", bench.png" if drew else " (no matplotlib: no chart)"))


def render(saved: Path, out: Path) -> None:
    """Write the report again from a saved bench.json's rounds, as this
    version of the harness summarizes them; nothing is measured."""
    d = json.loads(saved.read_text())
    report(out, d["machine"], d["limit_mib"], d["rounds"], d["missing"], d.get("mib"), d.get("kind_run", 1))


if __name__ == "__main__":
    sys.exit(main())
