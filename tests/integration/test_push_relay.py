"""The push relay against the real Pub/Sub emulator, pushing to loopback receivers.

Subscriptions here have a 1 s ack deadline and the relay extends its leases every
0.25 s, so a message that was not acked (or whose lease lapsed while the relay held it)
comes back within about a second, where a test can see it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import pytest
from dispatcher_devtools.push_relay import PushRelay

from tests.integration.conftest import Emulators
from tests.support.stack import PROJECT, unique

pytestmark = pytest.mark.integration

SUBSCRIPTION_ACK_DEADLINE_S = 1
QUIET_S = 1.5
"""Long enough for an unacked message to come back (deadline 1 s, plus slack)."""

Answer = int | Literal["close", "hang"]
"""A status to answer, or: close the connection unanswered / never answer."""


@dataclass
class PullSubscription:
    """A topic and a pull subscription on the emulator."""

    host_port: str
    topic: str
    path: str

    async def publish(self, texts: list[str], **attributes: str) -> None:
        """Publish one message per text, with `attributes` on each."""
        url = f"http://{self.host_port}/v1/projects/{PROJECT}/topics/{self.topic}:publish"
        messages = [
            {"data": base64.b64encode(text.encode()).decode(), "attributes": attributes}
            for text in texts
        ]
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            response = await http.post(url, json={"messages": messages})
        response.raise_for_status()


@dataclass(eq=False)
class Receiver:
    """A minimal HTTP/1.1 server that records push envelopes and answers per `answer`."""

    answer: Callable[[dict[str, Any]], Answer]
    latency_s: float = 0.0
    envelopes: list[dict[str, Any]] = field(default_factory=list)
    arrived_at: list[float] = field(default_factory=list)
    acked: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    server: asyncio.Server | None = None
    connections: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        """Where to push."""
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/"

    def texts(self, envelopes: list[dict[str, Any]] | None = None) -> list[str]:
        """The decoded message data of `envelopes` (default: all received)."""
        chosen = self.envelopes if envelopes is None else envelopes
        return [base64.b64decode(e["message"]["data"]).decode() for e in chosen]

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)

    async def close(self) -> None:
        """Stop listening and drop every open connection."""
        if self.server is not None:
            self.server.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.connections.discard(task)
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        length = next(
            int(line.split(":", 1)[1])
            for line in head.split("\r\n")
            if line.lower().startswith("content-length:")
        )
        envelope = json.loads(await reader.readexactly(length))
        self.envelopes.append(envelope)
        self.arrived_at.append(time.monotonic())
        answer = self.answer(envelope)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if answer == "close":
                return False
            if answer == "hang":
                await reader.read()  # until the relay gives up and closes the connection
                return False
            await asyncio.sleep(self.latency_s)
        finally:
            self.in_flight -= 1
        if answer in {200, 201, 202, 204}:
            self.acked.append(envelope)
        writer.write(f"HTTP/1.1 {answer} Relay-Test\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        return True


def always(status: int) -> Callable[[dict[str, Any]], Answer]:
    """An answer script: `status` for every push."""
    return lambda _envelope: status


def first_then_ok(first: Answer, times: int = 1) -> Callable[[dict[str, Any]], Answer]:
    """An answer script: `first` for the first `times` pushes, then 200."""
    seen = [0]

    def answer(_envelope: dict[str, Any]) -> Answer:
        seen[0] += 1
        return first if seen[0] <= times else 200

    return answer


async def wait_until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    """Poll `condition` until it holds, or fail after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition still false after {within_s} s")
        await asyncio.sleep(0.02)


