"""Writes BENCHMARKS.md and the PNG charts beside it (docs/benchmarks/) from one run.

The hand-written part of BENCHMARKS.md (between the notes markers) is kept across runs;
everything else is regenerated. An invocation that ran only scenario 6 (`run.sh -k tiers`)
or 7 (`run.sh -k neighbour`), or both, rewrites only their sections, in place, and leaves
the other sections' figures as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from tests.benchmarks.harness import (
    AddedLatency,
    Ceiling,
    GoodputResult,
    MemoryResult,
    PushRate,
    WrkResult,
    git_revision,
    machine,
    per_second,
)
from tests.benchmarks.neighbour_bench import NeighbourRun, NeighbourScenario
from tests.benchmarks.scale import InFlightMemory, ScaleRow, StoreCeiling
from tests.benchmarks.tiers_bench import RATE_OF_TRAFFIC as RATE_OF_TRAFFIC_NAMES
from tests.benchmarks.tiers_bench import TierRun, TierScenario, token_cost

ROOT: Final = Path(__file__).resolve().parents[2]
REPORT: Final = ROOT / "BENCHMARKS.md"
CHARTS: Final = ROOT / "docs" / "benchmarks"
COMMAND: Final = "bash tests/benchmarks/run.sh"
NOTES_START: Final = "<!-- notes:start -->"
NOTES_END: Final = "<!-- notes:end -->"
MODE_NAMES: Final = {"memory": "mode 1", "pubsub": "mode 3"}
TIERS_HEADING: Final = "## 6. Cost under deadline"
NEIGHBOUR_HEADING: Final = "## 7. Noisy neighbour"


@dataclass
class Results:
    """Everything one benchmark invocation measured."""

    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    load_before: str = ""
    duration_s: float = 0.0
    capacity: str = ""
    goodput: list[GoodputResult] = field(default_factory=list)
    ceiling: Ceiling | None = None
    push_rates: list[PushRate] = field(default_factory=list)
    region_down: list[GoodputResult] = field(default_factory=list)
    healthy_for_down: GoodputResult | None = None
    wrk: list[WrkResult] = field(default_factory=list)
    added: list[AddedLatency] = field(default_factory=list)
    memory: MemoryResult | None = None
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    scale: list[ScaleRow] = field(default_factory=list)
    store_ceiling: StoreCeiling | None = None
    in_flight: list[InFlightMemory] = field(default_factory=list)
    tiers: list[TierRun] = field(default_factory=list)
    tier_scenario: TierScenario | None = None
    neighbour: list[NeighbourRun] = field(default_factory=list)
    neighbour_scenario: NeighbourScenario | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def _others_ran(self) -> bool:
        """Whether any scenario but 6 and 7 ran."""
        others = (
            self.goodput,
            self.region_down,
            self.wrk,
            self.added,
            self.memory,
            self.scale,
            self.in_flight,
            self.push_rates,
        )
        return any(others)

    def only_tiers(self) -> bool:
        """Whether scenario 6 is all that ran (its section is then written on its own)."""
        return bool(self.tiers) and not self.neighbour and not self._others_ran()

    def only_neighbour(self) -> bool:
        """Whether scenario 7 is all that ran (its section is then written on its own)."""
        return bool(self.neighbour) and not self.tiers and not self._others_ran()

    def only_sections(self) -> bool:
        """Whether only scenarios written on their own (6, 7) ran."""
        return bool(self.tiers or self.neighbour) and not self._others_ran()

    def neighbour_run(self, key: str, mode: str = "memory") -> NeighbourRun | None:
        """Scenario 7's run of variant `key` in `mode`, if it ran."""
        return next((r for r in self.neighbour if r.variant == key and r.mode == mode), None)

    def tier(self, variant: str) -> TierRun | None:
        """Scenario 6's run of `variant`, if it ran."""
        return next((r for r in self.tiers if r.variant == variant), None)

    def healthy(self, mode: str = "memory") -> GoodputResult | None:
        """The default strategy's run in `mode`, if it ran."""
        return next((r for r in self.goodput if r.mode == mode and r.strategy == "default"), None)


