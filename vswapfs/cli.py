"""``vswapfs``: mount, up, down and status, in the spirit of zramctl and swapon."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

from . import _sizing, admin, zswap
from ._consts import (
    CODECS,
    DAEMON_ENV,
    DEFAULT_CODEC,
    DEFAULT_FIRST_ALGORITHM,
    DEFAULT_FIRST_LEVEL,
    DEFAULT_LEVEL,
    FIRST_ALGORITHMS,
    PAGE,
    VERSION,
    ZSTD_LEVELS,
)
from ._units import human, parse_limit, parse_size
from .linux import mem_total


def _size(text: str) -> int:
    try:
        n = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < PAGE:
        raise argparse.ArgumentTypeError(f"size {text!r} is smaller than one 4 KiB page")
    return n


DEFAULT_CHANNELS = 1
MAX_CHANNELS = 64
# what polling saves is a wake-up of tens of µs on a VM; 200, not 50: on a host where a swap-in's
# gaps outlast 50 µs, 50 never polled (docs/sustained.md, "What a READ waits on, and busy
# polling's window")
DEFAULT_BUSY_POLL_US = 200
MAX_BUSY_POLL_US = 1000


def _whole_number(what: str, top: int, low: int = 0) -> Callable[[str], int]:
    """An argparse type: an integer in ``low``..``top``, else one clear line naming ``what``."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = low - 1
        if not low <= n <= top:
            raise argparse.ArgumentTypeError(f"{what} must be an integer in {low}..{top}, not {text!r}")
        return n
    return parse


