"""The vswapfs lab: what proves and measures vswapfs, apart from what runs it.

- ``bench``: side-by-side swap benchmark against zram, zswap and a C FUSE
  floor (``fuse_floor.c``, shipped here and built with cc);
- ``checks``: fio, stress-ng, swapon/swapoff churn and the same-cgroup
  check, each against a real mount;
- ``faultfs``: a fault-injecting FUSE file system on the same transport,
  for backing-file error tests;
- ``bench_engine``, ``channels``, ``profile_daemon``: smaller experiments.

Each runs as ``python3 -m vswapfs_lab.<name>``, from a checkout or an
install.  Nothing in the ``vswapfs`` package imports this one.
"""
