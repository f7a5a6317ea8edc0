"""Scenario 2: one region answers 503 for the middle third of the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks.conftest import CAPACITY, JOBS
from tests.benchmarks.harness import STRATEGIES, bench_stack, run_goodput
from tests.benchmarks.report import Results

DEFAULT = next(s for s in STRATEGIES if s.key == "default")


@pytest.mark.timeout(400)
def test_one_region_down(results: Results, log_dir: Path) -> None:
    """Mode 1, default strategy: no job lost; completion time against the healthy run."""
    with bench_stack(
        "memory",
        log_dir=log_dir,
        standin_config=CAPACITY.standin_config(),
        regions=CAPACITY.regions,
    ) as stack:
        healthy = results.healthy("memory")
        if healthy is None or healthy.jobs != JOBS:
            healthy = run_goodput(stack, strategy=DEFAULT, capacity=CAPACITY, jobs=JOBS)
        third = healthy.completion_s / 3
        down = run_goodput(
            stack,
            strategy=DEFAULT,
            capacity=CAPACITY,
            jobs=JOBS,
            outage=(CAPACITY.regions[1], third, 2 * third),
        )
    results.healthy_for_down = healthy
    results.region_down.append(down)
    print(f"\n{down.summary()}")
    assert down.lost == 0, down.statuses
