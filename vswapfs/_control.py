"""The files of ``control/``: what they show and what writing them does.

Sysfs habit: one value per file (every counter and gauge has its own file),
plus zram's multi-column files and two machine-readable dumps.  Knobs read
back their value and take a new one; actions only take a write.  A bad
value raises ValueError: the caller answers EINVAL and nothing changes.
Knows the engine, not FUSE.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from . import linux, zswap
from ._consts import FIRST_ALGORITHMS
from ._sizing import mount_warnings
from ._units import parse_limit, parse_size
from .engine import CODECS, COUNTERS, DESCRIPTIONS, SwapSpace
from .fuse import PollStats, ServiceStats

MM_STAT = ("orig_data_size", "compr_data_size", "mem_used_total", "mem_limit", "mem_used_max",
           "same_pages", "pages_compacted", "huge_pages", "huge_pages_since")
# zram's four columns, then the backing-file faults (appended, as zram once grew io_stat)
IO_STAT = ("failed_reads", "failed_writes", "invalid_io", "notify_free", "bd_read_errors",
           "bd_write_errors", "checksum_failures")
BD_STAT = ("bd_count", "bd_reads", "bd_writes")

# What the daemon says of itself, besides its pid: (name, help, value without a daemon)
DAEMON_FILES = (
    ("version", "the daemon's version", "?"),
    ("build", "how its serving path runs: mypyc (compiled) or python (see setup.py)", "?"),
    ("supervisor_pid", "the pid of the supervisor that holds the state (0: none)", "0"),
    ("restarts", "daemons that served this mount before this one (crashes and restarts)", "0"),
)

log = logging.getLogger("vswapfs")

Reader = Callable[[SwapSpace], str]
Writer = Callable[[SwapSpace, str], str]  # returns what was done, for the log


@dataclass(frozen=True, slots=True)
class ControlFile:
    name: str
    help: str
    read: Reader | None = None
    write: Writer | None = None

    @property
    def mode(self) -> int:
        return (0o444 if self.read else 0) | (0o200 if self.write else 0)


def _columns(names: tuple[str, ...]) -> Reader:
    def read(space: SwapSpace) -> str:
        s = space.stats()
        return " ".join(str(s[n]) for n in names) + "\n"
    return read


def _one(name: str) -> Reader:
    return lambda space: f"{space.stats()[name]}\n"


def _all_stats(space: SwapSpace) -> dict[str, int]:
    """The engine's counters and gauges, then zswap's (the tier in front)."""
    return {**space.stats(), **zswap.stats()}


_ZSWAP_COUNTERS = {"zswap_stores", "zswap_loads", "zswap_written_back_pages", "zswap_pool_limit_hit"}


def _metrics(space: SwapSpace) -> str:
    out = []
    for name, value in _all_stats(space).items():
        counter = (name in COUNTERS and name != "mem_used_max") or name in _ZSWAP_COUNTERS \
            or name.startswith("zswap_reject_")
        what = DESCRIPTIONS.get(name) or zswap.DESCRIPTIONS[name]
        out += [f"# HELP vswapfs_{name} {what}", f"# TYPE vswapfs_{name} {'counter' if counter else 'gauge'}",
                f"vswapfs_{name} {value}"]
    return "\n".join(out) + "\n"


# busy_poll's columns: µs a thread's polling window may grow to (0: never polls), the
# widest window now (µs), requests read while polling, sleeps in poll(2), spells whose
# polling stopped because the CPU was wanted, and the highest share (percent) of recent idle
# spells that ended within the maximum (a thread polls only while it is at least 75)
BUSY_POLL = ("max_us", "window_us", "caught", "slept", "ceded", "within_pct")


def _fuse_stat(stats: ServiceStats) -> str:
    return "".join(f"{name} {n} {data} {ns // 1000} {ns / n / 1000:.1f}\n"
                   for name, (n, data, ns) in stats().items())


def _fuse_metrics(stats: ServiceStats) -> str:
    """fuse_stat in the Prometheus text format, one series per opcode."""
    rows = stats()
    out = []
    for metric, what, field in (
            ("requests_total", "FUSE requests answered", 0),
            ("bytes_total", "bytes of file data written or read", 1),
            ("busy_seconds_total", "time from parsing a request to writing its reply", 2)):
        out += [f"# HELP vswapfs_fuse_{metric} {what}, per opcode",
                f"# TYPE vswapfs_fuse_{metric} counter"]
        for op, row in rows.items():
            value = row[field] / 1e9 if field == 2 else row[field]
            out.append(f'vswapfs_fuse_{metric}{{op="{op}"}} {value}')
    return "\n".join(out) + "\n"


def _int(text: str, what: str) -> int:
    """An integer; its bounds are the engine's to check (``configure``)."""
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise ValueError(f"{what}: not an integer: {text.strip()!r}") from None


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "y", "yes", "on", "true"):
        return True
    if t in ("0", "n", "no", "off", "false"):
        return False
    raise ValueError(f"not a boolean: {text.strip()!r} (use 0 or 1)")


