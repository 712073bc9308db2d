#!/usr/bin/env python3
"""What swapon costs the kernel for a vswapfs image, used or not.

The daemon holds nothing for capacity never written, but the kernel
allocates its per-slot arrays (``swap_map``, ``swap_cgroup``) for the whole
area at swapon, with vmalloc (so every byte is resident at once).  For
each size: mount, attach, mkswap; read VmallocUsed; swapon; read it again;
tear down (also on failure).  Prints the growth, per 4 KiB slot of the
area the kernel took, against ``admin.swapon_cost`` (what ``vswapfs up``
warns with).  MemFree moves the same way, but with the page cache around
it the figure swings by hundreds of MiB from run to run.

    python3 -m vswapfs_lab.swapon_cost [--sizes 64G,1T,4T]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

from vswapfs import admin, linux
from vswapfs._units import human, parse_size


def one(size: int) -> dict[str, float]:
    mnt = tempfile.mkdtemp(prefix="vswapfs-swapon-cost-")
    try:
        admin.start_daemon(mnt, ["--size", str(size)])
        dev = admin.attach_loop(mnt)
        subprocess.run(["mkswap", dev], check=True, capture_output=True)
        vm0 = linux.meminfo("VmallocUsed")
        subprocess.run(["swapon", "--discard", dev], check=True, capture_output=True)
        vm1 = linux.meminfo("VmallocUsed")
        area = linux.swap_area_sizes()[dev] * 1024 + 4096
    finally:  # down does swapoff and losetup -d of the mount's loops, then unmounts
        if admin.mount_type(mnt) is not None:
            admin.down(mnt, force=True)
        os.rmdir(mnt)
    slots = area // 4096
    return {"image": size, "area": area, "vmalloc_growth": vm1 - vm0,
            "bytes_per_slot": round((vm1 - vm0) / slots, 2), "estimate": admin.swapon_cost(area)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64G,1T,4T")
    a = p.parse_args(argv)
    admin.check_root()
    rows = [one(parse_size(s)) for s in a.sizes.split(",")]
    print(f"{'image':>8} {'area':>8} {'vmalloc':>9} {'per slot':>9} {'up says':>8}")
    for r in rows:
        print(f"{human(r['image']):>8} {human(r['area']):>8} {human(r['vmalloc_growth']):>9} "
              f"{r['bytes_per_slot']:>8}B {human(r['estimate']):>8}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
