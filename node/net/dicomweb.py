"""DICOMweb clients for a configured destination (dicomweb-client over a requests session).

Secrets (basic password, bearer token) are read from the environment or a file when the client is made
and never logged; TLS verification and the timeout come from the destination.
"""

from __future__ import annotations

import requests
from dicomweb_client import DICOMwebClient

from node.config import Destination

__all__ = ["dicomweb_client"]


def dicomweb_client(dest: Destination, *, timeout: float | None = None) -> DICOMwebClient:
    """A DICOMweb client for ``dest`` (``kind = "dicomweb"``: ``url`` is the DICOMweb root).

    Raises:
        ConfigError: the destination's secret cannot be read.
    """
    session = requests.Session()
    session.verify = dest.verify_tls
    secret = dest.secret()
    if dest.auth == "basic":
        session.auth = (dest.username or "", secret or "")
    elif dest.auth == "bearer":
        session.headers["Authorization"] = f"Bearer {secret}"
    return DICOMwebClient(str(dest.url).rstrip("/"), session=session, timeout=timeout or dest.timeout)
