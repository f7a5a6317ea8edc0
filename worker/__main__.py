"""`python -m worker`: serve the Pub/Sub push endpoint on $HOST:$PORT."""

from __future__ import annotations

import os
import sys

from dispatcher.http import load_settings, serve
from dispatcher.settings import Mode
from worker.app import create_app


def main() -> None:
    """Read the environment once, then serve."""
    settings = load_settings(os.environ, service="worker")
    if settings.mode is not Mode.PUBSUB:
        # Without a shared store and a topic, no job could ever reach this process.
        print(
            "worker: configuration error: PUBSUB_TOPIC: the worker needs PUBSUB_TOPIC, "
            "FIRESTORE_COLLECTION and FIRESTORE_DATABASE",
            file=sys.stderr,
        )
        raise SystemExit(2)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
