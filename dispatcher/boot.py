"""Process start-up shared by both services' entry points.

`boot.run` is all a `__main__` does: settings from the environment, the app built
from them (which reads files such as API_KEYS_FILE), fewer garbage collections, and
uvicorn. A bad setting ends the process before it listens, with one line naming the
variable and exit code 2, never a traceback.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from dispatcher import logs
from dispatcher.errors import ConfigError
from dispatcher.pricing import PriceTable
from dispatcher.settings import Settings

# The exit code of a refused configuration (as for a command-line usage error).
CONFIG_ERROR_EXIT = 2
# Young collections every 10,000 allocations instead of 700, and a full one considered
# after 50 x 100 of them instead of 10 x 10: see `tune_gc`.
GC_THRESHOLDS = (10_000, 50, 100)


def run(
    service: str,
    create_app: Callable[[Settings], Any],
    env: Mapping[str, str],
    *,
    check: Callable[[Settings], None] | None = None,
) -> None:
    """Start a service and serve it until it is stopped.

    Args:
        service: The service's name, the first word of an error line.
        create_app: Builds the ASGI app from the settings; may raise ConfigError.
        env: The environment, `os.environ` (read here once).
        check: What this service requires of the settings beyond their own checks;
            raises ConfigError.
    """
    settings = load_settings(env, service=service)
    try:
        if check is not None:
            check(settings)
        if settings.price_table_file:
            PriceTable.load(settings.price_table_file)  # refused here, not in the lifespan
        app = create_app(settings)
    except ConfigError as exc:
        refuse(service, exc)
    serve(app, settings)


def load_settings(env: Mapping[str, str], *, service: str) -> Settings:
    """Parse settings for a service's entry point; exit with one clear line on error."""
    try:
        return Settings.from_env(env)
    except ConfigError as exc:
        refuse(service, exc)


def refuse(service: str, exc: ConfigError) -> NoReturn:
    """End the process for a bad setting: one line on stderr, exit code 2."""
    print(f"{service}: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(CONFIG_ERROR_EXIT) from None


def tune_gc() -> None:
    """Fewer, smaller garbage collections for a service holding many live objects.

    With Python's defaults, full collections ran every few seconds under load, each
    scanning every live job record and every object made at import: pauses in which
    the region slots freed meanwhile sat idle (scenario 1 of BENCHMARKS.md: goodput
    0.90 -> 0.93, the periodic dips gone). Objects from start-up are moved out of the
    collector's sight (`gc.freeze`); cycles are still collected, later.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def serve(app: Any, settings: Settings) -> None:
    """Serve an ASGI app with uvicorn, JSON logs, and Cloud Run's shutdown grace.

    Cloud Run sends SIGTERM and kills the instance 10 s later; uvicorn stops
    accepting at once and gives in-flight requests 5 s to finish before cancelling
    them; cancelled runs then hand their jobs back (at most 3 s) before exit.
    """
    import uvicorn

    logs.configure(settings.log_level)
    tune_gc()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
