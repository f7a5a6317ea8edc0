"""Region choice and health.

`RoundRobin` assigns regions at submission. `RegionPool` decides, per call, where
a job really runs: each region has a circuit breaker (closed → open for a
cooldown that doubles while it keeps failing → half-open, one probe → closed on
success) and an adaptive concurrency limit (additive increase on success,
multiplicative decrease on 429, once per round of calls, as TCP does; near the
limit where the last 429 came, growth slows down, as TCP CUBIC's does near its last
window, and a 429 there again steps back by one call only, so the limit dwells at
the region's capacity instead of saw-toothing below it; each such 429 halves how
often the same capacity is probed, until the limit grows past it). A call waits
for a slot in a healthy region, bounded, instead of bouncing off a full one: a
release hands its slot to the oldest waiting call that can use it.

The pool also tells how many calls the regions take now (`capacity`) and how many
hold a slot (`in_flight`): the in-process queue of modes 1 and 2 starts a job only
while few runs are without a slot, so the calls in flight follow the sum of the
regions' learned limits instead of a constant of the dispatcher's own.

`RegionStrategy.NAIVE` switches all of that off and behaves like the example the
project grew from: every call goes to the job's assigned region, which holds a fixed
number of calls (`concurrency_initial`, never adapted, no breaker), and the retries
of a job stay there (with backoff). It exists as the baseline of the benchmarks
(BENCHMARKS.md), not for production.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import itertools
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dispatcher.errors import RegionsBusy
from dispatcher.fairness import DEFAULT_SHARE, FairClock, Share
from dispatcher.settings import DEFAULTS, Settings
from dispatcher.settings import RegionStrategy as RegionStrategy  # declared with its setting

# A waiting call looks again at least this often, even with nothing to wake it.
IDLE_WAKE_S = 5.0


class RoundRobin:
    """Regions in turn, from a random offset (so instances do not march in step)."""

    def __init__(self, regions: Sequence[str], *, rng: random.Random | None = None) -> None:
        offset = (rng or random.SystemRandom()).randrange(len(regions))
        self._cycle: Iterator[str] = itertools.cycle([*regions[offset:], *regions[:offset]])

    def assign_region(self) -> str:
        """The next region in turn."""
        return next(self._cycle)


def session_region(regions: Sequence[str], session_id: str) -> str:
    """A stable region for a session id, the same on every instance."""
    digest = hashlib.sha256(session_id.encode()).digest()
    return regions[int.from_bytes(digest[:8], "big") % len(regions)]


class Breaker(enum.StrEnum):
    """A region's circuit-breaker state."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(enum.Enum):
    """How a call to a region ended, as far as the region's health is concerned."""

    SUCCESS = "success"
    OVERLOADED = "overloaded"  # 429: the region is full right now
    FAILED = "failed"  # 5xx, timeout, connection error: the region is unwell
    NEUTRAL = "neutral"  # the caller's fault (4xx): says nothing about the region


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolConfig:
    """Tuning of region health and concurrency.

    A field `x` with a setting `REGION_X` takes its default from that setting's
    declaration (see the README's settings table); the others are the pool's own.
    """

    cooldown_initial_s: float = DEFAULTS["region_cooldown_initial_s"]
    cooldown_max_s: float = DEFAULTS["region_cooldown_max_s"]
    overloads_to_open: int = 3
    concurrency_initial: int = DEFAULTS["region_concurrency_initial"]
    concurrency_min: int = DEFAULTS["region_concurrency_min"]
    concurrency_max: int = DEFAULTS["region_concurrency_max"]
    decrease_factor: float = 0.7
    # Within one call of the limit where the last 429 came, grow this many times slower;
    # twice slower again each time a 429 there confirms the same capacity, up to the max.
    near_ceiling_slowdown: float = 8.0
    near_ceiling_slowdown_max: float = 64.0
    # A call still running this long after it was sent was admitted by the region: a
    # full region answers 429 at once, long before a generation ends. The limit grows
    # then, not at the end of the call, so it ramps up in round trips of the 429, not of
    # the call: with 2 s calls, one round trip of the call is ten of these. The window
    # is at least twice the slowest recent 429 answer, so a loaded machine (or a slow
    # network) that delays refusals does not count them as admissions.
    accept_window_s: float = 0.2
    wait_max_s: float = DEFAULTS["region_wait_max_s"]
    strategy: RegionStrategy = DEFAULTS["region_strategy"]

    @classmethod
    def from_settings(cls, settings: Settings) -> PoolConfig:
        """The pool's tuning from the `REGION_*` settings (field `x` from `region_x`)."""
        return cls(**settings.values_for(cls, prefix="region_"))