def load_average() -> str:
    """The 1/5/15-minute load average (other work on the machine skews the figures)."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


# -- charts ---------------------------------------------------------------------------------


def write_charts(results: Results, charts: Path = CHARTS) -> list[str]:
    """Draw the charts; returns their file names (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    charts.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    if results.goodput:
        for name, status, title in (
            ("goodput-successes.png", 200, "successful calls per second, per region"),
            ("goodput-429s.png", 429, "calls answered 429 per second, per region"),
        ):
            modes = [m for m in MODE_NAMES if any(r.mode == m for r in results.goodput)]
            strategies = list(dict.fromkeys(r.strategy for r in results.goodput))
            fig, axes = plt.subplots(
                len(strategies),
                len(modes),
                figsize=(6.5 * len(modes), 2.6 * len(strategies)),
                squeeze=False,
            )
            for row, strategy in enumerate(strategies):
                for col, mode in enumerate(modes):
                    ax = axes[row][col]
                    run = next(
                        (r for r in results.goodput if r.mode == mode and r.strategy == strategy),
                        None,
                    )
                    if run is None:
                        ax.set_visible(False)
                        continue
                    series = per_second(run.calls_log, status=status)
                    for region, points in sorted(series.items()):
                        ax.plot([t for t, _ in points], [v for _, v in points], label=region, lw=1)
                    if not series:
                        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
                    ax.set_title(f"{MODE_NAMES[mode]}: {run.label}", fontsize=9)
                    ax.set_xlabel("s since the first submission", fontsize=8)
                    ax.tick_params(labelsize=8)
                    ax.grid(alpha=0.3)
                    if row == 0 and col == 0:
                        ax.legend(fontsize=7)
            fig.suptitle(title)
            fig.tight_layout()
            fig.savefig(charts / name, dpi=90)
            plt.close(fig)
            written.append(name)
    if results.region_down:
        run = results.region_down[0]
        fig, ax = plt.subplots(figsize=(8, 3.2))
        for region, points in sorted(per_second(run.calls_log, status=200).items()):
            ax.plot([t for t, _ in points], [v for _, v in points], label=f"{region} 200", lw=1)
        for region, points in sorted(per_second(run.calls_log, status=503).items()):
            ax.plot([t for t, _ in points], [v for _, v in points], "--", label=f"{region} 503")
        if run.outage:
            ax.axvspan(*run.outage, color="red", alpha=0.1, label="region answering 503")
        ax.set_title(f"mode 1, default strategy, one region down: {run.jobs} jobs")
        ax.set_xlabel("s since the first submission")
        ax.set_ylabel("calls per second")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(charts / "region-down.png", dpi=90)
        plt.close(fig)
        written.append("region-down.png")
    if results.memory is not None:
        memory = results.memory
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        ax.plot([n for n, _ in memory.samples], [r for _, r in memory.samples], marker="o")
        ax.axvline(memory.memory_max_jobs, color="grey", ls="--", label="MEMORY_MAX_JOBS")
        ax.set_xlabel("finished jobs")
        ax.set_ylabel("ingress RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.set_title("mode 1: ingress resident memory")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(charts / "memory.png", dpi=90)
        plt.close(fig)
        written.append("memory.png")
    workers = [row for row in results.scale if row.scenario == "mode 3, K workers"]
    if workers:
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        counts = [int(row.label.split("= ")[1]) for row in workers]
        ax.plot(counts, [row.share_of_bound for row in workers], marker="o", label="share of bound")
        ax.plot(counts, [row.run.share_429 for row in workers], marker="s", label="429 share")
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(k) for k in counts])
        ax.set_xlabel("worker processes (K)")
        ax.set_ylim(0, 1)
        ax.set_title("mode 3: jobs/s over min(limit, emulators' ceiling), and 429 share")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(charts / "scale-workers.png", dpi=90)
        plt.close(fig)
        written.append("scale-workers.png")
    if results.tiers:
        written.append(tiers_chart(results, charts, plt))
    if results.neighbour:
        written.append(neighbour_chart(results, charts, plt))
    return written


RATE_COLOURS: Final = {
    "standard": "tab:red",
    "flex": "tab:green",
    "provisioned": "tab:blue",
    "priority": "tab:purple",
}


