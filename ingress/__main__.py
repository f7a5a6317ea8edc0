"""`python -m ingress`: serve the ingress on $HOST:$PORT."""

from __future__ import annotations

import os

from dispatcher import boot
from ingress.app import create_app


def main() -> None:
    """Read the environment once, then serve."""
    boot.run("ingress", create_app, os.environ)


if __name__ == "__main__":
    main()
