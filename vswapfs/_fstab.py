"""``mount -t fuse.vswapfs`` and fstab support: translate mount options.

mount(8) runs ``mount.fuse.vswapfs SOURCE MOUNTPOINT -o OPTS``; the helper
turns vswapfs's own options (size=, pool_limit=, backing=, level=,
first_level=, first_algorithm=, reserve=, channels=, busy_poll=, algorithm=, zswap[=COMPRESSOR],
zswap_max_pool_percent=,
zswap_shrinker) into a
``vswapfs mount`` command line and leaves the generic ones (defaults,
noauto, nofail, rw, x-systemd.* ...) to mount(8) and systemd.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

OWN = {"size": "--size", "pool_limit": "--pool-limit", "backing": "--backing", "level": "--level",
       "first_level": "--first-level", "first_algorithm": "--first-algorithm", "reserve": "--reserve",
       "channels": "--channels", "busy_poll": "--busy-poll",
       "algorithm": "--algorithm",
       "zswap_max_pool_percent": "--zswap-max-pool-percent"}
FLAGS = {"zswap": "--zswap", "zswap_shrinker": "--zswap-shrinker"}  # also zswap=COMPRESSOR
GENERIC = {"defaults", "auto", "noauto", "nofail", "rw", "_netdev", "user", "nouser", "users",
           "suid", "nosuid", "dev", "nodev", "exec", "noexec", "relatime", "noatime", "atime"}


def options_to_args(opts: str) -> list[str]:
    """``size=8G,backing=/a,backing=/b,noauto`` -> vswapfs mount arguments.
    Unknown options raise ValueError naming them."""
    args: list[str] = []
    unknown = []
    for opt in filter(None, (o.strip() for o in opts.split(","))):
        key, _, value = opt.partition("=")
        if key in OWN and value:
            args += [OWN[key], value]
        elif key in FLAGS and not value:
            args.append(FLAGS[key])
        elif key == "zswap" and value:
            args += ["--zswap", value]
        elif key in GENERIC or key.startswith(("x-", "comment=")):
            continue
        else:
            unknown.append(opt)
    if unknown:
        raise ValueError(f"unknown vswapfs mount option(s): {', '.join(unknown)} "
                         f"(known: {', '.join([*OWN, *FLAGS])})")
    return args


def helper_main(argv: Sequence[str]) -> list[str]:
    """mount.fuse.vswapfs's argv (without argv[0]) -> ``vswapfs`` argv."""
    pos: list[str] = []
    opts: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "-o":
            opts.append(next(it, ""))
        elif a.startswith("-o"):
            opts.append(a[2:])
        elif a in ("-n", "-f", "-v", "-s"):  # no mtab, fake, verbose, sloppy: nothing to do
            continue
        else:
            pos.append(a)
    if len(pos) != 2:
        raise ValueError("usage: mount.fuse.vswapfs SOURCE MOUNTPOINT [-o OPTIONS]")
    return ["mount", pos[1], *options_to_args(",".join(opts))]


# where the templates are: a checkout, or pip's data-files
_TEMPLATE_DIRS = (Path(__file__).resolve().parent.parent / "mount-helpers",
                  Path(sys.prefix) / "share" / "vswapfs" / "mount-helpers")
INSTALL = {  # template -> where it goes, and its mode
    "mount.fuse.vswapfs": ("sbin/mount.fuse.vswapfs", 0o755),
    "vswapfs@.service": ("etc/systemd/system/vswapfs@.service", 0o644),
    "vswapfs.conf.example": ("etc/vswapfs/vswapfs.conf.example", 0o644),
}


def install_helpers(root: str = "/") -> list[str]:
    """Write the mount helper, the systemd unit and the example config under
    ``root``, with @PYTHON@ replaced by this interpreter (mount(8) and
    systemd run helpers with a PATH that may not find it).  Returns paths."""
    src = next((d for d in _TEMPLATE_DIRS if (d / "vswapfs@.service").exists()), None)
    if src is None:
        raise FileNotFoundError("mount-helpers templates not found")
    written = []
    for name, (rel, mode) in INSTALL.items():
        dest = Path(root, rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text((src / name).read_text().replace("@PYTHON@", sys.executable))
        os.chmod(dest, mode)
        written.append(str(dest))
    return written
