"""Development tools of vertex-dispatcher (never shipped in the service images)."""
