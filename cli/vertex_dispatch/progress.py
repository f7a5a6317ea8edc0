"""What a running command shows on stderr: a batch's progress, and a job's status.

On a terminal, tqdm draws and redraws the line (bar glyphs, width, messages printed around
the bar); the numbers after the bar are ours, the same as in the plain lines. Without a
terminal (CI, ``2> log``) nothing is redrawn: plain lines, throttled so a log stays short.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, TextIO

# tqdm ships no type information (typeshed's stubs are the separate types-tqdm); it is used
# through the few calls below, with its values treated as Any.
from tqdm import tqdm  # type: ignore[import-untyped]

from vertex_dispatch.batch import LineOutcome
from vertex_dispatch.report import format_duration

TTY_REFRESH_S: Final = 0.1
PLAIN_REFRESH_S: Final = 5.0
"""Without a terminal, at most one progress line every this many seconds, when it changed..."""
PLAIN_HEARTBEAT_S: Final = 60.0
"""...or when this long has passed, so a log shows the run is alive."""
SPINNER_FRAMES: Final = "|/-\\"
BAR_WIDTH: Final = 20
BAR_FORMAT: Final = f"[{{bar:{BAR_WIDTH}}}] {{n_fmt}}/{{total_fmt}} {{percentage:3.0f}}% | {{desc}}"
"""tqdm's line: ``[##########..........] 100/200  50% | `` and our counts as its ``desc``."""
BAR_GLYPHS: Final = ".#"
"""tqdm's ``ascii`` charset: empty, then full; no partial cells."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ProgressSnapshot:
    """What the progress bar shows.

    Attributes:
        done: Lines with an outcome (earlier runs included).
        total: Lines in the input.
        succeeded: Lines that got a response.
        failed: Lines with any other outcome.
        rate_per_s: Lines finished per second in this run; None before the first.
        retries: Requests retried in this run (429, 503, connection errors).
    """

    done: int
    total: int
    succeeded: int
    failed: int
    rate_per_s: float | None
    retries: int = 0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current rate."""
        if not self.rate_per_s:
            return None
        return (self.total - self.done) / self.rate_per_s


def _rate_and_eta(snapshot: ProgressSnapshot) -> tuple[str, str]:
    rate = f"{snapshot.rate_per_s:.1f}/s" if snapshot.rate_per_s is not None else "-/s"
    eta = format_duration(snapshot.eta_s if snapshot.done < snapshot.total else 0.0)
    return rate, eta


def format_counts(snapshot: ProgressSnapshot) -> str:
    """What follows the bar on a terminal: ``98 ok, 2 failed | 20.0/s | ETA 0:05``."""
    rate, eta = _rate_and_eta(snapshot)
    text = f"{snapshot.succeeded} ok, {snapshot.failed} failed | {rate} | ETA {eta}"
    return text + (f" | {snapshot.retries} retries" if snapshot.retries else "")


def format_progress(snapshot: ProgressSnapshot) -> str:
    """One progress line for a log: done/total, counts, rate, ETA, retries.

    Returns:
        The text, without a line break.
    """
    total = max(snapshot.total, 1)
    percent = 100 * snapshot.done // total
    rate, eta = _rate_and_eta(snapshot)
    return (
        f"progress: {snapshot.done}/{snapshot.total} ({percent}%), {snapshot.succeeded} "
        f"succeeded, {snapshot.failed} failed, {rate}, ETA {eta}"
        + (f", {snapshot.retries} retries" if snapshot.retries else "")
    )


class _TerminalLine(tqdm):  # type: ignore[misc]  # tqdm is untyped: its class is Any to mypy
    """A tqdm line that redraws only when told to (``refresh``): the callers throttle."""

    # tqdm's monitor thread only tunes tqdm's own throttling, which these lines do not use.
    monitor_interval = 0

    def __init__(self, stream: TextIO, **options: Any) -> None:
        super().__init__(
            file=stream,
            dynamic_ncols=True,  # follows the terminal's width, and cuts the line to fit it
            mininterval=float("inf"),
            **options,
        )


