"""Scenario 4: the mode-1 ingress's resident memory over 100,000 finished jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks.conftest import MEMORY_JOBS
from tests.benchmarks.harness import REGIONS, bench_stack, run_memory
from tests.benchmarks.report import Results

# Half the jobs, so the run shows the plateau once the bound is reached.
MEMORY_MAX_JOBS = max(1, MEMORY_JOBS // 2)


@pytest.mark.timeout(600)
def test_memory_is_bounded(results: Results, log_dir: Path) -> None:
    """RSS stops growing once MEMORY_MAX_JOBS finished records are kept."""
    with bench_stack(
        "memory",
        log_dir=log_dir,
        standin_config={"default": {"latency_s": 0.0}},
        regions=REGIONS,
        MEMORY_MAX_JOBS=str(MEMORY_MAX_JOBS),
        MAX_PENDING_JOBS=str(min(10_000, MEMORY_MAX_JOBS)),
        # Two JSON log lines per job cost ~5 % of the ingress's CPU and no memory.
        LOG_LEVEL="WARNING",
    ) as stack:
        memory = run_memory(
            stack,
            jobs=MEMORY_JOBS,
            memory_max_jobs=MEMORY_MAX_JOBS,
            sample_every=max(1, MEMORY_JOBS // 10),
            timeout_s=540,
        )
    results.memory = memory
    print(f"\n{memory}")
    assert memory.samples[-1][0] >= MEMORY_JOBS
