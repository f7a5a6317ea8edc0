"""A development relay that pushes a Pub/Sub emulator subscription like Pub/Sub push does.

The emulator's push subscriptions deliver about one message at a time; the real service
keeps hundreds of pushes outstanding. This relay pulls from an emulator *pull*
subscription (so every message passes through the emulator) over its REST API and
pushes each message to one or more workers the way Pub/Sub push and Cloud Run would
(https://cloud.google.com/pubsub/docs/push):

- **Envelope:** the wrapped push body, with ``deliveryAttempt`` counted here per
  ``messageId`` (1 on the first delivery the relay makes). Pub/Sub sends it only when
  the subscription has a dead-letter policy; the relay always does.
- **Ack:** an answer of 102, 200, 201, 202 or 204. Any other status, a connection error,
  or no answer within ``ack_deadline_s`` (the push's HTTP timeout, as for push
  subscriptions) is a nack.
- **Nack and backoff:** the relay holds a nacked message for the retry backoff
  (``min_backoff_s * 2 ** (failures - 1)``, capped at ``max_backoff_s``), then sends
  ``modifyAckDeadline 0`` so the emulator redelivers it at once. So a redelivery, like
  the first delivery, comes from the emulator; the pull subscription should therefore
  have no retry policy of its own. While it holds a message (pushing or backing off),
  the relay extends its ack deadline to ``lease_s`` every ``lease_every_s`` seconds, so
  the emulator never redelivers a message the relay still holds; the subscription's own
  deadline only has to cover the first ``lease_every_s``.
- **Flow control:** at most ``window`` pushes are outstanding; the window starts at
  ``initial_window``, grows by one per success up to ``max_window`` and halves (floor 1)
  per failure, and the relay pulls only as many messages as the window has room for.
  A message waiting out its backoff is not outstanding (Pub/Sub, not the worker, holds
  it then).
- **Load balancing:** each push goes to the worker with the fewest outstanding pushes;
  ties go round-robin.

``stop()`` cancels pulls and pushes and nacks every held message, so it is redelivered
at once. The emulator may still lease messages to a pull cancelled in flight; those
come back after the subscription's ack deadline.

Run it with::

    PUBSUB_EMULATOR_HOST=127.0.0.1:8085 python -m dispatcher_devtools.push_relay \\
        --subscription projects/P/subscriptions/S --worker http://127.0.0.1:8081/
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Coroutine, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

import aiohttp

logger = logging.getLogger(__name__)

ACK_STATUSES: Final = frozenset({102, 200, 201, 202, 204})
LEASE_S: Final = 60
"""The default ack deadline the relay keeps on each message it holds."""
LEASE_EVERY_S: Final = 5.0
"""How often held messages are extended by default; below Pub/Sub's 10 s minimum deadline."""
MAX_PULL: Final = 1000  # Pub/Sub's limit on maxMessages per pull
PULL_TIMEOUT_S: Final = 120.0  # the emulator holds an empty pull for about 90 s
EMULATOR_TIMEOUT_S: Final = 30.0
_SUBSCRIPTION: Final = re.compile(r"projects/[^/]+/subscriptions/[^/]+")
_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING")


