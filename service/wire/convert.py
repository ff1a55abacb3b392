"""Conversions between protobuf messages and tiering values: the only place where the two meet.

Every ``*_from_proto`` validates as it converts and raises :class:`tiering.errors.InvalidBlock` with
the offending field's path, so the error boundary can answer INVALID_ARGUMENT with a precise
``BadRequest`` field violation.
"""

from __future__ import annotations

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.tiering.errors import InvalidBlock
from kvtier.tiering.keys import KEY_BYTES, MAX_ID_BYTES, BlockKey, Namespace, Shard
from kvtier.tiering.layout import BlockLayout
from kvtier.tiering.results import resumed_prefix

TIER_TO_PROTO = {"hot": pb.TIER_HOT, "warm": pb.TIER_WARM, "cold": pb.TIER_COLD, "remote": pb.TIER_REMOTE,
                 None: pb.TIER_UNSPECIFIED, "": pb.TIER_UNSPECIFIED}
TIER_FROM_PROTO = {pb.TIER_HOT: "hot", pb.TIER_WARM: "warm", pb.TIER_COLD: "cold", pb.TIER_REMOTE: "remote",
                   pb.TIER_UNSPECIFIED: None}

#: Tenant used when the server does not authenticate callers and the request names none.
DEFAULT_TENANT = "default"


def layout_to_proto(layout: BlockLayout) -> pb.BlockLayout:
    return pb.BlockLayout(dtype=layout.dtype, layers=layout.layers, kv_heads=layout.kv_heads,
                          head_dim=layout.head_dim, block_tokens=layout.block_tokens)


def layout_from_proto(msg: pb.BlockLayout, field: str = "layout") -> BlockLayout:
    try:
        return BlockLayout(msg.dtype, msg.layers, msg.kv_heads, msg.head_dim, msg.block_tokens)
    except InvalidBlock as exc:
        sub = (exc.field or "layout").removeprefix("layout")
        raise InvalidBlock(str(exc), field=f"{field}{sub}") from None


def check_id(value: str, field: str, *, required: bool = True) -> str:
    """Validate a free-text id (tenant, session, model): non-empty when required, ≤ 256 UTF-8 bytes."""
    if required and not value:
        raise InvalidBlock(f"{field} is required", field=field)
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise InvalidBlock(f"{field} is longer than {MAX_ID_BYTES} UTF-8 bytes", field=field)
    if "\0" in value:
        raise InvalidBlock(f"{field} must not contain NUL characters", field=field)
    return value


def tenant_of(requested: str, authenticated: str | None = None) -> str:
    """The tenant a request acts for: the authenticated one if any, else the requested or default.

    :raises InvalidBlock: if the request names another tenant than its credentials.
    """
    if authenticated is not None:
        if requested and requested != authenticated:
            raise InvalidBlock("tenant does not match the caller's credentials", field="tenant")
        return authenticated
    return check_id(requested, "tenant", required=False) or DEFAULT_TENANT


def namespace_from_proto(msg: pb.Namespace, field: str = "namespace", *, tenant: str | None = None) -> Namespace:
    """A validated Namespace; ``tenant`` (already resolved by :func:`tenant_of`) overrides the field."""
    if not msg.ByteSize():
        raise InvalidBlock(f"{field} is required", field=field)
    check_id(msg.model, f"{field}.model")
    check_id(msg.revision, f"{field}.revision", required=False)
    if not msg.HasField("layout"):
        raise InvalidBlock(f"{field}.layout is required", field=f"{field}.layout")
    layout = layout_from_proto(msg.layout, f"{field}.layout")
    shard = shard_from_proto(msg.shard, layout, f"{field}.shard") if msg.HasField("shard") else None
    try:
        return Namespace(tenant if tenant is not None else tenant_of(msg.tenant), msg.model, msg.revision, layout,
                         shard, msg.cold_codec)
    except InvalidBlock as exc:
        if exc.field != "namespace.cold_codec":
            raise
        raise InvalidBlock(str(exc), field=f"{field}.cold_codec") from None


def shard_from_proto(msg: pb.Shard, layout: BlockLayout, field: str = "namespace.shard") -> Shard:
    """A validated Shard whose head count matches ``layout`` (errors name ``field``'s sub-field)."""
    if len(msg.heads) != layout.kv_heads:
        raise InvalidBlock(f"{field}.heads lists {len(msg.heads)} heads but the layout has {layout.kv_heads} "
                           "kv_heads", field=f"{field}.heads")
    try:
        return Shard(msg.rank, msg.world_size, tuple(msg.heads))
    except InvalidBlock as exc:
        sub = (exc.field or "namespace.shard").removeprefix("namespace.shard")
        raise InvalidBlock(str(exc), field=f"{field}{sub}") from None


def namespace_to_proto(ns: Namespace) -> pb.Namespace:
    msg = pb.Namespace(model=ns.model, revision=ns.revision, layout=layout_to_proto(ns.layout), tenant=ns.tenant)
    if ns.shard is not None:
        msg.shard.CopyFrom(pb.Shard(rank=ns.shard.rank, world_size=ns.shard.world_size, heads=ns.shard.heads))
    msg.cold_codec = ns.cold_codec
    return msg


