"""Region choice: round-robin, session affinity, cache pinning, breaker and adaptive limits."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import pytest

from dispatcher.errors import ConfigError, RegionsBusy
from dispatcher.regions import (
    Breaker,
    Outcome,
    PoolConfig,
    RegionPool,
    RegionStrategy,
    RoundRobin,
    pinned_region,
    session_region,
)
from dispatcher.settings import Settings

REGIONS = ("a-east1", "b-west1", "c-north1")


class Ticks:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_round_robin_cycles_from_an_offset() -> None:
    """Successive assignments cycle through the regions in order, from some offset."""
    robin = RoundRobin(REGIONS, rng=random.Random(1))
    picks = [robin.assign_region() for _ in range(7)]
    start = REGIONS.index(picks[0])
    assert picks == [REGIONS[(start + i) % 3] for i in range(7)]


def test_round_robin_offsets_differ_between_instances() -> None:
    """Instances start at random offsets, so not every instance starts on the first region."""
    starts = {RoundRobin(REGIONS, rng=random.Random(seed)).assign_region() for seed in range(20)}
    assert len(starts) > 1


def test_session_region_is_stable() -> None:
    """A session id maps to the same region every time, on any instance."""
    assert {session_region(REGIONS, "user-42") for _ in range(5)} == {
        session_region(REGIONS, "user-42")
    }


@pytest.mark.parametrize(
    ("request_body", "region"),
    [
        ({"cachedContent": "projects/p/locations/europe-west4/cachedContents/123"}, "europe-west4"),
        ({"cachedContent": "not-a-cache-name"}, None),
        ({}, None),
    ],
)
def test_pinned_region_comes_from_cached_content(
    request_body: dict[str, str], region: str | None
) -> None:
    """A named context cache pins the request to the cache's region."""
    assert pinned_region(request_body) == region


async def test_failure_opens_breaker_and_next_region_is_used() -> None:
    """A 5xx opens the region's breaker; the next call goes to the next region."""
    ticks = Ticks()
    pool = RegionPool(PoolConfig(cooldown_initial_s=2), clock=ticks)
    slot = await pool.acquire(REGIONS)
    assert slot.region == "a-east1"
    pool.release(slot, Outcome.FAILED)
    assert pool.state("a-east1").breaker is Breaker.OPEN
    assert (await pool.acquire(REGIONS)).region == "b-west1"


async def test_half_open_allows_one_probe_then_closes_on_success() -> None:
    """After the cooldown one probe goes through; success closes the breaker."""
    ticks = Ticks()
    pool = RegionPool(PoolConfig(cooldown_initial_s=2), clock=ticks)
    pool.release(await pool.acquire(["a-east1"]), Outcome.FAILED)
    ticks.now += 2.5
    probe = await pool.acquire(["a-east1", "b-west1"])
    assert probe.region == "a-east1" and probe.probe
    assert (await pool.acquire(["a-east1", "b-west1"])).region == "b-west1"
    pool.release(probe, Outcome.SUCCESS)
    assert pool.state("a-east1").breaker is Breaker.CLOSED


async def test_cooldown_doubles_while_failing_and_is_capped() -> None:
    """Each failed probe doubles the cooldown, up to the maximum."""
    ticks = Ticks()
    pool = RegionPool(PoolConfig(cooldown_initial_s=1, cooldown_max_s=4), clock=ticks)
    cooldowns = []
    for _ in range(5):
        slot = await pool.acquire(["a-east1"], deadline_s=0)
        pool.release(slot, Outcome.FAILED)
        cooldowns.append(pool.state("a-east1").cooldown_s)
        ticks.now += 10
    assert cooldowns == [1, 2, 4, 4, 4]


async def test_overload_halves_limit_once_per_round() -> None:
    """Several 429s from calls started together decrease the limit only once."""
    pool = RegionPool(PoolConfig(concurrency_initial=10, decrease_factor=0.5, overloads_to_open=99))
    slots = [await pool.acquire(["a-east1"]) for _ in range(4)]
    for slot in slots:
        pool.release(slot, Outcome.OVERLOADED)
    assert pool.state("a-east1").limit == 5


async def test_success_grows_limit_additively_after_overload() -> None:
    """After the first 429 the limit grows by about one per limit's worth of successes."""
    pool = RegionPool(PoolConfig(concurrency_initial=4, decrease_factor=0.5, overloads_to_open=99))
    pool.release(await pool.acquire(["a-east1"]), Outcome.OVERLOADED)
    assert pool.state("a-east1").limit == 2
    held = await pool.acquire(["a-east1"])  # the limit is in use: it may grow
    for _ in range(2):
        pool.release(await pool.acquire(["a-east1"]), Outcome.SUCCESS)
    assert pool.state("a-east1").limit == pytest.approx(2 + 1 / 2 + 1 / 2.5)
    pool.release(held, Outcome.NEUTRAL)


