"""Integration fixtures: the official emulators (one pair per session) and stack factories."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.emulators import (
    Emulator,
    emulators_unavailable_reason,
    reset_firestore,
    running_emulators,
)
from tests.support.processes import ServiceProcess
from tests.support.stack import (
    PROJECT,
    Stack,
    create_push_subscription,
    service_env,
    start_standin,
    unique,
)

MODES = ("memory", "firestore", "pubsub")


@dataclass
class Emulators:
    """The two running emulators."""

    firestore: Emulator
    pubsub: Emulator


@pytest.fixture(scope="session")
def emulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulators]:
    """Both emulators on free loopback ports for the whole session; skipped when absent."""
    reason = emulators_unavailable_reason()
    if reason is not None:
        pytest.skip(f"emulators unavailable: {reason}")
    with running_emulators(PROJECT, tmp_path_factory.mktemp("emulators")) as (firestore, pubsub):
        yield Emulators(firestore=firestore, pubsub=pubsub)


@pytest.fixture
def firestore_env(emulators: Emulators) -> dict[str, str]:
    """FIRESTORE_EMULATOR_HOST for a test, on a freshly cleared database."""
    reset_firestore(emulators.firestore.host_port, PROJECT)
    return emulators.firestore.env()


def mode_env(mode: str, emulators: Emulators | None) -> dict[str, str]:
    """The variables that select `mode`, with fresh names so tests never share state."""
    if mode == "memory":
        return {}
    assert emulators is not None
    env = {
        **emulators.firestore.env(),
        "FIRESTORE_COLLECTION": unique("jobs"),
        "FIRESTORE_DATABASE": "(default)",
    }
    if mode == "pubsub":
        env.update(emulators.pubsub.env())
        env["PUBSUB_TOPIC"] = unique("topic")
    return env


@pytest.fixture
def stack_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Starts a whole stack in a mode: stand-in, worker (mode 3), ingresses; stops it after.

    Args of the factory: mode, standin (its config doc), ingresses (how many),
    ack_deadline (mode 3 subscription), and any setting as a keyword (env name).
    """
    stacks: list[Stack] = []

    def make(
        mode: str = "memory",
        *,
        standin: dict[str, Any] | None = None,
        ingresses: int = 1,
        ack_deadline: int = 30,
        **overrides: str,
    ) -> Stack:
        emulators = request.getfixturevalue("emulators") if mode != "memory" else None
        if emulators is not None:
            reset_firestore(emulators.firestore.host_port, PROJECT)
        stand_in = start_standin(tmp_path, standin)
        stack = Stack(standin=stand_in, ingresses=[])
        stacks.append(stack)
        env = service_env(stand_in, **mode_env(mode, emulators), **overrides)
        stack.env = env
        if mode == "pubsub":
            assert emulators is not None
            stack.worker = ServiceProcess.start("worker", env, log_dir=tmp_path)
            # The interactive topic (when asked for) gets its own push, as deploy.sh does.
            for topic in filter(None, (env["PUBSUB_TOPIC"], env.get("INTERACTIVE_TOPIC"))):
                create_push_subscription(
                    emulators.pubsub.env(),
                    topic=topic,
                    subscription=unique("push"),
                    endpoint=f"{stack.worker.url}/",
                    ack_deadline=ack_deadline,
                )
        for _ in range(ingresses):
            stack.ingresses.append(ServiceProcess.start("ingress", env, log_dir=tmp_path))
        return stack

    yield make
    for stack in stacks:
        stack.close()
