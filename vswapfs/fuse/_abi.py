"""FUSE kernel ABI: opcodes, flags and struct layouts from <linux/fuse.h>.

Protocol 7.38 layouts (the header on these machines); newer kernels accept
them.  All structs are little-endian with the kernel's natural alignment,
spelled out as ``struct`` formats with explicit padding.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

KERNEL_VERSION: Final = 7
KERNEL_MINOR_VERSION: Final = 38
ROOT_ID: Final = 1
MIN_READ_BUFFER: Final = 8192


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


# INIT flags (fuse_init_in/out.flags; flags2 holds bits 32..63)
ASYNC_READ: Final = 1 << 0
BIG_WRITES: Final = 1 << 5
ASYNC_DIO: Final = 1 << 15
WRITEBACK_CACHE: Final = 1 << 16
PARALLEL_DIROPS: Final = 1 << 18
MAX_PAGES: Final = 1 << 22
INIT_EXT: Final = 1 << 30

INIT_FLAG_NAMES: Final = {
    ASYNC_READ: "ASYNC_READ", BIG_WRITES: "BIG_WRITES", ASYNC_DIO: "ASYNC_DIO",
    WRITEBACK_CACHE: "WRITEBACK_CACHE", PARALLEL_DIROPS: "PARALLEL_DIROPS",
    MAX_PAGES: "MAX_PAGES", INIT_EXT: "INIT_EXT",
}

# fuse_open_out.open_flags
FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_KEEP_CACHE: Final = 1 << 1
FOPEN_NONSEEKABLE: Final = 1 << 2
FOPEN_PARALLEL_DIRECT_WRITES: Final = 1 << 6

# fuse_setattr_in.valid
FATTR_MODE: Final = 1 << 0
FATTR_UID: Final = 1 << 1
FATTR_GID: Final = 1 << 2
FATTR_SIZE: Final = 1 << 3
FATTR_ATIME: Final = 1 << 4
FATTR_MTIME: Final = 1 << 5
FATTR_FH: Final = 1 << 6

# fuse_getattr_in.getattr_flags
GETATTR_FH: Final = 1 << 0

# fuse_notify_code: a message from the server, written with unique 0 and
# the code in the error field.  RESEND (7.40, Linux 6.9) is newer than the
# header here: the kernel puts every request that was read but not answered
# back on the pending queue, its unique ORed with UNIQUE_RESEND.
NOTIFY_RESEND: Final = 7
UNIQUE_RESEND: Final = 1 << 63

# ioctl on /dev/fuse: _IOR(229, 0, uint32_t)
DEV_IOC_CLONE: Final = (2 << 30) | (4 << 16) | (229 << 8) | 0

IN_HEADER: Final = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER: Final = struct.Struct("<IiQ")  # len error unique
INIT_IN: Final = struct.Struct("<IIII")  # major minor max_readahead flags (flags2 follows from 7.36)
INIT_IN_FLAGS2: Final = struct.Struct("<I")
# major minor max_readahead flags max_background congestion_threshold max_write
# time_gran max_pages map_alignment flags2 unused[7]: 18 fields
INIT_OUT_FIELDS: Final = ("major", "minor", "max_readahead", "flags", "max_background",
                          "congestion_threshold", "max_write", "time_gran", "max_pages",
                          "map_alignment", "flags2", *(f"unused{i}" for i in range(7)))
INIT_OUT: Final = struct.Struct("<IIIIHHIIHHI7I")
ATTR: Final = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT: Final = struct.Struct("<QQQQII" + ATTR.format[1:])
ATTR_OUT: Final = struct.Struct("<QII" + ATTR.format[1:])
GETATTR_IN: Final = struct.Struct("<IIQ")  # flags dummy fh
SETATTR_IN: Final = struct.Struct("<IIQQQQQQIIIIIIII")
OPEN_IN: Final = struct.Struct("<II")  # flags open_flags
CREATE_IN: Final = struct.Struct("<IIII")  # flags mode umask open_flags
OPEN_OUT: Final = struct.Struct("<QII")  # fh open_flags padding
RELEASE_IN: Final = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN: Final = struct.Struct("<QIIQ")  # fh unused padding lock_owner
READ_IN: Final = struct.Struct("<QQII")  # fh offset size read_flags (lock_owner, flags follow)
WRITE_IN: Final = struct.Struct("<QQII")  # fh offset size write_flags
WRITE_IN_SIZE: Final = 40  # the payload of a WRITE starts this far into the body
# IN_HEADER and what READ_IN and WRITE_IN share (fh offset size flags): the data path's one unpack
DATA_IN: Final = struct.Struct(IN_HEADER.format + READ_IN.format[1:])
WRITE_OUT: Final = struct.Struct("<II")
STATFS_OUT: Final = struct.Struct("<QQQQQIIII24x")
FSYNC_IN: Final = struct.Struct("<QII")
FORGET_IN: Final = struct.Struct("<Q")
BATCH_FORGET_IN: Final = struct.Struct("<II")
FORGET_ONE: Final = struct.Struct("<QQ")
INTERRUPT_IN: Final = struct.Struct("<Q")
FALLOCATE_IN: Final = struct.Struct("<QQQII")  # fh offset length mode padding
DIRENT: Final = struct.Struct("<QQII")  # ino off namelen type
