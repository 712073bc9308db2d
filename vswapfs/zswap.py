"""zswap in front of vswapfs: turn it on, give it back as it was, read it.

The RFC's own configuration is zswap over a virtual swap device: zswap
keeps hot pages compressed in the kernel, at zram's speed, and writes the
ones that go cold (its shrinker, or its pool at its limit) to the device
behind it, here vswapfs, which keeps them denser and for no disk slot.

zswap is global: once on, it fronts every swap device on the machine,
not only this one.  ``vswapfs up --zswap`` records the settings it
found (``STATE``) before it changes any, and the last ``down`` of a mount
that asked for zswap puts them back, also when ``up`` fails halfway.

Per cgroup (v2 only; this project's test VMs have v1) the controls are
``memory.zswap.max`` (bytes of zswap pool a cgroup may use; 0 turns zswap
off for it) and ``memory.zswap.writeback`` (0: its pages are never written
back to the device).

Counters come from ``/proc/meminfo`` and ``/proc/vmstat`` always, and from
``/sys/kernel/debug/zswap`` where debugfs is mounted.  No import here
loads the engine or the transport: ``vswapfs status`` uses this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Final

from . import linux

PARAMS: Final = Path("/sys/module/zswap/parameters")
DEBUGFS: Final = Path("/sys/kernel/debug/zswap")
FASTEST: Final = ("lz4", "lzo-rle", "lzo")  # the compressor picked when none is named, in order
# The knobs up sets (and down restores), in the order they are written back:
# ``enabled`` last, so zswap never runs with half of the old settings.
KNOBS: Final = ("compressor", "max_pool_percent", "accept_threshold_percent", "shrinker_enabled",
                "enabled")

# What every stat means; the keys are what stats.json, metrics and status --json carry.
DESCRIPTIONS: Final[dict[str, str]] = {
    "zswap_enabled": "1 while zswap is on (it is global: it fronts every swap device)",
    "zswap_pool_bytes": "memory zswap's pool holds (meminfo Zswap)",
    "zswap_stored_bytes": "bytes of pages zswap holds, before compression (meminfo Zswapped)",
    "zswap_stored_pages": "pages zswap holds (Zswapped / 4096)",
    "zswap_stores": "pages zswap took in so far (vmstat zswpout)",
    "zswap_loads": "pages read back from zswap so far (vmstat zswpin)",
    "zswap_written_back_pages": "pages zswap wrote back to the swap devices behind it (vmstat zswpwb)",
    "zswap_pool_limit_hit": "times zswap's pool reached max_pool_percent (debugfs)",
    "zswap_reject_compress_poor": "pages zswap sent on because they compressed poorly (debugfs)",
    "zswap_reject_compress_fail": "pages zswap sent on because compression failed (debugfs)",
    "zswap_reject_alloc_fail": "pages zswap sent on for want of pool memory (debugfs)",
    "zswap_reject_reclaim_fail": "writebacks from a full pool that failed (debugfs)",
    "zswap_reject_kmemcache_fail": "pages zswap sent on for want of an entry (debugfs)",
    "zswap_stored_incompressible_pages": "pages zswap keeps raw because they do not compress (debugfs)",
}
_DEBUGFS_STATS: Final = tuple(k[len("zswap_"):] for k in DESCRIPTIONS
                              if k.endswith(("_hit", "_fail", "_poor", "incompressible_pages")))


class ZswapError(Exception):
    """zswap cannot be set as asked; the message is one line for the user."""


def available() -> bool:
    """True if this kernel has zswap."""
    return (PARAMS / "enabled").exists()


def params() -> dict[str, str]:
    """zswap's settings now, by knob."""
    return {k: (PARAMS / k).read_text().strip() for k in KNOBS if (PARAMS / k).exists()}


def kernel_compressors() -> set[str]:
    """The compression algorithms the kernel's crypto API offers now."""
    names: set[str] = set()
    try:
        text = Path("/proc/crypto").read_text()
    except OSError:
        return names
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if fields.get("type") in ("scomp", "acomp", "compression") and "name" in fields:
            names.add(fields["name"])
    return names