def _positive(what: str, top: float) -> Callable[[str], float]:
    """An argparse type: a number above 0 and at most ``top``, else one clear line."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = -1.0
        if not 0 < x <= top:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{what} must be a number above 0 and at most {top:g}, "
                                             f"not {text!r}")
        return x
    return parse


def _mix(text: str) -> str:
    """An argparse type: stress's zero:text:random weights, checked before any worker starts."""
    from .workload import parse_mix

    try:
        parse_mix(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


_channels = _whole_number("channels", MAX_CHANNELS)
_busy_poll = _whole_number("busy-poll (µs)", MAX_BUSY_POLL_US)
MAX_STRESS_WORKERS = 64
_workers = _whole_number("workers", MAX_STRESS_WORKERS, low=1)
_rounds = _whole_number("rounds", 1_000_000)
_multiple = _positive("multiple", 100.0)
_duration = _positive("duration (s)", 7 * 86400.0)


def _limit(text: str) -> int:
    try:
        return parse_limit(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_mount_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=_size,
                   help="virtual swap size (default: 7/8 of the pool limit, what it keeps if no "
                        "page compresses; 2x RAM with a backing file; half of RAM with no pool limit)")
    p.add_argument("--backing", action="append", default=[], metavar="PATH",
                   help="backing file to create (sparse); repeatable")
    p.add_argument("--pool-limit", type=_limit, default=None, metavar="S|P%",
                   help=f"compressed pool limit: bytes (512M) or percent of RAM (20%%); 0 for none; "
                        f"default {DEFAULT_POOL_LIMIT.replace('%', '%%')} (zswap's max_pool_percent), "
                        "or the reserve")
    p.add_argument("--algorithm", choices=CODECS, default=DEFAULT_CODEC,
                   help=f"compressor, as zramctl's --algorithm (default {DEFAULT_CODEC}; lz4 is "
                        "about twice as fast and a quarter less dense on text)")
    p.add_argument("--level", type=int, default=None,
                   help=f"zstd level pages end up at (default {DEFAULT_LEVEL})")
    p.add_argument("--first-level", type=int, default=None,
                   help=f"zstd level a page is stored at when swapped out, recompressed to --level "
                        f"once the daemon is idle (default {DEFAULT_FIRST_LEVEL}; given alone, it "
                        "makes --first-algorithm zstd; = --level: no recompression)")
    p.add_argument("--first-algorithm", choices=FIRST_ALGORITHMS, default=None,
                   help=f"what a zstd space stores a page with when swapped out, recompressed to zstd "
                        f"at --level once the daemon is idle (default {DEFAULT_FIRST_ALGORITHM}; zstd: at "
                        "--first-level)")
    p.add_argument("--channels", type=_channels, default=DEFAULT_CHANNELS, metavar="N",
                   help=f"threads that serve the image's I/O on their own /dev/fuse clone "
                        f"(default {DEFAULT_CHANNELS}; 0: the event loop serves it)")
    p.add_argument("--busy-poll", type=_busy_poll, default=DEFAULT_BUSY_POLL_US, metavar="US",
                   help=f"µs a channel thread may keep polling /dev/fuse before it sleeps, a window "
                        f"that adapts to how close requests come (default {DEFAULT_BUSY_POLL_US}; "
                        f"0: sleep at once)")
    p.add_argument("--zswap", nargs="?", const="", default=None, metavar="COMPRESSOR",
                   help="put the kernel's zswap in front (global: it fronts every swap device), "
                        "with COMPRESSOR or the fastest the kernel has (lz4, lzo-rle, lzo); "
                        "its settings are restored at down")
    p.add_argument("--zswap-max-pool-percent", type=int, default=None, metavar="N",
                   help="zswap's pool limit, percent of RAM (with --zswap; default: as it is)")
    p.add_argument("--zswap-shrinker", action="store_true",
                   help="let zswap's shrinker write cold pages back to vswapfs (with --zswap)")
    p.add_argument("--no-supervisor", action="store_true",
                   help="run the daemon without the supervisor that keeps the swapped-out pages "
                        "alive across its crashes and restarts (not recommended)")
    p.add_argument("--reserve", type=_size, default=0, metavar="SIZE",
                   help="commit SIZE of pool memory (and the daemon's heap) at start and fault "
                        "nothing in later; for a daemon in the same memory cgroup as its users")


MIN_RESERVE = 64 << 10  # one pool chunk
# The pool's limit unless one is given: zswap's default max_pool_percent.  A
# swap backend that can take all RAM leaves the OOM killer only the rest;
# at 20% the pool holds about half of RAM's worth of pages at zstd's usual
# 2.5x, more with a backing file, and the rest of RAM stays the workload's.
DEFAULT_POOL_LIMIT = "20%"


def _check_mount_options(a: argparse.Namespace) -> None:
    """What argparse cannot check alone; fails before anything starts."""
    if a.reserve and a.reserve < MIN_RESERVE:
        raise admin.AdminError(f"--reserve {a.reserve} is less than one 64 KiB pool chunk")
    if a.reserve and a.pool_limit and a.pool_limit > a.reserve:
        raise admin.AdminError(f"--pool-limit {a.pool_limit} is larger than --reserve {a.reserve}")
    if a.first_algorithm is not None and a.algorithm != "zstd":
        raise admin.AdminError(f"--first-algorithm is a zstd setting; --algorithm {a.algorithm} has "
                               "one step")
    for opt, v in (("--level", a.level), ("--first-level", a.first_level)):
        if v is not None and a.algorithm != "zstd":
            raise admin.AdminError(f"{opt} is a zstd setting; --algorithm {a.algorithm} has no levels")
        lo, hi = ZSTD_LEVELS
        if v is not None and (v == 0 or not lo <= v <= hi):
            raise admin.AdminError(f"{opt} must be a non-zero zstd level in {lo}..{hi}, not {v}")


def _zswap_values(a: argparse.Namespace) -> dict[str, str] | None:
    """What --zswap asks zswap to be, checked before anything starts; None
    without --zswap (and its other options are refused then)."""
    if a.zswap is None:
        if a.zswap_max_pool_percent is not None or a.zswap_shrinker:
            raise admin.AdminError("--zswap-max-pool-percent and --zswap-shrinker need --zswap")
        return None
    try:
        return zswap.wanted(a.zswap or None, a.zswap_max_pool_percent, a.zswap_shrinker)
    except zswap.ZswapError as e:
        raise admin.AdminError(str(e)) from None


def _mount_args(a: argparse.Namespace) -> list[str]:
    _check_mount_options(a)
    out = []
    if a.size:
        out += ["--size", str(a.size)]
    for b in a.backing:
        out += ["--backing", os.path.abspath(b)]
    if a.pool_limit is not None:
        out += ["--pool-limit", str(a.pool_limit)]
    if a.algorithm != DEFAULT_CODEC:
        out += ["--algorithm", a.algorithm]
    if a.level is not None:
        out += ["--level", str(a.level)]
    if a.first_level is not None:
        out += ["--first-level", str(a.first_level)]
    if a.first_algorithm is not None:
        out += ["--first-algorithm", a.first_algorithm]
    if a.reserve:
        out += ["--reserve", str(a.reserve)]
    if a.channels != DEFAULT_CHANNELS:
        out += ["--channels", str(a.channels)]
    if a.busy_poll != DEFAULT_BUSY_POLL_US:
        out += ["--busy-poll", str(a.busy_poll)]
    if a.no_supervisor:
        out += ["--no-supervisor"]
    return out


class _Version(argparse.Action):
    """``--version``: the build is looked up only when asked (see _build)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from . import _build

        print(f"vswapfs {VERSION} ({_build.describe()})")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vswapfs", description="virtual swap space in userspace")
    p.add_argument("--version", action=_Version, nargs=0,
                   help="print the version and the build (mypyc or python) and exit")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mount", help="mount a vswapfs file system (the daemon)")
    m.add_argument("mountpoint")
    _add_mount_options(m)
    m.add_argument("--foreground", action="store_true", help="do not detach; log to stderr")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--debug", action="store_true", help="log every request")
    u = sub.add_parser("up", help="mount if needed, attach a loop device, mkswap, swapon")
    u.add_argument("mountpoint")
    _add_mount_options(u)
    u.add_argument("--priority", type=int, help="swap priority (swapon -p)")
    r = sub.add_parser("restart", help="replace the daemon with a new process (new code too), "
                       "swap staying on: the new one takes the swapped-out pages over")
    r.add_argument("mountpoint")
    r.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the new daemon")
    d = sub.add_parser("down", help="swapoff, detach the loop device, unmount")
    d.add_argument("mountpoint")
    d.add_argument("--force", action="store_true",
                   help="recover after the daemon died: abort the FUSE connection")
    t = sub.add_parser("stress", help="verify every page under memory pressure (swap must be up)")
    t.add_argument("mountpoint")
    t.add_argument("--workers", type=_workers, default=2,
                   help=f"processes that share the working set (default 2, at most {MAX_STRESS_WORKERS})")
    t.add_argument("--limit", type=_size, default=64 << 20, help="memory cgroup limit (default 64M)")
    t.add_argument("--multiple", type=_multiple, default=3.0, help="working set / limit (default 3)")
    t.add_argument("--pattern", choices=("seq", "random", "cow", "mix"), default="mix")
    t.add_argument("--duration", type=_duration, default=60.0, help="seconds (default 60)")
    t.add_argument("--rounds", type=_rounds, default=0,
                   help="rounds per worker instead of a duration (default 0: the duration)")
    t.add_argument("--mix", type=_mix, default="1:1:1", help="zero:text:random page weights")
    i = sub.add_parser("install-helpers", help="install mount.fuse.vswapfs and the systemd unit")
    i.add_argument("--root", default="/", help="install under this directory (default /)")
    s = sub.add_parser("status", help="a zramctl-like table of vswapfs mounts")
    s.add_argument("mountpoint", nargs="?")
    s.add_argument("--json", action="store_true")
    return p


def _cmd_mount(a: argparse.Namespace, argv: Sequence[str]) -> int:
    if not a.foreground:
        values = _zswap_values(a)
        admin.check_root()
        pid = admin.start_daemon(a.mountpoint, _mount_args(a))
        if values is not None:
            try:
                admin.claim_zswap(a.mountpoint, values)
            except BaseException:
                admin.down(a.mountpoint, force=True)
                raise
        print(f"{a.mountpoint}: mounted (daemon pid {pid}, log {admin.log_path(a.mountpoint)})")
        return 0
    _check_mount_options(a)
    admin.check_root()
    from ._supervisor import ENV_READY, ENV_SOCKET, Keeper, command

    supervised = ENV_SOCKET in os.environ
    if not supervised and not a.no_supervisor:
        # this process becomes the supervisor; the daemon is its child, started
        # again with the same arguments whenever it dies (see _supervisor).
        # -P: the package comes from the installation (or PYTHONPATH), never
        # from the directory the admin happened to start it in
        if a.ready_fd is None:
            admin.check_mountpoint(a.mountpoint)
        child = [sys.executable, "-P", "-m", "vswapfs", *_without_ready_fd(argv)]
        os.execve(sys.executable, command(child, a.ready_fd, str(admin.supervisor_pidfile(a.mountpoint))),
                  {**os.environ, **DAEMON_ENV})
    if DAEMON_ENV.items() - os.environ.items():
        # malloc's settings are read once, at start: run again with them
        os.execve(sys.executable, [sys.executable, "-P", "-m", "vswapfs", *argv],
                  {**os.environ, **DAEMON_ENV})
    keeper = Keeper.from_env()
    if keeper is not None and a.ready_fd is None and ENV_READY in os.environ:
        a.ready_fd = int(os.environ.pop(ENV_READY))
    inherited = keeper.inherited if keeper else {}
    if a.ready_fd is None and not inherited:
        admin.check_mountpoint(a.mountpoint)
    import trio

    from . import _daemon
    from .engine import SwapSpace, kept_size

    logging.basicConfig(level=logging.DEBUG if a.debug else logging.INFO,
                        format="%(asctime)s vswapfs[%(process)d] %(levelname)s %(message)s")
    _daemon.protect(reserve=bool(a.reserve))  # before any thread exists
    limit = a.pool_limit
    if limit is None:
        limit = 0 if a.reserve else parse_limit(DEFAULT_POOL_LIMIT)  # a reserve is its own limit
    # the engine's fds, if a previous daemon left them (it takes the names it knows)
    engine_fds = inherited if "table" in inherited else {}
    size = kept_size(engine_fds)  # a daemon that takes over serves the image it was given
    if size is None:
        size = a.size or _sizing.default_size(mem_total(), _sizing.bounding_limit(limit, a.reserve),
                                              _sizing.backing_room(a.backing) if a.backing else None)
    elif a.size and a.size // PAGE * PAGE != size:
        logging.warning("--size %d ignored: the mount serves the %d bytes it was made with", a.size, size)
    space = SwapSpace(size // PAGE * PAGE, pool_limit=limit,
                      level=a.level if a.level is not None else DEFAULT_LEVEL,
                      first_level=a.first_level if a.first_level is not None else DEFAULT_FIRST_LEVEL,
                      # a zstd --first-level alone asks for a zstd first store (= --level: one step)
                      first_algorithm=a.first_algorithm or ("zstd" if a.first_level is not None
                                                            else DEFAULT_FIRST_ALGORITHM),
                      backing=a.backing,
                      reserve=a.reserve, dynamic=not a.reserve, codec=a.algorithm,
                      fds=engine_fds or None)
    if keeper is not None:
        # before the mount: no page can be stored before they are kept (after a takeover,
        # those an earlier version did not keep, such as the size)
        keeper.put({k: fd for k, fd in space.fds().items() if k not in engine_fds})
        if "settings" in inherited:  # what control/ tuned in an earlier daemon
            _daemon.apply_settings(space, inherited["settings"])
        space.on_fds(keeper.put, keeper.drop)
    trio.run(functools.partial(_daemon.run, channels=a.channels, busy_poll_us=a.busy_poll,
                               trim=not a.reserve, keeper=keeper),
             admin.canonical(a.mountpoint), space, a.ready_fd)
    return 0


def _without_ready_fd(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--ready-fd N``: only the first daemon gets it."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ready-fd":
            skip = True
        elif not arg.startswith("--ready-fd="):
            out.append(arg)
    return out


def _cmd_status(a: argparse.Namespace) -> int:
    mnts = [a.mountpoint] if a.mountpoint else admin.mounts()
    rows = {m: admin.status(m) for m in mnts}
    algorithms = {m: admin.algorithm(m) for m in mnts}
    warnings = {m: admin.pool_risks(m, s) for m, s in rows.items()}
    z = zswap.stats()
    if a.json:
        print(json.dumps({m: {**s, "algorithm": algorithms[m], "tiers": _tiers(s, z), "warnings": warnings[m]}
                          for m, s in rows.items()}, indent=2))
        return 0
    for m, ws in warnings.items():  # what changed since up: a lower pool limit, a backing file gone
        for w in ws:
            print(f"vswapfs: warning: {m}: {w}", file=sys.stderr)
    cols = ("MOUNT", "DEVICE", "DISKSIZE", "ALGORITHM", "DATA", "COMPR", "TOTAL", "LIMIT", "ZERO", "POOL",
            "PHYS", "RATIO")
    lines = [cols]
    for m, s in rows.items():
        ratio = s["orig_data_size"] / max(s["mem_used_total"], 1) if s["stored_pages"] else 0
        lines.append((m, ",".join(admin.loops_of(m)) or "-", human(s["disksize"]), algorithms[m],
                      human(s["orig_data_size"]), human(s["compr_data_size"]), human(s["mem_used_total"]),
                      human(s["mem_limit"]) if s["mem_limit"] else "-", str(s["zero_pages"]),
                      str(s["pool_pages"]), str(s["phys_pages"]), f"{ratio:.2f}"))
    widths = [max(len(r[i]) for r in lines) for i in range(len(cols))]
    for r in lines:
        cells = (v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
        print(" ".join(cells))
    if z.get("zswap_enabled") or z.get("zswap_stored_pages"):
        params = zswap.params()
        print(f"zswap ({params.get('compressor', '?')}, pool limit {params.get('max_pool_percent', '?')}% "
              f"of RAM) in front of every swap device: {z['zswap_stored_pages']} pages "
              f"({human(z['zswap_stored_bytes'])}) in {human(z['zswap_pool_bytes'])}, "
              f"{z['zswap_written_back_pages']} written back so far")
    for m, s in rows.items():
        t = _tiers(s, z)
        print(f"{m}: swapped pages in zswap {t['zswap']} (all devices), vswapfs pool {t['pool']}, "
              f"backing files {t['backing']}, zero {t['zero']}")
    return 0


def _tiers(s: dict[str, int], z: dict[str, int]) -> dict[str, int]:
    """Where swapped pages live, in pages: zswap (which fronts every swap
    device, so its count is the machine's), this mount's pool, its backing
    files, and its zero (same-filled) pages, which take no memory."""
    return {"zswap": z.get("zswap_stored_pages", 0), "pool": s["pool_pages"],
            "backing": s["phys_pages"], "zero": s["zero_pages"]}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(argv)
    try:
        if a.cmd == "mount":
            return _cmd_mount(a, argv)
        if a.cmd == "up":
            values = _zswap_values(a)
            print(admin.up(a.mountpoint, _mount_args(a), a.priority, values))
            if values is not None:
                print(f"zswap ({values['compressor']}) is in front of every swap device on this "
                      f"machine until `vswapfs down {a.mountpoint}`")
            return 0
        if a.cmd == "stress":
            from .stress import print_report, stress

            admin.check_root()
            r = stress(a.mountpoint, workers=a.workers, limit=a.limit, multiple=a.multiple,
                       pattern=a.pattern, duration=a.duration, rounds=a.rounds, mix=a.mix)
            print_report(r)
            return 0 if r["ok"] else 1
        if a.cmd == "install-helpers":
            from ._fstab import install_helpers

            for path in install_helpers(a.root):
                print(path)
            return 0
        if a.cmd == "restart":
            print(admin.restart(a.mountpoint, a.timeout))
            return 0
        if a.cmd == "down":
            for step in admin.down(a.mountpoint, force=a.force):
                print(step)
            return 0
        return _cmd_status(a)
    except admin.AdminError as e:
        print(f"vswapfs: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"vswapfs: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
