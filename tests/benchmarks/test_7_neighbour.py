"""Scenario 7: the noisy neighbour (issue: fair share between keys), mode 1.

Key A (batch) floods N jobs at once; 30 s later key B (interactive) sends one job a
second for 60 s; scenario 1's regions. Beside it, in the same invocation: B alone on an
idle system, both keys interactive (no priority difference), and B's jobs sent with A's
key (one FIFO). Only what never varies is asserted (every job final, none lost); B's
latency against B alone, A's throughput and the goodput are reported in BENCHMARKS.md
section 7.

Mode 3 is not run: the Pub/Sub emulator pushes one or two messages at a time (section 1),
so a flood there measures the emulator's push rate, not the fair share; and in mode 3 both
keys share one topic, so B's job waits behind A's backlog in Pub/Sub itself (README:
"Not yet").
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tests.benchmarks.neighbour_bench import (
    VARIANTS,
    NeighbourScenario,
    Variant,
    neighbour_stack,
    run_neighbour,
)
from tests.benchmarks.report import Results

SCENARIO = dataclasses.replace(
    NeighbourScenario(),
    jobs=int(os.environ.get("BENCH_NEIGHBOUR_JOBS", str(NeighbourScenario.jobs))),
)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("chosen", VARIANTS, ids=lambda v: v.key.replace(" ", "-"))
def test_noisy_neighbour(chosen: Variant, results: Results, log_dir: Path) -> None:
    """Every job of both keys reaches a final state, none lost; the figures recorded."""
    with neighbour_stack(SCENARIO, chosen, log_dir=log_dir) as (stack, keys):
        run = run_neighbour(stack, keys, SCENARIO, chosen)
    results.neighbour_scenario = SCENARIO
    results.neighbour.append(run)
    print(f"\nneighbour {chosen.key}: {run.summary()}")
    assert run.lost == {"A": 0, "B": 0}, run.statuses
