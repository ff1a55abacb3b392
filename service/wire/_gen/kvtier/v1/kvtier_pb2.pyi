from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_HOT: _ClassVar[Tier]
    TIER_WARM: _ClassVar[Tier]
    TIER_COLD: _ClassVar[Tier]
    TIER_REMOTE: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
TIER_HOT: Tier
TIER_WARM: Tier
TIER_COLD: Tier
TIER_REMOTE: Tier

class BlockLayout(_message.Message):
    __slots__ = ("dtype", "layers", "kv_heads", "head_dim", "block_tokens")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    def __init__(self, dtype: _Optional[str] = ..., layers: _Optional[int] = ..., kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_tokens: _Optional[int] = ...) -> None: ...

class Shard(_message.Message):
    __slots__ = ("rank", "world_size", "heads")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    world_size: int
    heads: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, rank: _Optional[int] = ..., world_size: _Optional[int] = ..., heads: _Optional[_Iterable[int]] = ...) -> None: ...

class Namespace(_message.Message):
    __slots__ = ("model", "revision", "layout", "tenant", "shard", "cold_codec")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    COLD_CODEC_FIELD_NUMBER: _ClassVar[int]
    model: str
    revision: str
    layout: BlockLayout
    tenant: str
    shard: Shard
    cold_codec: str
    def __init__(self, model: _Optional[str] = ..., revision: _Optional[str] = ..., layout: _Optional[_Union[BlockLayout, _Mapping]] = ..., tenant: _Optional[str] = ..., shard: _Optional[_Union[Shard, _Mapping]] = ..., cold_codec: _Optional[str] = ...) -> None: ...