def choose(compressor: str | None) -> str:
    """The compressor to give zswap: ``compressor`` if the kernel has it,
    else, when none is named, the fastest it has (lz4, lzo-rle, lzo)."""
    have = kernel_compressors()
    if compressor is not None:
        if have and compressor not in have:
            raise ZswapError(f"the kernel has no {compressor} compressor for zswap "
                             f"(it has: {', '.join(sorted(have)) or 'none'})")
        return compressor
    for name in FASTEST:
        if name in have:
            return name
    return params().get("compressor", "lzo")  # the kernel's own choice


def _write(knob: str, value: str) -> None:
    try:
        (PARAMS / knob).write_text(value)
    except OSError as e:
        raise ZswapError(f"zswap {knob}={value} refused: {e.strerror or e}") from None


def apply(values: dict[str, str]) -> None:
    """Write ``values`` to zswap's knobs, in ``KNOBS`` order."""
    for knob in KNOBS:
        if knob in values and (PARAMS / knob).exists():
            _write(knob, values[knob])


def wanted(compressor: str | None, max_pool_percent: int | None, shrinker: bool) -> dict[str, str]:
    """The settings ``up --zswap`` asks for; checked, nothing written."""
    if not available():
        raise ZswapError("this kernel has no zswap (/sys/module/zswap is missing)")
    if max_pool_percent is not None and not 1 <= max_pool_percent <= 100:
        raise ZswapError(f"--zswap-max-pool-percent must be in 1..100, not {max_pool_percent}")
    out = {"compressor": choose(compressor), "enabled": "Y"}
    if max_pool_percent is not None:
        out["max_pool_percent"] = str(max_pool_percent)
    if shrinker:
        out["shrinker_enabled"] = "Y"
    return out


def _load(state: Path) -> tuple[dict[str, str], list[str]] | None:
    """(the settings as found, the mounts that want zswap), if recorded."""
    try:
        data = json.loads(state.read_text())
        return ({str(k): str(v) for k, v in data["saved"].items()}, [str(o) for o in data["owners"]])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _store(state: Path, saved: dict[str, str], owners: list[str]) -> None:
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"saved": saved, "owners": owners}))
    os.replace(tmp, state)


def claim(state: Path, mnt: str, values: dict[str, str]) -> None:
    """Record zswap's settings as found (unless a mount already did) and
    ``mnt`` as one that wants zswap, then set ``values``.  If setting
    fails, what was set is put back."""
    saved, owners = _load(state) or (params(), [])
    if mnt not in owners:
        owners.append(mnt)
    _store(state, saved, owners)
    try:
        apply(values)
    except BaseException:
        release(state, mnt)
        raise


def release(state: Path, mnt: str, alive: set[str] | None = None) -> dict[str, str] | None:
    """``mnt`` no longer wants zswap; if it was the last, put zswap's
    settings back as they were found.  ``alive``: the mounts that still
    exist; an owner not among them (its daemon died, nobody ran ``down``)
    wants nothing any more.  Returns what was restored (None if nothing
    was, because another mount still wants zswap or none did)."""
    found = _load(state)
    if found is None:
        return None
    saved, owners = found
    owners = [o for o in owners if o != mnt and (alive is None or o in alive)]
    if owners:
        _store(state, saved, owners)
        return None
    apply(saved)
    state.unlink(missing_ok=True)
    return saved


def owners(state: Path) -> list[str]:
    """Mounts that asked for zswap and are not down yet."""
    found = _load(state)
    return found[1] if found else []


def stats() -> dict[str, int]:
    """Every counter in DESCRIPTIONS that this machine offers (the debugfs
    ones only where debugfs is mounted)."""
    if not available():
        return {}
    vm = linux.vmstat()
    stored = linux.meminfo("Zswapped")
    out = {
        "zswap_enabled": int(params().get("enabled") == "Y"),
        "zswap_pool_bytes": linux.meminfo("Zswap"),
        "zswap_stored_bytes": stored,
        "zswap_stored_pages": stored // 4096,
        "zswap_stores": vm.get("zswpout", 0),
        "zswap_loads": vm.get("zswpin", 0),
        "zswap_written_back_pages": vm.get("zswpwb", 0),
    }
    if DEBUGFS.is_dir():
        for name in _DEBUGFS_STATS:
            try:
                out["zswap_" + name] = int((DEBUGFS / name).read_text())
            except (OSError, ValueError):
                continue
    return out
