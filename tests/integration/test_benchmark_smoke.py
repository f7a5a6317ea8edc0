"""Fast versions of benchmark scenarios 1, 5, 6 and 7 (small N), so the harness cannot rot.

The real suite is `bash tests/benchmarks/run.sh` (BENCHMARKS.md); this runs the same
code, in mode 1 with every strategy on 150 jobs, in mode 3 with two workers behind
the push relay on 60 jobs, scenario 6's tiers on 200 jobs with a 5 s deadline, and
scenario 7's noisy neighbour on 2,000 jobs beside a 5 s trickle (and, in mode 3 with
the interactive topic, 300 jobs), with small latencies and short backoffs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks.harness import STRATEGIES, Capacity, bench_stack, run_goodput
from tests.benchmarks.neighbour_bench import SMOKE as NEIGHBOUR_SMOKE
from tests.benchmarks.neighbour_bench import VARIANTS as NEIGHBOUR_VARIANTS
from tests.benchmarks.neighbour_bench import neighbour_stack, run_neighbour
from tests.benchmarks.neighbour_bench import variant as neighbour_variant
from tests.benchmarks.report import (
    Results,
    render,
    render_neighbour,
    splice_section,
    targets,
    write_charts,
)
from tests.benchmarks.scale import ScaleRow, measure_store_ceiling, scale_stack, store_operations
from tests.benchmarks.tiers_bench import SMOKE as TIERS_SMOKE
from tests.benchmarks.tiers_bench import VARIANTS, run_tier_variant, tier_stack
from tests.integration.conftest import Emulators

pytestmark = pytest.mark.integration

SMOKE = Capacity(concurrency=8, latency_s=0.05)  # 4 regions x 8 x 50 ms = 640 calls/s
# Short backoffs and requeue delays, so the naive strategy's retries end in seconds.
FAST_RETRIES = {
    "VERTEX_BACKOFF_INITIAL_S": "0.05",
    "VERTEX_BACKOFF_MAX_S": "0.2",
    "REQUEUE_DELAY_S": "0.2",
}


@pytest.mark.timeout(60)
def test_goodput_harness_runs_every_strategy(tmp_path: Path) -> None:
    """Each strategy finishes every job; figures, targets, report and charts are produced."""
    results = Results(capacity=SMOKE.describe())
    for strategy in STRATEGIES:
        regions = SMOKE.regions[:1] if strategy.single_region else SMOKE.regions
        with bench_stack(
            "memory",
            log_dir=tmp_path,
            standin_config=SMOKE.standin_config(),
            regions=regions,
            emulators=None,  # named, so mypy knows the settings below cannot fill it
            **{**FAST_RETRIES, **strategy.env},
        ) as stack:
            run = run_goodput(stack, strategy=strategy, capacity=SMOKE, jobs=150, timeout_s=40)
        assert run.lost == 0, run.statuses
        assert run.calls_by_status.get("200") == 150
        assert run.duplicate_successes == 0
        assert 0 < run.goodput <= 1.5
        assert run.latency_p50_s <= run.latency_p99_s
        if strategy.single_region:
            assert {region for _, region, _ in run.calls_log} == {SMOKE.regions[0]}
        results.goodput.append(run)
    assert {row[0] for row in targets(results)} >= {
        "mode 1: goodput >= 0.90 of the limit",
        "default beats both baselines on completion time",
    }
    text = render(results, write_charts(results, tmp_path), notes="\nsmoke\n")
    assert "## 1. Goodput under regional capacity" in text
    assert "this project's default" in text


@pytest.mark.timeout(180)
def test_mode3_scale_harness_runs_with_two_workers(tmp_path: Path, emulators: Emulators) -> None:
    """Mode 3 at small scale: 2 ingresses, 2 workers behind the push relay, the ceiling too."""
    pair = (emulators.firestore, emulators.pubsub)
    results = Results(capacity=SMOKE.describe())
    results.store_ceiling = measure_store_ceiling(pair, jobs=40, in_flight=8)
    with scale_stack(pair, log_dir=tmp_path, capacity=SMOKE, workers=2) as stack:
        run = run_goodput(stack, strategy=STRATEGIES[-1], capacity=SMOKE, jobs=60, timeout_s=90)
        ops = store_operations(stack)
    assert run.lost == 0, run.statuses
    assert run.duplicate_successes == 0
    assert ops["create"] == 60
    assert ops["update"] >= 120  # a claim and a result per job
    results.scale.append(
        ScaleRow(
            scenario="mode 3, K workers",
            label="K = 2",
            run=run,
            store_ops_per_job=ops["update"] / 60,
            ceiling_per_s=results.store_ceiling.rate_per_s,
        )
    )
    text = render(results, write_charts(results, tmp_path), notes="\nsmoke\n")
    assert "## 5. At realistic scale" in text
    assert "| K = 2 |" in text


@pytest.mark.timeout(90)
def test_tiers_harness_runs_every_variant(tmp_path: Path) -> None:
    """Scenario 6 small: every job of every tier final, none lost, section 6 rendered."""
    results = Results(tier_scenario=TIERS_SMOKE)
    for variant in (*VARIANTS, "provisioned"):
        jobs = TIERS_SMOKE.provisioned_jobs if variant == "provisioned" else TIERS_SMOKE.jobs
        with tier_stack(TIERS_SMOKE, log_dir=tmp_path) as stack:
            run = run_tier_variant(stack, TIERS_SMOKE, variant=variant, jobs=jobs, timeout_s=30)
        assert run.lost == 0, run.statuses
        assert sum(run.statuses.values()) == jobs
        assert set(run.failed_by_code) <= {"DEADLINE_EXCEEDED"}, run.failed_by_code
        assert (run.cost_usd == 0) == (variant == "provisioned")  # PT is free per token
        results.tiers.append(run)
    assert results.only_tiers()
    text = render(results, write_charts(results, tmp_path), notes="\nsmoke\n")
    assert "## 6. Cost under deadline" in text
    for variant in (*VARIANTS, "provisioned"):
        assert f"| {variant} | " in text
    # Written on its own, the section replaces only itself in an existing report.
    report = "# Benchmarks\n\n## 5. At realistic scale\n\nkept\n\n## Notes\n\nnotes\n"
    once = splice_section(report, "## 6. Cost under deadline\n\nfirst\n")
    twice = splice_section(once, "## 6. Cost under deadline\n\nsecond\n")
    assert "kept" in twice and "notes" in twice and "first" not in twice
    assert twice.index("## 5.") < twice.index("second") < twice.index("## Notes")


@pytest.mark.timeout(120)
def test_neighbour_harness_runs_every_variant(tmp_path: Path) -> None:
    """Scenario 7 small, mode 1: every job of every key final, none lost, section 7 rendered."""
    results = Results(neighbour_scenario=NEIGHBOUR_SMOKE)
    chosen_ones = [v for v in NEIGHBOUR_VARIANTS if v.mode == "memory"]
    for chosen in chosen_ones:
        with neighbour_stack(NEIGHBOUR_SMOKE, chosen, log_dir=tmp_path) as (stack, keys):
            run = run_neighbour(stack, keys, NEIGHBOUR_SMOKE, chosen, timeout_s=40)
        assert run.lost == {"A": 0, "B": 0, "C": 0}, run.statuses
        b_jobs = NEIGHBOUR_SMOKE.b_jobs if chosen.trickle else 0
        assert sum(run.statuses["B"].values()) == b_jobs
        flood = NEIGHBOUR_SMOKE.jobs if chosen.flood else 0
        assert sum(run.statuses["A"].values()) + sum(run.statuses["C"].values()) == flood
        assert run.refused == {"A": 0, "B": 0, "C": 0}  # MAX_PENDING_JOBS holds every job
        results.neighbour.append(run)
    weights = results.neighbour_run("weights")
    assert weights is not None and weights.weight_ratio is not None
    assert sum(weights.backlogged_finals.values()) > 0
    assert results.only_neighbour() and results.only_sections()
    text = render(results, write_charts(results, tmp_path), notes="\nsmoke\n")
    assert "## 7. Noisy neighbour" in text
    for chosen in chosen_ones:
        assert f"| mode 1 | {chosen.label} | " in text
    for target in (
        "noisy neighbour: 0 jobs lost, every job final",
        "noisy neighbour, mode 1: total goodput >= 0.95x the run without B",
        "noisy neighbour: batch keys of weights 3:1 complete within 10 % of 3:1",
    ):
        assert target in text
    # Written on its own, section 7 follows section 6 and leaves it alone.
    report = "# Benchmarks\n\n## 6. Cost under deadline\n\nkept\n\n## Notes\n\nnotes\n"
    section = "\n".join(render_neighbour(results, []))
    spliced = splice_section(report, section, "## 7. Noisy neighbour")
    assert "kept" in spliced and "notes" in spliced
    assert spliced.index("## 6.") < spliced.index("## 7.") < spliced.index("## Notes")


@pytest.mark.timeout(60)
def test_neighbour_harness_runs_in_mode_3(tmp_path: Path, emulators: Emulators) -> None:
    """Scenario 7 small, mode 3 with INTERACTIVE_TOPIC (two subscriptions, two relays):
    every job final, none lost, the mode-3 rows rendered."""
    pair = (emulators.firestore, emulators.pubsub)
    results = Results(neighbour_scenario=NEIGHBOUR_SMOKE)
    chosen = neighbour_variant("fair", "pubsub")
    with neighbour_stack(NEIGHBOUR_SMOKE, chosen, log_dir=tmp_path, emulators=pair) as (
        stack,
        keys,
    ):
        assert "INTERACTIVE_TOPIC" in stack.env
        run = run_neighbour(stack, keys, NEIGHBOUR_SMOKE, chosen, timeout_s=40, ceiling_per_s=100)
    assert run.lost == {"A": 0, "B": 0, "C": 0}, run.statuses
    assert sum(run.statuses["A"].values()) == NEIGHBOUR_SMOKE.pubsub_jobs
    assert sum(run.statuses["B"].values()) == NEIGHBOUR_SMOKE.b_jobs
    assert run.bound_per_s == 100
    results.neighbour.append(run)
    text = "\n".join(render_neighbour(results, []))
    assert f"| mode 3 | {chosen.label} | " in text
