"""A free local TCP port, for the tests' rendezvous and the vLLM server (ci/serving_check.py runs in
its own environment, without tests/ on its path, so the helper lives here)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now (the OS picks it); the caller binds it soon after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
