"""`python -m ingress`: serve the ingress on $HOST:$PORT."""

from __future__ import annotations

import os

from dispatcher.http import load_settings, serve
from ingress.app import create_app


def main() -> None:
    """Read the environment once, then serve."""
    settings = load_settings(os.environ, service="ingress")
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
