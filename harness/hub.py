"""Whether the Hugging Face hub can be reached (used by model loading and by the data checks)."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_offline() -> bool:
    """True when the hub must not (HF_HUB_OFFLINE) or cannot (its host does not resolve) be reached."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False  # the proxy resolves names, not us
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:  # without DNS transformers retries for ~45 s before failing; this fails at once
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False
