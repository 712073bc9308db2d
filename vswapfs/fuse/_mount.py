"""Mounting a FUSE file system, and unmounting it (both need root)."""

from __future__ import annotations

import os

from .. import linux


def open_and_mount(mountpoint: str, fstype: str, *, source: str = "none",
                   allow_other: bool = True) -> int:
    """Open /dev/fuse and mount it on ``mountpoint`` as ``fuse.<fstype>``;
    returns the fd.  Needs root (mount(2))."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions"
    if allow_other:
        opts += ",allow_other"
    try:
        linux.mount(source, mountpoint, f"fuse.{fstype}", linux.MS_NOSUID | linux.MS_NODEV, opts)
    except BaseException:
        os.close(fd)
        raise
    return fd


def unmount(mountpoint: str) -> None:
    """umount(2); raises OSError(EBUSY) while the mount is in use."""
    linux.umount(mountpoint)
