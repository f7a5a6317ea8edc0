"""The unit tier's rule, enforced: no test opens a socket or starts a process.

Every unit test runs under a guard that replaces the calls a socket or a process
starts with (`socket.socket.connect`/`connect_ex`/`bind`, `subprocess.Popen`,
`asyncio`'s subprocess creation, `os.system`) by one that records the call and
raises. The test then fails at teardown, even if the code under test caught the
error (aiohttp turns a refused connect into a transient 503, for instance).
`socket.socketpair` stays untouched: asyncio's event loop wakes itself through one.
Tests that need loopback HTTP or a real process belong in tests/integration/.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest

# urllib3 probes for IPv6 by binding ::1 when it is first imported (google-auth imports
# it lazily, on the first token check); imported here, before any guard is in place,
# so the probe is not taken for a test opening a socket.
import urllib3.util.connection  # noqa: F401


class UnitTierViolation(AssertionError):
    """A unit test opened a socket or started a process."""


def _forbid(name: str, seen: list[str]) -> Callable[..., NoReturn]:
    def forbidden(*args: Any, **kwargs: Any) -> NoReturn:
        seen.append(name)
        raise UnitTierViolation(
            f"unit tests start no process and open no socket: {name} was called "
            "(make the test in-process, or move it to tests/integration/)"
        )

    return forbidden


@pytest.fixture(autouse=True)
def no_sockets_or_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fails the test if it connects or binds a socket, or starts a subprocess."""
    seen: list[str] = []
    for owner, attribute in (
        (socket.socket, "connect"),
        (socket.socket, "connect_ex"),
        (socket.socket, "bind"),
        (subprocess, "Popen"),
        (os, "system"),
        (asyncio, "create_subprocess_exec"),
        (asyncio, "create_subprocess_shell"),
        (asyncio.subprocess, "create_subprocess_exec"),
        (asyncio.subprocess, "create_subprocess_shell"),
        # What both create_subprocess_* call, for code that imported them by name.
        (asyncio.base_events.BaseEventLoop, "subprocess_exec"),
        (asyncio.base_events.BaseEventLoop, "subprocess_shell"),
    ):
        name = f"{getattr(owner, '__name__', owner)}.{attribute}"
        monkeypatch.setattr(owner, attribute, _forbid(name, seen))
    yield
    if seen:
        pytest.fail(f"unit test broke the tier's rule: called {', '.join(seen)}", pytrace=False)
