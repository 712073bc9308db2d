"""The key-value workload's own logic, on a real redis-server in a real
memory cgroup (no swap needed: the heap fits).  Nothing here is timed."""

from __future__ import annotations

import os

import pytest
from conftest import needs_root

from vswapfs import MiB
from vswapfs.cgroup import MemCgroup
from vswapfs_lab import kv

pytestmark = needs_root


@pytest.fixture
def redis_port() -> int:
    if why := kv.available():
        pytest.skip(why)
    return kv.PORT + 7  # not the bench's port: a bench may run beside the tests


def test_kv_loads_serves_random_gets_and_checks_every_sampled_value(redis_port: int) -> None:
    with MemCgroup(f"vswapfs-test-kv-{os.getpid()}", 256 * MiB) as cg, kv.server(cg, redis_port) as srv:
        assert srv.pid in cg.pids()  # the server is inside the cgroup, the harness is not
        assert os.getpid() not in cg.pids()
        keys = kv.keys_for(8)
        assert keys > 5000
        kv.load(redis_port, keys)
        figures = kv.bench_gets(redis_port, keys, requests=2000, clients=2)
        assert figures["kv_rps"] > 0 and 0 < figures["kv_p50_ms"] <= figures["kv_p99_ms"]
        assert kv.check(redis_port, keys, samples=keys) == 0
        # a value that is not what was stored is counted, not missed
        c = kv.Client(redis_port)
        c.send(kv._resp(b"SET", kv.key(17), b"not the value"))
        assert c.reply() == b"OK"
        c.close()
        assert kv.check(redis_port, keys, samples=keys) == 1
    assert srv.poll() is not None  # killed on the way out


def test_kv_values_are_real_text_and_random_bytes_not_one_repeated_byte() -> None:
    values = [kv.value(i) for i in range(30)]
    assert all(len(v) == kv.VALUE_BYTES for v in values)
    assert len(set(values)) == 30
    assert not any(v == v[:1] * len(v) for v in values)  # redis-benchmark's own values would be
    assert kv.key(12) == b"key:000000000012"  # what redis-benchmark -r asks for