def tiers_chart(results: Results, charts: Path, plt: Any) -> str:
    """Scenario 6: cost per 1,000 jobs by rate per variant; auto's answers per lane."""
    fig, (costs, lanes) = plt.subplots(1, 2, figsize=(12, 3.4))
    table = results.tier_scenario.prices() if results.tier_scenario else {}
    prices = next(iter(table.values()), {})
    names = [run.variant for run in results.tiers]
    bottoms = [0.0] * len(names)
    for rate, colour in RATE_COLOURS.items():
        heights = []
        for run in results.tiers:
            kinds = {t: k for t, k in run.tokens.items() if RATE_OF_TRAFFIC_NAMES.get(t, t) == rate}
            heights.append(token_cost(kinds, prices) / run.jobs * 1000 if run.jobs else 0.0)
        if any(heights):
            costs.bar(names, heights, bottom=bottoms, color=colour, label=rate)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for index, run in enumerate(results.tiers):
        costs.text(
            index,
            bottoms[index],
            f"{run.on_time_share:.0%} on time",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    costs.set_ylim(0, max(bottoms, default=0.0) * 1.15 or 1.0)  # room for the labels
    costs.set_ylabel("USD per 1,000 jobs")
    costs.set_title("cost by billed rate (label: share answered before the deadline)", fontsize=9)
    costs.legend(fontsize=7)
    costs.grid(alpha=0.3, axis="y")
    auto = results.tier("auto")
    if auto is not None:
        for lane, points in sorted(per_second(auto.calls_log, status=200, bucket_s=2.0).items()):
            lanes.plot([t for t, _ in points], [v for _, v in points], label=lane, lw=1)
        lanes.axvline(auto.deadline_s, color="grey", ls="--", label="deadline (first job)")
    lanes.set_title("auto: answers (200) per second, per lane", fontsize=9)
    lanes.set_xlabel("s since the first submission")
    lanes.grid(alpha=0.3)
    lanes.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(charts / "tiers.png", dpi=90)
    plt.close(fig)
    return "tiers.png"


def neighbour_chart(results: Results, charts: Path, plt: Any) -> str:
    """Scenario 7, a row per mode: B's latency over time per variant; A's jobs final per second."""
    modes = [m for m in MODE_NAMES if any(r.mode == m for r in results.neighbour)]
    fig, axes = plt.subplots(len(modes), 2, figsize=(12, 3.4 * len(modes)), squeeze=False)
    scenario = results.neighbour_scenario
    for (latency, flood), mode in zip(axes, modes, strict=True):
        runs = [r for r in results.neighbour if r.mode == mode]
        for run in runs:
            if run.b_points:
                latency.plot(
                    [t for t, _ in run.b_points],
                    [s for _, s in run.b_points],
                    marker=".",
                    lw=0.8,
                    label=run.label,
                )
            if run.a_final_at:
                series = per_second(
                    [(t, "A", 200) for t in run.a_final_at], status=200, bucket_s=2.0
                )
                points = series.get("A", [])
                flood.plot([t for t, _ in points], [v for _, v in points], lw=1, label=run.label)
        latency.set_yscale("log")
        latency.set_title(
            f"{MODE_NAMES[mode]}, B: latency of each job (POST sent to final), by when sent",
            fontsize=9,
        )
        latency.set_xlabel("s since A's first submission")
        latency.set_ylabel("s")
        latency.grid(alpha=0.3)
        latency.legend(fontsize=7)
        if scenario is not None:
            for ax in (latency, flood):
                ax.axvspan(
                    scenario.b_delay_s,
                    scenario.b_delay_s + scenario.b_duration_s,
                    color="grey",
                    alpha=0.08,
                )
            flood.axhline(
                scenario.capacity.jobs_per_s, color="grey", ls="--", label="regions' limit"
            )
        ceiling = next((r.ceiling_per_s for r in runs if r.ceiling_per_s), None)
        if ceiling:
            flood.axhline(ceiling, color="black", ls=":", label="emulators' ceiling")
        flood.set_title(
            f"{MODE_NAMES[mode]}, A: jobs final per second (shaded: B sending)", fontsize=9
        )
        flood.set_xlabel("s since A's first submission")
        flood.set_ylim(bottom=0)
        flood.grid(alpha=0.3)
        flood.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(charts / "neighbour.png", dpi=90)
    plt.close(fig)
    return "neighbour.png"


# -- targets --------------------------------------------------------------------------------


def wasted(run: GoodputResult) -> int:
    """Upstream calls beyond the one successful call each job needs."""
    return run.calls - run.calls_by_status.get("200", 0)


def targets(results: Results) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each target of the issue; met None when not measured."""
    rows: list[tuple[str, str, bool | None]] = []
    default = results.healthy("memory")
    baselines = [r for r in results.goodput if r.mode == "memory" and r.strategy != "default"]
    if default is not None:
        reachable = results.ceiling.share_of_limit if results.ceiling is not None else None
        ceiling = (
            f" (a client at exactly the capacity, no dispatcher: {reachable:.2f})"
            if reachable is not None
            else ""
        )
        rows.append(
            (
                "mode 1: goodput >= 0.90 of the limit",
                f"{default.goodput:.2f}{ceiling}",
                default.goodput >= 0.9,
            )
        )
        rows.append(
            (
                "mode 1: <= 5 % of upstream calls answered 429",
                f"{default.share_429:.1%}",
                default.share_429 <= 0.05,
            )
        )
        if baselines:
            runs = [default, *baselines]
            faster = all(default.completion_s < b.completion_s for b in baselines)
            leaner = all(wasted(default) < wasted(b) for b in baselines)
            rows.append(
                (
                    "default beats both baselines on completion time",
                    ", ".join(
                        f"{r.strategy} {r.completion_s:.1f} s" for r in [default, *baselines]
                    ),
                    faster,
                )
            )
            rows.append(
                (
                    "default beats both baselines on wasted calls",
                    ", ".join(f"{r.strategy} {wasted(r)}" for r in runs),
                    leaner,
                )
            )
    if results.region_down:
        down = results.region_down[0]
        healthy = results.healthy_for_down
        rows.append(("one region down: 0 jobs lost", str(down.lost), down.lost == 0))
        if healthy is not None:
            ratio = down.completion_s / healthy.completion_s
            rows.append(
                ("one region down: completion <= 1.5x healthy", f"{ratio:.2f}x", ratio <= 1.5)
            )
    post = [w for w in results.wrk if w.mode == "memory" and w.endpoint == "POST /generate"]
    if post:
        paced = [w for w in post if "paced" in w.load]
        for w in post:
            if "paced" in w.load:
                continue
            rows.append(
                (
                    f"mode 1: >= 1,000 POST /generate per second, one process ({w.load})",
                    f"{w.rate_per_s:,.0f}/s, p99 {w.p99_ms:.1f} ms",
                    w.rate_per_s >= 1000,
                )
            )
        if paced:
            at = paced[0]
            rows.append(
                (
                    "mode 1: p99 <= 10 ms at 1,000 POST/s",
                    f"p99 {at.p99_ms:.1f} ms at {at.rate_per_s:,.0f}/s",
                    at.p99_ms <= 10 and at.rate_per_s >= 950,
                )
            )
    rows += tier_targets(results)
    rows += neighbour_targets(results)
    if results.memory is not None:
        memory = results.memory
        at_bound = next(
            (r for n, r in memory.samples if n >= memory.memory_max_jobs), memory.rss_end_mib
        )
        growth = memory.rss_end_mib - at_bound
        rows.append(
            (
                "memory: no growth past MEMORY_MAX_JOBS",
                f"{at_bound:.0f} MiB at {memory.memory_max_jobs:,} jobs, "
                f"{memory.rss_end_mib:.0f} MiB at {memory.jobs:,} ({growth:+.0f} MiB)",
                growth <= 0.05 * at_bound,
            )
        )
    return rows


def tier_targets(results: Results) -> list[tuple[str, str, bool | None]]:
    """Scenario 6's targets (measured, not asserted): (target, measured, met)."""
    rows: list[tuple[str, str, bool | None]] = []
    standard, flex, auto = (results.tier(v) for v in ("standard", "flex", "auto"))
    if auto is not None:
        rows.append(
            (
                "tiers: auto answers >= 99 % of jobs before the deadline",
                f"{auto.on_time_share:.1%} ({auto.on_time:,} of {auto.jobs:,})",
                auto.on_time_share >= 0.99,
            )
        )
        if standard is not None and standard.cost_usd > 0:
            ratio = auto.cost_per_1000 / standard.cost_per_1000
            rows.append(
                (
                    "tiers: auto costs <= 0.65x all-standard",
                    f"{ratio:.2f}x (${auto.cost_per_1000:.4f} against "
                    f"${standard.cost_per_1000:.4f} per 1,000 jobs)",
                    ratio <= 0.65,
                )
            )
    if flex is not None:
        rows.append(
            (
                "tiers: flex alone misses the deadline for some jobs",
                f"{flex.jobs - flex.on_time:,} of {flex.jobs:,} late ({flex.on_time_share:.1%} "
                "on time)",
                flex.on_time < flex.jobs,
            )
        )
    if standard is not None:
        rows.append(
            (
                "tiers: standard alone meets the deadline",
                f"{standard.on_time_share:.1%} on time, all done in {standard.wall_s:.1f} s",
                standard.on_time == standard.jobs,
            )
        )
    provisioned = results.tier("provisioned")
    if provisioned is not None:
        rows.append(
            (
                "tiers: no on-demand token billed for a provisioned job",
                f"{provisioned.provisioned_jobs_on_demand_tokens} tokens",
                provisioned.provisioned_jobs_on_demand_tokens == 0,
            )
        )
    lost = [run for run in results.tiers if run.lost]
    if results.tiers:
        rows.append(
            (
                "tiers: 0 jobs lost, every job final",
                ", ".join(f"{run.variant} {run.lost}" for run in results.tiers),
                not lost,
            )
        )
    return rows


def neighbour_targets(results: Results) -> list[tuple[str, str, bool | None]]:
    """Scenario 7's targets (measured, not asserted): (target, measured, met)."""
    rows: list[tuple[str, str, bool | None]] = []
    scenario = results.neighbour_scenario
    call_s = scenario.capacity.latency_s if scenario is not None else 0.0
    for mode, name in MODE_NAMES.items():
        alone, fair = results.neighbour_run("alone", mode), results.neighbour_run("fair", mode)
        if alone is not None and fair is not None and alone.b_latency_p99_s > 0:
            bound = 1.5 * alone.b_latency_p99_s + call_s
            ratio = fair.b_latency_p99_s / alone.b_latency_p99_s
            topic = ", INTERACTIVE_TOPIC" if mode == "pubsub" else ""
            rows.append(
                (
                    f"noisy neighbour, {name}{topic}: B's p99 under A's flood <= 1.5x B alone "
                    f"+ one call ({call_s * 1000:.0f} ms)",
                    f"{fair.b_latency_p99_s:.2f} s against {bound:.2f} s (alone "
                    f"{alone.b_latency_p99_s:.2f} s; {ratio:.2f}x)",
                    fair.b_latency_p99_s <= bound,
                )
            )
        a_alone = results.neighbour_run("A alone", mode)
        if a_alone is not None and fair is not None and a_alone.busy_per_s > 0:
            ratio = fair.busy_per_s / a_alone.busy_per_s
            rows.append(
                (
                    f"noisy neighbour, {name}: total goodput >= 0.95x the run without B",
                    f"{ratio:.3f}x ({fair.busy_per_s:,.1f} against {a_alone.busy_per_s:,.1f} "
                    "jobs/s while A has work)",
                    ratio >= 0.95,
                )
            )
    weights = results.neighbour_run("weights")
    if weights is not None and weights.weight_ratio is not None:
        ratio = weights.weight_ratio
        rows.append(
            (
                "noisy neighbour: batch keys of weights 3:1 complete within 10 % of 3:1 "
                "while both have work",
                f"{ratio:.2f}:1 ({weights.backlogged_finals['A']:,} against "
                f"{weights.backlogged_finals['C']:,} in the first {weights.backlogged_s:.0f} s)",
                2.7 <= ratio <= 3.3,
            )
        )
    if results.neighbour:
        rows.append(
            (
                "noisy neighbour: 0 jobs lost, every job final",
                ", ".join(f"{run.name} {sum(run.lost.values())}" for run in results.neighbour),
                not any(sum(run.lost.values()) for run in results.neighbour),
            )
        )
    return rows


# -- markdown -------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds:.2f}"


def _cpu(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.1f}" for name, value in cpu.items())


def render(results: Results, charts: list[str], notes: str) -> str:
    """BENCHMARKS.md as text."""
    lines: list[str] = [
        "# Benchmarks",
        "",
        f"Generated by `{COMMAND}` (the suite in `tests/benchmarks/`, about 10 minutes on 2",
        "cores); everything but the notes at the end is rewritten by each run. Real processes",
        "on loopback: the ingress, the worker (mode 3), the Vertex stand-in",
        "(`devtools/dispatcher_devtools/vertex_standin.py`) and, in mode 3, the Firestore",
        "and Pub/Sub emulators. Every service runs with its default settings unless a row says",
        "otherwise.",
        "",
        "| date | machine | command | commit | load average before (1/5/15 min) | took |",
        "|---|---|---|---|---|---|",
        f"| {results.started:%Y-%m-%d %H:%M} UTC | {machine()} | `{COMMAND}` | "
        f"{git_revision()} | {results.load_before} | {results.duration_s / 60:.1f} min |",
        "",
    ]
    if results.skipped:
        lines += ["Not run in this invocation:", ""]
        lines += [f"- {what}: {why}" for what, why in results.skipped.items()]
        lines.append("")
    rows = targets(results)
    if rows:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        for target, measured, met in rows:
            verdict = "not measured" if met is None else ("yes" if met else "**no**")
            lines.append(f"| {target} | {measured} | {verdict} |")
        lines += ["", "Why a target is missed, and what was changed, is in the notes below.", ""]
    if results.goodput:
        lines += [
            "## 1. Goodput under regional capacity",
            "",
            f"The stand-in serves {results.capacity}: a call beyond a region's concurrency is",
            "answered 429 at once. N jobs are submitted as fast as the ingress accepts them",
            "(16 connections); goodput = (N / limit) / completion time, where completion runs",
            "from the first submission to the last job's `updated_at`. Job latency is",
            "`updated_at - created_at` of each record. Wasted calls = calls - 200s.",
            "",
            "| mode | strategy | N | completion s | goodput | calls/job | 429 share "
            "| wasted calls | job latency p50 / p95 / p99 s | lost | CPU s used |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for run in results.goodput:
            lines.append(
                f"| {MODE_NAMES[run.mode]} | {run.label} | {run.jobs:,} | {run.completion_s:.1f} "
                f"| {run.goodput:.2f} | {run.calls_per_job:.3f} | {run.share_429:.1%} "
                f"| {wasted(run)} | {_ms(run.latency_p50_s)} / {_ms(run.latency_p95_s)} / "
                f"{_ms(run.latency_p99_s)} | {run.lost} | {_cpu(run.cpu_s)} |"
            )
        lines.append("")
        if results.ceiling is not None:
            c = results.ceiling
            lines += [
                f"The set-up's own ceiling: a client holding exactly {c.calls_in_flight} calls in "
                "flight (the capacity), each slot's next call sent the moment the last is "
                f"answered, straight at the stand-in with no dispatcher, got {c.rate_per_s:,.1f} "
                f"calls/s for {c.duration_s:g} s = **{c.share_of_limit:.2f} of the limit** "
                f"(answers {c.calls_by_status}): the HTTP round trip and the stand-in's own CPU "
                "on this machine, which no dispatcher can win back.",
                "",
            ]
        for name in ("goodput-successes.png", "goodput-429s.png"):
            if name in charts:
                lines += [f"![{name}](docs/benchmarks/{name})", ""]
    if results.push_rates:
        lines += [
            "### The Pub/Sub emulator's push rate, alone",
            "",
            "Messages published to a topic whose push subscription points at a sink that",
            "acknowledges after a fixed delay (`tests/benchmarks/push_sink.py`):",
            "",
            "| messages | sink delay s | pushes/s | most pushes in flight |",
            "|---|---|---|---|",
        ]
        for rate in results.push_rates:
            lines.append(
                f"| {rate.messages:,} | {rate.delay_s:g} | {rate.rate_per_s:,.1f} "
                f"| {rate.max_in_flight} |"
            )
        lines.append("")
    if results.region_down:
        healthy = results.healthy_for_down
        lines += [
            "## 2. One region down mid-run",
            "",
            "Mode 1, default strategy, the same set-up; one region answers 503 for the middle",
            "third of the healthy run's completion time.",
            "",
            "| run | N | completion s | vs healthy | lost | calls by status | window s |",
            "|---|---|---|---|---|---|---|",
        ]
        if healthy is not None:
            lines.append(
                f"| healthy | {healthy.jobs:,} | {healthy.completion_s:.1f} | 1.00x | "
                f"{healthy.lost} | {healthy.calls_by_status} | - |"
            )
        for run in results.region_down:
            ratio = f"{run.completion_s / healthy.completion_s:.2f}x" if healthy else "-"
            window = f"{run.outage[0]:.1f}-{run.outage[1]:.1f}" if run.outage else "-"
            lines.append(
                f"| one region 503 | {run.jobs:,} | {run.completion_s:.1f} | {ratio} | "
                f"{run.lost} | {run.calls_by_status} | {window} |"
            )
        lines.append("")
        if "region-down.png" in charts:
            lines += ["![region-down.png](docs/benchmarks/region-down.png)", ""]
    if results.wrk or results.added:
        lines += [
            "## 3. Ingress overhead",
            "",
            "`wrk` (one thread, Lua scripts in `tests/benchmarks/lua/`) against one ingress",
            "process. Closed loop unless the load says paced (each connection waits 10 ms",
            "between requests). In mode 1 the same process also executes every job it accepts:",
            "'accept path' rows use a stand-in answering after 120 s, so no job finishes during",
            "the run: the executor sends its first calls and waits, and jobs wait in the queue",
            "(`MAX_PENDING_JOBS=40000` so that none is refused); the row with execution waves",
            "uses one answering after 2 s (the executor's calls, sent together, are answered",
            "together); 'accept + execute' rows use one answering at once.",
            "",
            "| mode | endpoint | load | connections | requests/s | p50 ms | p90 ms | p99 ms "
            "| max ms | answers | CPU s used |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for w in results.wrk:
            lines.append(
                f"| {MODE_NAMES[w.mode]} | {w.endpoint} | {w.load} | {w.connections} "
                f"| {w.rate_per_s:,.0f} | {w.p50_ms:.1f} | {w.p90_ms:.1f} | {w.p99_ms:.1f} "
                f"| {w.max_ms:.0f} | {w.statuses} | {_cpu(w.cpu_s)} |"
            )
        lines.append("")
    if results.added:
        lines += [
            "### Added latency per job",
            "",
            "One job at a time: POST /generate, then GET /jobs/{id} every 2 ms until it is",
            "finished; against the same client POSTing generateContent to the stand-in itself.",
            "",
            "| mode | jobs | upstream latency s | direct p50 / p99 ms | job p50 / p99 ms "
            "| added p50 / p99 ms |",
            "|---|---|---|---|---|---|",
        ]
        for a in results.added:
            lines.append(
                f"| {MODE_NAMES[a.mode]} | {a.jobs} | {a.upstream_latency_s:g} "
                f"| {a.direct_p50_ms:.1f} / {a.direct_p99_ms:.1f} "
                f"| {a.job_p50_ms:.1f} / {a.job_p99_ms:.1f} "
                f"| {a.added_p50_ms:.1f} / {a.added_p99_ms:.1f} |"
            )
        lines.append("")
    if results.memory is not None:
        memory = results.memory
        lines += [
            "## 4. Memory",
            "",
            f"Mode 1, `MEMORY_MAX_JOBS={memory.memory_max_jobs:,}`, {memory.jobs:,} jobs "
            f"through one ingress in {memory.seconds:.0f} s (stand-in answering at once); "
            "resident memory (VmRSS) of the ingress by jobs finished:",
            "",
            "| finished jobs | " + " | ".join(f"{n:,}" for n, _ in memory.samples) + " |",
            "|---|" + "---|" * len(memory.samples),
            "| RSS MiB | " + " | ".join(f"{r:.0f}" for _, r in memory.samples) + " |",
            "",
            f"The first job was {'evicted (404)' if memory.first_job_evicted else 'still kept'} "
            "at the end.",
            "",
        ]
        if "memory.png" in charts:
            lines += ["![memory.png](docs/benchmarks/memory.png)", ""]
    if results.scale:
        lines += render_scale(results, charts)
    if results.tiers:
        lines += render_tiers(results, charts)
    if results.neighbour:
        lines += render_neighbour(results, charts)
    if results.profiles:
        lines += [
            "## Profiles",
            "",
            "py-spy (100-200 Hz) on the ingress during the runs named; share of the samples by",
            "where the time goes (first matching frame), then the functions with the most",
            "own time.",
            "",
        ]
        for name, profile in results.profiles.items():
            lines += [
                f"### {name} ({profile['samples']:,} samples)",
                "",
                "| where | share |",
                "|---|---|",
            ]
            lines += [f"| {label} | {share:.0%} |" for label, share in profile["buckets"]]
            lines += ["", "| function (own time) | share |", "|---|---|"]
            lines += [f"| `{name_}` | {share:.1%} |" for name_, share in profile["own"]]
            lines.append("")
    lines += ["## Notes", "", NOTES_START, notes.strip("\n"), NOTES_END, ""]
    return "\n".join(lines)


def existing_notes(path: Path = REPORT) -> str:
    """The hand-written notes of the current report, kept across runs."""
    if not path.exists():
        return "\n(none yet)\n"
    text = path.read_text(encoding="utf-8")
    start, end = text.find(NOTES_START), text.find(NOTES_END)
    if start < 0 or end < start:
        return "\n(none yet)\n"
    return text[start + len(NOTES_START) : end]


def write_report(results: Results, path: Path = REPORT, charts_dir: Path = CHARTS) -> Path:
    """Write BENCHMARKS.md and the charts; returns the report's path.

    When scenarios 6 and/or 7 are all that ran and the report exists, only their
    sections are replaced (or added before the profiles and notes); every other section
    is kept as it is.
    """
    charts = write_charts(results, charts_dir)
    if results.only_sections() and path.exists():
        text = path.read_text(encoding="utf-8")
        if results.tiers:
            text = splice_section(text, "\n".join(render_tiers(results, charts)))
        if results.neighbour:
            section = "\n".join(render_neighbour(results, charts))
            text = splice_section(text, section, NEIGHBOUR_HEADING)
        path.write_text(text, "utf-8")
        return path
    notes = existing_notes(path)
    path.write_text(render(results, charts, notes), encoding="utf-8")
    return path


def splice_section(text: str, section: str, heading: str = TIERS_HEADING) -> str:
    """`text` with the section under `heading` replaced by `section` (up to the next `## `).

    A report without that section gets it before `## Profiles`, else before `## Notes`,
    else at the end.
    """
    section = section.rstrip("\n") + "\n\n"
    start = text.find(f"\n{heading}\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        end = len(text) if end < 0 else end + 1
        return text[: start + 1] + section + text[end:]
    for anchor in ("\n## Profiles\n", "\n## Notes\n"):
        at = text.find(anchor)
        if at >= 0:
            return text[: at + 1] + section + text[at + 1 :]
    return text.rstrip("\n") + "\n\n" + section


def render_scale(results: Results, charts: list[str]) -> list[str]:
    """Section 5: the scale scenarios, each beside its baselines and its bound."""
    lines = [
        "## 5. At realistic scale",
        "",
        "Each scenario's rows ran in this invocation, on the same machine. `bound` is the",
        "regions' limit (calls/s they serve at once), or in mode 3 the emulators' own ceiling",
        "when lower; `share` = (N / completion s) / bound. The direct client is a program",
        "with no dispatcher: round-robin straight at the regions with as many calls in",
        "flight as the regions hold in all, each 429 or 503 retried at the next region after",
        "an exponential backoff (1 s doubling to 30 s, with jitter), until it succeeds.",
        "",
    ]
    if results.store_ceiling is not None:
        c = results.store_ceiling
        lines += [
            f"The emulators' ceiling: {c.jobs:,} jobs, {c.in_flight} at a time, each with the "
            "services' own create, publish, claim and result write and nothing else, from one "
            f"process: **{c.rate_per_s:,.0f} jobs/s**; emulator CPU per job (ms) "
            f"{c.cpu_ms_per_job}.",
            "",
        ]
    scenarios = list(dict.fromkeys(row.scenario for row in results.scale))
    for scenario in scenarios:
        rows = [row for row in results.scale if row.scenario == scenario]
        lines += [
            f"### {scenario}: {rows[0].run.capacity}",
            "",
            "| run | N | completion s | bound /s | share | 429 share | calls/job | "
            "duplicate calls | job latency p50 / p99 s | store ops/job | CPU ms/job | lost |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            run = row.run
            cpu = ", ".join(
                f"{name} {seconds / run.jobs * 1000:.2f}" for name, seconds in run.cpu_s.items()
            )
            ops = "" if row.store_ops_per_job is None else f"{row.store_ops_per_job:.2f}"
            lines.append(
                f"| {row.label} | {run.jobs:,} | {run.completion_s:.1f} | {row.bound_per_s:,.0f} "
                f"| {row.share_of_bound:.2f} | {run.share_429:.1%} | {run.calls_per_job:.3f} "
                f"| {run.duplicate_successes} | {_ms(run.latency_p50_s)} / "
                f"{_ms(run.latency_p99_s)} | {ops} | {cpu} | {run.lost} |"
            )
        lines.append("")
    if "scale-workers.png" in charts:
        lines += ["![scale-workers.png](docs/benchmarks/scale-workers.png)", ""]
    if results.in_flight:
        lines += [
            "### Calls in flight in one process",
            "",
            "Resident memory sampled every 0.25 s with the calls in flight (`/metrics`); the",
            "cost of a call in flight = (RSS at the peak - RSS before) / calls in flight then",
            "(its job record included). CPU per job over the whole run.",
            "",
            "| process | regions | peak in flight | RSS before / at peak MiB | KiB per call "
            "| CPU ms/job | share of the limit |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in results.in_flight:
            lines.append(
                f"| {m.process} | {m.capacity} | {m.peak_in_flight:,} | {m.rss_before_mib:.0f} / "
                f"{m.rss_peak_mib:.0f} | {m.kib_per_call:.1f} | {m.cpu_ms_per_job:.2f} "
                f"| {m.share_of_bound:.2f} |"
            )
        lines.append("")
    return lines


def render_tiers(results: Results, charts: list[str]) -> list[str]:
    """Section 6: cost under deadline, each variant's figures beside the construction."""
    scenario = results.tier_scenario
    took = f", took {results.duration_s / 60:.1f} min" if results.duration_s else ""
    command = f"{COMMAND} -k tiers" if results.only_tiers() else COMMAND
    lines = [
        TIERS_HEADING,
        "",
        f"Ran {results.started:%Y-%m-%d %H:%M} UTC on {machine()}, `{command}` "
        f"(commit {git_revision()}, load average before {results.load_before}{took}); mode 1,",
        "one ingress; every variant on a fresh stack (limits and the `auto` rule's p95 learnt",
        "from nothing). Mode 3 is not run: the tier of each call is chosen by the same",
        "executor, and mode 3's rate here is the Pub/Sub emulator's (section 1), below flex's.",
        "",
    ]
    if scenario is not None:
        standard_price, flex_price = scenario.standard_price, scenario.flex_price
        lines += [
            f"**Construction.** {scenario.construction()} Prices (USD per million prompt / "
            f"candidates tokens): standard {standard_price[0]:g} / {standard_price[1]:g}, "
            f"flex {flex_price[0]:g} / {flex_price[1]:g}, provisioned "
            f"{scenario.provisioned_price[0]:g} (PT is paid by the month). Each prompt is "
            f"~{scenario.prompt_chars // 4} tokens, each answer ~{scenario.response_bytes // 6} "
            "(the stand-in counts ceil(characters / 4)). Standard calls try the PT regions "
            "first (PT while it has room, then on demand); `auto` runs flex while a job's "
            "time left exceeds a standard reserve (10 s until a standard call is timed, "
            "then 3 x their p95 + 1 s), then standard. The provisioned variant is "
            f"{scenario.provisioned_jobs:,} jobs of tier `provisioned`.",
            "",
        ]
    lines += [
        "On time = succeeded with `updated_at` <= the job's `deadline`. Tokens from the",
        "stand-in's `/_standin/stats` per `trafficType`; cost = those tokens x the price table,",
        "per 1,000 submitted jobs (late jobs cost nothing and count), beside",
        "`dispatcher_cost_usd_total` from the ingress's `/metrics`. Wall = first submission",
        "to the last job's `updated_at`.",
        "",
        "| tier | N | on time | succeeded / failed | lost | wall s | answered by "
        "| tokens billed standard / PT / flex | cost per 1,000 jobs | /metrics cost "
        "| vs standard |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    standard = results.tier("standard")
    for run in results.tiers:
        failed = ", ".join(f"{n:,} {code}" for code, n in sorted(run.failed_by_code.items()))
        ratio = (
            f"{run.cost_per_1000 / standard.cost_per_1000:.2f}x"
            if standard is not None and standard.cost_usd > 0
            else "-"
        )
        shares = " / ".join(
            f"{run.token_share(rate):.0%}" for rate in ("standard", "provisioned", "flex")
        )
        answered = ", ".join(f"{tier} {n:,}" for tier, n in sorted(run.answered_by_tier.items()))
        metrics_per_1000 = run.metrics_cost_usd / run.jobs * 1000 if run.jobs else 0.0
        lines.append(
            f"| {run.variant} | {run.jobs:,} | **{run.on_time_share:.1%}** "
            f"| {run.statuses.get('succeeded', 0):,} / {run.statuses.get('failed', 0):,}"
            f"{f' ({failed})' if failed else ''} | {run.lost} | {run.wall_s:.1f} | {answered} "
            f"| {shares} | ${run.cost_per_1000:.4f} | ${metrics_per_1000:.4f} | {ratio} |"
        )
    lines += [
        "",
        "429s by kind of lane (`standard`: the plain regions; `flex`: `global~flex`;",
        "`provisioned`: `REGION~provisioned`), from the stand-in's call log and from the",
        "dispatcher's `dispatcher_upstream_calls_total` (its region labels are lanes); the",
        "stand-in's own `by_status` per region (flex and standard calls to `global` together).",
        "",
        "| tier | stand-in: 429 share per kind | dispatcher: 429 share per kind "
        "| stand-in by_status per region | CPU s used |",
        "|---|---|---|---|---|",
    ]
    for run in results.tiers:
        standin = ", ".join(f"{k} {v}" for k, v in run.share_429().items())
        dispatcher = ", ".join(f"{k} {v}" for k, v in run.share_429(run.upstream_by_lane).items())
        regions = "; ".join(
            f"{region} {statuses}" for region, statuses in sorted(run.standin_by_status.items())
        )
        lines.append(
            f"| {run.variant} | {standin} | {dispatcher} | {regions} | {_cpu(run.cpu_s)} |"
        )
    rows = tier_targets(results)
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for target, measured, met in rows:
        verdict = "not measured" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {target} | {measured} | {verdict} |")
    lines.append("")
    if "tiers.png" in charts:
        lines += ["![tiers.png](docs/benchmarks/tiers.png)", ""]
    return lines


def render_neighbour(results: Results, charts: list[str]) -> list[str]:
    """Section 7: the noisy neighbour, B's latency beside its baselines, A's throughput."""
    scenario = results.neighbour_scenario
    took = f", took {results.duration_s / 60:.1f} min" if results.duration_s else ""
    command = f"{COMMAND} -k neighbour" if results.only_neighbour() else COMMAND
    ceiling = next((r.ceiling_per_s for r in results.neighbour if r.ceiling_per_s), None)
    lines = [
        NEIGHBOUR_HEADING,
        "",
        f"Ran {results.started:%Y-%m-%d %H:%M} UTC on {machine()}, `{command}` "
        f"(commit {git_revision()}, load average before {results.load_before}{took}). "
        "Every variant on a fresh stack (region limits and the fair share's",
        "virtual times start from nothing). Key A (`priority=batch weight=1`) submits its N",
        "jobs at once; key B (`priority=interactive`) sends one job per interval. Baselines in",
        "the same invocation: B alone on an idle system; both keys `priority=interactive`",
        "(no priority difference, only the weighted fair queuing between keys); B's jobs sent",
        "with A's key (one caller, so one FIFO: what B would get without per-key shares); A",
        "alone (no B: the total goodput the fair run is held against); two batch keys, A",
        "`weight=3` and C `weight=1`, each flooding half of N at once (no B). Mode 1: one",
        "ingress. Mode 3: ingresses and workers over the Firestore and Pub/Sub emulators,",
        "each subscription pulled by `dispatcher_devtools.push_relay` pushing to every worker",
        "(the emulator's own push delivers about one message at a time, section 1); with",
        "`INTERACTIVE_TOPIC` B's jobs have a topic and relay of their own, without it they",
        "queue in the one subscription behind A's backlog. The keys file goes to ingresses",
        "and workers alike (the worker takes priority and weight from the job's record).",
        "",
    ]
    if scenario is not None:
        lines += [f"**Construction.** {scenario.construction(ceiling)}", ""]
    lines += [
        "B's latency = its POST sent to its record's `updated_at` (record: `created_at` to",
        "`updated_at`). A's jobs/s in B's window counts A's records whose `updated_at` falls",
        "in it, over the part of it before A's last job was final; overall, from A's first",
        "submission to its last job final. Total jobs/s while A has work = every key's jobs",
        "final by A's last one, over that time (B's jobs sent after A's backlog is gone",
        "would otherwise count idle capacity as lost); goodput = every job final per second",
        "over the bound (the regions' limit; in mode 3 the emulators' ceiling, lower), over",
        "the whole run and over all of B's window.",
        "",
        "| mode | variant | A jobs | B jobs | B latency p50 / p99 / max s | B record p50 / p99 s "
        "| B vs alone (p99) | B's calls answered 429 | A jobs/s in B's window / overall "
        "| total jobs/s while A has work (vs A alone) | goodput overall / in window "
        "| POST 429s A / B | lost | CPU s used |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results.neighbour:
        alone = results.neighbour_run("alone", run.mode)
        a_alone = results.neighbour_run("A alone", run.mode)
        trickle = run.b_jobs > 0
        ratio = (
            f"{run.b_latency_p99_s / alone.b_latency_p99_s:.2f}x"
            if trickle and alone is not None and alone.b_latency_p99_s > 0
            else "-"
        )
        flood = run.a_jobs > 0
        a_rate = "-"
        if flood:
            in_window = f"{run.a_in_window_per_s:,.1f}" if trickle else "-"
            a_rate = f"{in_window} / {run.a_overall_per_s:,.1f}"
        busy = f"{run.busy_per_s:,.1f}" if flood else "-"
        if flood and a_alone is not None and a_alone.busy_per_s > 0 and not run.c_jobs:
            busy += f" ({run.busy_per_s / a_alone.busy_per_s:.3f}x)"
        goodput = f"{run.goodput:.2f} / {run.window_goodput:.2f}" if flood else "-"
        latency = (
            f"{run.b_latency_p50_s:.2f} / **{run.b_latency_p99_s:.2f}** / "
            f"{run.b_latency_max_s:.2f} | {run.b_record_p50_s:.2f} / {run.b_record_p99_s:.2f}"
            if trickle
            else "- | -"
        )
        a_jobs = f"{run.a_jobs:,}" + (f" + C {run.c_jobs:,}" if run.c_jobs else "")
        lines.append(
            f"| {MODE_NAMES[run.mode]} | {run.label} | {a_jobs} | {run.b_jobs} | {latency} "
            f"| {ratio} | {run.b_upstream_429s if trickle else '-'} | {a_rate} | {busy} "
            f"| {goodput} | {run.refused['A']} / {run.refused['B']} "
            f"| {sum(run.lost.values())} | {_cpu(run.cpu_s)} |"
        )
    weights = results.neighbour_run("weights")
    if weights is not None and weights.backlogged_finals:
        lines += [
            "",
            "Weights 3:1: each key's jobs final while both had work (from the first",
            "submission to the first of the two keys' last job final); over a whole run in",
            "which both finish, the shares are only the submission counts.",
            "",
            "| key | policy | jobs | final while both had work | share |",
            "|---|---|---|---|---|",
        ]
        both = sum(weights.backlogged_finals.values())
        for key, policy, jobs in (
            ("A", "priority=batch weight=3", weights.a_jobs),
            ("C", "priority=batch weight=1", weights.c_jobs),
        ):
            done = weights.backlogged_finals[key]
            lines.append(
                f"| {key} | `{policy}` | {jobs:,} | {done:,} in {weights.backlogged_s:.0f} s "
                f"| {done / both:.1%} |"
            )
    lines += [
        "",
        "Upstream calls by status (the stand-in's log) and A's submission time:",
        "",
        "| mode | variant | calls by status | A's submissions took s |",
        "|---|---|---|---|",
    ]
    for run in results.neighbour:
        submit = f"{run.a_submit_s:.1f}" if run.a_jobs else "-"
        lines.append(f"| {MODE_NAMES[run.mode]} | {run.label} | {run.calls_by_status} | {submit} |")
    rows = neighbour_targets(results)
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for target, measured, met in rows:
        verdict = "not measured" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {target} | {measured} | {verdict} |")
    lines.append("")
    if "neighbour.png" in charts:
        lines += ["![neighbour.png](docs/benchmarks/neighbour.png)", ""]
    return lines
