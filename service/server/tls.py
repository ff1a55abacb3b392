"""Transport security of the listener: TLS, mutual TLS, and the refusal to listen openly.

* ``security.tls_cert`` + ``security.tls_key`` (PEM): the server speaks TLS only; a plaintext
  client fails its handshake.
* ``security.tls_client_ca`` as well: mutual TLS; a client must present a certificate signed by
  that CA, else its handshake fails. (The certificate authenticates the connection; the tenant still
  comes from the bearer token.)
* No tokens configured: the server is unauthenticated. It then listens only on a loopback address,
  unless ``security.allow_insecure_remote`` is true, and logs one line saying so.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None


def server_credentials(security) -> grpc.ServerCredentials | None:
    """TLS credentials for the listener, or ``None`` for plaintext.

    :param security: the ``security`` settings section.
    :raises ValueError: if only one of cert/key is set, a client CA is set without them, or a file
        cannot be read.
    """
    cert, key, ca = security.tls_cert, security.tls_key, security.tls_client_ca
    if (cert is None) != (key is None):
        raise ValueError("security.tls_cert and security.tls_key must be set together")
    if cert is None:
        if ca is not None:
            raise ValueError("security.tls_client_ca (mutual TLS) needs security.tls_cert and security.tls_key")
        return None
    pair = (_read(key, "security.tls_key"), _read(cert, "security.tls_cert"))
    client_ca = _read(ca, "security.tls_client_ca")
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, ``localhost`` or a ``unix:`` socket) only reaches this machine."""
    if host.startswith("unix:"):
        return True
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or 0.0.0.0/:: (every interface): assume reachable from outside


def check_exposure(host: str, *, authenticated: bool, allow_insecure_remote: bool) -> None:
    """Refuse to listen unauthenticated on a non-loopback address, unless explicitly allowed.

    :raises ValueError: naming the settings that fix it.
    """
    if authenticated:
        return
    if is_loopback(host):
        log.info("no security.tokens configured: serving UNAUTHENTICATED on loopback %s", host)
    elif allow_insecure_remote:
        log.warning("no security.tokens configured: serving UNAUTHENTICATED on %s "
                    "(security.allow_insecure_remote=true)", host)
    else:
        raise ValueError(f"refusing to listen on {host} without authentication: configure security.tokens "
                         "(or security.tokens_file), listen on 127.0.0.1, or set "
                         "security.allow_insecure_remote=true")