def _knob(name: str, help: str, get: Reader, set_: Callable[[SwapSpace, str], None]) -> ControlFile:
    def write(space: SwapSpace, text: str) -> str:
        set_(space, text)
        return f"{name} = {get(space).strip()}"
    return ControlFile(name, help, get, write)


def warn_of_the_pool(space: SwapSpace, what: str) -> None:
    """Log what ``vswapfs status`` warns of (a pool that can fill before
    the kernel's swap area does) after ``what`` changed it, or at start."""
    paths = [bf.path for bf in space.backing_files()]
    for w in mount_warnings(space.stats(), linux.mem_total(), paths):
        log.warning("%s: %s", what, w)


def _set_pool_limit(space: SwapSpace, text: str) -> None:
    space.configure(pool_limit=parse_limit(text))
    warn_of_the_pool(space, "control/pool_limit")


def _set_level(space: SwapSpace, text: str) -> None:
    space.configure(level=_int(text, "compression_level"))


def _set_first_level(space: SwapSpace, text: str) -> None:
    space.configure(first_level=_int(text, "first_compression_level"))


def _set_first_algorithm(space: SwapSpace, text: str) -> None:
    space.configure(first_algorithm=text.strip())


def _bracketed(choices: tuple[str, ...], chosen: str) -> str:
    """zram's comp_algorithm format: the choices, the one in use in brackets."""
    return " ".join(f"[{c}]" if c == chosen else c for c in choices) + "\n"


def _first_algorithm(space: SwapSpace) -> str:
    """The first store's choices (with the lz4 codec, lz4 alone: there is no second step)."""
    if space.codec != "zstd":
        return _bracketed((space.codec,), space.codec)
    return _bracketed(FIRST_ALGORITHMS, space.first_algorithm)


def _set_accept(space: SwapSpace, text: str) -> None:
    space.configure(accept_threshold=_int(text, "accept_threshold_percent"))


def _set_huge(space: SwapSpace, text: str) -> None:
    space.configure(huge_threshold=_int(text, "huge_threshold"))


def _set_wb(space: SwapSpace, text: str) -> None:
    space.configure(writeback_enabled=_bool(text))


def _do_writeback(space: SwapSpace, text: str) -> str:
    t = text.strip().lower()
    n = None if t == "all" else _int(t, "writeback")
    if n is not None and n < 1:
        raise ValueError(f"writeback: {n} pages? write a positive count, or all")
    return f"wrote back {space.writeback(n)} pages"


def _do_compact(space: SwapSpace, text: str) -> str:
    return f"compaction freed {space.compact()} pages"


def _path(text: str) -> str:
    p = text.strip()
    if not p.startswith("/") or "\n" in p or "\0" in p:
        raise ValueError(f"expected an absolute path, not {p!r}")
    return p


def _do_add_backing(space: SwapSpace, text: str) -> str:
    p = _path(text)
    index = space.add_backing(p)
    warn_of_the_pool(space, "control/add_backing")  # e.g. on a file system with little room
    return f"added backing file {p} as #{index}"


def _do_evacuate(space: SwapSpace, text: str) -> str:
    p = _path(text)
    moved = space.remove_backing(p)
    warn_of_the_pool(space, "control/evacuate")
    return f"evacuated {moved} pages from {p}, removed it"


def _const(value: str) -> Reader:
    return lambda _: f"{value}\n"


def _check(space: SwapSpace) -> str:
    problems = space.check()
    return "".join(p + "\n" for p in problems) if problems else "ok\n"


