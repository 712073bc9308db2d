"""A real program under swap: redis with a heap larger than its cgroup.

``redis-server`` (Debian's ``redis-server`` package) runs alone in a
memory cgroup of ``limit_mib``; the harness, outside the cgroup, loads it
over loopback with ``keys`` values of ``VALUE_BYTES`` cut from real files
and random bytes (the workload's page mix without zero pages: a store
rarely holds empty values), about 3x the limit in all.  Then
``redis-benchmark`` (also outside the cgroup) sends random GETs over the
whole key space: most of them fault a swapped-out page in.  Its figures,
throughput and p50/p99 in ms, are what a user of the server sees.  Last, a
sample of keys is read back and checked byte for byte: a backend that
returns a wrong page fails the run, not just slows it.

    python3 -m vswapfs_lab.kv --limit 256 [--requests 50000]   # against whatever swap is on
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from vswapfs import MiB, linux, workload
from vswapfs.cgroup import MemCgroup

VALUE_BYTES = 1000  # a value: what a cache of rendered fragments or JSON documents holds
KEY_OVERHEAD = 80  # redis's bytes per key beyond the value (dict entry, robj, sds headers)
MIX = (0, 2, 1)  # zero:text:random, as workload.page: real-file text, and some random bytes
PORT = 6391  # loopback only; another redis on the default port is left alone
BATCH = 500  # SETs sent before their replies are read


def key(i: int) -> bytes:
    """Key ``i`` as redis-benchmark's ``-r`` makes it: ``key:`` and 12 digits."""
    return b"key:%012d" % i


def value(i: int) -> bytes:
    """The value stored under key ``i``."""
    return workload.page(i, 1, MIX)[:VALUE_BYTES]


def available() -> str | None:
    """Why the workload cannot run here, or None."""
    for exe in ("redis-server", "redis-benchmark"):
        if shutil.which(exe) is None:
            return f"no {exe} (apt-get install redis-server)"
    return None


def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class Client:
    """A minimal RESP client: enough for SET, GET and PING, pipelined."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.rf = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes | None:
        line = self.rf.readline()
        if line[:1] in (b"+", b":"):
            return line[1:-2]
        if line[:1] == b"$":
            n = int(line[1:-2])
            if n < 0:
                return None
            data = self.rf.read(n + 2)
            return data[:-2]
        raise OSError(f"redis: {line[:200]!r}")

    def close(self) -> None:
        self.rf.close()
        self.sock.close()


@contextlib.contextmanager
def server(cg: MemCgroup, port: int = PORT) -> Iterator[subprocess.Popen[bytes]]:
    """redis-server inside ``cg``: no persistence, loopback only; killed on exit."""
    work = tempfile.mkdtemp(prefix="vswapfs-kv-")
    proc = cg.popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", work, "--protected-mode", "yes",
                     "--loglevel", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                c = Client(port)
                c.send(_resp(b"PING"))
                if c.reply() == b"PONG":
                    c.close()
                    break
                c.close()
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start: "
                                   + (proc.stderr.read().decode()[-300:] if proc.poll() is not None  # type: ignore[union-attr]
                                      else "no answer in 10 s"))
            time.sleep(0.05)
        yield proc
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def load(port: int, keys: int) -> float:
    """SET every key, pipelined; seconds taken."""
    c = Client(port)
    t0 = time.perf_counter()
    try:
        for lo in range(0, keys, BATCH):
            hi = min(lo + BATCH, keys)
            c.send(b"".join(_resp(b"SET", key(i), value(i)) for i in range(lo, hi)))
            for _ in range(lo, hi):
                if c.reply() != b"OK":
                    raise OSError("redis: SET was not OK")
    finally:
        c.close()
    return time.perf_counter() - t0


def check(port: int, keys: int, samples: int, seed: int = 7) -> int:
    """Read ``samples`` random keys back; how many hold the wrong value."""
    c = Client(port)
    pick = random.Random(seed).sample(range(keys), min(samples, keys))
    bad = 0
    try:
        for lo in range(0, len(pick), BATCH):
            part = pick[lo:lo + BATCH]
            c.send(b"".join(_resp(b"GET", key(i)) for i in part))
            bad += sum(c.reply() != value(i) for i in part)
    finally:
        c.close()
    return bad


def bench_gets(port: int, keys: int, requests: int, clients: int) -> dict[str, float]:
    """redis-benchmark's random GETs over the key space: throughput, p50, p99."""
    out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "get",
                          "-r", str(keys), "-n", str(requests), "-c", str(clients), "--csv"],
                         check=True, capture_output=True, text=True, timeout=1800).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    if not rows:
        raise RuntimeError(f"redis-benchmark printed no figures: {out[-300:]!r}")
    r = rows[-1]
    return {"kv_rps": float(r["rps"]), "kv_p50_ms": float(r["p50_latency_ms"]),
            "kv_p99_ms": float(r["p99_latency_ms"])}


def keys_for(heap_mib: int) -> int:
    """Keys that make a heap of about ``heap_mib``."""
    return heap_mib * MiB // (VALUE_BYTES + KEY_OVERHEAD)


REQUESTS = 50_000  # GETs a run times


def run(limit_mib: int, heap_mib: int | None = None, requests: int = REQUESTS, clients: int = 4,
        samples: int = 20_000, port: int = PORT) -> dict[str, float]:
    """The whole workload in a fresh cgroup; figures and the checked sample."""
    workload.use_file_corpus()
    keys = keys_for(heap_mib or 3 * limit_mib)
    with MemCgroup(f"vswapfs-kv-{os.getpid()}", limit_mib * MiB) as cg, server(cg, port):
        c0 = linux.cpu_busy_s()
        load_s = load(port, keys)
        c1 = linux.cpu_busy_s()
        figures = bench_gets(port, keys, requests, clients)
        c2 = linux.cpu_busy_s()
        bad = check(port, keys, samples)
        peak = cg.peak()
    if bad:
        raise RuntimeError(f"kv: {bad} of {samples} values read back wrong")
    return {**figures, "kv_load_s": round(load_s, 3),
            "kv_load_cpu_s": round(c1 - c0, 2), "kv_get_cpu_s": round(c2 - c1, 2),
"kv_keys": float(keys),
            "kv_checked": float(min(samples, keys)), "kv_cgroup_peak_mib": round(peak / MiB, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=256, help="the server's cgroup, MiB")
    p.add_argument("--heap", type=int, default=None, help="MiB of keys and values (default: 3x the limit)")
    p.add_argument("--requests", type=int, default=50_000)
    p.add_argument("--clients", type=int, default=4)
    a = p.parse_args(argv)
    if why := available():
        print(f"kv: {why}", file=sys.stderr)
        return 1
    print(json.dumps(run(a.limit, a.heap, a.requests, a.clients)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