class PushRelay:
    """Pulls from an emulator subscription and pushes each message to workers.

    Everything runs on one event loop and no bookkeeping step awaits, so the counters
    need no lock.
    """

    def __init__(
        self,
        *,
        emulator_host: str,
        subscription: str,
        workers: Sequence[str],
        ack_deadline_s: float = 600.0,
        min_backoff_s: float = 10.0,
        max_backoff_s: float = 600.0,
        initial_window: int = 16,
        max_window: int = 1000,
        lease_s: int = LEASE_S,
        lease_every_s: float = LEASE_EVERY_S,
    ) -> None:
        """Create a relay; nothing runs until `start`.

        Args:
            emulator_host: The emulator's ``HOST:PORT`` (``PUBSUB_EMULATOR_HOST``).
            subscription: ``projects/P/subscriptions/S``, a pull subscription.
            workers: The URLs to push to (duplicates are dropped).
            ack_deadline_s: Seconds a push may take before it counts as a nack.
            min_backoff_s: Delay before the first redelivery of a nacked message.
            max_backoff_s: Largest delay before a redelivery.
            initial_window: Outstanding pushes allowed at first.
            max_window: Most outstanding pushes the window may grow to.
            lease_s: The ack deadline kept on each held message.
            lease_every_s: How often held messages are extended; below both
                ``lease_s`` and the subscription's ack deadline.

        Raises:
            ValueError: An argument is out of range or malformed.
        """
        if not _SUBSCRIPTION.fullmatch(subscription):
            raise ValueError(f"subscription must be projects/P/subscriptions/S: {subscription!r}")
        if not workers:
            raise ValueError("at least one worker URL is needed")
        if ack_deadline_s <= 0 or not 0 <= min_backoff_s <= max_backoff_s:
            raise ValueError("need ack_deadline_s > 0 and 0 <= min_backoff_s <= max_backoff_s")
        if not 1 <= initial_window <= max_window:
            raise ValueError("need 1 <= initial_window <= max_window")
        if not 0 < lease_every_s < lease_s <= 600:
            raise ValueError("need 0 < lease_every_s < lease_s <= 600")
        self.subscription = subscription
        self._base = f"http://{emulator_host}/v1/{subscription}"
        self._workers = list(dict.fromkeys(workers))
        self._ack_deadline_s = ack_deadline_s
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self._max_window = max_window
        self._lease_s = lease_s
        self._lease_every_s = lease_every_s
        self._window = initial_window
        self._outstanding = 0
        self._in_flight = dict.fromkeys(self._workers, 0)
        self._pushes = dict.fromkeys(self._workers, 0)
        self._next_worker = 0
        self._deliveries: dict[str, int] = {}
        self._held: set[str] = set()
        self._room = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.acked = 0
        self.nacked = 0

    @property
    def outstanding(self) -> int:
        """Pushes sent and not yet answered."""
        return self._outstanding

    @property
    def window(self) -> int:
        """How many pushes may be outstanding now."""
        return self._window

    @property
    def pushes(self) -> Mapping[str, int]:
        """Pushes sent so far, per worker URL (a read-only view)."""
        return MappingProxyType(self._pushes)

    async def start(self) -> None:
        """Start pulling and pushing (call on the loop that will run the relay)."""
        # trust_env=False: a proxy from the environment must not capture loopback.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), trust_env=False
        )
        for loop in (self._pull_loop(), self._lease_loop()):
            self._spawn(loop)

    async def stop(self) -> None:
        """Cancel pulls and pushes, nack every held message, and close the session."""
        held = list(self._held)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is None:
            return
        if held:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await self._modify_ack_deadline(held, 0)
        await self._session.close()
        self._session = None

    async def __aenter__(self) -> PushRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _emulator(self, action: str, body: Mapping[str, Any], timeout_s: float) -> Any:
        assert self._session is not None
        async with (
            asyncio.timeout(timeout_s),
            self._session.post(f"{self._base}:{action}", json=body) as response,
        ):
            response.raise_for_status()
            return await response.json()

    async def _modify_ack_deadline(self, ack_ids: list[str], seconds: int) -> None:
        body = {"ackIds": ack_ids, "ackDeadlineSeconds": seconds}
        await self._emulator("modifyAckDeadline", body, EMULATOR_TIMEOUT_S)

    async def _pull_loop(self) -> None:
        while True:
            while self._outstanding >= self._window:
                self._room.clear()
                await self._room.wait()
            room = min(self._window - self._outstanding, MAX_PULL)
            try:
                # A long poll: the emulator answers as soon as a message is there.
                answer = await self._emulator("pull", {"maxMessages": room}, PULL_TIMEOUT_S)
            except (aiohttp.ClientError, TimeoutError) as exc:
                logger.warning("pull from %s failed (%r); retrying in 1 s", self._base, exc)
                await asyncio.sleep(1.0)
                continue
            for received in answer.get("receivedMessages", []):
                # Count the push as outstanding before the next pull sizes itself.
                worker = self._pick_worker()
                self._held.add(received["ackId"])
                self._outstanding += 1
                self._in_flight[worker] += 1
                self._pushes[worker] += 1
                self._spawn(self._deliver(received, worker))

    def _pick_worker(self) -> str:
        count = len(self._workers)
        # min() keeps the first of equals, so starting after the last choice is round-robin.
        order = [(self._next_worker + i) % count for i in range(count)]
        chosen = min(order, key=lambda i: self._in_flight[self._workers[i]])
        self._next_worker = (chosen + 1) % count
        return self._workers[chosen]

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_every_s)
            if self._held:
                try:
                    await self._modify_ack_deadline(list(self._held), self._lease_s)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    logger.warning("extending %d leases failed: %r", len(self._held), exc)

    async def _deliver(self, received: Mapping[str, Any], worker: str) -> None:
        ack_id = str(received["ackId"])
        message = received["message"]
        message_id = str(message["messageId"])
        attempt = self._deliveries[message_id] = self._deliveries.get(message_id, 0) + 1
        try:
            try:
                ok = await self._push(worker, _envelope(message, self.subscription, attempt))
            finally:
                self._outstanding -= 1
                self._in_flight[worker] -= 1
                self._room.set()
            if ok:
                self.acked += 1
                self._window = min(self._window + 1, self._max_window)
                self._deliveries.pop(message_id, None)
                await self._emulator("acknowledge", {"ackIds": [ack_id]}, EMULATOR_TIMEOUT_S)
                return
            self.nacked += 1
            self._window = max(self._window // 2, 1)
            delay = min(self._min_backoff_s * 2 ** (attempt - 1), self._max_backoff_s)
            logger.info(
                "message %s nacked (attempt %d); retry in %.2f s", message_id, attempt, delay
            )
            await asyncio.sleep(delay)
            await self._modify_ack_deadline([ack_id], 0)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The lease lapses and the emulator redelivers: at least once, as Pub/Sub.
            logger.warning("emulator call for message %s failed: %r", message_id, exc)
        finally:
            self._held.discard(ack_id)

    async def _push(self, worker: str, envelope: Mapping[str, Any]) -> bool:
        assert self._session is not None
        try:
            async with (
                asyncio.timeout(self._ack_deadline_s),
                self._session.post(worker, json=envelope) as response,
            ):
                await response.read()
                return response.status in ACK_STATUSES
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.info("push to %s failed: %r", worker, exc)
            return False


def _envelope(message: Mapping[str, Any], subscription: str, attempt: int) -> dict[str, Any]:
    """The wrapped push body Pub/Sub sends, with both spellings of the id and time."""
    message_id, publish_time = message["messageId"], message.get("publishTime", "")
    return {
        "message": {
            "data": message.get("data", ""),
            "attributes": message.get("attributes", {}),
            "messageId": message_id,
            "message_id": message_id,
            "publishTime": publish_time,
            "publish_time": publish_time,
        },
        "subscription": subscription,
        "deliveryAttempt": attempt,
    }


async def _serve(relay: PushRelay) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with relay:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Relay until SIGTERM or SIGINT (the ``python -m`` entry point)."""
    parser = argparse.ArgumentParser(
        prog="python -m dispatcher_devtools.push_relay",
        description="Push a Pub/Sub emulator pull subscription to workers, like Pub/Sub push. "
        "The emulator is PUBSUB_EMULATOR_HOST.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--subscription", required=True, help="projects/P/subscriptions/S")
    parser.add_argument(
        "--worker", action="append", required=True, help="URL to push to (repeatable)"
    )
    for flag, kind, default, text in (
        ("--ack-deadline-s", float, 600.0, "push timeout, seconds"),
        ("--min-backoff-s", float, 10.0, "first retry delay, seconds"),
        ("--max-backoff-s", float, 600.0, "largest retry delay, seconds"),
        ("--initial-window", int, 16, "pushes outstanding at first"),
        ("--max-window", int, 1000, "most pushes outstanding"),
    ):
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument("--log-level", type=str.upper, default="INFO", choices=_LOG_LEVELS)
    args = parser.parse_args(argv)
    emulator_host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not emulator_host:
        parser.error("PUBSUB_EMULATOR_HOST must be set to the emulator's HOST:PORT")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        relay = PushRelay(
            emulator_host=emulator_host,
            subscription=args.subscription,
            workers=args.worker,
            ack_deadline_s=args.ack_deadline_s,
            min_backoff_s=args.min_backoff_s,
            max_backoff_s=args.max_backoff_s,
            initial_window=args.initial_window,
            max_window=args.max_window,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(
        f"push-relay: {args.subscription} at {emulator_host} -> {', '.join(args.worker)} "
        f"(window {args.initial_window}..{args.max_window})",
        file=sys.stderr,
        flush=True,
    )
    asyncio.run(_serve(relay))


if __name__ == "__main__":
    main()