class KeyList(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("namespace", "token_ids", "keys", "accept_lossy")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_LOSSY_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    accept_lossy: bool
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., keys: _Optional[_Iterable[bytes]] = ..., accept_lossy: _Optional[bool] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("cached_tokens", "cached_blocks", "tiers", "keys", "local_tokens", "remote_tokens", "lossy", "lossy_blocks")
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSSY_FIELD_NUMBER: _ClassVar[int]
    LOSSY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    cached_tokens: int
    cached_blocks: int
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    local_tokens: int
    remote_tokens: int
    lossy: _containers.RepeatedScalarFieldContainer[bool]
    lossy_blocks: int
    def __init__(self, cached_tokens: _Optional[int] = ..., cached_blocks: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[Tier, str]]] = ..., keys: _Optional[_Iterable[bytes]] = ..., local_tokens: _Optional[int] = ..., remote_tokens: _Optional[int] = ..., lossy: _Optional[_Iterable[bool]] = ..., lossy_blocks: _Optional[int] = ...) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("namespace", "session_id", "token_ids", "durable", "first_block", "block_count", "priority", "ttl_seconds")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    BLOCK_COUNT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    session_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    durable: bool
    first_block: int
    block_count: int
    priority: int
    ttl_seconds: float
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., session_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., durable: _Optional[bool] = ..., first_block: _Optional[int] = ..., block_count: _Optional[int] = ..., priority: _Optional[int] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("block_index", "offset", "data", "checksum")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    offset: int
    data: bytes
    checksum: int
    def __init__(self, block_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("header", "chunk", "first_chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    chunk: BlockChunk
    first_chunk: BlockChunk
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., chunk: _Optional[_Union[BlockChunk, _Mapping]] = ..., first_chunk: _Optional[_Union[BlockChunk, _Mapping]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("keys", "stored", "skipped_present", "skipped_not_admitted", "accepts_first_chunk")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_PRESENT_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_NOT_ADMITTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_FIRST_CHUNK_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    stored: _containers.RepeatedScalarFieldContainer[bytes]
    skipped_present: _containers.RepeatedScalarFieldContainer[bytes]
    skipped_not_admitted: _containers.RepeatedScalarFieldContainer[bytes]
    accepts_first_chunk: bool
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., stored: _Optional[_Iterable[bytes]] = ..., skipped_present: _Optional[_Iterable[bytes]] = ..., skipped_not_admitted: _Optional[_Iterable[bytes]] = ..., accepts_first_chunk: _Optional[bool] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("keys", "session_id", "tenant", "start_block", "max_blocks", "accept_lossy", "inline_data")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_LOSSY_FIELD_NUMBER: _ClassVar[int]
    INLINE_DATA_FIELD_NUMBER: _ClassVar[int]
    keys: KeyList
    session_id: str
    tenant: str
    start_block: int
    max_blocks: int
    accept_lossy: bool
    inline_data: bool
    def __init__(self, keys: _Optional[_Union[KeyList, _Mapping]] = ..., session_id: _Optional[str] = ..., tenant: _Optional[str] = ..., start_block: _Optional[int] = ..., max_blocks: _Optional[int] = ..., accept_lossy: _Optional[bool] = ..., inline_data: _Optional[bool] = ...) -> None: ...

class BlockHeader(_message.Message):
    __slots__ = ("index", "key", "dtype", "shape", "tier", "checksum", "size", "lossy")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LOSSY_FIELD_NUMBER: _ClassVar[int]
    index: int
    key: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    tier: Tier
    checksum: int
    size: int
    lossy: bool
    def __init__(self, index: _Optional[int] = ..., key: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., tier: _Optional[_Union[Tier, str]] = ..., checksum: _Optional[int] = ..., size: _Optional[int] = ..., lossy: _Optional[bool] = ...) -> None: ...

class GetEnd(_message.Message):
    __slots__ = ("blocks_sent", "complete", "stopped_at", "reason", "tokens")
    BLOCKS_SENT_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    STOPPED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    blocks_sent: int
    complete: bool
    stopped_at: int
    reason: str
    tokens: int
    def __init__(self, blocks_sent: _Optional[int] = ..., complete: _Optional[bool] = ..., stopped_at: _Optional[int] = ..., reason: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("header", "data", "end", "header_data", "last")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    HEADER_DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    header: BlockHeader
    data: bytes
    end: GetEnd
    header_data: bytes
    last: GetEnd
    def __init__(self, header: _Optional[_Union[BlockHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., end: _Optional[_Union[GetEnd, _Mapping]] = ..., header_data: _Optional[bytes] = ..., last: _Optional[_Union[GetEnd, _Mapping]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("tenant", "session_id", "prefetch_budget_ms", "accept_lossy")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_LOSSY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    prefetch_budget_ms: int
    accept_lossy: bool
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ..., prefetch_budget_ms: _Optional[int] = ..., accept_lossy: _Optional[bool] = ...) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("namespace", "tokens", "keys", "tiers", "cached_blocks", "priority", "ttl_seconds", "lossy", "lossy_blocks")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOSSY_FIELD_NUMBER: _ClassVar[int]
    LOSSY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    tokens: int
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    cached_blocks: int
    priority: int
    ttl_seconds: float
    lossy: _containers.RepeatedScalarFieldContainer[bool]
    lossy_blocks: int
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tokens: _Optional[int] = ..., keys: _Optional[_Iterable[bytes]] = ..., tiers: _Optional[_Iterable[_Union[Tier, str]]] = ..., cached_blocks: _Optional[int] = ..., priority: _Optional[int] = ..., ttl_seconds: _Optional[float] = ..., lossy: _Optional[_Iterable[bool]] = ..., lossy_blocks: _Optional[int] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("keys", "session_id", "tenant", "budget_ms", "wait")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    keys: KeyList
    session_id: str
    tenant: str
    budget_ms: int
    wait: bool
    def __init__(self, keys: _Optional[_Union[KeyList, _Mapping]] = ..., session_id: _Optional[str] = ..., tenant: _Optional[str] = ..., budget_ms: _Optional[int] = ..., wait: _Optional[bool] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("blocks", "ready_blocks")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    READY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    ready_blocks: int
    def __init__(self, blocks: _Optional[int] = ..., ready_blocks: _Optional[int] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("tenant", "session_id", "erase_blocks")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ERASE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    session_id: str
    erase_blocks: bool
    def __init__(self, tenant: _Optional[str] = ..., session_id: _Optional[str] = ..., erase_blocks: _Optional[bool] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ("blocks_erased",)
    BLOCKS_ERASED_FIELD_NUMBER: _ClassVar[int]
    blocks_erased: int
    def __init__(self, blocks_erased: _Optional[int] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("namespace", "model")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    model: ModelRef
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("tenant", "model", "revision")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    revision: str
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., revision: _Optional[str] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("blocks_deleted",)
    BLOCKS_DELETED_FIELD_NUMBER: _ClassVar[int]
    blocks_deleted: int
    def __init__(self, blocks_deleted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "blocks", "used_bytes", "capacity_bytes", "hits", "misses", "promotions", "demotions", "evictions", "checksum_failures", "state", "errors", "dropped_writes")
    TIER_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_WRITES_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    blocks: int
    used_bytes: int
    capacity_bytes: int
    hits: int
    misses: int
    promotions: int
    demotions: int
    evictions: int
    checksum_failures: int
    state: str
    errors: int
    dropped_writes: int
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., blocks: _Optional[int] = ..., used_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., promotions: _Optional[int] = ..., demotions: _Optional[int] = ..., evictions: _Optional[int] = ..., checksum_failures: _Optional[int] = ..., state: _Optional[str] = ..., errors: _Optional[int] = ..., dropped_writes: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("tiers", "pinned_blocks", "write_queue_depth", "pending_writes", "compression_ratio", "bytes_moved", "counters", "version")
    class BytesMovedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TIERS_FIELD_NUMBER: _ClassVar[int]
    PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WRITE_QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    PENDING_WRITES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    pinned_blocks: int
    write_queue_depth: int
    pending_writes: int
    compression_ratio: float
    bytes_moved: _containers.ScalarMap[str, int]
    counters: _containers.ScalarMap[str, int]
    version: str
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., pinned_blocks: _Optional[int] = ..., write_queue_depth: _Optional[int] = ..., pending_writes: _Optional[int] = ..., compression_ratio: _Optional[float] = ..., bytes_moved: _Optional[_Mapping[str, int]] = ..., counters: _Optional[_Mapping[str, int]] = ..., version: _Optional[str] = ...) -> None: ...

class OpenArenaRequest(_message.Message):
    __slots__ = ("size_bytes",)
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    def __init__(self, size_bytes: _Optional[int] = ...) -> None: ...

class OpenArenaResponse(_message.Message):
    __slots__ = ("arena_id", "ticket", "socket_path", "size_bytes", "alignment", "control", "prefault")
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    PREFAULT_FIELD_NUMBER: _ClassVar[int]
    arena_id: str
    ticket: bytes
    socket_path: str
    size_bytes: int
    alignment: int
    control: bool
    prefault: bool
    def __init__(self, arena_id: _Optional[str] = ..., ticket: _Optional[bytes] = ..., socket_path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., alignment: _Optional[int] = ..., control: _Optional[bool] = ..., prefault: _Optional[bool] = ...) -> None: ...

class ShmSlot(_message.Message):
    __slots__ = ("offset", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class PutShmRequest(_message.Message):
    __slots__ = ("arena_id", "header", "upload_id", "slots", "checksums", "more")
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    arena_id: str
    header: PutHeader
    upload_id: str
    slots: _containers.RepeatedCompositeFieldContainer[ShmSlot]
    checksums: _containers.RepeatedScalarFieldContainer[int]
    more: bool
    def __init__(self, arena_id: _Optional[str] = ..., header: _Optional[_Union[PutHeader, _Mapping]] = ..., upload_id: _Optional[str] = ..., slots: _Optional[_Iterable[_Union[ShmSlot, _Mapping]]] = ..., checksums: _Optional[_Iterable[int]] = ..., more: _Optional[bool] = ...) -> None: ...

class PutShmResponse(_message.Message):
    __slots__ = ("upload_id", "done")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    done: PutResponse
    def __init__(self, upload_id: _Optional[str] = ..., done: _Optional[_Union[PutResponse, _Mapping]] = ...) -> None: ...

class GetShmRequest(_message.Message):
    __slots__ = ("arena_id", "request", "region", "destination")
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    arena_id: str
    request: GetRequest
    region: ShmSlot
    destination: ShmKVDestination
    def __init__(self, arena_id: _Optional[str] = ..., request: _Optional[_Union[GetRequest, _Mapping]] = ..., region: _Optional[_Union[ShmSlot, _Mapping]] = ..., destination: _Optional[_Union[ShmKVDestination, _Mapping]] = ...) -> None: ...

class ShmKVDestination(_message.Message):
    __slots__ = ("offset", "capacity_tokens", "first_token", "dtype", "layers", "kv_heads", "head_dim")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    offset: int
    capacity_tokens: int
    first_token: int
    dtype: str
    layers: int
    kv_heads: int
    head_dim: int
    def __init__(self, offset: _Optional[int] = ..., capacity_tokens: _Optional[int] = ..., first_token: _Optional[int] = ..., dtype: _Optional[str] = ..., layers: _Optional[int] = ..., kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ...) -> None: ...

class ShmBlock(_message.Message):
    __slots__ = ("header", "offset", "first_token")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    header: BlockHeader
    offset: int
    first_token: int
    def __init__(self, header: _Optional[_Union[BlockHeader, _Mapping]] = ..., offset: _Optional[int] = ..., first_token: _Optional[int] = ...) -> None: ...

class GetShmResponse(_message.Message):
    __slots__ = ("blocks", "end", "rest_keys", "next_block_bytes")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    REST_KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[ShmBlock]
    end: GetEnd
    rest_keys: _containers.RepeatedScalarFieldContainer[bytes]
    next_block_bytes: int
    def __init__(self, blocks: _Optional[_Iterable[_Union[ShmBlock, _Mapping]]] = ..., end: _Optional[_Union[GetEnd, _Mapping]] = ..., rest_keys: _Optional[_Iterable[bytes]] = ..., next_block_bytes: _Optional[int] = ...) -> None: ...

class CudaIpcBuffer(_message.Message):
    __slots__ = ("mem_handle", "size_bytes", "offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
    MEM_HANDLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    mem_handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    def __init__(self, mem_handle: _Optional[bytes] = ..., size_bytes: _Optional[int] = ..., offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ...) -> None: ...

class GetIpcRequest(_message.Message):
    __slots__ = ("arena_id", "request", "device_uuid")
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    arena_id: str
    request: GetRequest
    device_uuid: str
    def __init__(self, arena_id: _Optional[str] = ..., request: _Optional[_Union[GetRequest, _Mapping]] = ..., device_uuid: _Optional[str] = ...) -> None: ...

class IpcBlock(_message.Message):
    __slots__ = ("header", "offset")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    header: BlockHeader
    offset: int
    def __init__(self, header: _Optional[_Union[BlockHeader, _Mapping]] = ..., offset: _Optional[int] = ...) -> None: ...

class GetIpcResponse(_message.Message):
    __slots__ = ("lease_id", "lease_seconds", "buffer", "blocks", "end", "rest_keys")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    REST_KEYS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    lease_seconds: float
    buffer: CudaIpcBuffer
    blocks: _containers.RepeatedCompositeFieldContainer[IpcBlock]
    end: GetEnd
    rest_keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, lease_id: _Optional[str] = ..., lease_seconds: _Optional[float] = ..., buffer: _Optional[_Union[CudaIpcBuffer, _Mapping]] = ..., blocks: _Optional[_Iterable[_Union[IpcBlock, _Mapping]]] = ..., end: _Optional[_Union[GetEnd, _Mapping]] = ..., rest_keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReleaseIpcRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseIpcResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