async def test_confirmed_capacity_is_probed_ever_more_rarely() -> None:
    """Each 429 at the last 429's limit halves the growth there (to a cap); passing it resets."""
    pool = RegionPool(PoolConfig(overloads_to_open=99, near_ceiling_slowdown_max=32))
    state = pool.state("a-east1")
    state.slow_start, state.limit, state.ceiling = False, 12.9, 12.95  # probing at the ceiling
    for expected in (16, 32, 32):
        pool.release(await pool.acquire(["a-east1"]), Outcome.OVERLOADED)
        assert state.slowdown == expected
        assert state.limit == pytest.approx(state.ceiling - 1)
        state.limit = state.ceiling - 0.5  # grown back near the ceiling: the next round
    held = [await pool.acquire(["a-east1"]) for _ in range(6)]  # in use: it may grow
    before = state.limit
    pool.release(await pool.acquire(["a-east1"]), Outcome.SUCCESS)
    assert state.limit == pytest.approx(before + 1 / (before * 32))
    state.limit = state.ceiling + 0.999
    pool.release(await pool.acquire(["a-east1"]), Outcome.SUCCESS)  # past it: capacity grew
    assert state.slowdown == 8
    for slot in held:
        pool.release(slot, Outcome.NEUTRAL)


async def test_call_waits_for_a_free_slot_instead_of_overflowing() -> None:
    """At the limit, acquire waits until a slot is released."""
    pool = RegionPool(PoolConfig(concurrency_initial=1, concurrency_min=1))
    held = await pool.acquire(["a-east1"])
    waiter = asyncio.create_task(pool.acquire(["a-east1"]))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    pool.release(held, Outcome.NEUTRAL)
    slot = await asyncio.wait_for(waiter, 1)
    assert slot.region == "a-east1"


async def test_released_slot_goes_to_the_oldest_waiter_not_a_newcomer() -> None:
    """A release hands its slot to the call that waited; one arriving later waits its turn."""
    pool = RegionPool(PoolConfig(concurrency_initial=1, concurrency_max=1))
    held = await pool.acquire(["a-east1"])
    first = asyncio.create_task(pool.acquire(["a-east1"]))
    await asyncio.sleep(0.01)
    pool.release(held, Outcome.SUCCESS)
    # Runs before `first` is scheduled again: it must not take the slot handed to `first`.
    started = time.monotonic()
    with pytest.raises(RegionsBusy):
        await pool.acquire(["a-east1"], deadline_s=0.05)  # the region stays full
    assert time.monotonic() - started >= 0.05
    assert (await asyncio.wait_for(first, 1)).region == "a-east1"


async def test_a_full_healthy_region_is_waited_for_never_called_past_its_limit() -> None:
    """Past REGION_WAIT_MAX_S a call still waits for a full healthy region instead of a 429."""
    pool = RegionPool(PoolConfig(concurrency_initial=1, concurrency_max=1, wait_max_s=0.01))
    held = await pool.acquire(["a-east1"])
    waiting = asyncio.create_task(pool.acquire(["a-east1"]))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    assert pool.state("a-east1").in_flight == 1
    pool.release(held, Outcome.SUCCESS)
    assert (await asyncio.wait_for(waiting, 1)).region == "a-east1"


async def test_slot_handed_to_a_cancelled_waiter_is_given_back() -> None:
    """A waiter cancelled after being handed a slot returns it to the next waiter."""
    pool = RegionPool(PoolConfig(concurrency_initial=1, concurrency_max=1))
    held = await pool.acquire(["a-east1"])
    cancelled = asyncio.create_task(pool.acquire(["a-east1"]))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(pool.acquire(["a-east1"]))
    await asyncio.sleep(0.01)
    pool.release(held, Outcome.SUCCESS)  # hands the slot to `cancelled`...
    cancelled.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert (await asyncio.wait_for(second, 1)).region == "a-east1"
    assert pool.state("a-east1").in_flight == 1


async def test_avoided_region_used_only_as_last_resort() -> None:
    """A retry avoids the region that just failed while another is usable."""
    pool = RegionPool(PoolConfig())
    assert (await pool.acquire(REGIONS, avoid=["a-east1"])).region == "b-west1"
    assert (await pool.acquire(["a-east1"], avoid=["a-east1"])).region == "a-east1"


async def test_all_regions_cooling_waits_then_probes() -> None:
    """When every region is open, acquire waits (bounded) and then probes one anyway."""
    pool = RegionPool(PoolConfig(cooldown_initial_s=60, wait_max_s=0.05))
    for region in REGIONS:
        pool.release(await pool.acquire([region]), Outcome.FAILED)
    assert all(pool.state(region).breaker is Breaker.OPEN for region in REGIONS)
    started = time.monotonic()
    slot = await asyncio.wait_for(pool.acquire(REGIONS), 2)
    assert time.monotonic() - started >= 0.05  # waited wait_max_s first
    assert slot.probe
    assert slot.region == REGIONS[0]  # the first to open: its cooldown ends first
    assert pool.state(slot.region).breaker is Breaker.OPEN  # still cooling, probed anyway


# -- REGION_STRATEGY=naive: the benchmark baseline (the original example's behaviour) --


