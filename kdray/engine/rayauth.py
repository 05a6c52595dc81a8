"""Ray's token authentication for a process that connects to a cluster by its address.

Ray 2.59+ starts a local cluster with token authentication on (a token in ``~/.ray/auth_token``), and
``ray start`` turns it on when a token exists. A process that connects by an explicit address (``ray.init(
address=...)``, ``RAY_ADDRESS``, the job API's HTTP client) does not turn it on by itself (Ray does that
only for a cluster it finds, ``address="auto"``), so against a cluster with Ray's defaults it is refused:
``InvalidAuthToken``, or HTTP 401 from the dashboard. kdray connects by address everywhere, so it turns
token authentication on itself whenever a token is at hand; a token sent to a cluster without
authentication is ignored, so this is safe. A ``RAY_AUTH_MODE`` the user set is left as it is.
"""

from __future__ import annotations

import os


def token_auth_if_token_available() -> None:
    """Turn Ray's token authentication on in this process (and the processes it starts) when a token
    is at hand (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and the user set no mode."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
