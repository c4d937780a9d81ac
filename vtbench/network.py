"""Is the network there? Fast answers, so that a machine without one fails in seconds, not minutes.

huggingface_hub and ``datasets`` retry a dead network for 25-50 s per request before they fall back
to their local caches or fail; vtbench asks these first and goes straight to the cache.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

HUB_PROBE_TIMEOUT_S = 3.0


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set now (huggingface_hub reads it only once, at import)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag in {"1", "true", "yes", "on"} or constants.is_offline_mode()


def host_reachable(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to ``url``'s host be opened within ``timeout`` seconds (DNS included)?

    huggingface_hub retries a dead network for ~25 s per file; this probe makes the no-network
    case fail in at most ``timeout``. Behind a proxy the probe is skipped (the proxy decides).
    """
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    reached = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            reached.set()
        except OSError:
            pass

    # A thread, because getaddrinfo has no timeout of its own; a failed lookup ends it at once.
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    prober.join(timeout)
    return reached.is_set()
