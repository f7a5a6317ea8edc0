"""One picture of each region across instances: breakers and learnt capacity, shared.

Each instance's `RegionPool` learns alone. With K instances sending to one region,
each would find the region's capacity by itself (K slow starts, K rounds of 429s)
and keep calling a dead region until its own breaker opened. The board shares
what matters through the store, at a cost of O(regions) operations per interval
and never one per job:

- every `interval_s`, one heartbeat write of this instance, one count of the
  instances seen lately, and one batched read of the regions' records;
- a region no instance has learnt yet starts at `REGION_CONCURRENCY_INITIAL` for the
  whole fleet (each instance its share), not that many per instance;
- a region's record is written when this instance's breaker opens (at once: the
  others open theirs within one interval) and when a 429 round finds the
  capacity, as `capacity` = this instance's limit x the instances counted; each
  instance then takes `capacity / instances` as its share. Capacity writes of one
  instance to one region are spaced by at least max(interval, instances) seconds,
  so a record sees about one write a second whatever the fleet's size (Firestore
  sustains about one write a second per document).

When the store cannot be read or written, each instance goes on learning alone
(logged once per outage) and takes up the shared picture when the store answers
again. Wall-clock times are shared; each instance turns them into its own
monotonic clock's, so the clocks' offset between instances only shifts a cooldown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from dispatcher.background import BackgroundLoop
from dispatcher.errors import StoreUnavailable
from dispatcher.regions import Breaker, RegionEvent, RegionPool

log = logging.getLogger(__name__)

# An instance counts as alive for this many heartbeat intervals after its last beat.
ALIVE_INTERVALS = 3


@dataclass(frozen=True, kw_only=True, slots=True)
class SharedRegion:
    """What the instances know of one region together."""

    region: str
    capacity: float | None = None  # calls in flight the region admits, all instances
    capacity_at: float = 0.0  # wall-clock seconds when it was learnt
    opened_at: float = 0.0  # wall-clock seconds when a breaker last opened
    open_until: float = 0.0
    opened_by: str = ""


class RegionBoardStore(Protocol):
    """Where the shared region records and the instances' heartbeats are kept."""

    async def read_regions(self, regions: Sequence[str]) -> dict[str, SharedRegion]:
        """The records that exist among `regions`, by name.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def write_region(self, record: SharedRegion, fields: Sequence[str]) -> None:
        """Write only `fields` of the record (others may be written by other instances).

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def beat(self, instance_id: str, at: float) -> None:
        """Record that `instance_id` is alive at wall-clock `at`.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def count_instances(self, since: float) -> int:
        """How many instances beat at or after wall-clock `since`.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...


@dataclass
class MemoryRegionBoardStore:
    """The board's store in memory: for tests, and for instances in one process."""

    regions: dict[str, SharedRegion] = field(default_factory=dict)
    beats: dict[str, float] = field(default_factory=dict)
    writes: int = 0

    async def read_regions(self, regions: Sequence[str]) -> dict[str, SharedRegion]:
        """The stored records among `regions`."""
        return {r: self.regions[r] for r in regions if r in self.regions}

    async def write_region(self, record: SharedRegion, fields: Sequence[str]) -> None:
        """Merge `fields` of `record` into the stored one."""
        self.writes += 1
        stored = self.regions.get(record.region, SharedRegion(region=record.region))
        self.regions[record.region] = replace(
            stored, **{name: getattr(record, name) for name in fields}
        )

    async def beat(self, instance_id: str, at: float) -> None:
        """Remember the heartbeat."""
        self.beats[instance_id] = at

    async def count_instances(self, since: float) -> int:
        """Instances that beat since `since`."""
        return sum(1 for at in self.beats.values() if at >= since)


OPENING_FIELDS = ("opened_at", "open_until", "opened_by")
CAPACITY_FIELDS = ("capacity", "capacity_at")


