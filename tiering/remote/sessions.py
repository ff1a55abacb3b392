"""Remote session values: ``version (20 ASCII digits) ‖ XXH3-64(sid ‖ record) (8 bytes LE) ‖ record``.

Last writer wins by version (a timestamp in ns): :data:`PUT_SCRIPT` runs atomically on the session's
one key and replaces the value only when the stored version is older, so two nodes writing at once
leave exactly one of the two records, whole (the newer; on an exact tie, the one written first).
Versions are compared as fixed-width decimal strings because Lua numbers (doubles) cannot hold
nanosecond timestamps exactly. Imports only xxhash.
"""

from __future__ import annotations

import xxhash

VERSION_DIGITS = 20
HEAD = VERSION_DIGITS + 8

#: KEYS[1] = session key; ARGV = version string, whole value, TTL in ms. Returns 1 if stored, 0 if stale.
PUT_SCRIPT = """
local cur = redis.call('GETRANGE', KEYS[1], 0, 19)
if cur ~= '' and cur >= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


def version_text(version: int) -> bytes:
    if not 0 <= version < 10**VERSION_DIGITS:
        raise ValueError("a session version is a non-negative integer below 10**20")
    return b"%020d" % version


def pack(sid: bytes, record: bytes, version: int) -> bytes:
    """The stored value of ``record`` at ``version`` for session ``sid``."""
    return version_text(version) + xxhash.xxh3_64_intdigest(sid + record).to_bytes(8, "little") + record


def unpack(sid: bytes, value: bytes | None) -> tuple[bytes, int] | None:
    """``(record, version)`` of a stored value, or ``None`` if absent, damaged or another session's."""
    if value is None or len(value) < HEAD or not value[:VERSION_DIGITS].isdigit():
        return None
    record = value[HEAD:]
    if xxhash.xxh3_64_intdigest(sid + record).to_bytes(8, "little") != value[VERSION_DIGITS:HEAD]:
        return None
    return record, int(value[:VERSION_DIGITS])