def naive_pool() -> RegionPool:
    """A pool with the naive strategy and limits that the adaptive one would enforce."""
    return RegionPool(
        PoolConfig(concurrency_initial=1, cooldown_initial_s=60, strategy=RegionStrategy.NAIVE)
    )


async def test_naive_pool_holds_a_fixed_limit_in_the_first_candidate() -> None:
    """Naive: calls queue for the first candidate's fixed slots; a release lets the next go."""
    pool = RegionPool(PoolConfig(strategy=RegionStrategy.NAIVE, concurrency_initial=2))
    slots = [await asyncio.wait_for(pool.acquire(REGIONS), 0.1) for _ in range(2)]
    assert {slot.region for slot in slots} == {"a-east1"}
    third = asyncio.create_task(pool.acquire(REGIONS))
    await asyncio.sleep(0.01)
    assert not third.done()  # the other regions are free, but naive never moves
    pool.release(slots[0], Outcome.SUCCESS)
    assert (await asyncio.wait_for(third, 0.1)).region == "a-east1"
    assert pool.state("a-east1").limit == 2  # never learnt
    assert not pool.retries_move


async def test_naive_pool_has_no_breaker_and_ignores_avoid() -> None:
    """Naive: failures and 429s neither open a breaker nor lower a limit; `avoid` is ignored."""
    pool = naive_pool()
    for outcome in (Outcome.FAILED, Outcome.OVERLOADED, Outcome.OVERLOADED, Outcome.OVERLOADED):
        pool.release(await pool.acquire(REGIONS), outcome)
    state = pool.state("a-east1")
    assert state.breaker is Breaker.CLOSED
    assert state.limit == 1
    assert state.in_flight == 0
    assert (await pool.acquire(REGIONS, avoid=["a-east1"])).region == "a-east1"


def test_adaptive_is_the_default_strategy(settings_factory: Callable[..., Settings]) -> None:
    """REGION_STRATEGY defaults to adaptive, accepts naive and names itself on a bad value."""
    assert settings_factory().region_strategy is RegionStrategy.ADAPTIVE
    assert RegionPool(PoolConfig()).retries_move
    assert settings_factory(REGION_STRATEGY="naive").region_strategy is RegionStrategy.NAIVE
    with pytest.raises(ConfigError, match="REGION_STRATEGY"):
        settings_factory(REGION_STRATEGY="round-robin")


async def test_limit_grows_when_a_call_outlives_the_accept_window() -> None:
    """A call still running after the accept window counts as admitted: the limit grows then."""
    pool = RegionPool(PoolConfig(concurrency_initial=2, accept_window_s=0.02))
    slots = [await pool.acquire(REGIONS[:1]) for _ in range(2)]
    assert pool.state(REGIONS[0]).limit == 2
    await asyncio.sleep(0.05)
    assert pool.state(REGIONS[0]).limit == 4  # slow start: +1 per admitted call
    for slot in slots:
        pool.release(slot, Outcome.SUCCESS)
    assert pool.state(REGIONS[0]).limit == 4  # not counted a second time at the end


async def test_a_429_round_brings_the_limit_to_what_the_region_holds() -> None:
    """After a round of 429s the limit is the calls still admitted, not a fixed fraction."""
    pool = RegionPool(PoolConfig(concurrency_initial=20, accept_window_s=0))
    slots = [await pool.acquire(REGIONS[:1]) for _ in range(20)]
    refused, admitted = slots[:4], slots[4:]  # the region holds 16
    for slot in refused:
        pool.release(slot, Outcome.OVERLOADED)
    state = pool.state(REGIONS[0])
    assert state.limit == 16
    assert state.breaker is Breaker.CLOSED
    for slot in admitted:
        pool.release(slot, Outcome.SUCCESS)


async def test_a_429_never_cuts_the_limit_below_the_multiplicative_decrease() -> None:
    """A 429 while few calls are held (someone else fills the region) cuts by 0.7 at most."""
    pool = RegionPool(PoolConfig(concurrency_initial=20, accept_window_s=0))
    slot = await pool.acquire(REGIONS[:1])
    pool.release(slot, Outcome.OVERLOADED)
    assert pool.state(REGIONS[0]).limit == pytest.approx(14.0)


def test_capacity_counts_limits_and_one_probe_per_unhealthy_region() -> None:
    """capacity() sums closed regions' limits and counts an open region as one probe."""
    pool = RegionPool(PoolConfig(concurrency_initial=10))
    pool.state(REGIONS[1]).breaker = Breaker.OPEN
    assert pool.capacity(REGIONS) == 21
    assert pool.in_flight == 0


async def test_limit_does_not_grow_while_the_region_is_barely_used() -> None:
    """Calls one at a time in a region with limit 16 leave the limit at 16 (no idle growth)."""
    pool = RegionPool(PoolConfig(concurrency_initial=16, accept_window_s=0))
    for _ in range(50):
        pool.release(await pool.acquire(REGIONS[:1]), Outcome.SUCCESS)
    assert pool.state(REGIONS[0]).limit == 16
