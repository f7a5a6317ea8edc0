"""Benchmark fixtures: the emulators, a log folder, and the results that become BENCHMARKS.md.

The suite is opt-in (pyproject's addopts ignore this folder); run it with
`bash tests/benchmarks/run.sh`. Sizes can be shrunk for a quick look with
BENCH_JOBS, BENCH_MODE3_JOBS and BENCH_MEMORY_JOBS (the report says what ran).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.benchmarks.harness import Capacity
from tests.benchmarks.report import Results, load_average, write_report
from tests.support.emulators import Emulator, emulators_unavailable_reason, running_emulators
from tests.support.stack import PROJECT

RESULTS = Results()
CAPACITY = Capacity()
JOBS = int(os.environ.get("BENCH_JOBS", "4000"))
# The Pub/Sub emulator pushes one message at a time (see BENCHMARKS.md), so mode 3 runs
# take ~1/latency jobs per second whatever the strategy: a smaller N keeps the run short.
MODE3_JOBS = int(os.environ.get("BENCH_MODE3_JOBS", "100"))
MEMORY_JOBS = int(os.environ.get("BENCH_MEMORY_JOBS", "100000"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here is a benchmark."""
    for item in items:
        item.add_marker(pytest.mark.benchmark)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Note the machine's load before anything starts."""
    RESULTS.load_before = load_average()
    RESULTS.capacity = CAPACITY.describe()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write BENCHMARKS.md and the charts from whatever ran."""
    if os.environ.get("BENCH_NO_REPORT"):
        return
    ran = (RESULTS.goodput, RESULTS.wrk, RESULTS.memory, RESULTS.region_down, RESULTS.scale)
    if any(ran) or RESULTS.tiers or RESULTS.neighbour:
        RESULTS.duration_s = (datetime.now(UTC) - RESULTS.started).total_seconds()
        path = write_report(RESULTS)
        print(f"\nbenchmarks: wrote {path}")


@pytest.fixture(scope="session")
def results() -> Results:
    """The figures of this invocation."""
    return RESULTS


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the processes log (kept by pytest for the last runs)."""
    return tmp_path_factory.mktemp("bench-logs")


@pytest.fixture(scope="session")
def emulators(log_dir: Path) -> Iterator[tuple[Emulator, Emulator]]:
    """(firestore, pubsub) for the whole session; mode-3 benchmarks skip without them."""
    reason = emulators_unavailable_reason()
    if reason is not None:
        RESULTS.skipped["mode 3"] = reason
        pytest.skip(f"emulators unavailable: {reason}")
    with running_emulators(PROJECT, log_dir) as both:
        yield both