def keys_from_proto(raw: list[bytes] | tuple[bytes, ...], field: str = "keys") -> list[BlockKey]:
    """Validated keys: each exactly 16 bytes, no duplicates (a chain never repeats a key)."""
    keys = []
    seen = set()
    for i, k in enumerate(raw):
        if len(k) != KEY_BYTES:
            raise InvalidBlock(f"{field}[{i}] is {len(k)} bytes; keys are {KEY_BYTES} bytes", field=f"{field}[{i}]")
        if k in seen:
            raise InvalidBlock(f"{field}[{i}] repeats an earlier key", field=f"{field}[{i}]")
        seen.add(k)
        keys.append(BlockKey(bytes(k)))
    return keys


def keys_to_proto(keys) -> list[bytes]:
    return [k.digest for k in keys]


# -- responses (server side) ------------------------------------------------------------------------
def tiers_to_proto(tiers) -> list[int]:
    """Tier names (``hot``/``warm``/``cold``, ``None`` = gone) as ``Tier`` enum values."""
    return [TIER_TO_PROTO[t] for t in tiers]


def lookup_to_proto(chain, found, n_tokens: int | None) -> pb.LookupResponse:
    """A :class:`tiering.results.LookupResult` over the request's key ``chain`` as a ``LookupResponse``
    (tokens capped at the request's ``n_tokens``, split into local and remote-only)."""
    cached = found.tokens if n_tokens is None else min(found.tokens, n_tokens)
    remote = min(found.remote_tokens, cached)
    return pb.LookupResponse(cached_tokens=cached, cached_blocks=found.blocks, tiers=tiers_to_proto(found.tiers),
                             keys=keys_to_proto(chain), local_tokens=cached - remote, remote_tokens=remote,
                             lossy=found.lossy, lossy_blocks=sum(found.lossy))


def put_result_to_proto(result) -> pb.PutResponse:
    """A :class:`tiering.store.PutResult` as a ``PutResponse``."""
    return pb.PutResponse(keys=keys_to_proto(result.keys), stored=keys_to_proto(result.stored),
                          skipped_present=keys_to_proto(result.skipped_present),
                          skipped_not_admitted=keys_to_proto(result.skipped_not_admitted))


def block_header_to_proto(index: int, key: BlockKey, block, tier: str) -> pb.BlockHeader:
    """The ``BlockHeader`` announcing ``block`` (a :class:`tiering.tier.Block`) at chain position ``index``."""
    return pb.BlockHeader(index=index, key=key.digest, dtype=block.dtype, shape=list(block.shape),
                          tier=TIER_TO_PROTO[tier], checksum=block.checksum, size=block.nbytes, lossy=block.lossy)


def resume_to_proto(session, tiers, lossy: list[bool] | None = None, *, exact_only: bool = False
                    ) -> pb.ResumeResponse:
    """A session (:class:`tiering.sessions.Session`) and its blocks' tiers as a ``ResumeResponse``;
    ``lossy[i]``: block ``i`` would be served approximate (with ``exact_only`` the cached prefix ends
    before the first such block): :func:`tiering.results.resumed_prefix`."""
    cached, lossy = resumed_prefix(tiers, lossy or [], exact_only)
    return pb.ResumeResponse(namespace=namespace_to_proto(session.namespace), tokens=session.tokens,
                             keys=keys_to_proto(session.keys), tiers=tiers_to_proto(tiers), cached_blocks=cached,
                             priority=session.priority, ttl_seconds=session.ttl_s or 0.0, lossy=lossy,
                             lossy_blocks=sum(lossy[:cached]))


_TIER_COUNTERS = ("hits", "misses", "promotions", "demotions", "evictions", "checksum_failures")


def stats_to_proto(snap: dict, version: str) -> pb.StatsResponse:
    """``TieredStore.snapshot()`` as a ``StatsResponse``: tiers top first, integer counters in ``counters``
    (the bytes written per record codec as ``codec_raw_bytes_<codec>`` and ``codec_stored_bytes_<codec>``).
    The shared (remote) tier also reports its state, errors and dropped writes (``snap["shared"]``)."""
    tiers = []
    shared = snap.get("shared") or {}
    for name, usage in snap["usage"].items():
        counters = snap["tiers"].get(name, {})
        extra = {}
        if name == shared.get("tier"):
            extra = dict(state=shared["state"], errors=sum(shared["errors"].values()), dropped_writes=shared["dropped"])
        tiers.append(pb.TierStats(tier=TIER_TO_PROTO[name], blocks=usage["blocks"], used_bytes=usage["used_bytes"],
                                  capacity_bytes=usage["capacity_bytes"],
                                  **{c: counters.get(c, 0) for c in _TIER_COUNTERS}, **extra))
    skip = {"tiers", "usage", "bytes_moved", "shared", "pinned_blocks", "write_queue_depth", "pending_writes",
            "compression_ratio"}
    counters = {k: int(v) for k, v in snap.items() if k not in skip and isinstance(v, int) and v >= 0}
    for per_codec in ("codec_raw_bytes", "codec_stored_bytes"):
        counters.update({f"{per_codec}_{codec}": int(n) for codec, n in snap.get(per_codec, {}).items()})
    return pb.StatsResponse(tiers=tiers, pinned_blocks=snap["pinned_blocks"],
                            write_queue_depth=snap["write_queue_depth"], pending_writes=snap["pending_writes"],
                            compression_ratio=snap["compression_ratio"] or 0.0,
                            bytes_moved={k: int(v) for k, v in snap["bytes_moved"].items()},
                            counters=counters, version=version)
