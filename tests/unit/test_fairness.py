"""Fair share between callers (dispatcher/fairness.py), in the queue and the region pool."""

from __future__ import annotations

import asyncio
import collections

import pytest

from dispatcher.fairness import FairQueue, Share
from dispatcher.regions import Outcome, PoolConfig, RegionPool

A = Share(tenant="a", batch=True)
B = Share(tenant="b")
C = Share(tenant="c", batch=True, weight=2.0)


async def _drain(queue: FairQueue) -> list[str]:
    return [(await queue.get())[0] for _ in range(queue.qsize())]


async def test_interactive_jobs_start_before_a_batch_backlog() -> None:
    """A job of an interactive key queued after 1,000 batch jobs starts first."""
    queue = FairQueue()
    for index in range(1000):
        queue.put_nowait(f"a{index}", A)
    queue.put_nowait("b0", B)
    assert (await queue.get())[0] == "b0"


async def test_keys_of_one_class_share_by_weight_and_keep_their_order() -> None:
    """Two batch keys, weights 1 and 2, both backlogged: starts go 1:2, each key's in order."""
    queue = FairQueue()
    for index in range(30):
        queue.put_nowait(f"a{index}", A)
        queue.put_nowait(f"c{index}", C)
    started = [await queue.get() for _ in range(30)]
    by_key = collections.Counter(share.tenant for _, share in started)
    assert by_key == {"a": 10, "c": 20}
    a_ids = [job_id for job_id, share in started if share is A]
    assert a_ids == [f"a{i}" for i in range(10)]


async def test_a_key_that_arrives_late_is_not_owed_the_past() -> None:
    """A key that was idle does not get a burst of every slot it missed: it interleaves."""
    queue = FairQueue()
    for index in range(20):
        queue.put_nowait(f"a{index}", A)
    for _ in range(10):
        await queue.get()
    late = Share(tenant="late", batch=True)
    for index in range(10):
        queue.put_nowait(f"late{index}", late)
    order = [share.tenant for _, share in [await queue.get() for _ in range(10)]]
    assert order.count("late") == 5


async def test_get_waits_for_a_job() -> None:
    """get() waits until a job is queued."""
    queue = FairQueue()
    waiting = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    queue.put_nowait("x", B)
    assert await waiting == ("x", B)


@pytest.mark.parametrize("first", [A, B])
async def test_region_pool_gives_a_freed_slot_to_interactive_before_batch(first: Share) -> None:
    """With the region full, a freed slot goes to the interactive caller's waiting call,
    whichever started waiting first."""
    pool = RegionPool(PoolConfig(concurrency_initial=1, concurrency_max=1))
    held = await pool.acquire(["r"])
    second = B if first is A else A
    calls = [asyncio.create_task(pool.acquire(["r"], share=share)) for share in (first, second)]
    await asyncio.sleep(0.01)
    pool.release(held, Outcome.SUCCESS)
    await asyncio.sleep(0.01)
    done = [share for share, call in zip((first, second), calls, strict=True) if call.done()]
    assert done == [B]
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
