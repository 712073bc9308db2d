"""The engine's consistency check, for tests and for recovery.

Every table word's target exists and is used once, every rmap entry
points back at its word, the per-cluster and global gauges match a
recount, and the pool and file accounting sum.  Reads every structure;
call with the engine lock held (``SwapSpace.check`` does).
"""

from __future__ import annotations

from . import _entry as E
from ._placement import QUARANTINED, Placement
from ._pool import size_class


def check(place: Placement) -> list[str]:
    """Every table word's target exists and is used once, every rmap
    entry points back at its word, and the pool and file accounting
    sum.  Returns the problems found."""
    bad = place.table.check()
    objs: set[tuple[int, int]] = set()
    payload = 0
    phys: dict[tuple[int, int], int] = {}
    for slot, w in place.table.words():
        t = w & E.TAG_MASK
        if t == E.POOL:
            obj, length = E.pool_object(w), E.pool_length(w)
            payload += length
            key = (size_class(length), obj)
            if key in objs or not place.pool.holds(obj, length):
                bad.append(f"slot {slot}: pool object {key} shared or not live")
            objs.add(key)
        elif t == E.PHYS:
            f, p = E.phys_file(w), E.phys_slot(w)
            bf = place.backing[f]
            if bf is None or p >= len(bf.rmap) or bf.rmap[p] != slot:
                bad.append(f"slot {slot}: backing {f} slot {p} does not point back")
            phys[(f, p)] = slot
        elif t != E.SAME:
            bad.append(f"slot {slot}: word {w:#x} has no backend")
    if len(objs) != place.pool.objects or payload != place.pool.payload:
        bad.append(f"pool holds {place.pool.objects} objects of {place.pool.payload} bytes, "
                   f"the tables {len(objs)} of {payload}")
    quarantined = {(bf.index, p) for bf, p in place.deferred}
    for bf in place.backing:
        if bf is None:
            continue
        live = 0
        for p, v in enumerate(bf.rmap):
            if v == -1:
                continue
            live += 1
            if v >= 0 and phys.get((bf.index, p)) != v:
                bad.append(f"backing {bf.index} slot {p}: rmap says {v}, no such word")
            elif v == QUARANTINED and (bf.index, p) not in quarantined:
                bad.append(f"backing {bf.index} slot {p}: quarantined, not deferred")
            elif v < -1 and v != QUARANTINED:
                bad.append(f"backing {bf.index} slot {p}: left reserved ({v})")
        if live != bf.live or sum(bf.used) != live:
            bad.append(f"backing {bf.index}: live {bf.live}, used {sum(bf.used)}, rmap {live}")
    return bad

