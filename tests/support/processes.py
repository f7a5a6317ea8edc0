"""Real service processes on loopback for integration tests and benchmarks.

``ServiceProcess`` runs ``python -m MODULE`` in its own process group with a small,
explicit environment, waits until its health endpoint answers, and ends it by process
group so nothing it spawned outlives the test. The lower-level helpers here (free ports,
the child environment, stopping a process group, waiting for readiness) are shared with
``tests.support.emulators``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx

__all__ = [
    "BIND_ATTEMPTS",
    "NO_NETWORK_ENV",
    "ServiceProcess",
    "base_child_env",
    "free_port",
    "group_alive",
    "is_bind_failure",
    "kill_process_group",
    "log_tail",
    "spawn_logged",
    "stop_process_group",
    "wait_until_ready",
]

NO_NETWORK_ENV: Final[Mapping[str, str]] = {
    # google-auth probes the GCE metadata server when it finds no credentials; point it
    # at a closed loopback port (discard) so no child ever reaches 169.254.169.254.
    "NO_GCE_CHECK": "True",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    # gcloud would otherwise check for updates, report usage and may stop to prompt.
    "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
    "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
    "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
    "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
}
"""Set in every child so neither google-auth nor gcloud reaches beyond loopback."""

PASSTHROUGH_ENV: Final = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "SYSTEMROOT",
    "PYTHONPATH",
    # The emulators are Java programs launched by gcloud; keep the user's choice of both.
    "JAVA_HOME",
    "CLOUDSDK_CONFIG",
    "CLOUDSDK_PYTHON",
    # Lets coverage.py follow into subprocesses when a run asks for it.
    "COVERAGE_PROCESS_START",
)
"""Variables copied from the parent; everything else a child needs is passed explicitly,
so a developer's shell (credentials, proxies, project settings) cannot leak into a test."""

LOG_TAIL_CHARS: Final = 4000
_POLL_INTERVAL_S: Final = 0.1
_PROBE_TIMEOUT_S: Final = 2.0
_BIND_FAILURE_MARKERS: Final = ("Address already in use", "BindException", "[Errno 98]")
BIND_ATTEMPTS: Final = 3
"""How many free ports a starter tries when the child cannot bind the one it was given."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is released before returning, so another process may take it first; the
    starters below retry on a bind failure for that reason.

    Returns:
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_child_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Build a child environment: a minimal copy of ours, ``overrides``, then no-network.

    Args:
        overrides: Variables for the child; they win over the copied basics but not over
            ``NO_NETWORK_ENV``, which every child must have.

    Returns:
        A fresh dict for ``subprocess.Popen(env=...)``.
    """
    env = {name: os.environ[name] for name in PASSTHROUGH_ENV if name in os.environ}
    env.update(overrides or {})
    env.update(NO_NETWORK_ENV)
    return env


def log_tail(log_path: Path, limit: int = LOG_TAIL_CHARS) -> str:
    """Return the last ``limit`` characters of a log file (empty if it does not exist).

    Args:
        log_path: The file a child writes its output to.
        limit: How many trailing characters to return.

    Returns:
        The tail of the log, decoded leniently.
    """
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return text[-limit:]


def is_bind_failure(log_path: Path) -> bool:
    """Tell whether a child's log shows it failed to bind its port.

    Args:
        log_path: The child's log.

    Returns:
        True when the tail of the log names an address-in-use error.
    """
    tail = log_tail(log_path)
    return any(marker in tail for marker in _BIND_FAILURE_MARKERS)


