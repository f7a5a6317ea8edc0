"""Process set-up shared by both services' entry points."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from dispatcher.http import GC_THRESHOLDS, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """Put the test process's collector back as it was."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_start_up_objects_and_collects_less_often() -> None:
    """Start-up objects leave the scans; young collections come 10,000 allocations apart."""
    tune_gc()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.isenabled()
