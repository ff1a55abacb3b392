"""Remote record layout: key names, the part-0 manifest, splitting a cold record into parts and joining them.

A block's record (the cold tier's format, see ``tiering/codec.py``) is stored under
``{prefix}{<key hex>}`` (part 0) and ``{prefix}{<key hex>}:<i>`` (parts 1…n-1): one hash tag, so every
part lives in one slot on one node and one MGET reads them all. Part 0 starts with a manifest:

=========  =====  ===============================================
field      bytes  meaning
=========  =====  ===============================================
magic      4      ``b"KVRM"``
version    1      :data:`MANIFEST_VERSION`
flags      1      reserved, 0
reserved   2      0
parts      4      number of parts (≥ 1)
length     8      bytes of the whole record
block key  16     the block key the record was written for
xxh3       8      XXH3-64 of the whole record
=========  =====  ===============================================

A missing part, a part of another write (torn), a record copied under another key or any flipped
byte fails :func:`join`: the block is a miss, never wrong bytes. Imports only the codec's checksum.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import xxhash

from ..codec import checksum
from ..keys import BlockKey

MANIFEST = struct.Struct("<4sBBHIQ16sQ")
MAGIC = b"KVRM"
MANIFEST_VERSION = 1
#: a record needs at most this many parts (a sanity bound on a damaged manifest)
MAX_PARTS = 1 << 16


def block_base(prefix: str, key: BlockKey) -> bytes:
    """Name of part 0 of ``key``: ``{prefix}{<key hex>}``."""
    return f"{prefix}{{{key.hex()}}}".encode()


def part_names(base: bytes, count: int) -> list[bytes]:
    """Names of parts ``0 … count-1`` of the block whose part 0 is ``base``."""
    return [base] + [base + b":%d" % i for i in range(1, count)]


def session_name(prefix: str, sid: bytes) -> bytes:
    """Key of a session: a 128-bit BLAKE2b of its (tenant, id) key, so no id appears in Redis."""
    return f"{prefix}s:{{{hashlib.blake2b(sid, digest_size=16).hexdigest()}}}".encode()


def parts_needed(record_bytes: int, part_bytes: int) -> int:
    """Parts a record of ``record_bytes`` takes (part 0 also holds the manifest)."""
    return max(1, -(-(record_bytes + MANIFEST.size) // part_bytes))


def split(key: BlockKey, record: bytes, part_bytes: int) -> list[bytes | memoryview]:
    """Values of the parts of ``record`` (part 0 = manifest ‖ first bytes). Parts ≥ 1 are views, not copies."""
    count = parts_needed(len(record), part_bytes)
    manifest = MANIFEST.pack(MAGIC, MANIFEST_VERSION, 0, 0, count, len(record), key.digest, checksum(record))
    first = part_bytes - MANIFEST.size
    view = memoryview(record)
    return [manifest + bytes(view[:first])] + [view[first + (i - 1) * part_bytes:first + i * part_bytes]
                                               for i in range(1, count)]


@dataclass(frozen=True, slots=True)
class Joined:
    """Outcome of :func:`join`: ``record`` when ``status == "ok"``; ``parts`` is the manifest's count."""

    status: str  # ok | missing | corrupt | more
    record: bytes | None = None
    parts: int = 0


def part_count(part0: bytes | None) -> int:
    """The part count a part 0 announces, or 0 when it is absent or no manifest."""
    if part0 is None or len(part0) < MANIFEST.size:
        return 0
    magic, version, _f, _r, count, _len, _key, _x = MANIFEST.unpack_from(part0)
    return count if magic == MAGIC and version == MANIFEST_VERSION and 0 < count <= MAX_PARTS else 0


def join(key: BlockKey, values: list[bytes | None]) -> Joined:
    """Check and concatenate the fetched parts of ``key`` (``values[i]`` = part i, ``None`` = absent).

    :returns: ``ok`` with the record; ``missing`` (no part 0, or a part absent); ``corrupt`` (bad manifest,
        other key, wrong length or checksum); ``more`` when fewer parts were fetched than the manifest has.
    Copies: one (the parts joined, or part 0's tail sliced).
    """
    part0 = values[0] if values else None
    if part0 is None:
        return Joined("missing")
    count = part_count(part0)
    if not count:
        return Joined("corrupt")
    _m, _v, _f, _r, _c, length, digest, xxh = MANIFEST.unpack_from(part0)
    if digest != key.digest:
        return Joined("corrupt", parts=count)
    if len(values) < count:
        return Joined("more", parts=count)
    if any(v is None for v in values[:count]):
        return Joined("missing", parts=count)
    if count == 1:
        record = part0[MANIFEST.size:]
    else:
        record = b"".join([memoryview(part0)[MANIFEST.size:], *values[1:count]])
    if len(record) != length or xxhash.xxh3_64_intdigest(record) != xxh:
        return Joined("corrupt", parts=count)
    return Joined("ok", record, count)