def group_alive(pgid: int) -> bool:
    """Tell whether any live (non-zombie) process remains in a process group.

    Zombies are ignored: an emulator's JVM is reparented to init when gcloud exits and
    sits as a zombie until init reaps it, which ``kill(-pgid, 0)`` would count as alive.

    Args:
        pgid: The process group id (the leader's pid, given ``start_new_session=True``).

    Returns:
        True while some member of the group is still running.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we were looking
            continue
        # Format: "pid (comm) state ppid pgrp ..."; comm may contain spaces and ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _group_still_ours(process: subprocess.Popen[bytes]) -> bool:
    # Once we have reaped the leader, its pid may be reused, but only after every member
    # of its group is gone (the kernel keeps a pid reserved while it names a group). A
    # live process under that pid therefore means our group is over; without this check
    # a late kill() could hit whatever new group took the number (pid_max may be 32768).
    if process.returncode is not None and Path(f"/proc/{process.pid}").exists():
        return False
    return group_alive(process.pid)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    # The group may already be gone; that is the outcome we wanted.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _wait_group_gone(process: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        process.poll()  # reap the leader so it does not linger as our zombie
        if not _group_still_ours(process):
            return True
        time.sleep(0.05)
    process.poll()
    return not _group_still_ours(process)


def stop_process_group(process: subprocess.Popen[bytes], *, timeout: float) -> int:
    """SIGTERM a process group, wait for all of it, then SIGKILL whatever remains.

    Waiting for the whole group, not just the leader, matters for the emulators: gcloud
    exits at once on SIGTERM while its JVM child is still shutting down.

    Args:
        process: A child started with ``start_new_session=True`` (so pgid == pid).
        timeout: Seconds to allow for a graceful exit before SIGKILL.

    Returns:
        The leader's exit code (negative for a signal, as in ``Popen.returncode``).
    """
    pgid = process.pid
    if _group_still_ours(process):
        _signal_group(pgid, signal.SIGTERM)
        if not _wait_group_gone(process, time.monotonic() + timeout):
            _signal_group(pgid, signal.SIGKILL)
            _wait_group_gone(process, time.monotonic() + 5.0)
    return process.wait()


def kill_process_group(process: subprocess.Popen[bytes]) -> int:
    """SIGKILL a process group at once and reap its leader.

    Args:
        process: A child started with ``start_new_session=True``.

    Returns:
        The leader's exit code.
    """
    if _group_still_ours(process):
        _signal_group(process.pid, signal.SIGKILL)
        _wait_group_gone(process, time.monotonic() + 5.0)
    return process.wait()


def wait_until_ready(
    url: str,
    process: subprocess.Popen[bytes],
    *,
    log_path: Path,
    timeout: float,
    is_ready: Callable[[httpx.Response], bool],
    what: str,
) -> None:
    """Poll ``GET url`` until ``is_ready`` accepts a response.

    Args:
        url: The readiness URL on loopback.
        process: The child being waited for; its early exit ends the wait.
        log_path: The child's log, quoted in the error.
        timeout: Seconds before giving up.
        is_ready: Decides whether a response means ready.
        what: A short name for error messages.

    Raises:
        RuntimeError: The child exited first or the timeout passed; the message holds
            the tail of the log. The caller owns stopping the child.
    """
    deadline = time.monotonic() + timeout
    last_problem = "no answer yet"
    # trust_env=False: an HTTP(S)_PROXY in the environment must not capture loopback.
    with httpx.Client(trust_env=False, timeout=_PROBE_TIMEOUT_S) as client:
        while True:
            exit_code = process.poll()
            if exit_code is not None:
                raise RuntimeError(
                    f"{what} exited with code {exit_code} before {url} was ready; "
                    f"log {log_path} ends with:\n{log_tail(log_path)}"
                )
            try:
                response = client.get(url)
            except httpx.TransportError as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
            else:
                if is_ready(response):
                    return
                last_problem = f"HTTP {response.status_code}: {response.text[:200]!r}"
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"{what} was not ready at {url} within {timeout:.0f} s "
                    f"(last: {last_problem}); log {log_path} ends with:\n{log_tail(log_path)}"
                )
            time.sleep(_POLL_INTERVAL_S)


def spawn_logged(
    command: Sequence[str], *, env: Mapping[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Start a command in its own process group with stdout and stderr appended to a log.

    Args:
        command: The argv to run.
        env: The complete child environment.
        log_path: The log file (appended to, so a restart keeps the earlier output).

    Returns:
        The running child.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        log_file.write(f"\n=== {time.strftime('%H:%M:%S')} $ {' '.join(command)}\n".encode())
        log_file.flush()
        # The child holds its own copy of the descriptor, so closing ours is safe.
        return subprocess.Popen(
            list(command),
            env=dict(env),
            stdin=subprocess.DEVNULL,  # nothing may stop to prompt
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own group: stopping it reaches every descendant
        )


@dataclass(eq=False)
class ServiceProcess:
    """A ``python -m MODULE`` child serving HTTP on 127.0.0.1, ended by process group.

    Attributes:
        module: The module run with ``python -m``.
        args: Extra command-line arguments after the module.
        port_flag: Whether ``--port PORT`` is appended to ``args``.
        env: The complete child environment (including ``HOST`` and ``PORT``).
        port: The loopback port it serves on.
        health_path: The path that answers 200 when the service is ready.
        ready_timeout: Seconds to wait for readiness on each (re)start.
        log_path: Where stdout and stderr go.
        process: The running child.
    """

    module: str
    args: tuple[str, ...]
    port_flag: bool
    env: Mapping[str, str]
    port: int
    health_path: str
    ready_timeout: float
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @classmethod
    def start(
        cls,
        module: str,
        env: Mapping[str, str],
        *,
        log_dir: Path,
        health_path: str = "/healthz",
        port: int | None = None,
        ready_timeout: float = 30.0,
        args: Sequence[str] = (),
        port_flag: bool = False,
    ) -> ServiceProcess:
        """Start ``sys.executable -m module *args`` and wait until it is healthy.

        The child gets a minimal copy of our environment, then ``env``, then
        ``HOST=127.0.0.1``, ``PORT``, ``PYTHONUNBUFFERED=1`` and ``NO_NETWORK_ENV``.

        Args:
            module: The module to run, e.g. ``"ingress"``.
            env: Service settings for the child.
            log_dir: Directory for the log file.
            health_path: Path polled until it answers 200.
            port: The port to serve on; a free one when None.
            ready_timeout: Seconds to wait for the health check.
            args: Extra command-line arguments after the module.
            port_flag: Also pass ``--port PORT``, for programs that take the port as a
                flag rather than from ``PORT`` (the Vertex stand-in).

        Returns:
            The healthy service.

        Raises:
            RuntimeError: It exited or was not healthy in time; includes the log tail.
        """
        # A port picked by free_port() can be taken by someone else before the child
        # binds it; only then is a fresh port worth another try.
        attempts = 1 if port is not None else BIND_ATTEMPTS
        for attempt in range(1, attempts + 1):
            chosen_port = port if port is not None else free_port()
            child_env = base_child_env(
                {
                    **env,
                    "HOST": "127.0.0.1",
                    "PORT": str(chosen_port),
                    "PYTHONUNBUFFERED": "1",  # the log must be current when we quote it
                }
            )
            service = cls(
                module=module,
                args=tuple(args),
                port_flag=port_flag,
                env=child_env,
                port=chosen_port,
                health_path=health_path,
                ready_timeout=ready_timeout,
                log_path=log_dir / f"{module}-{chosen_port}.log",
                process=_spawn_module(
                    module, _argv(args, port_flag, chosen_port), child_env, log_dir, chosen_port
                ),
            )
            try:
                service._wait_ready()
            except RuntimeError:
                service.kill()
                if attempt < attempts and is_bind_failure(service.log_path):
                    continue
                raise
            return service
        raise AssertionError("unreachable: the loop returns or raises")

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The child's pid, which is also its process group id."""
        return self.process.pid

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM the group, wait up to ``timeout`` s, then SIGKILL what remains.

        Args:
            timeout: Seconds allowed for a graceful shutdown.

        Returns:
            The exit code (negative when ended by a signal).
        """
        return stop_process_group(self.process, timeout=timeout)

    def kill(self) -> int:
        """SIGKILL the whole group at once and wait for it.

        Returns:
            The exit code (normally ``-9``).
        """
        return kill_process_group(self.process)

    def log_text(self) -> str:
        """Return everything the service has written so far (all starts)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def restart(self) -> None:
        """Stop the service if running, then start it again with the same env and port.

        Raises:
            RuntimeError: The new process exited or was not healthy in time.
        """
        if self.process.poll() is None:
            self.terminate()
        self.process = _spawn_module(
            self.module,
            _argv(self.args, self.port_flag, self.port),
            self.env,
            self.log_path.parent,
            self.port,
        )
        try:
            self._wait_ready()
        except RuntimeError:
            self.kill()
            raise

    def _wait_ready(self) -> None:
        wait_until_ready(
            f"{self.url}{self.health_path}",
            self.process,
            log_path=self.log_path,
            timeout=self.ready_timeout,
            is_ready=lambda response: response.status_code == 200,
            what=f"python -m {self.module}",
        )


def _argv(args: Sequence[str], port_flag: bool, port: int) -> list[str]:
    return [*args, "--port", str(port)] if port_flag else list(args)


def _spawn_module(
    module: str, args: Sequence[str], env: Mapping[str, str], log_dir: Path, port: int
) -> subprocess.Popen[bytes]:
    return spawn_logged(
        [sys.executable, "-m", module, *args],
        env=env,
        log_path=log_dir / f"{module}-{port}.log",
    )
