"""The checks peers pass, run against a vswapfs device.

    python -m vswapfs_lab.checks fio     [--mib 256]      fio random writes with crc32c verify,
                                                      then blkdiscard and a compare against zeros
    python -m vswapfs_lab.checks stress-ng [--seconds 30] stress-ng --vm (all methods, verify,
                                                      page-in) and --pageswap under a memory cgroup
    python -m vswapfs_lab.checks churn   [--cycles 50]    swapon/swapoff with data swapped out each
                                                      time; swapoff while the data is held
    python -m vswapfs_lab.checks same-cgroup [--no-reserve]  the daemon and a hog in ONE memory
                                                      cgroup: the hog must finish, verified

Each sets up its own vswapfs on a temporary mount point, tears it down
(also on failure), prints what it saw and a last JSON line, and exits 0
only if nothing was wrong.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from vswapfs import SERVING_THREAD, MiB, admin, linux
from vswapfs.cgroup import MemCgroup


def _stats(mnt: str) -> dict[str, int]:
    return admin.status(mnt)


@contextmanager
def _tmp_mount(args: list[str]) -> Iterator[str]:
    mnt = tempfile.mkdtemp(prefix="vswapfs-check-")
    try:
        with admin.mounted(mnt, args):
            yield mnt
    finally:
        os.rmdir(mnt)


def kernel_used_pages(mnt: str) -> int:
    """Pages the kernel counts as in use on the swap areas of ``mnt``
    (swap-cache-only pages keep their slots until reclaim frees them)."""
    used = linux.swap_areas()
    return sum(used.get(dev, 0) // 4 for dev in admin.loops_of(mnt))


def _wait_empty(mnt: str, timeout: float = 10) -> int:
    """Wait until vswapfs holds only the swap header; return the pages it holds."""
    deadline = time.monotonic() + timeout
    while (n := _stats(mnt)["stored_pages"]) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def fio_verify(mib: int = 256) -> dict[str, object]:
    """fio random 4 KiB writes at queue depth 32 with crc32c verify, on the
    raw loop device; then blkdiscard and compare the device with zeros."""
    with _tmp_mount(["--size", f"{mib}M"]) as mnt:
        dev = admin.attach_loop(mnt)
        try:
            r = subprocess.run(
                ["fio", "--name=vswapfs-verify", f"--filename={dev}", "--rw=randwrite", "--bs=4k",
                 f"--size={mib}M", "--direct=1", "--ioengine=libaio", "--iodepth=32",
                 "--verify=crc32c", "--verify_fatal=1", "--verify_backlog=1024",
                 "--verify_state_save=0",
                 "--buffer_compress_percentage=50", "--refill_buffers", "--output-format=json"],
                capture_output=True, text=True, check=False)
            job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0] if "{" in r.stdout else {}
            stored = _stats(mnt)["stored_pages"]
            refused = _stats(mnt)["failed_writes"]
            subprocess.run(["blkdiscard", dev], check=True)
            left = _stats(mnt)["stored_pages"]
            zero = bytes(MiB)
            nonzero = 0
            with open(dev, "rb", buffering=0) as f:
                while chunk := f.read(MiB):
                    nonzero += chunk != zero[:len(chunk)]
            result = {"check": "fio", "ok": r.returncode == 0 and job.get("error") == 0
                      and stored > 0 and left == 0 and nonzero == 0,
                      "fio_rc": r.returncode, "fio_error": job.get("error"),
                      "written_mib": round(job.get("write", {}).get("io_bytes", 0) / MiB, 1),
                      "verified_mib": round(job.get("read", {}).get("io_bytes", 0) / MiB, 1),
                      "write_iops": round(job.get("write", {}).get("iops", 0)),
                      "stored_pages_before_discard": stored, "stored_pages_after_discard": left,
                      "nonzero_mib_after_discard": nonzero, "failed_writes": refused}
            if r.returncode:
                result["fio_stderr"] = r.stderr[-1000:]
            return result
        finally:
            subprocess.run(["losetup", "-d", dev], check=False)


@contextmanager
def _swap_mount(args: list[str]) -> Iterator[tuple[str, str]]:
    mnt = tempfile.mkdtemp(prefix="vswapfs-check-")
    try:
        with admin.swap_up(mnt, args) as dev:
            yield mnt, dev
    finally:
        os.rmdir(mnt)


def stress_ng(seconds: int = 30, limit_mib: int = 64) -> dict[str, object]:
    """stress-ng --vm (every method, --verify, --page-in) and --pageswap
    --verify, in a memory cgroup a third the size of their working set."""
    runs = [["--vm", "2", "--vm-bytes", f"{limit_mib * 3 // 2}M", "--vm-method", "all", "--verify",
             "--page-in"], ["--pageswap", "2", "--verify"]]
    out: dict[str, object] = {"check": "stress-ng", "ok": True}
    with _swap_mount(["--size", "2G"]) as (mnt, dev):
        for i, args in enumerate(runs):
            name = args[0].strip("-")
            before = _stats(mnt)
            with MemCgroup(f"vswapfs-check-{os.getpid()}-{i}", limit_mib * MiB) as cg:
                proc = cg.popen(["stress-ng", *args, "-t", f"{seconds}s", "--metrics-brief"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                text = proc.communicate(timeout=seconds * 10 + 120)[0].decode(errors="replace")
            after = _stats(mnt)
            failed = [ln for ln in text.splitlines() if "fail" in ln.lower() and "0 failed" not in ln]
            ok = proc.returncode == 0 and not failed
            out[name] = {"rc": proc.returncode, "ok": ok,
                         "swapped_through_pages": after["notify_free"] - before["notify_free"],
                         "tail": text.strip().splitlines()[-3:]}
            out["ok"] = bool(out["ok"]) and ok
        # Swap-cache-only pages keep their slots after exit, and a discard
        # comes only for a wholly free cluster: report both counts, then
        # swapoff, after which vswapfs must hold nothing but the header.
        time.sleep(2)
        out["stored_pages_at_exit"] = _stats(mnt)["stored_pages"]
        out["kernel_used_pages_at_exit"] = kernel_used_pages(mnt)
        subprocess.run(["swapoff", dev], check=True)
        left = out["stored_pages_after_swapoff"] = _wait_empty(mnt)
        out["ok"] = bool(out["ok"]) and left <= 1
    return out


def churn(cycles: int = 50, mib: int = 48, limit_mib: int = 24) -> dict[str, object]:
    """``cycles`` times: swapon, a process fills ``mib`` MiB in a
    ``limit_mib`` MiB cgroup and holds it (swapped out), swapoff brings it
    all back through the daemon, the process verifies every page."""
    bad = verified = swapped = 0
    t0 = time.monotonic()
    with _tmp_mount(["--size", "1G"]) as mnt:
        dev = admin.attach_loop(mnt)
        try:
            subprocess.run(["mkswap", dev], check=True, capture_output=True)
            for _ in range(cycles):
                subprocess.run(["swapon", "--discard", dev], check=True)
                with MemCgroup(f"vswapfs-churn-{os.getpid()}", limit_mib * MiB) as cg:
                    proc = cg.popen([sys.executable, "-m", "vswapfs.workload", "--mib", str(mib), "--hold"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                    assert proc.stdin is not None and proc.stdout is not None
                    if proc.stdout.readline() != b"filled\n":
                        raise RuntimeError("workload died before holding its pages")
                    swapped += _stats(mnt)["stored_pages"]
                    cg.set_limit(4096 * MiB)  # room to take every page back
                    subprocess.run(["swapoff", dev], check=True)
                    proc.stdin.write(b"verify\n")
                    proc.stdin.close()
                    result = json.loads(proc.stdout.read())
                    proc.wait(60)
                bad += result["bad"]
                verified += result["verified"]
            left = _wait_empty(mnt, 5)  # the daemon frees what swapoff left behind
        finally:
            if dev in admin.swaps():
                subprocess.run(["swapoff", dev], check=False)
            subprocess.run(["losetup", "-d", dev], check=False)
    return {"check": "churn", "ok": bad == 0 and left <= 1, "cycles": cycles, "pages_verified": verified,
            "bad": bad, "pages_swapped_out": swapped, "stored_pages_after": left,
            "seconds": round(time.monotonic() - t0, 1)}


def same_cgroup(reserve_mib: int = 64, limit_mib: int = 320, hog_mib: int = 384,
                seconds: float = 180, rounds: int = 3, extra: tuple[str, ...] = ()) -> dict[str, object]:
    """The daemon and a hog that needs swap in one memory cgroup.

    ``vswapfs up`` runs inside the cgroup, so the daemon and everything it
    faults in are charged there, with ``--reserve reserve_mib`` (0: the
    default mode, which deadlocks on cgroup v1, see ``_daemon``).  The hog
    writes ``hog_mib`` of zero and text pages, more than the cgroup has
    left, and verifies each, ``rounds`` times in random order.  If the pair is not done after ``seconds``,
    it hung: the FUSE connection is aborted (``down --force``), the hog is
    killed, and the check fails.  The machine is recovered either way."""
    mnt = tempfile.mkdtemp(prefix="vswapfs-samecg-")
    out: dict[str, object] = {"check": "same-cgroup", "reserve_mib": reserve_mib,
                              "limit_mib": limit_mib, "hog_mib": hog_mib, "hung": False}
    cg = MemCgroup(f"vswapfs-samecg-{os.getpid()}", limit_mib * MiB)
    hog = None
    try:
        args = ["--size", "2G", *extra] + (["--reserve", f"{reserve_mib}M"] if reserve_mib else [])
        upped = cg.popen([sys.executable, "-m", "vswapfs", "up", mnt, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        text = upped.communicate(timeout=120)[0].decode().strip()
        if upped.returncode:
            raise RuntimeError(f"vswapfs up failed: {text}")
        daemon = admin.daemon_pid(mnt)
        out["daemon_in_cgroup"] = daemon in cg.pids()
        out["daemon_charge_mib"] = round(cg.usage() / MiB, 1)
        before = _faults_and_rss(daemon)
        threads_before = _faults_by_thread(daemon)
        t0 = time.monotonic()
        hog = cg.popen([sys.executable, "-m", "vswapfs.workload", "--mib", str(hog_mib), "--mix", "1:2:0",
                        "--pattern", "random", "--rounds", str(rounds)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            said = hog.communicate(timeout=seconds)[0].decode().strip()
            out.update(seconds=round(time.monotonic() - t0, 1), hog_rc=hog.returncode)  # -9: OOM-killed
            res = json.loads(said.splitlines()[-1])
            out.update(verified=res["verified"], bad=res["bad"])
            after = _faults_and_rss(daemon)
            out["daemon_faults_while_serving"] = after[0] - before[0]
            by_thread = {t: n - threads_before.get(t, 0) for t, n in _faults_by_thread(daemon).items()
                         if n != threads_before.get(t, 0)}
            out["faults_by_thread"] = by_thread
            out["serving_thread_faults"] = sum(n for t, n in by_thread.items()
                                               if t.rsplit("/", 1)[0] == SERVING_THREAD)
            out["daemon_rss_growth_kib"] = after[1] - before[1]
            out["stats"] = {k: v for k, v in _settled_stats(mnt).items()
                            if k in ("notify_free", "mem_used_max", "pool_reserve", "failed_writes",
                                     "pool_spare")}
        except subprocess.TimeoutExpired:
            out["hung"] = True
            # Before anything is aborted: where each thread waits, what the
            # cgroup holds and what the daemon last logged, so that a hang
            # in CI says why.
            out["threads"] = where_waiting(cg.pids())
            out["cgroup_usage_mib"] = round(cg.usage() / MiB, 1)
            out["log_tail"] = _log_tail(mnt)
        except (ValueError, IndexError, KeyError) as e:
            out["hog_error"] = repr(e)
    finally:
        out["recovery"] = _recover(mnt, hog)
        cg.close()
        os.rmdir(mnt)
    out["ok"] = (not out["hung"] and out.get("hog_rc") == 0 and out.get("bad") == 0
                 and out.get("verified") == hog_mib * 256 * rounds and bool(out.get("daemon_in_cgroup"))
                 and (not reserve_mib or out.get("daemon_faults_while_serving") == 0))
    return out


def _settled_stats(mnt: str, quiet: float = 1.0, timeout: float = 30) -> dict[str, int]:
    """The stats of ``mnt`` once no discard came for ``quiet`` seconds (at
    most ``timeout``): the kernel discards an exited hog's swap clusters in
    the background, the later the busier the machine (CI once read 22,382
    freed pages straight after a hog whose run frees over 100,000)."""
    deadline = time.monotonic() + timeout
    seen = _stats(mnt)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = _stats(mnt)
        if now["notify_free"] == seen["notify_free"]:
            return now
        seen = now
    return seen


def _faults_by_thread(pid: int | None) -> dict[str, int]:
    """Page faults so far of each of the daemon's threads, as "name/tid"
    (housekeeping, which faults memory in on purpose, is "vswapfs-keeper")."""
    return {f"{name}/{tid}": n for tid, (name, n) in linux.task_faults(pid or 0).items()}


def _faults_and_rss(pid: int | None) -> tuple[int, int]:
    """(minor + major page faults so far, VmRSS in KiB) of ``pid``."""
    who = "self" if pid is None else pid
    return linux.page_faults(who), linux.process_status(who, "VmRSS")


def where_waiting(pids: list[int]) -> list[str]:
    """One line per thread of ``pids``: pid/tid, name, state, and the kernel
    functions it waits in (``/proc/PID/task/TID/stack``, root only, offsets
    dropped; else ``wchan``), innermost first."""
    lines = []
    for pid in pids:
        for task in sorted(glob.glob(f"/proc/{pid}/task/*"), key=lambda t: int(t.rsplit("/", 1)[1])):
            try:
                with open(f"{task}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # the thread is gone
            try:
                with open(f"{task}/stack") as f:
                    stack = [line.split()[-1].split("+")[0] for line in f if line.strip()]
            except OSError:  # not permitted: the one function it waits in
                try:
                    with open(f"{task}/wchan") as f:
                        stack = [f.read().strip()]
                except OSError:
                    stack = ["?"]
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            state = stat[stat.rindex(")") + 2]
            where = " < ".join(stack[:12]) or "(in user space)"
            lines.append(f"{pid}/{task.rsplit('/', 1)[1]} {name} {state}: {where}")
    return lines


def _log_tail(mnt: str, lines: int = 20) -> list[str]:
    """The last ``lines`` lines of the daemon's log (on tmpfs: never a read
    through the mount, which may be the thing that hangs)."""
    try:
        return admin.log_path(mnt).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _recover(mnt: str, hog: subprocess.Popen[bytes] | None) -> list[str]:
    """Tear down a vswapfs that may hang: ``down --force`` aborts the FUSE
    connection; while the hog lives swapoff cannot take its pages back,
    so it is killed and ``down --force`` runs again."""
    steps: list[str] = []
    if admin.mount_type(mnt) is None:
        return steps
    down = [sys.executable, "-m", "vswapfs", "down", "--force", mnt]
    for attempt in range(2):
        r = subprocess.run(down, capture_output=True, text=True, timeout=300, check=False)
        steps.append((r.stdout or r.stderr).strip())
        if hog is not None and hog.poll() is None:
            hog.kill()
            hog.wait(60)
        if r.returncode == 0 or attempt:
            break
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="peer checks against a vswapfs device")
    sub = p.add_subparsers(dest="check", required=True)
    sub.add_parser("fio").add_argument("--mib", type=int, default=256)
    sub.add_parser("stress-ng").add_argument("--seconds", type=int, default=30)
    sub.add_parser("churn").add_argument("--cycles", type=int, default=50)
    sc = sub.add_parser("same-cgroup")
    sc.add_argument("--reserve-mib", type=int, default=64, help="0: the default (lazy) mode")
    sc.add_argument("--no-reserve", dest="reserve_mib", action="store_const", const=0)
    sc.add_argument("--seconds", type=float, default=180)
    sc.add_argument("--limit-mib", type=int, default=320)
    sc.add_argument("--hog-mib", type=int, default=384)
    sc.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("vswapfs_lab.checks: must be run as root", file=sys.stderr)
        return 1
    if a.check == "fio":
        r = fio_verify(a.mib)
    elif a.check == "stress-ng":
        r = stress_ng(a.seconds)
    elif a.check == "same-cgroup":
        r = same_cgroup(a.reserve_mib, limit_mib=a.limit_mib, hog_mib=a.hog_mib, seconds=a.seconds,
                        rounds=a.rounds)
    else:
        r = churn(a.cycles)
    for k, v in r.items():
        print(f"{k}: {v}")
    print(json.dumps(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