class RegionBoard:
    """Keeps one instance's `RegionPool` in step with the shared region records."""

    def __init__(
        self,
        pool: RegionPool,
        store: RegionBoardStore,
        regions: Sequence[str],
        *,
        instance_id: str,
        interval_s: float,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self._store = store
        self._regions = tuple(regions)
        self._instance_id = instance_id
        self._interval_s = interval_s
        self._wall = wall
        self._instances = 1
        self._opened: set[str] = set()  # breakers this instance opened since the last sync
        self._found: set[str] = set()  # capacities this instance found since the last sync
        self._written_at: dict[str, float] = {}  # region -> last capacity write (wall)
        self._seen_opening: dict[str, float] = {}  # region -> opened_at adopted or written
        self._seen_capacity: dict[str, tuple[float, int]] = {}  # (capacity_at, instances)
        self._rounds = 0  # syncs that reached the store
        self._wake = asyncio.Event()
        self._syncer = BackgroundLoop("region-board", self._loop)
        self._healthy = True
        pool.listen(self._on_event)

    @property
    def instances(self) -> int:
        """Instances counted at the last sync (at least this one)."""
        return self._instances

    def start(self) -> None:
        """Sync every interval, and at once after this instance opens a breaker."""
        self._syncer.start()

    async def stop(self) -> None:
        """Stop syncing."""
        await self._syncer.stop()

    def _on_event(self, region: str, event: RegionEvent) -> None:
        if event is RegionEvent.OPENED:
            self._opened.add(region)
            self._wake.set()
        else:
            self._found.add(region)

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync()
            except StoreUnavailable as exc:
                if self._healthy:
                    log.warning(
                        "shared region state unavailable; learning alone until it answers",
                        extra={"reason": str(exc)[:300]},
                    )
                self._healthy = False
            else:
                if not self._healthy:
                    log.info("shared region state available again")
                self._healthy = True
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)

    async def sync(self) -> None:
        """One round: beat and count, write what changed here, take up what changed elsewhere.

        Raises:
            StoreUnavailable: the store could not be reached (what was to be written is
                kept for the next round).
        """
        now = self._wall()
        await self._store.beat(self._instance_id, now)
        self._rounds += 1
        since = now - ALIVE_INTERVALS * self._interval_s
        self._instances = max(1, await self._store.count_instances(since))
        await self._write_changes(now)
        if not self._regions:  # an instance that only counts (the mode-3 ingress)
            return
        shared = await self._store.read_regions(self._regions)
        for region in self._regions:
            record = shared.get(region)
            if record is not None:
                self._take_up(record, now)
            if self._rounds <= ALIVE_INTERVALS and (record is None or record.capacity is None):
                # Over the first rounds every instance started with this one is counted.
                self._pool.share_start(region, self._instances)

    async def _write_changes(self, now: float) -> None:
        for region in sorted(self._opened):
            record = SharedRegion(
                region=region,
                opened_at=now,
                open_until=now + self._pool.open_for_s(region),
                opened_by=self._instance_id,
            )
            await self._store.write_region(record, OPENING_FIELDS)
            self._seen_opening[region] = now
            self._opened.discard(region)
        spacing = max(self._interval_s, float(self._instances))
        for region in sorted(self._found):
            if now - self._written_at.get(region, -spacing) < spacing:
                continue  # written lately: keep it for a later round
            state = self._pool.state(region)
            if state.breaker is not Breaker.CLOSED:
                self._found.discard(region)
                continue  # an open region's limit says nothing of its capacity
            capacity = state.limit * self._instances
            await self._store.write_region(
                SharedRegion(region=region, capacity=capacity, capacity_at=now), CAPACITY_FIELDS
            )
            self._written_at[region] = now
            self._seen_capacity[region] = (now, self._instances)
            self._found.discard(region)

    def _take_up(self, record: SharedRegion, now: float) -> None:
        region = record.region
        if record.opened_at > self._seen_opening.get(region, 0.0):
            self._seen_opening[region] = record.opened_at
            if record.opened_by != self._instance_id and record.open_until > now:
                self._pool.adopt_opening(region, record.open_until - now)
        if record.capacity is None:
            return
        seen = (record.capacity_at, self._instances)
        if seen != self._seen_capacity.get(region):
            # A new estimate, or the same one over a fleet of another size.
            self._seen_capacity[region] = seen
            self._pool.adopt_share(region, record.capacity / self._instances)
