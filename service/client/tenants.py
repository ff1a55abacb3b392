"""Which tenant a client's session call acts for: :class:`SessionTenants`.

Imports the light tiering vocabulary only. Shared by the gRPC clients and the in-process one, so that
a session put under ``Namespace("acme", …)`` is found again by ``get(session_id=…)``, ``resume`` and
``delete_session`` without naming the tenant twice.
"""

from __future__ import annotations

import threading

from kvtier.tiering.keys import Namespace

#: Sessions whose tenant a client remembers (the oldest is forgotten first past this).
REMEMBERED_SESSIONS = 65536


class SessionTenants:
    """The tenant of each session this client put, and the rule that picks a call's tenant.

    Thread-safe (a lock held only for dictionary updates, never across a call).

    :param default: the client's own tenant (``""`` for a gRPC client: the server then takes the
        tenant of the caller's credentials, or ``"default"`` without authentication).
    """

    def __init__(self, default: str) -> None:
        self.default = default
        self._sessions: dict[str, str] = {}
        self._lock = threading.Lock()

    def resolve(self, session_id: str | None, tenant: str | None, namespace: Namespace | None) -> str:
        """The tenant of a call: ``tenant`` if given (not empty), else ``namespace``'s, else the tenant of
        the namespace this client last put ``session_id`` under, else :attr:`default`."""
        if tenant:
            return tenant
        if namespace is not None:
            return namespace.tenant
        if session_id is not None:
            with self._lock:
                found = self._sessions.get(session_id)
            if found is not None:
                return found
        return self.default

    def remember(self, session_id: str | None, namespace: Namespace) -> None:
        """Note that ``session_id`` was just put under ``namespace`` (nothing for ``None``)."""
        if not session_id:
            return
        with self._lock:
            self._sessions.pop(session_id, None)
            self._sessions[session_id] = namespace.tenant
            if len(self._sessions) > REMEMBERED_SESSIONS:
                del self._sessions[next(iter(self._sessions))]

    def forget(self, session_id: str, tenant: str) -> None:
        """Drop ``session_id`` after it was deleted for ``tenant``."""
        with self._lock:
            if self._sessions.get(session_id) == tenant:
                del self._sessions[session_id]
