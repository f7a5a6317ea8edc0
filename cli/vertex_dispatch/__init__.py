"""Command-line client of vertex-dispatcher."""
