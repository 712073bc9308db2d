"""vswapfs: virtual swap space for Linux, in userspace.

The package's constants are importable from here at no cost (``_consts``
imports nothing); the command line is :mod:`vswapfs.cli`, the admin
functions it runs are :mod:`vswapfs.admin`, the engine is
:mod:`vswapfs.engine` and the FUSE transport :mod:`vswapfs.fuse`.
"""

from ._consts import CLUSTER_BYTES, CLUSTER_SLOTS, FSTYPE, PAGE, SERVING_THREAD, MiB

__all__ = ["CLUSTER_BYTES", "CLUSTER_SLOTS", "FSTYPE", "PAGE", "SERVING_THREAD", "MiB"]
