"""Sessions: a conversation's ordered chain of block keys, persisted beside the blocks.
Imports ``errors``, ``keys``, ``layout`` only.

A session is identified by (tenant, session id). Its record holds the namespace, the block keys in
prefix order, the token count, created/last-used times, a priority and an optional TTL. Records are
JSON (small: a 2,048-token session of 16-token blocks is ~4.5 KB) and are written in the same LMDB
transactions as the blocks they name, after them, so a session never names a block that was never
committed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .errors import InvalidBlock
from .keys import MAX_ID_BYTES, BlockKey, Namespace, Shard
from .layout import BlockLayout


def session_id_key(tenant: str, session_id: str) -> bytes:
    """The LMDB key of a session: ``tenant ‖ 0x00 ‖ session id`` (UTF-8).

    :raises InvalidBlock: on an empty or over-long id, or a NUL in the tenant.
    """
    if not session_id:
        raise InvalidBlock("session_id must not be empty", field="session_id")
    sid = session_id.encode("utf-8")
    if len(sid) > MAX_ID_BYTES:
        raise InvalidBlock(f"session_id is {len(sid)} bytes long; at most {MAX_ID_BYTES}", field="session_id")
    if "\0" in tenant:
        raise InvalidBlock("tenant must not contain NUL", field="namespace.tenant")
    return tenant.encode("utf-8") + b"\0" + sid


@dataclass(slots=True)
class Session:
    """One conversation's cached state. Times are wall-clock seconds since the epoch."""

    tenant: str
    session_id: str
    namespace: Namespace
    keys: list[BlockKey]
    tokens: int
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    priority: int = 0
    ttl_s: float | None = None

    @property
    def id_key(self) -> bytes:
        return session_id_key(self.tenant, self.session_id)

    def expired(self, now: float | None = None) -> bool:
        """True once ``ttl_s`` seconds have passed since the session was last used."""
        if not self.ttl_s:
            return False
        return (time.time() if now is None else now) > self.last_used + self.ttl_s

    def to_json(self) -> bytes:
        ns = self.namespace
        return json.dumps({
            "v": 1, "tenant": self.tenant, "session_id": self.session_id,
            "ns": namespace_to_dict(ns), "keys": [k.hex() for k in self.keys], "tokens": self.tokens,
            "created": self.created, "last_used": self.last_used, "priority": self.priority, "ttl_s": self.ttl_s,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Session":
        d = json.loads(raw)
        return cls(d["tenant"], d["session_id"], namespace_from_dict(d["ns"]),
                   [BlockKey.from_hex(k) for k in d["keys"]], d["tokens"], d["created"], d["last_used"],
                   d["priority"], d["ttl_s"])


def namespace_to_dict(ns: Namespace) -> dict:
    """A namespace as the JSON of session and namespace records (an unsharded one exactly as before shards)."""
    lay = ns.layout
    d = {"tenant": ns.tenant, "model": ns.model, "revision": ns.revision,
         "layout": {"dtype": lay.dtype, "layers": lay.layers, "kv_heads": lay.kv_heads,
                    "head_dim": lay.head_dim, "block_tokens": lay.block_tokens}}
    if ns.shard is not None:  # absent for unsharded namespaces: their records stay byte-identical
        d["shard"] = {"rank": ns.shard.rank, "world_size": ns.shard.world_size, "heads": list(ns.shard.heads)}
    if ns.cold_codec:  # absent for lossless namespaces, likewise
        d["cold_codec"] = ns.cold_codec
    return d


def namespace_from_dict(d: dict) -> Namespace:
    """Inverse of :func:`namespace_to_dict`."""
    sh = d.get("shard")
    shard = Shard(sh["rank"], sh["world_size"], tuple(sh["heads"])) if sh is not None else None
    return Namespace(d["tenant"], d["model"], d["revision"], BlockLayout(**d["layout"]), shard,
                     d.get("cold_codec", ""))
