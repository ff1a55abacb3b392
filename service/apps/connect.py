"""How the ``kvtier`` client commands reach a server: target, bearer token and TLS from the command
line. Imports grpc and the server's token-file reader only; never opens a connection itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from kvtier.service.server.auth import AUTH_METADATA, load_tokens_file


def read_token(path: Path) -> str:
    """The bearer token in ``path``: either a file holding just the token (surrounding whitespace
    ignored), or a kvtier tokens file (``*.json``/``*.toml`` with ``tokens``/``admin_tokens``, the
    server's ``security.tokens_file``), whose first admin token, else first token, is taken.

    :raises ValueError: if the file cannot be read or holds no token (the message never shows it).
    """
    if path.suffix in (".json", ".toml"):
        tokens, admins = load_tokens_file(path)
        token = next(iter(admins), None) or next(iter(tokens), None)
    else:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read token file {str(path)!r}: {type(exc).__name__}") from None
    if not token:
        raise ValueError(f"token file {str(path)!r} holds no token")
    return token


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Connection:
    """Where and how to call: ``target`` plus optional token and TLS files (PEM).

    :ivar tls_ca: CA bundle that signed the server's certificate; any TLS option switches TLS on
        (the system roots are used without it).
    :ivar tls_cert: client certificate, for a server that asks for mutual TLS (with ``tls_key``).
    """

    target: str
    token: str | None = None
    token_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def bearer(self) -> str | None:
        """The token given directly or read from ``token_file`` (``--token`` wins)."""
        if self.token:
            return self.token
        return read_token(self.token_file) if self.token_file is not None else None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """``authorization: Bearer …`` when a token was given, else nothing."""
        token = self.bearer()
        return ((AUTH_METADATA, f"Bearer {token}"),) if token else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials, or ``None`` for plaintext (no TLS option given).

        :raises ValueError: on an unreadable file, or only one of ``tls_cert``/``tls_key``.
        """
        if not (self.tls_ca or self.tls_cert or self.tls_key):
            return None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        return grpc.ssl_channel_credentials(root_certificates=_read(self.tls_ca, "--tls-ca"),
                                            private_key=_read(self.tls_key, "--tls-key"),
                                            certificate_chain=_read(self.tls_cert, "--tls-cert"))

    def aio_channel(self) -> grpc.aio.Channel:
        """A ``grpc.aio`` channel to ``target`` (TLS when asked); the caller closes it."""
        creds = self.credentials()
        return (grpc.aio.secure_channel(self.target, creds) if creds is not None
                else grpc.aio.insecure_channel(self.target))
