"""Scenario 1: goodput under regional capacity, per strategy, in modes 1 and 3."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks.conftest import CAPACITY, JOBS, MODE3_JOBS
from tests.benchmarks.harness import (
    STRATEGIES,
    Profiler,
    Strategy,
    bench_stack,
    measure_ceiling,
    measure_push_rate,
    run_goodput,
)
from tests.benchmarks.report import Results
from tests.support.emulators import Emulator


@pytest.mark.timeout(60)
def test_ceiling_without_dispatcher(results: Results, log_dir: Path) -> None:
    """The limit's reachable share for a perfect client: what the goodput is measured beside."""
    results.ceiling = measure_ceiling(log_dir, CAPACITY)
    print(f"\n{results.ceiling}")
    assert results.ceiling.calls_by_status.get("429", 0) == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.key)
def test_goodput_mode1(strategy: Strategy, results: Results, log_dir: Path) -> None:
    """N jobs through one mode-1 ingress: every job succeeds; the figures are recorded."""
    regions = CAPACITY.regions[:1] if strategy.single_region else CAPACITY.regions
    with bench_stack(
        "memory",
        log_dir=log_dir,
        standin_config=CAPACITY.standin_config(),
        regions=regions,
        emulators=None,  # named, so mypy knows the settings below cannot fill it
        **strategy.env,
    ) as stack:
        profiler = (
            # 100 Hz: py-spy's own CPU must not slow the strategy it watches.
            Profiler(stack.ingress.pid, log_dir / "goodput-mode1.collapsed", rate=100)
            if strategy.key == "default"
            else None
        )
        run = run_goodput(stack, strategy=strategy, capacity=CAPACITY, jobs=JOBS)
        profile = profiler.stop() if profiler else None
    if profile:
        results.profiles["mode 1 ingress, scenario 1, default strategy"] = profile
    results.goodput.append(run)
    print(f"\n{run.summary()}")
    assert run.lost == 0, run.statuses


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.key)
def test_goodput_mode3(
    strategy: Strategy,
    results: Results,
    log_dir: Path,
    emulators: tuple[Emulator, Emulator],
) -> None:
    """The same through the mode-3 ingress, Pub/Sub push and the worker (smaller N)."""
    regions = CAPACITY.regions[:1] if strategy.single_region else CAPACITY.regions
    with bench_stack(
        "pubsub",
        log_dir=log_dir,
        standin_config=CAPACITY.standin_config(),
        regions=regions,
        emulators=emulators,
        **strategy.env,
    ) as stack:
        run = run_goodput(stack, strategy=strategy, capacity=CAPACITY, jobs=MODE3_JOBS)
    results.goodput.append(run)
    print(f"\n{run.summary()}")
    assert run.lost == 0, run.statuses


@pytest.mark.timeout(300)
def test_emulator_push_rate(
    results: Results, log_dir: Path, emulators: tuple[Emulator, Emulator]
) -> None:
    """The Pub/Sub emulator's push rate alone, to an instant and to a 200 ms endpoint."""
    _, pubsub = emulators
    for messages, delay_s in ((1000, 0.0), (30, CAPACITY.latency_s)):
        rate = measure_push_rate(
            pubsub, log_dir=log_dir, messages=messages, delay_s=delay_s, timeout_s=60
        )
        results.push_rates.append(rate)
        print(f"\n{rate}")
        assert rate.messages == messages
