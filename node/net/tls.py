"""TLS for DICOM (PS3.15 "Basic TLS Secure Transport"): server and client contexts.

The listener presents ``node.tls_cert`` / ``node.tls_key``; with ``node.tls_ca`` it verifies client
certificates signed by that CA, and with ``tls_require_client_cert`` it refuses clients without one
(mutual TLS). Destinations with ``tls = true`` connect over TLS, verifying the server against
``tls_ca`` (or the system store) and presenting ``tls_cert``/``tls_key`` when given. TLS 1.2 minimum.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from node.errors import ConfigError

__all__ = ["client_context", "server_context"]


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from exc


def server_context(cert: Path, key: Path, *, ca: Path | None = None, require_client_cert: bool = False) -> ssl.SSLContext:
    """The listener's TLS context."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key)
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the clients' CA {ca}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(*, ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
                   verify: bool = True) -> ssl.SSLContext:
    """A client TLS context for a destination."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
        if ca is not None:
            try:
                ctx.load_verify_locations(cafile=str(ca))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load the CA {ca}: {exc}") from exc
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key)
    return ctx
