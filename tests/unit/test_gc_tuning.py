"""The serving manager's cyclic-GC settings."""

from __future__ import annotations

import gc

from manager.gc_tuning import GEN0_THRESHOLD, settle_gc


def test_settle_gc_freezes_the_heap_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        settle_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GEN0_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
