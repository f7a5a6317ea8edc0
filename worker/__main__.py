"""`python -m worker`: serve the Pub/Sub push endpoint on $HOST:$PORT."""

from __future__ import annotations

import os

from dispatcher import boot
from dispatcher.errors import ConfigError
from dispatcher.settings import Mode, Settings
from worker.app import create_app


def require_pubsub(settings: Settings) -> None:
    """Refuse to start without a shared store and a topic: no job could reach this process.

    Raises:
        ConfigError: naming PUBSUB_TOPIC.
    """
    if settings.mode is not Mode.PUBSUB:
        raise ConfigError(
            "PUBSUB_TOPIC",
            "the worker needs PUBSUB_TOPIC, FIRESTORE_COLLECTION and FIRESTORE_DATABASE",
        )


def main() -> None:
    """Read the environment once, then serve."""
    boot.run("worker", create_app, os.environ, check=require_pubsub)


if __name__ == "__main__":
    main()
