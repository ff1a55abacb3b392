"""Unit: one block's or session's commands for its node, and the builders of read/write units.

A unit is routed by its ``name`` (part 0 or the session key: one hash tag, one node); after a run it
holds its replies or the kind of error it met. Imports the remote record and session layouts only.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..keys import BlockKey
from . import records, sessions
from .config import RemoteConfig


@dataclass(slots=True)
class Unit:
    """One block or session write or read, routed to one node: ``commands`` run in order there."""

    ident: object
    name: bytes
    commands: list[tuple]
    nbytes: int  # bytes the unit moves (sent, or expected back), which sizes its timeout
    kind: str | None = None  # error kind, None when every reply was fine
    replies: list | None = None
    replicas: int | None = None
    redirect: tuple[str, int] | None = None  # the node a MOVED or ASK reply named
    asking: bool = False  # sent to an importing node: each command preceded by ASKING


def block_write(config: RemoteConfig, key: BlockKey, record: bytes) -> Unit:
    """SET of every part with the record TTL: parts 1…n-1 first, the manifest (part 0) last, so a reader
    racing the write sees a torn block (a miss), never a manifest ahead of its parts."""
    base = records.block_base(config.key_prefix, key)
    parts = records.split(key, record, config.max_part_bytes)
    names = records.part_names(base, len(parts))
    ttl = config.ttl_ms
    order = list(range(1, len(parts))) + [0]
    return Unit(key, base, [("SET", names[i], parts[i], "PX", ttl) for i in order], len(record))


def block_read(config: RemoteConfig, key: BlockKey, parts: int) -> Unit:
    """One MGET of parts ``0 … parts-1`` and a PEXPIRE of each (the TTL refresh of a hit; a no-op on absent keys)."""
    names = records.part_names(records.block_base(config.key_prefix, key), parts)
    ttl = config.ttl_ms
    return Unit(key, names[0], [("MGET", *names), *[("PEXPIRE", n, ttl) for n in names]],
                parts * config.max_part_bytes)


def session_write(config: RemoteConfig, sid: bytes, record: bytes, version: int) -> Unit:
    """The last-writer-wins script storing a session record at ``version``."""
    value = sessions.pack(sid, record, version)
    name = records.session_name(config.key_prefix, sid)
    cmd = ("EVAL", sessions.PUT_SCRIPT, 1, name, sessions.version_text(version), value, config.ttl_ms)
    return Unit(("session", sid), name, [cmd], len(value))