class ProgressBar:
    """Progress of a batch on stderr: a tqdm bar on a terminal, throttled lines otherwise."""

    def __init__(
        self,
        *,
        stream: TextIO,
        total: int,
        earlier: Iterable[LineOutcome],
        tty: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.total = total
        self.tty = tty
        self.clock = clock
        earlier = list(earlier)
        self.done = len(earlier)
        self.succeeded = sum(outcome.succeeded for outcome in earlier)
        self.finished_this_run = 0
        self.retries = 0
        self.started = clock()
        self._last_render = -float("inf")
        self._last_counts = (-1, -1)
        self._bar: _TerminalLine | None = None
        if tty:
            self._bar = _TerminalLine(
                stream,
                total=total,
                initial=self.done,
                desc=format_counts(self.snapshot()),
                bar_format=BAR_FORMAT,
                ascii=BAR_GLYPHS,
                leave=True,
            )
            self._last_render = clock()

    def snapshot(self) -> ProgressSnapshot:
        """The current numbers."""
        elapsed = self.clock() - self.started
        rate = self.finished_this_run / elapsed if self.finished_this_run and elapsed > 0 else None
        return ProgressSnapshot(
            done=self.done,
            total=self.total,
            succeeded=self.succeeded,
            failed=self.done - self.succeeded,
            rate_per_s=rate,
            retries=self.retries,
        )

    def advance(self, outcome: LineOutcome) -> None:
        """Count a line that got its outcome."""
        self.done += 1
        self.finished_this_run += 1
        self.succeeded += outcome.succeeded
        self.render()

    def retried(self) -> None:
        """Count a retried request."""
        self.retries += 1

    def render(self, *, force: bool = False) -> None:
        """Draw the bar (or print a line) unless it was done a moment ago."""
        now = self.clock()
        since = now - self._last_render
        if not force:
            changed = (self.done, self.retries) != self._last_counts
            if self.tty:
                due = since >= TTY_REFRESH_S
            else:
                due = (changed and since >= PLAIN_REFRESH_S) or since >= PLAIN_HEARTBEAT_S
            if not due:
                return
        self._last_render = now
        self._last_counts = (self.done, self.retries)
        if self._bar is not None:
            self._redraw()
        else:
            self.stream.write(format_progress(self.snapshot()) + "\n")
            self.stream.flush()

    def _redraw(self, *, refresh: bool = True) -> None:
        assert self._bar is not None, "only on a terminal"
        self._bar.n = self.done
        self._bar.set_description_str(format_counts(self.snapshot()), refresh=refresh)

    def note(self, message: str) -> None:
        """Print a message line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state (unless a log line already shows it) and end the bar's line."""
        if self._bar is not None:
            self._redraw(refresh=False)
            self._bar.close()  # draws the final state and ends its line
            self._bar = None
            self.stream.flush()
        else:
            self.render(force=(self.done, self.retries) != self._last_counts)


class Spinner:
    """A job's status while ``submit`` waits: a spinner on a terminal, else a line per change."""

    def __init__(self, *, stream: TextIO, tty: bool, job_id: str) -> None:
        self.stream = stream
        self.tty = tty
        self.job_id = job_id
        self.status = "pending"
        self.started = time.monotonic()
        self._frame = 0
        self._line: _TerminalLine | None = None

    def update(self, status: str) -> None:
        """Show a new status."""
        if status == self.status:
            return
        self.status = status
        if not self.tty:
            self.stream.write(f"job {self.job_id}: {status}\n")
            self.stream.flush()

    def text(self) -> str:
        """The next frame: ``| job ID: running 1.3s``."""
        frame = SPINNER_FRAMES[self._frame % len(SPINNER_FRAMES)]
        self._frame += 1
        elapsed = time.monotonic() - self.started
        return f"{frame} job {self.job_id}: {self.status} {elapsed:.1f}s"

    async def spin(self) -> None:
        """Redraw every tenth of a second until cancelled (on a terminal); else one line."""
        if not self.tty:
            self.stream.write(f"job {self.job_id}: {self.status}\n")
            self.stream.flush()
            return
        line = self._line = _TerminalLine(
            self.stream, total=None, desc=self.text(), bar_format="{desc}", leave=False
        )
        while True:
            await asyncio.sleep(TTY_REFRESH_S)
            line.set_description_str(self.text(), refresh=True)

    def clear(self) -> None:
        """Remove the spinner line."""
        if self._line is not None:
            self._line.close()
            self._line = None
            self.stream.flush()
