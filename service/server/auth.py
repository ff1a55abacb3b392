"""Who is calling: bearer tokens to tenants, and the admin check.

May import ``service.server.errors`` only.

A caller sends ``authorization: Bearer <token>`` metadata with every RPC. A token of
``security.tokens`` acts for its tenant only: the tenant becomes part of every key's namespace, and a
request naming another tenant is refused (``convert.tenant_of``). A token of
``security.admin_tokens`` may call the admin RPCs (``Stats``) and acts for whichever tenant a request
names (``default`` when it names none). With no tokens configured, authentication is off and every
request acts for the tenant it names.

Tokens are compared in constant time (``hmac.compare_digest`` over SHA-256 digests, against every
configured token), and no token ever reaches a log line, an error message or a span.

``kvtier serve`` re-reads ``security.tokens_file`` on SIGHUP (:func:`reload_tokens`): the whole token
table is swapped at once, so a removed token stops working and an added one starts, without a
restart; a file that does not load keeps the old table (one WARN line).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kvtier.service.server.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

#: Metadata key gRPC carries the credentials in (lower case, as HTTP/2 headers are).
AUTH_METADATA = "authorization"
_SCHEME = "bearer "


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    :ivar tenant: the tenant every request of this caller acts for; ``None`` for an admin token,
        which acts for the tenant a request names.
    :ivar admin: may call admin RPCs.
    """

    tenant: str | None
    admin: bool = False


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def load_tokens_file(path: str | Path) -> tuple[dict[str, str], list[str]]:
    """``(tokens, admin_tokens)`` from a JSON (``*.json``) or TOML file of the form
    ``{"tokens": {"<token>": "<tenant>"}, "admin_tokens": ["<token>"]}`` (both keys optional).

    :raises ValueError: if the file cannot be read or parsed, or has the wrong shape; the message
        names the file, never its content.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot load security.tokens_file {str(path)!r}: {type(exc).__name__}") from None
    tokens, admins = data.get("tokens", {}), data.get("admin_tokens", [])
    if not (isinstance(tokens, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in tokens.items())
            and isinstance(admins, list) and all(isinstance(t, str) for t in admins)):
        raise ValueError(f"security.tokens_file {str(path)!r}: want a 'tokens' table of token = tenant "
                         "strings and an 'admin_tokens' list of strings")
    return dict(tokens), list(admins)


def _entries(tokens: Mapping[str, str] | None, admin_tokens: Iterable[str]) -> tuple[tuple[bytes, Principal], ...]:
    entries: list[tuple[bytes, Principal]] = []
    for token, tenant in (tokens or {}).items():
        if not token or not tenant or "\0" in tenant:
            raise ValueError("security.tokens: tokens and tenants must be non-empty (and tenants free of NUL)")
        entries.append((_digest(token), Principal(tenant)))
    for token in admin_tokens:
        if not token:
            raise ValueError("security.admin_tokens: tokens must be non-empty")
        entries.append((_digest(token), Principal(None, admin=True)))
    return tuple(entries)


class Authenticator:
    """Maps bearer tokens to :class:`Principal` s. Thread-safe: the token table is an immutable tuple,
    replaced whole by :meth:`replace` (one assignment), so a call sees the old table or the new one.

    :param tokens: token → tenant.
    :param admin_tokens: tokens allowed to call admin RPCs.
    :raises ValueError: on an empty token or tenant, or a tenant with a NUL.
    """

    def __init__(self, tokens: Mapping[str, str] | None = None, admin_tokens: Iterable[str] = ()) -> None:
        self._entries = _entries(tokens, admin_tokens)

    def replace(self, tokens: Mapping[str, str] | None, admin_tokens: Iterable[str] = ()) -> None:
        """Swap in a new token table (calls in flight finish under the one they started with).

        :raises ValueError: as the constructor; the old table is kept then.
        """
        self._entries = _entries(tokens, admin_tokens)

    def __repr__(self) -> str:  # never the tokens
        return f"Authenticator({len(self._entries)} tokens)"

    @property
    def enabled(self) -> bool:
        """Whether any token is configured (else every call is anonymous and allowed)."""
        return bool(self._entries)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal | None:
        """The caller named by the ``authorization`` metadata.

        :returns: ``None`` when authentication is off.
        :raises Unauthenticated: if it is on and the metadata has no bearer token, or an unknown one.
        """
        if not self._entries:
            return None
        presented = None
        for key, value in metadata or ():
            if key == AUTH_METADATA:
                value = value.decode("latin-1") if isinstance(value, bytes) else value
                if value[:len(_SCHEME)].lower() == _SCHEME:
                    presented = value[len(_SCHEME):].strip()
                break
        if not presented:
            raise Unauthenticated("missing bearer token: send 'authorization: Bearer <token>' metadata")
        digest = _digest(presented)
        found = None
        for known, principal in self._entries:  # no early exit: time does not depend on which matched
            if hmac.compare_digest(known, digest) and found is None:
                found = principal
        if found is None:
            raise Unauthenticated("unknown bearer token")
        return found

    def still_admits(self, principal: Principal | None) -> None:
        """Check that some configured token still acts as ``principal`` (a caller authenticated once, e.g.
        the owner of a same-host arena socket, after a SIGHUP reload).

        :raises Unauthenticated: if no token names that principal any more.
        """
        if principal is None and not self._entries:
            return
        if not any(p == principal for _, p in self._entries):
            raise Unauthenticated("the token this arena was opened with is no longer configured; open a new one")


def tenant_of(principal: Principal | None) -> str | None:
    """The tenant ``principal`` is bound to (``authenticated`` argument of ``convert.tenant_of``)."""
    return None if principal is None else principal.tenant


def require_admin(principal: Principal | None, rpc: str) -> None:
    """Allow admin RPCs to admin tokens (and to everyone when authentication is off).

    :raises PermissionDenied: for a tenant token.
    """
    if principal is not None and not principal.admin:
        raise PermissionDenied(f"{rpc} needs an admin token")


def _configured_tokens(security) -> tuple[dict[str, str], list[str]]:
    tokens, admins = dict(security.tokens), list(security.admin_tokens)
    if security.tokens_file is not None:
        more, more_admins = load_tokens_file(security.tokens_file)
        tokens.update(more)
        admins += more_admins
    return tokens, admins


def authenticator_from_settings(security) -> Authenticator:
    """The :class:`Authenticator` of the ``security`` settings (``tokens`` and ``admin_tokens``
    merged with ``tokens_file``).

    :raises ValueError: see :func:`load_tokens_file` and :class:`Authenticator`.
    """
    return Authenticator(*_configured_tokens(security))


def reload_tokens(auth: Authenticator, security) -> bool:
    """Re-read ``security.tokens_file`` (merged with ``tokens``/``admin_tokens`` as at start) into
    ``auth`` (the SIGHUP handler). A file that does not load, or that would leave no token at all while
    ``auth`` has some (authentication switched off by a bad edit), keeps the old tokens and logs one
    WARN line, never a token.

    :returns: whether the tokens were replaced.
    """
    if security.tokens_file is None:
        log.warning("SIGHUP: no security.tokens_file to reload; tokens unchanged")
        return False
    try:
        tokens, admins = _configured_tokens(security)
        if auth.enabled and not (tokens or admins):
            raise ValueError(f"security.tokens_file {str(security.tokens_file)!r} holds no token, which would "
                             "switch authentication off")
        auth.replace(tokens, admins)
    except ValueError as exc:
        log.warning("SIGHUP: tokens not reloaded, the old ones stay in force: %s", exc)
        return False
    log.info("SIGHUP: reloaded %d tenant and %d admin tokens from security.tokens_file", len(tokens), len(admins))
    return True
