"""Namespaces and block keys: the chained prefix hash that names every block.
Imports numpy, ``errors``, ``layout`` and ``lossy_spec`` (codec names) only.

The hash is part of kvtier's public contract (clients in any language compute keys themselves), so
it is specified here exactly and pinned by test vectors in ``tests/tiering/test_keys.py`` and the README:

* ``H(x) = BLAKE2b(x, digest_size=16)`` (RFC 7693, no key, no salt, no personalisation).
* A string field is encoded as its UTF-8 length, a 4-byte little-endian unsigned integer, then its
  UTF-8 bytes. The namespace root is
  ``key_0 = H(b"kvtier-ns-v1" ‖ str(tenant) ‖ str(model) ‖ str(revision) ‖ str(layout.describe()))``.
  A namespace with a shard (one rank's heads of a sharded model) appends ``str(shard.describe())``,
  i.e. ``str("shard:{rank}/{world_size}:{h0},{h1},…")`` with the head indices in decimal, in block
  order, joined by commas; a namespace without a shard hashes exactly the bytes above.
* A namespace with a lossy cold codec (``cold_codec``, opt-in: ``"fp8_e4m3"``, ``"int8"``, ``"int4"``,
  optionally with a group size, ``"int4/g32"``) appends one more field, after the shard's if any:
  ``str("codec:" + cold_codec)``. A namespace with the lossless codec (``cold_codec == ""``) hashes
  exactly the bytes above, so exact and lossy caches of one model coexist and never share a key.
* Token ids are encoded as 4-byte little-endian unsigned integers (0 ≤ id < 2**32).
* ``key_i = H(key_{i-1} ‖ tokens of block i)``, where block i covers tokens
  ``[i*block_tokens, (i+1)*block_tokens)``; the last block may be shorter (partial).

A partial block's key never becomes the parent of another key: when the sequence grows, the full
block gets its own key from the same parent, so partial blocks cannot poison later keys. Two tenants,
two model revisions, two layouts or two shards never share a key because the root differs.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidBlock
from .layout import BlockLayout
from .lossy_spec import LOSSY_DTYPES, parse_spec

KEY_BYTES = 16
MAX_ID_BYTES = 256
_NS_MAGIC = b"kvtier-ns-v1"


def _h(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=KEY_BYTES).digest()


def _field(value: str, name: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > MAX_ID_BYTES:
        raise InvalidBlock(f"{name} is {len(raw)} bytes long; at most {MAX_ID_BYTES}", field=name)
    return struct.pack("<I", len(raw)) + raw


@dataclass(frozen=True, slots=True)
class BlockKey:
    """The 16-byte content address of one block. A value type: frozen, slotted, hashable."""

    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != KEY_BYTES:
            raise InvalidBlock(f"a block key is exactly {KEY_BYTES} bytes", field="keys")

    def hex(self) -> str:
        return self.digest.hex()

    @classmethod
    def from_hex(cls, text: str) -> "BlockKey":
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise InvalidBlock(f"not a hex block key: {text[:40]!r}", field="keys") from None

    def __repr__(self) -> str:
        return f"BlockKey({self.digest.hex()[:12]}…)"


@dataclass(frozen=True, slots=True)
class Shard:
    """One rank's part of a sharded (tensor-parallel) model's KV: which ranks exist and which heads it holds.

    :ivar rank: this rank, ``0 <= rank < world_size``.
    :ivar world_size: how many ranks the model is split over (at least 1).
    :ivar heads: the model's KV head indices this rank's blocks hold, in the order of the blocks' head
        axis (as many as the layout's ``kv_heads``; distinct). Ranks that replicate a head list it too.
    :raises InvalidBlock: on a rank outside the world, an empty or repeated head list, or a description
        longer than 256 UTF-8 bytes.
    """

    rank: int
    world_size: int
    heads: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        if not 0 <= self.rank < self.world_size or self.world_size >= 2**32:
            raise InvalidBlock(f"shard rank {self.rank} is not in a world of {self.world_size}",
                               field="namespace.shard.rank")
        if not self.heads or len(set(self.heads)) != len(self.heads) or min(self.heads) < 0 \
                or max(self.heads) >= 2**32:
            raise InvalidBlock("shard heads must be distinct head indices in 0..2**32-1, at least one",
                               field="namespace.shard.heads")
        _field(self.describe(), "namespace.shard")

    def describe(self) -> str:
        """The shard's key text: ``"shard:{rank}/{world_size}:{h0},{h1},…"``, e.g. ``"shard:1/2:2,3"``."""
        return f"shard:{self.rank}/{self.world_size}:{','.join(map(str, self.heads))}"


@dataclass(frozen=True, slots=True)
class Namespace:
    """Where keys live: one tenant, one model at one weights revision, one block layout, and for a
    sharded model one rank's shard (``None``: the whole model), and the cold tier's codec for its blocks
    (``cold_codec``: ``""`` the server's lossless codec; else a lossy codec, see ``tiering/lossy``).

    Changing any field changes every key (automatic invalidation); two tenants never share a key.

    :raises InvalidBlock: on an empty model, a field over 256 UTF-8 bytes, a shard whose head count
        is not the layout's ``kv_heads``, or an unknown ``cold_codec`` (or a lossy one for a layout whose
        dtype is not a float type).
    """

    tenant: str
    model: str
    revision: str
    layout: BlockLayout
    shard: Shard | None = None
    cold_codec: str = ""

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidBlock("namespace.model must name the model", field="namespace.model")
        if self.shard is not None and len(self.shard.heads) != self.layout.kv_heads:
            raise InvalidBlock(f"the shard holds {len(self.shard.heads)} heads but the layout has "
                               f"{self.layout.kv_heads} kv_heads", field="namespace.shard.heads")
        if self.cold_codec:
            try:
                parse_spec(self.cold_codec)
            except ValueError as exc:
                raise InvalidBlock(str(exc), field="namespace.cold_codec") from None
            if self.layout.dtype not in LOSSY_DTYPES:
                raise InvalidBlock(f"a lossy cold codec needs float KV, not {self.layout.dtype}",
                                   field="namespace.cold_codec")
        self.root()  # validates field lengths

    def root(self) -> BlockKey:
        """``key_0``: the hash of the namespace, parent of the first block."""
        text = (_NS_MAGIC + _field(self.tenant, "namespace.tenant") + _field(self.model, "namespace.model")
                + _field(self.revision, "namespace.revision") + _field(self.layout.describe(), "layout"))
        if self.shard is not None:
            text += _field(self.shard.describe(), "namespace.shard")
        if self.cold_codec:
            text += _field("codec:" + self.cold_codec, "namespace.cold_codec")
        return BlockKey(_h(text))

    @property
    def lossy(self) -> bool:
        """Whether the cold tier stores this namespace's blocks with a lossy codec."""
        return bool(self.cold_codec)

    @property
    def ns_id(self) -> bytes:
        """Stable 16-byte id of the namespace (its root key), used to index blocks by namespace."""
        return self.root().digest


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise InvalidBlock("token ids must be a flat sequence", field="token_ids")
    if arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0 or int(arr.max()) >= 2**32):
        raise InvalidBlock("token ids must be integers in 0..2**32-1", field="token_ids")
    return arr.astype("<u4", copy=False).tobytes()


def chain_keys(namespace: Namespace, tokens: Sequence[int] | np.ndarray) -> list[BlockKey]:
    """Keys of the blocks covering ``tokens`` under ``namespace``: one per block, the last maybe partial.

    :returns: ``ceil(len(tokens) / block_tokens)`` keys, in prefix order.
    :raises InvalidBlock: on token ids outside 0..2**32-1.
    """
    return list(iter_keys(namespace, tokens))


def iter_keys(namespace: Namespace, tokens: Sequence[int] | np.ndarray) -> Iterator[BlockKey]:
    """Lazy form of :func:`chain_keys` (stops early when the caller does)."""
    raw = _token_bytes(tokens)
    step = namespace.layout.block_tokens * 4
    parent = namespace.root().digest
    for start in range(0, len(raw), step):
        parent = _h(parent + raw[start:start + step])
        yield BlockKey(parent)