def build_control_files(space: SwapSpace, service_stats: ServiceStats = dict,
                        daemon: dict[str, str] | None = None,
                        poll_stats: PollStats = lambda: (0, 0, 0, 0, 0, 0)) -> dict[str, ControlFile]:
    """All control files, by name.  ``service_stats``: the transport's
    counts per FUSE opcode (requests, bytes, ns), for ``fuse_stat`` and
    ``metrics``; ``daemon``: the values of DAEMON_FILES; ``poll_stats``:
    the columns of BUSY_POLL, for ``busy_poll``."""
    daemon = daemon or {}
    files = [
        ControlFile("mm_stat", "zram columns: " + " ".join(MM_STAT), _columns(MM_STAT)),
        ControlFile("io_stat", "zram columns: " + " ".join(IO_STAT), _columns(IO_STAT)),
        ControlFile("bd_stat", "zram columns, 4 KiB units: " + " ".join(BD_STAT), _columns(BD_STAT)),
        ControlFile("stats.json", "every counter and gauge, zswap's too",
                    lambda s: json.dumps(_all_stats(s)) + "\n"),
        ControlFile("metrics", "Prometheus text format",
                    lambda s: _metrics(s) + _fuse_metrics(service_stats)),
        ControlFile("fuse_stat", "per FUSE opcode answered: name, requests, bytes written or read, "
                    "busy µs (parse to reply, summed), mean µs", lambda _: _fuse_stat(service_stats)),
        ControlFile("busy_poll", "FUSE channel threads polling before they sleep, columns: "
                    + " ".join(BUSY_POLL), lambda _: " ".join(map(str, poll_stats())) + "\n"),
        ControlFile("backing_files", "backing files, one path per line",
                    lambda s: "".join(bf.path + "\n" for bf in s.backing_files())),
        ControlFile("pid", "the daemon's pid", lambda s: f"{os.getpid()}\n"),
        ControlFile("check", "the engine's consistency check (every table word against the gauges, "
                    "the pool and the rmaps): ok, or the problems found", _check),
        *(ControlFile(name, help, _const(daemon.get(name, default)))
          for name, help, default in DAEMON_FILES),
        _knob("pool_limit", "pool memory limit: bytes, K/M/G, or N% of RAM; 0 for none",
              lambda s: f"{s.pool_limit}\n", _set_pool_limit),
        ControlFile("comp_algorithm", "zram's format: the codecs, the one in use in brackets",
                    lambda s: _bracketed(CODECS, s.codec)),
        _knob("compression_level", "zstd level (negative: faster); 0 with lz4, which has none",
              lambda s: f"{s.level}\n", _set_level),
        _knob("first_comp_algorithm", "what a page is stored with first, recompressed to zstd at "
              "compression_level when idle: lz4, or zstd at first_compression_level (the one in "
              "use in brackets)", _first_algorithm, _set_first_algorithm),
        _knob("first_compression_level", "zstd level a page is stored at first when "
              "first_comp_algorithm is zstd, recompressed to compression_level when idle (the same: "
              "no recompression); never above it",
              lambda s: f"{s.first_level}\n", _set_first_level),
        _knob("accept_threshold_percent", "after the limit is hit, accept again below this % of it",
              lambda s: f"{s.accept_threshold}\n", _set_accept),
        _knob("huge_threshold", "bytes: pages that compress worse are stored raw or on disk",
              lambda s: f"{s.huge_threshold}\n", _set_huge),
        _knob("writeback_enabled", "1: pool pages may move to backing files",
              lambda s: f"{int(s.writeback_enabled)}\n", _set_wb),
        ControlFile("writeback", "write N or all: move LRU pool pages to a backing file",
                    write=_do_writeback),
        ControlFile("compact", "write anything: compact the pool", write=_do_compact),
        ControlFile("add_backing", "write a path: add a backing file there", write=_do_add_backing),
        ControlFile("evacuate", "write a path: move its pages away, then remove it",
                    write=_do_evacuate),
    ]
    taken = {f.name for f in files}
    files += [ControlFile(name, DESCRIPTIONS[name], _one(name))
              for name in space.stats() if name not in taken]
    return {f.name: f for f in files}


__all__ = ["BD_STAT", "BUSY_POLL", "IO_STAT", "MM_STAT", "ControlFile", "build_control_files", "parse_size",
           "warn_of_the_pool"]