@pytest.fixture
def pull_subscription(emulators: Emulators) -> Iterator[Callable[[], PullSubscription]]:
    """Factory: a fresh topic and pull subscription (1 s ack deadline), deleted after."""
    host_port = emulators.pubsub.host_port
    base = f"http://{host_port}/v1/projects/{PROJECT}"
    made: list[PullSubscription] = []
    http = httpx.Client(trust_env=False, timeout=10)

    def make() -> PullSubscription:
        topic, name = unique("relay-topic"), unique("relay-pull")
        http.put(f"{base}/topics/{topic}", json={}).raise_for_status()
        http.put(
            f"{base}/subscriptions/{name}",
            json={
                "topic": f"projects/{PROJECT}/topics/{topic}",
                "ackDeadlineSeconds": SUBSCRIPTION_ACK_DEADLINE_S,
            },
        ).raise_for_status()
        made.append(PullSubscription(host_port, topic, f"projects/{PROJECT}/subscriptions/{name}"))
        return made[-1]

    yield make
    for sub in made:
        with contextlib.suppress(httpx.HTTPError):
            http.delete(f"http://{host_port}/v1/{sub.path}")
            http.delete(f"{base}/topics/{sub.topic}")
    http.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Callable[..., Any]]:
    """Factory: a started `Receiver` (answer script, latency_s), closed after."""
    made: list[Receiver] = []

    async def make(answer: Callable[[dict[str, Any]], Answer], latency_s: float = 0.0) -> Receiver:
        made.append(Receiver(answer=answer, latency_s=latency_s))
        await made[-1].start()
        return made[-1]

    yield make
    for each in made:
        await each.close()


@pytest.fixture
async def relay() -> AsyncIterator[Callable[..., Any]]:
    """Factory: a started `PushRelay` with tiny backoffs and fast leases, stopped after."""
    made: list[PushRelay] = []

    async def make(sub: PullSubscription, receivers: list[Receiver], **overrides: Any) -> PushRelay:
        options: dict[str, Any] = {
            "ack_deadline_s": 5.0,
            "min_backoff_s": 0.05,
            "max_backoff_s": 0.2,
            "lease_s": 1,
            "lease_every_s": 0.25,
            **overrides,
        }
        made.append(
            PushRelay(
                emulator_host=sub.host_port,
                subscription=sub.path,
                workers=[r.url for r in receivers],
                **options,
            )
        )
        await made[-1].start()
        return made[-1]

    yield make
    for each in made:
        await each.stop()


async def test_each_message_is_pushed_once_as_pubsub_wraps_it_and_acked(
    pull_subscription: Callable[[], PullSubscription],
    receiver: Callable[..., Any],
    relay: Callable[..., Any],
) -> None:
    """Every message arrives once in Pub/Sub's wrapped envelope, is acked and never returns."""
    sub = pull_subscription()
    texts = [f"message {i}" for i in range(20)]
    await sub.publish(texts, tenant="t1")
    worker = await receiver(always(200))
    pusher = await relay(sub, [worker])

    await wait_until(lambda: pusher.acked == len(texts))
    await asyncio.sleep(QUIET_S)

    assert sorted(worker.texts()) == sorted(texts)
    assert pusher.acked == len(texts) and pusher.nacked == 0
    for envelope in worker.envelopes:
        message = envelope["message"]
        assert set(envelope) == {"message", "subscription", "deliveryAttempt"}
        assert envelope["subscription"] == sub.path
        assert envelope["deliveryAttempt"] == 1
        assert message["attributes"] == {"tenant": "t1"}
        assert message["messageId"] == message["message_id"]
        assert message["publishTime"] == message["publish_time"]
        assert message["publishTime"].endswith("Z")


async def test_a_503_is_redelivered_after_the_backoff_with_attempt_two(
    pull_subscription: Callable[[], PullSubscription],
    receiver: Callable[..., Any],
    relay: Callable[..., Any],
) -> None:
    """A push answered 503 returns as deliveryAttempt 2 after the backoff, then stays acked."""
    sub = pull_subscription()
    await sub.publish(["retry me"])
    worker = await receiver(first_then_ok(503))
    backoff_s = 0.3
    pusher = await relay(sub, [worker], min_backoff_s=backoff_s, max_backoff_s=1.0)

    await wait_until(lambda: pusher.acked == 1)
    await asyncio.sleep(QUIET_S)

    assert [e["deliveryAttempt"] for e in worker.envelopes] == [1, 2]
    assert worker.texts() == ["retry me", "retry me"]
    assert worker.arrived_at[1] - worker.arrived_at[0] >= backoff_s
    assert (pusher.acked, pusher.nacked) == (1, 1)