@dataclass(kw_only=True, slots=True)
class RegionState:
    """Live state of one region in this process."""

    name: str
    limit: float
    in_flight: int = 0
    breaker: Breaker = Breaker.CLOSED
    failures: int = 0
    cooldown_s: float = 0.0
    open_until: float = 0.0
    probing: bool = False
    slow_start: bool = True
    ceiling: float = math.inf  # the limit when the last 429 came
    floor: float = 0.0  # the lowest the 429s of the last decrease's round may take it
    slowdown: float = 8.0  # how much slower the limit grows near the ceiling
    epoch: int = 0  # bumped at each decrease; calls from an older epoch do not decrease again
    calls_by_outcome: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False, kw_only=True, slots=True)
class Slot:
    """Permission to make one call to `region`; give it back with `RegionPool.release`."""

    region: str
    epoch: int
    probe: bool
    # Whether the limit already grew for this call (it outlived the accept window).
    counted: bool = False
    accept_timer: asyncio.TimerHandle | None = None
    taken_at: float = 0.0


class RegionPool:
    """Health and concurrency of every region, shared by all calls in the process."""

    def __init__(self, config: PoolConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._regions: dict[str, RegionState] = {}
        # Calls waiting for a slot, oldest first. A release hands its slot straight to
        # the oldest waiter that can use it, so a call that waited is never overtaken
        # by one that just came. No asyncio.Condition: every change here is synchronous
        # on the one event loop, and the Condition's lock handed itself from task to
        # task one loop iteration at a time, which stalled releases for ~0.3 s while
        # the loop was busy accepting submissions.
        self._waiters: list[_Waiter] = []
        self._waiter_seq = 0
        self._fair = FairClock()  # the order of waiting calls between callers
        self._listener: Callable[[str, RegionEvent], None] | None = None
        self._refusal_s = 0.0  # the slowest recent 429 answer, decaying

    def listen(self, listener: Callable[[str, RegionEvent], None]) -> None:
        """Call `listener(region, event)` when a breaker opens or a 429 round cuts a limit."""
        self._listener = listener

    def adopt_opening(self, region: str, remaining_s: float) -> None:
        """Open a region's breaker because another instance saw it fail.

        Args:
            region: The region.
            remaining_s: How long the other instance keeps it open from now.
        """
        state = self.state(region)
        if state.breaker is not Breaker.CLOSED or remaining_s <= 0:
            return
        state.breaker = Breaker.OPEN
        state.cooldown_s = max(state.cooldown_s, remaining_s)
        state.open_until = self._clock() + remaining_s
        self._hand_over(wake_the_rest=True)

    def adopt_share(self, region: str, share: float) -> None:
        """Take this instance's share of a region's capacity learnt across instances.

        A limit still in slow start jumps to the share (a new instance need not find the
        capacity again); a learnt one only comes down to it. The share becomes the
        ceiling, near which the limit grows slowly.
        """
        state = self.state(region)
        share = max(float(self._config.concurrency_min), share)
        state.limit = share if state.slow_start else min(state.limit, share)
        state.slow_start = False
        state.ceiling = share
        self._hand_over(wake_the_rest=False)

    def share_start(self, region: str, instances: int) -> None:
        """Start a region not yet learnt at the initial limit for the fleet, not per instance.

        K instances starting together at `concurrency_initial` each would send K times
        that to a region in their first round; a region in slow start that never saw a
        429 gets its share of it instead (it grows from there as usual).
        """
        state = self.state(region)
        if not state.slow_start or state.epoch > 0 or instances < 1:
            return
        share = max(
            float(self._config.concurrency_min), self._config.concurrency_initial / instances
        )
        state.limit = min(state.limit, share)

    def open_for_s(self, region: str) -> float:
        """How long the region's breaker stays open from now (0 when it is not open)."""
        state = self.state(region)
        if state.breaker is not Breaker.OPEN:
            return 0.0
        return max(0.0, state.open_until - self._clock())

    def _tell(self, region: str, event: RegionEvent) -> None:
        if self._listener is not None:
            self._listener(region, event)

    def state(self, region: str) -> RegionState:
        """The live state of a region (created on first use)."""
        state = self._regions.get(region)
        if state is None:
            state = RegionState(
                name=region,
                limit=float(self._config.concurrency_initial),
                slowdown=self._config.near_ceiling_slowdown,
            )
            self._regions[region] = state
        return state

    @property
    def in_flight(self) -> int:
        """Calls holding a slot, over every region."""
        return sum(state.in_flight for state in self._regions.values())

    @property
    def waiting(self) -> int:
        """Calls waiting for a slot."""
        return len(self._waiters)

    def capacity(self, regions: Sequence[str]) -> int:
        """How many calls `regions` take at once now: their limits, one probe per unhealthy one."""
        total = 0
        for region in regions:
            state = self.state(region)
            total += int(state.limit) if state.breaker is Breaker.CLOSED else 1
        return total

    def snapshot(self) -> dict[str, RegionState]:
        """Every region seen so far, by name."""
        return dict(self._regions)

    @property
    def retries_move(self) -> bool:
        """Whether a retry may go to another region (False: it stays in the assigned one)."""
        return self._config.strategy is RegionStrategy.ADAPTIVE

    async def acquire(
        self,
        candidates: Sequence[str],
        *,
        avoid: Sequence[str] = (),
        deadline_s: float | None = None,
        share: Share = DEFAULT_SHARE,
    ) -> Slot:
        """A slot in the first usable region of `candidates`, waiting for one if need be.

        Regions in `avoid` (those that just failed this job) are used only when no
        other is usable. A region that is healthy but full is waited for: a release
        hands its slot over. When no candidate is healthy for `wait_max_s`, the
        region whose cooldown ends first is called anyway, as a probe. A full region
        is never called past its limit: that would only earn a 429. With the naive
        strategy, the first candidate only.

        Args:
            candidates: Regions in order of preference.
            avoid: Regions to pass over while another is usable.
            deadline_s: How long the caller may wait at most (None: until a slot frees).
            share: Whose call it is: the order in which waiting calls get slots.

        Raises:
            RegionsBusy: the deadline passed while every candidate was full.
        """
        if self._config.strategy is RegionStrategy.NAIVE:
            # No health, a fixed limit: the first candidate (the job's region) only.
            candidates, avoid = candidates[:1], ()
        now = self._clock()
        probe_at = now + self._config.wait_max_s
        give_up_at = math.inf if deadline_s is None else now + deadline_s
        while True:
            slot = self._try_take(candidates, avoid)
            if slot is not None:
                return slot
            now = self._clock()
            healthy = any(self.state(r).breaker is Breaker.CLOSED for r in candidates)
            if not healthy and now >= probe_at:
                return self._force(candidates)
            if now >= give_up_at:
                raise RegionsBusy(
                    f"every allowed region ({', '.join(candidates)}) stayed at its limit "
                    f"of calls in flight for {deadline_s:g} s"
                )
            # Woken by a released slot or a health change; the timer also covers a
            # cooldown that simply runs out, the probe becoming due, and the deadline.
            wake_at = min(give_up_at, probe_at if not healthy else math.inf)
            reopen = self._next_reopen(candidates)
            wake_in = min(wake_at - now, reopen if reopen is not None else math.inf)
            slot = await self._wait(candidates, avoid, max(min(wake_in, IDLE_WAKE_S), 0.001), share)
            if slot is not None:
                return slot

    async def _wait(
        self, candidates: Sequence[str], avoid: Sequence[str], timeout_s: float, share: Share
    ) -> Slot | None:
        """A slot handed over by a release, or None when woken to look again."""
        loop = asyncio.get_running_loop()
        self._waiter_seq += 1
        waiter = _Waiter(loop.create_future(), candidates, avoid, share, self._waiter_seq)
        self._waiters.append(waiter)
        timer = loop.call_later(timeout_s, _resolve, waiter.future, None)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            handed = future.result() if future.done() and not future.cancelled() else None
            if handed is not None:
                self._give_back(handed)  # handed a slot, then cancelled before using it
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):  # still listed: timed out or cancelled
                self._waiters.remove(waiter)

    def _hand_over(self, *, wake_the_rest: bool) -> None:
        """Give usable slots to waiting calls in their fair order (`Share`); wake the
        rest if asked.

        Waking makes a call recompute how long to wait (a breaker that opened
        changes when a region comes back), and force a probe once it is due.
        """
        if not self._waiters:
            return
        waiting = self._waiters
        self._waiters = []
        if len({w.share for w in waiting}) > 1:
            waiting.sort(key=self._fair_order)
        for waiter in waiting:
            if waiter.future.done():
                continue
            slot = self._try_take(waiter.candidates, waiter.avoid)
            if slot is not None:
                self._fair.served(waiter.share)
                waiter.future.set_result(slot)
            elif wake_the_rest:
                waiter.future.set_result(None)
            else:
                self._waiters.append(waiter)

    def _fair_order(self, waiter: _Waiter) -> tuple[bool, float, int]:
        return (*self._fair.order(waiter.share), waiter.seq)

    def _free(self, slot: Slot) -> RegionState:
        """Take the slot off its region's calls in flight (and end its probe)."""
        if slot.accept_timer is not None:
            slot.accept_timer.cancel()
            slot.accept_timer = None
        state = self.state(slot.region)
        state.in_flight = max(0, state.in_flight - 1)
        if slot.probe:
            state.probing = False
        return state

    def _give_back(self, slot: Slot) -> None:
        """Return a slot that was never used for a call."""
        self._free(slot)
        self._hand_over(wake_the_rest=False)

    def release(self, slot: Slot, outcome: Outcome) -> None:
        """Give a slot back and learn from how the call ended."""
        state = self._free(slot)  # a naive slot is never a probe
        state.calls_by_outcome[outcome.value] = state.calls_by_outcome.get(outcome.value, 0) + 1
        if self._config.strategy is RegionStrategy.NAIVE:
            self._hand_over(wake_the_rest=False)  # nothing is learnt
            return
        config = self._config
        if outcome is Outcome.SUCCESS:
            state.breaker = Breaker.CLOSED
            state.failures = 0
            state.cooldown_s = 0.0
            if not slot.counted:
                self._grow(state, used=state.in_flight + 1)
        elif outcome is Outcome.OVERLOADED:
            self._refusal_s = max(self._clock() - slot.taken_at, self._refusal_s * 0.9)
            if slot.epoch == state.epoch:
                # The first 429 of a round: the calls started with it saw the same full
                # region, so they count once, for the limit and for the breaker.
                state.failures += 1
                state.slow_start = False
                state.epoch += 1
                if abs(state.limit - state.ceiling) < 1.0:
                    # Where the last 429 came too: the capacity has not moved, this was
                    # the slow probe above it. Step back below it, not far down, and
                    # probe it half as often from now on.
                    decreased = state.limit - 1.0
                    state.slowdown = min(config.near_ceiling_slowdown_max, state.slowdown * 2)
                else:
                    # The calls the region holds now are what it admitted: go there, but
                    # never below the multiplicative decrease.
                    decreased = max(state.limit * config.decrease_factor, state.in_flight)
                    state.slowdown = config.near_ceiling_slowdown
                state.floor = min(decreased, state.limit * config.decrease_factor)
                state.ceiling = state.limit
                state.limit = max(float(config.concurrency_min), decreased)
                self._tell(state.name, RegionEvent.DECREASED)
            elif slot.epoch == state.epoch - 1 and state.in_flight < state.limit:
                # A later 429 of the same round: the calls sent with the first one are
                # coming back refused, so what is still held is closer to the capacity.
                state.limit = max(float(config.concurrency_min), state.floor, state.in_flight)
                state.ceiling = min(state.ceiling, state.limit)
            if slot.probe or state.failures >= config.overloads_to_open:
                self._open(state)
        elif outcome is Outcome.FAILED:
            state.failures += 1
            self._open(state)
        # A plain release frees a slot for the oldest waiter that can use it; a
        # failure or an overload may change every waiter's plan, so all look again.
        self._hand_over(wake_the_rest=outcome not in (Outcome.SUCCESS, Outcome.NEUTRAL))

    def _grow(self, state: RegionState, *, used: int) -> None:
        """Raise the limit after an admitted call: +1 in slow start, else ~+1 per round.

        Only while the limit is in use (`used`, the calls in flight with this one, at
        least half of it): a region that served 5 calls at a time says nothing about 70,
        and a limit grown while idle would let the next burst of work overrun the region
        all at once (TCP's congestion window validation, RFC 7661, for the same reason).
        """
        if used * 2 < state.limit:
            return
        config = self._config
        if state.slow_start:
            step = 1.0
        elif abs(state.limit - state.ceiling) < 1.0:
            # Near the last overload: the region's capacity is probably here, so
            # stay (and probe slowly) rather than overshoot again at once.
            step = 1.0 / (max(state.limit, 1.0) * state.slowdown)
        else:
            step = 1.0 / max(state.limit, 1.0)
        state.limit = min(float(config.concurrency_max), state.limit + step)
        if state.limit >= state.ceiling + 1.0:
            # Past the last overload without a 429: the capacity grew; probe freely.
            state.slowdown = config.near_ceiling_slowdown

    def _accepted(self, slot: Slot) -> None:
        """The call outlived the accept window: the region admitted it; grow now."""
        slot.accept_timer = None
        state = self.state(slot.region)
        if slot.probe or state.breaker is not Breaker.CLOSED:
            return  # a probe closes the breaker at its end, not before
        slot.counted = True
        self._grow(state, used=state.in_flight)
        self._hand_over(wake_the_rest=False)

    def _open(self, state: RegionState) -> None:
        config = self._config
        state.cooldown_s = (
            config.cooldown_initial_s
            if state.cooldown_s == 0
            else min(config.cooldown_max_s, state.cooldown_s * 2)
        )
        state.breaker = Breaker.OPEN
        state.open_until = self._clock() + state.cooldown_s
        self._tell(state.name, RegionEvent.OPENED)

    def _usable(self, state: RegionState) -> bool:
        if state.breaker is Breaker.OPEN and self._clock() >= state.open_until:
            state.breaker = Breaker.HALF_OPEN
        if state.breaker is Breaker.OPEN:
            return False
        if state.breaker is Breaker.HALF_OPEN:
            return not state.probing
        return state.in_flight < int(state.limit)

    def _try_take(self, candidates: Sequence[str], avoid: Sequence[str]) -> Slot | None:
        preferred = [r for r in candidates if r not in avoid]
        for group in (preferred, [r for r in candidates if r in avoid]):
            for region in group:
                state = self.state(region)
                if self._usable(state):
                    return self._take(state)
        return None

    def _force(self, candidates: Sequence[str]) -> Slot:
        states = [self.state(r) for r in candidates]
        state = min(states, key=lambda s: (s.open_until, s.in_flight))
        return self._take(state)

    def _take(self, state: RegionState) -> Slot:
        probe = state.breaker is not Breaker.CLOSED
        if probe:
            state.probing = True
        state.in_flight += 1
        slot = Slot(region=state.name, epoch=state.epoch, probe=probe, taken_at=self._clock())
        if self._config.strategy is RegionStrategy.ADAPTIVE and self._config.accept_window_s > 0:
            window_s = max(self._config.accept_window_s, 2 * self._refusal_s)
            slot.accept_timer = asyncio.get_running_loop().call_later(
                window_s, self._accepted, slot
            )
        return slot

    def _next_reopen(self, candidates: Sequence[str]) -> float | None:
        now = self._clock()
        waits = [
            self.state(r).open_until - now
            for r in candidates
            if self.state(r).breaker is Breaker.OPEN
        ]
        return min(waits) if waits else None


