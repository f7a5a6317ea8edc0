"""Scenario 6: cost under deadline (issue: consumption tiers), mode 1.

The same N jobs with the same deadline, all `standard`, all `flex`, all `auto`, and a
small all-`provisioned` variant, each on a fresh stack. Only what never varies is
asserted (every job final, none lost, every failure DEADLINE_EXCEEDED); the targets
(auto on time and cheap, flex late, standard on time, PT never billed on demand) are
measured and reported in BENCHMARKS.md section 6.

Mode 3 is not run: the tiers are chosen per call by the same executor in both modes, and
mode 3's rate here is the Pub/Sub emulator's (one push at a time, section 1), far below
flex's 20 jobs/s, so it would measure the emulator rather than the tiers.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tests.benchmarks.report import Results
from tests.benchmarks.tiers_bench import VARIANTS, TierScenario, run_tier_variant, tier_stack

SCENARIO = dataclasses.replace(
    TierScenario(),
    jobs=int(os.environ.get("BENCH_TIER_JOBS", str(TierScenario.jobs))),
)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", [*VARIANTS, "provisioned"])
def test_tiers_cost_under_deadline(variant: str, results: Results, log_dir: Path) -> None:
    """Every job of `variant` reaches a final state, none lost; the figures recorded."""
    jobs = SCENARIO.provisioned_jobs if variant == "provisioned" else SCENARIO.jobs
    with tier_stack(SCENARIO, log_dir=log_dir) as stack:
        run = run_tier_variant(stack, SCENARIO, variant=variant, jobs=jobs)
    results.tier_scenario = SCENARIO
    results.tiers.append(run)
    print(f"\ntiers {variant}: {run.summary()}")
    assert run.lost == 0, run.statuses
    assert set(run.failed_by_code) <= {"DEADLINE_EXCEEDED"}, run.failed_by_code
