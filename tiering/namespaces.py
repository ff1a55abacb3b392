"""NamespaceRegistry: the namespaces a store has seen, by id, loaded from the durable tier at open.

Imports ``keys`` and ``sessions`` (the JSON form). Thread-safe (its own lock).
"""

from __future__ import annotations

import json
import threading

from .keys import Namespace
from .sessions import namespace_from_dict, namespace_to_dict


class NamespaceRegistry:
    """Namespaces by id. :param stored: ns_id → JSON dict, as the durable tier returns them."""

    def __init__(self, stored: dict[bytes, dict] | None = None) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[bytes, Namespace] = {k: namespace_from_dict(v) for k, v in (stored or {}).items()}

    def get(self, ns_id: bytes) -> Namespace | None:
        with self._lock:
            return self._by_id.get(ns_id)

    def register(self, ns: Namespace) -> dict[bytes, bytes]:
        """Remember ``ns``; returns the record to persist (``{ns_id: json}``) the first time, else ``{}``."""
        with self._lock:
            if ns.ns_id in self._by_id:
                return {}
            self._by_id[ns.ns_id] = ns
        return {ns.ns_id: json.dumps(namespace_to_dict(ns)).encode()}

    def ids(self, tenant: str, model: str | None = None, revision: str | None = None) -> set[bytes]:
        """Ids of ``tenant``'s namespaces (of ``model`` at ``revision`` when given)."""
        with self._lock:
            return {i for i, ns in self._by_id.items() if ns.tenant == tenant
                    and (model is None or ns.model == model) and (revision is None or ns.revision == revision)}

    def owned_by(self, ns_ids: list[bytes | None], tenant: str) -> list[bool]:
        """For each id, whether it names a namespace of ``tenant`` (``None``: no)."""
        with self._lock:
            return [i is not None and (ns := self._by_id.get(i)) is not None and ns.tenant == tenant
                    for i in ns_ids]
