"""Validation at the door: every key the store derives from a request fits the store's limits, and every
reply a request implies fits one gRPC message, so an accepted request is always storable and answerable.

May import ``service.wire.convert``, ``service.server.errors`` and ``tiering`` (errors, keys).

The wire checks (``service/wire/convert.py``) bound each id to 256 UTF-8 bytes; the store derives
longer things from them:

* a session's record key is ``tenant ‖ 0x00 ‖ session id`` (``tiering/sessions.py``), up to 513 bytes,
  over LMDB's 511-byte key limit: :func:`session_id` refuses the combination up front, naming the field
  (INVALID_ARGUMENT), instead of letting the background commit fail for the whole write batch;
* namespace and block records are keyed by 16-byte digests (always fit; their values have no limit);
* a Put's reply names every key of its chain (twice), and a Resume of its session once: a chain longer
  than :func:`max_chain_blocks` could be stored but never answered, so :func:`check_chain` refuses it
  (RESOURCE_EXHAUSTED, ``QuotaFailure`` ``request:chain_blocks``) before anything is stored.
"""

from __future__ import annotations

from kvtier.service.server.errors import QuotaExceeded
from kvtier.service.wire import convert
from kvtier.tiering.errors import InvalidBlock

#: Longest key LMDB stores: its compiled-in MDB_MAXKEYSIZE (``lmdb.Environment.max_key_size()``).
STORE_KEY_BYTES = 511
#: Reply bytes per block of a chain, at most: a PutResponse names each key in ``keys`` and again in
#: ``stored`` (tag, length and 16-byte digest: 18 bytes each); a ResumeResponse once, plus its tier.
REPLY_BYTES_PER_BLOCK = 40
#: Reply bytes beyond the keys, at most: a namespace of three 256-byte ids and a layout, counters, framing.
REPLY_OVERHEAD = 4096


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def session_id(tenant: str, value: str, field: str = "session_id", *, required: bool = True) -> str | None:
    """The session id ``value`` of ``tenant``, checked as an id and as part of the session's record key.

    :param tenant: the tenant the request acts for (already resolved, ≤ 256 bytes).
    :param required: when False an empty ``value`` gives ``None`` (no session).
    :raises InvalidBlock: naming ``field`` when the id is empty (and required), too long, has a NUL, or
        makes a record key longer than :data:`STORE_KEY_BYTES` with the tenant.
    """
    sid = convert.check_id(value, field, required=required)
    if not sid:
        return None
    size = _utf8_len(tenant) + 1 + _utf8_len(sid)
    if size > STORE_KEY_BYTES:
        room = STORE_KEY_BYTES - 1 - _utf8_len(tenant)
        raise InvalidBlock(f"{field} of {_utf8_len(sid)} bytes with the tenant's {_utf8_len(tenant)} makes a "
                           f"{size}-byte session record key; the store's keys hold {STORE_KEY_BYTES} bytes, so this "
                           f"tenant's session ids may have at most {room} UTF-8 bytes", field=field)
    return sid


def max_chain_blocks(max_message_bytes: int) -> int:
    """Blocks of the longest chain whose replies fit a ``max_message_bytes`` message."""
    return max(0, (max_message_bytes - REPLY_OVERHEAD) // REPLY_BYTES_PER_BLOCK)


def check_chain(n_blocks: int, max_message_bytes: int, rpc: str) -> None:
    """:raises QuotaExceeded: if a chain of ``n_blocks`` blocks would not fit one reply (0 = no limit)."""
    most = max_chain_blocks(max_message_bytes) if max_message_bytes else 0
    if most and n_blocks > most:
        raise QuotaExceeded(f"{rpc}: a chain of {n_blocks} blocks would not fit one reply of at most "
                            f"{max_message_bytes} bytes (server.max_message_bytes); at most {most} blocks, so "
                            "use larger blocks or a shorter sequence", subject="request:chain_blocks")