class RegionEvent(enum.Enum):
    """A change in a region worth telling other instances (`RegionPool.listen`)."""

    OPENED = "opened"  # the breaker opened
    DECREASED = "decreased"  # a 429 round lowered the limit: the capacity was found


@dataclass(eq=False, slots=True)
class _Waiter:
    """A call waiting in `RegionPool.acquire`: where it may go, and how to answer it."""

    future: asyncio.Future[Slot | None]
    candidates: Sequence[str]
    avoid: Sequence[str]
    share: Share = DEFAULT_SHARE
    seq: int = 0


def _resolve(future: asyncio.Future[Slot | None], slot: Slot | None) -> None:
    if not future.done():
        future.set_result(slot)


_CACHED_CONTENT = re.compile(r"^projects/[^/]+/locations/([^/]+)/cachedContents/[^/]+$")


def pinned_region(request: Mapping[str, Any]) -> str | None:
    """The region a request must run in, if it names a context cache.

    A cache (`projects/P/locations/R/cachedContents/ID`) exists only in region R
    (https://cloud.google.com/vertex-ai/generative-ai/docs/context-cache/context-cache-overview),
    so such a request may run nowhere else.
    """
    cached = request.get("cachedContent")
    if not isinstance(cached, str):
        return None
    match = _CACHED_CONTENT.match(cached)
    return match.group(1) if match else None
