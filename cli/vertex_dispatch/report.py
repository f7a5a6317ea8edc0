"""Text for people at the end of a batch: durations, plain tables, the summary."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Outcome(Protocol):
    """What the summary reads of a line's outcome (``batch.LineOutcome``)."""

    @property
    def region(self) -> str | None:
        """The region that served (or was assigned) the job."""

    @property
    def succeeded(self) -> bool:
        """Whether the line got a response."""

    @property
    def label(self) -> str:
        """The outcome as the summary groups it."""


def format_duration(seconds: float | None) -> str:
    """``75.2`` → ``1:15``; ``3725`` → ``1:02:05``; None → ``?``."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table: the first column left-aligned, the others right-aligned."""
    cells = [list(map(str, header)), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [row[0].ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunCounts:
    """Where this run's lines came from.

    Attributes:
        submitted: Jobs the ingress created for this run.
        reattached: Jobs of an earlier run found again: by their journalled id, or by a
            replayed ``Idempotency-Key``.
        earlier: Lines an earlier run had finished, not run again.
    """

    submitted: int = 0
    reattached: int = 0
    earlier: int = 0


def format_summary(outcomes: Sequence[Outcome], *, elapsed_s: float, counts: RunCounts) -> str:
    """The end-of-batch summary: per region, per outcome, totals and time.

    Args:
        outcomes: One per input line.
        elapsed_s: Duration of this run.
        counts: Where this run's lines came from.

    Returns:
        Several lines of text.
    """
    by_region: dict[str, Counter[str]] = {}
    for outcome in outcomes:
        region = outcome.region or "(no job)"
        region_counts = by_region.setdefault(region, Counter())
        region_counts["jobs"] += 1
        region_counts["succeeded" if outcome.succeeded else "failed"] += 1
    regions = sorted(by_region.items(), key=lambda item: (-item[1]["jobs"], item[0]))
    succeeded = sum(outcome.succeeded for outcome in outcomes)
    region_rows: list[list[object]] = [
        [region, c["jobs"], c["succeeded"], c["failed"]] for region, c in regions
    ]
    region_rows.append(["total", len(outcomes), succeeded, len(outcomes) - succeeded])
    labels = Counter(outcome.label for outcome in outcomes)
    outcome_rows: list[list[object]] = [
        [label, count] for label, count in sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    head = (
        f"{len(outcomes)} lines in {format_duration(elapsed_s)} ({elapsed_s:.1f} s): "
        f"{succeeded} succeeded, {len(outcomes) - succeeded} did not\n"
        f"this run: {counts.submitted} jobs submitted, {counts.reattached} re-attached, "
        f"{counts.earlier} lines already done"
    )
    return "\n\n".join(
        [
            head,
            format_table(["region", "jobs", "succeeded", "failed"], region_rows),
            format_table(["outcome", "lines"], outcome_rows),
        ]
    )