async def test_window_grows_on_successes_and_halves_on_failures(
    pull_subscription: Callable[[], PullSubscription],
    receiver: Callable[..., Any],
    relay: Callable[..., Any],
) -> None:
    """Fast successes widen the window past its start; each failure then halves it."""
    sub = pull_subscription()
    await sub.publish([f"fast {i}" for i in range(40)])
    failing = {"left": 0}

    def answer(_envelope: dict[str, Any]) -> Answer:
        if failing["left"] > 0:
            failing["left"] -= 1
            return 503
        return 200

    worker = await receiver(answer)
    pusher = await relay(sub, [worker], initial_window=2, max_window=30)
    await wait_until(lambda: pusher.acked == 40)
    assert pusher.window == 30  # 2 + 40 successes, capped at max_window

    failing["left"] = 3
    await sub.publish(["slow luck"])
    await wait_until(lambda: pusher.acked == 41)

    # 30 -> 15 -> 7 -> 3 after three failures, then +1 for the success.
    assert pusher.nacked == 3
    assert pusher.window == 4


async def test_outstanding_pushes_never_exceed_the_window(
    pull_subscription: Callable[[], PullSubscription],
    receiver: Callable[..., Any],
    relay: Callable[..., Any],
) -> None:
    """With slow answers, exactly as many pushes are outstanding as the window allows."""
    sub = pull_subscription()
    await sub.publish([f"slow {i}" for i in range(12)])
    worker = await receiver(always(200), latency_s=0.2)
    pusher = await relay(sub, [worker], initial_window=4, max_window=4)

    await wait_until(lambda: pusher.acked == 12)

    assert worker.max_in_flight == 4
    assert pusher.outstanding == 0


async def test_pushes_spread_over_two_receivers(
    pull_subscription: Callable[[], PullSubscription],
    receiver: Callable[..., Any],
    relay: Callable[..., Any],
) -> None:
    """Pushes go to the less busy of two workers, so both take an even share."""
    sub = pull_subscription()
    texts = [f"spread {i}" for i in range(40)]
    await sub.publish(texts)
    workers = [await receiver(always(200), latency_s=0.05) for _ in range(2)]
    pusher = await relay(sub, workers)

    await wait_until(lambda: pusher.acked == len(texts))

    assert sorted(workers[0].texts() + workers[1].texts()) == sorted(texts)
    assert dict(pusher.pushes) == {w.url: len(w.envelopes) for w in workers}
    assert all(len(w.envelopes) >= 10 for w in workers), pusher.pushes


@pytest.mark.parametrize("death", ["close", "hang"])
async def test_a_receiver_dying_mid_push_loses_nothing(
    pull_subscription: Callable[[], PullSubscription],
    receiver: Callable[..., Any],
    relay: Callable[..., Any],
    death: Answer,
) -> None:
    """Pushes a dead worker drops or never answers are nacked and redelivered to the live one."""
    sub = pull_subscription()
    texts = [f"survive {i}" for i in range(10)]
    await sub.publish(texts)
    dead = await receiver(lambda _envelope: death)
    alive = await receiver(always(200), latency_s=0.05)
    pusher = await relay(sub, [dead, alive], ack_deadline_s=0.3)

    await wait_until(lambda: pusher.acked == len(texts), within_s=15)
    await asyncio.sleep(QUIET_S)

    assert dead.envelopes, "the dead worker never got a push"
    assert sorted(alive.texts(alive.acked)) == sorted(texts)
    assert len(alive.acked) == len(texts)  # nothing acked twice
    retried = set(dead.texts())
    assert all(e["deliveryAttempt"] >= 2 for e in alive.acked if alive.texts([e])[0] in retried)
    assert pusher.nacked == len(dead.envelopes)


async def test_a_push_slower_than_the_subscription_deadline_is_not_redelivered(
    pull_subscription: Callable[[], PullSubscription],
    receiver: Callable[..., Any],
    relay: Callable[..., Any],
) -> None:
    """Leases keep a message held while its push outlives the 1 s subscription deadline."""
    sub = pull_subscription()
    await sub.publish(["slow one"])
    worker = await receiver(always(200), latency_s=1.6)
    pusher = await relay(sub, [worker])

    await wait_until(lambda: pusher.acked == 1)
    await asyncio.sleep(QUIET_S)

    assert worker.texts() == ["slow one"]
    assert pusher.nacked == 0
