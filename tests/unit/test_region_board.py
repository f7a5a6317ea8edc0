"""The shared region picture: merge, spacing of writes, staleness, fallback when unreadable."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from dispatcher.errors import StoreUnavailable
from dispatcher.region_board import (
    ALIVE_INTERVALS,
    MemoryRegionBoardStore,
    RegionBoard,
    SharedRegion,
)
from dispatcher.regions import Breaker, Outcome, PoolConfig, RegionPool

REGIONS = ("a-east1", "b-west1")


class Wall:
    """A wall clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def board_factory(
    store: MemoryRegionBoardStore, wall: Wall, name: str, **config: float
) -> tuple[RegionPool, RegionBoard]:
    """A pool and its board on `store`, with no accept window (limits move only on release)."""
    pool = RegionPool(PoolConfig(accept_window_s=0, **config))  # type: ignore[arg-type]
    board = RegionBoard(pool, store, REGIONS, instance_id=name, interval_s=2.0, wall=wall)
    return pool, board


async def overload(pool: RegionPool, region: str, held: int, refused: int) -> None:
    """A round where the region admits `held` calls and refuses `refused` with 429."""
    slots = [await pool.acquire([region]) for _ in range(held + refused)]
    for slot in slots[held:]:
        pool.release(slot, Outcome.OVERLOADED)
    for slot in slots[:held]:
        pool.release(slot, Outcome.SUCCESS)


async def test_an_opening_elsewhere_opens_the_breaker_here() -> None:
    """A breaker opened by one instance is open in the other after its next sync."""
    store, wall = MemoryRegionBoardStore(), Wall()
    first, first_board = board_factory(store, wall, "one", cooldown_initial_s=10)
    second, second_board = board_factory(store, wall, "two")
    slot = await first.acquire([REGIONS[0]])
    first.release(slot, Outcome.FAILED)
    await first_board.sync()
    await second_board.sync()
    assert second.state(REGIONS[0]).breaker is Breaker.OPEN
    assert second.open_for_s(REGIONS[0]) == pytest.approx(10, abs=0.5)
    assert second.state(REGIONS[1]).breaker is Breaker.CLOSED


async def test_an_expired_opening_is_not_taken_up() -> None:
    """A stale record whose cooldown has ended opens nothing."""
    store, wall = MemoryRegionBoardStore(), Wall()
    store.regions[REGIONS[0]] = SharedRegion(
        region=REGIONS[0], opened_at=wall.now - 30, open_until=wall.now - 20, opened_by="gone"
    )
    pool, board = board_factory(store, wall, "one")
    await board.sync()
    assert pool.state(REGIONS[0]).breaker is Breaker.CLOSED


async def test_an_opening_is_taken_up_once() -> None:
    """A breaker closed by its own probe is not reopened by the record it took up before."""
    store, wall = MemoryRegionBoardStore(), Wall()
    first, first_board = board_factory(store, wall, "one", cooldown_initial_s=10)
    second, second_board = board_factory(store, wall, "two")
    first.release(await first.acquire([REGIONS[0]]), Outcome.FAILED)
    await first_board.sync()
    await second_board.sync()
    second.state(REGIONS[0]).breaker = Breaker.CLOSED  # as a successful probe leaves it
    await second_board.sync()
    assert second.state(REGIONS[0]).breaker is Breaker.CLOSED


async def test_a_new_instance_starts_at_its_share_of_the_learnt_capacity() -> None:
    """Capacity learnt by one instance is split over the instances counted, no slow start."""
    store, wall = MemoryRegionBoardStore(), Wall()
    first, first_board = board_factory(store, wall, "one", concurrency_initial=40)
    second, second_board = board_factory(store, wall, "two", concurrency_initial=40)
    await first_board.sync()
    await second_board.sync()  # both are counted from now on
    await overload(first, REGIONS[0], held=30, refused=10)
    await first_board.sync()
    assert store.regions[REGIONS[0]].capacity == pytest.approx(60, rel=0.02)  # 30 x 2
    await second_board.sync()
    state = second.state(REGIONS[0])
    assert state.limit == pytest.approx(30, rel=0.02)
    assert not state.slow_start


async def test_capacity_writes_are_spaced() -> None:
    """One instance writes a region's capacity at most once per interval, however many 429s."""
    store, wall = MemoryRegionBoardStore(), Wall()
    pool, board = board_factory(store, wall, "one", concurrency_initial=20)
    await overload(pool, REGIONS[0], held=15, refused=5)
    await board.sync()
    writes = store.writes
    for _ in range(3):
        await overload(pool, REGIONS[0], held=int(pool.state(REGIONS[0]).limit) - 2, refused=2)
        wall.now += 0.5
        await board.sync()
    assert store.writes == writes  # all within the 2 s spacing
    wall.now += 2.0
    await board.sync()
    assert store.writes == writes + 1


class Unreachable(MemoryRegionBoardStore):
    """A store that refuses every call."""

    async def read_regions(self, regions: Sequence[str]) -> dict[str, SharedRegion]:
        raise StoreUnavailable("down")

    async def beat(self, instance_id: str, at: float) -> None:
        raise StoreUnavailable("down")


async def test_an_unreachable_store_leaves_local_learning_alone() -> None:
    """When the store is down, sync raises StoreUnavailable and the pool keeps its own limits."""
    store, wall = Unreachable(), Wall()
    pool, board = board_factory(store, wall, "one", concurrency_initial=20)
    await overload(pool, REGIONS[0], held=12, refused=3)
    with pytest.raises(StoreUnavailable):
        await board.sync()
    assert pool.state(REGIONS[0]).limit == pytest.approx(14, abs=0.5)  # max(0.7 x 20, 12 held)
    assert board.instances == 1


async def test_a_fleet_starts_an_unlearnt_region_at_the_initial_limit_in_all() -> None:
    """Four instances starting together take a quarter of the initial limit each, at first."""
    store, wall = MemoryRegionBoardStore(), Wall()
    pools = [board_factory(store, wall, f"i{n}", concurrency_initial=16) for n in range(4)]
    for _ in range(ALIVE_INTERVALS):
        for _, board in pools:
            await board.sync()
    assert [pool.state(REGIONS[0]).limit for pool, _ in pools] == [4.0, 4.0, 4.0, 4.0]
    pool, board = pools[-1]
    pool.state(REGIONS[0]).limit = 9.0  # grown by slow start since
    await board.sync()
    assert pool.state(REGIONS[0]).limit == 9.0  # only the first rounds set the start
