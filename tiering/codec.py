"""Record codec of the cold tier: header, byte-shuffle, zstd (or blosc2's shuffle+zstd), checksum.
Imports numpy, zstandard, blosc2 (lazily), ``checksum``, ``errors``, ``layout`` and ``lossy`` only.

A record is ``header ‖ payload``. The header (little-endian, :data:`HEADER` layout) holds:

=============  ======  ====================================================
field          bytes   meaning
=============  ======  ====================================================
magic          4       ``b"KVTR"``
version        1       record format version (:data:`FORMAT_VERSION`)
codec id       1       how the payload is encoded (:class:`CodecId`)
dtype code     1       :data:`tiering.layout.DTYPES` code
flags          1       reserved, 0
tokens         4       tokens in the block (shape follows from the layout)
layers         4       ┐
kv_heads       4       │ the block's shape ``[2, layers, kv_heads, tokens, head_dim]``
head_dim       4       ┘
raw length     8       bytes of the decoded block
checksum       8       XXH3-64 of the decoded (raw) bytes
=============  ======  ====================================================

Lossy records (opt-in per namespace, codec ids 16–18, ``tiering/lossy``) have the same header; their
payload is the lossy codec's and their checksum is the XXH3-64 of the *decoded* (approximate) bytes,
so a damaged lossy record fails the same check and becomes a miss.

The byte-shuffle groups the bytes of every element by significance (all low bytes, then all high
bytes…) so that zstd sees the slowly varying exponent bytes together; on real bf16 KV this lifts the
ratio noticeably. Decoding always verifies the checksum of the raw bytes: a corrupted record raises
:class:`~tiering.errors.ChecksumError` and is never returned.

``blosc2_zstd`` (codec id 3) lets blosc2 do the same byte-shuffle (SIMD) and zstd per blosc2 block
(:data:`BLOSC2_BLOCK_BYTES`) inside one blosc2 chunk, decoding straight into the destination; it needs
the ``blosc2`` package, imported on first use only.

Copies: encode = shuffle (1 copy) + compress; decode writes the block once into the caller's buffer
(or a fresh one): ``shuffle_zstd`` decompresses into a reused per-thread scratch buffer and unshuffles
from it into the destination (vectorised for 2-byte elements); ``zstd``, ``raw`` and ``blosc2_zstd``
decode straight into the destination.
"""

from __future__ import annotations

import enum
import struct
import threading
from dataclasses import dataclass

import numpy as np
import zstandard

from .checksum import checksum  # re-exported: callers import it from here as well
from .errors import ChecksumError, InvalidBlock
from .layout import DTYPE_BY_CODE, DTYPES, itemsize
from .lossy import LossyPayloadError, by_id, for_spec, is_lossy

MAGIC = b"KVTR"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sBBBBIIIIQQ")


#: Byte offset of the codec id in a record (after magic 4, version 1); readable in sealed records too.
CODEC_OFFSET = 5


def codec_name(record: bytes | memoryview) -> str:
    """Name of the codec that wrote ``record`` (plain or sealed): ``shuffle_zstd``, ``zstd``, ``raw``, or a
    lossy codec's (``fp8_e4m3``…); ``unknown`` for an unknown id. Reads the header's codec byte only."""
    cid = record[CODEC_OFFSET] if len(record) > CODEC_OFFSET else -1
    if is_lossy(cid):
        return by_id(cid).name
    return CodecId(cid).name.lower() if cid in set(CodecId) else "unknown"


class CodecId(enum.IntEnum):
    """Lossless payload encodings. Part of the on-disk format: never renumber, only append. Ids 16–18
    are the lossy codecs' (:data:`tiering.lossy.CODEC_IDS`)."""

    RAW = 0
    ZSTD = 1
    SHUFFLE_ZSTD = 2
    #: a blosc2 chunk: byte-shuffle + zstd per blosc2 block (``pip install blosc2``)
    BLOSC2_ZSTD = 3


def shuffle(raw: memoryview | bytes, item: int) -> bytes:
    """Group the bytes of each ``item``-byte element by significance (1 copy)."""
    if item == 1:
        return bytes(raw)
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(-1, item)
    return arr.T.tobytes()


def unshuffle(data: bytes | memoryview | np.ndarray, item: int, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`shuffle`; returns a fresh uint8 array (or fills ``out``, of the same size)."""
    arr = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    dst = np.empty(arr.size, dtype=np.uint8) if out is None else out
    if item == 1:
        dst[:] = arr
        return dst
    planes = arr.reshape(item, -1)
    if item == 2:
        # Two vectorised passes over whole 16-bit words (high plane shifted, low plane or-ed in): ~3x
        # faster than writing each byte plane into a strided column.
        words = dst.view("<u2")
        np.left_shift(planes[1], 8, out=words, dtype="<u2")
        np.bitwise_or(words, planes[0], out=words)
        return dst
    grid = dst.reshape(-1, item)
    # One strided column write per byte plane: ~10x faster than copying the transposed view
    # (np.ascontiguousarray(planes.T)), whose reads jump across planes for every element.
    for k in range(item):
        grid[:, k] = planes[k]
    return dst


_BLOSC2: list = []  # [module, newest chunk format version it writes], filled on first use


def _blosc2():
    """The ``blosc2`` module, imported on first use (it takes about a second to import).

    :raises ChecksumError: if it is not installed (a ``blosc2_zstd`` record cannot be read without it).
    """
    if not _BLOSC2:
        try:
            import blosc2
        except ImportError as exc:  # pragma: no cover - the package is a dependency
            raise ChecksumError("record is blosc2_zstd and the blosc2 package is not installed") from exc
        _BLOSC2[:] = [blosc2, blosc2.compress2(bytes(16))[0]]
    return _BLOSC2[0]


#: blosc2's block size for new records. Measured on fp16/bf16 KV blocks of 0.36–2 MiB: decoding runs at
#: zstd-alone speed (unshuffle included) at the same or a better ratio, where blosc2's automatic choice
#: (tens of KiB for 2-byte elements) decodes ~15 % slower. Records of any block size decode.
BLOSC2_BLOCK_BYTES = 1 << 20


def blosc2_clevel(level: int) -> int:
    """blosc2's ``clevel`` (1..9) whose zstd level is closest to zstd ``level``: blosc2 runs zstd at
    ``2 * clevel - 1``."""
    return max(1, min(9, (level + 2) // 2))


@dataclass(frozen=True, slots=True)
class RecordHeader:
    """Decoded header of a cold record. ``codec`` is a :class:`CodecId`, or a lossy codec's id (int)."""

    codec: CodecId | int
    dtype: str
    tokens: int
    layers: int
    kv_heads: int
    head_dim: int
    raw_length: int
    checksum: int

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (2, self.layers, self.kv_heads, self.tokens, self.head_dim)

    @property
    def lossy(self) -> bool:
        """Whether the record's bytes are approximate (a lossy codec wrote it)."""
        return is_lossy(int(self.codec))

    @property
    def lossy_codec(self) -> str:
        """The lossy codec's name (``""`` for an exact record): a block decoded from this record is
        re-encoded with it if it is written again, so it stays marked lossy."""
        return by_id(int(self.codec)).name if self.lossy else ""


class Codec:
    """Encodes blocks to records and back. Thread-safe: zstd contexts are kept per thread.

    :param level: zstd compression level (1 fast … 19 small; negative levels are faster still).
    :param codec: payload encoding for new records; any known codec can always be decoded.
    """

    def __init__(self, level: int = 3, codec: CodecId = CodecId.SHUFFLE_ZSTD) -> None:
        self.level = level
        self.codec = CodecId(codec)
        self._local = threading.local()
        if self.codec is CodecId.BLOSC2_ZSTD:
            _blosc2()  # imported now (about a second), not in the first Put

    def _cctx(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level)
        return c

    def _dctx(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def _scratch(self, n: int) -> np.ndarray:
        """This thread's scratch buffer of ``n`` bytes (grown, never shrunk): its pages stay faulted in,
        so decompressing into it costs no page faults, unlike a fresh buffer of every block's size."""
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf.size < n:
            buf = self._local.scratch = np.empty(max(n, 1), dtype=np.uint8)
        return buf[:n]

    def _decompress_into(self, payload: memoryview, dst: np.ndarray) -> None:
        """Decompress the zstd frame ``payload`` into ``dst``, which it must fill exactly.

        :raises ChecksumError: if it does not decompress, or to another length.
        """
        try:
            with self._dctx().stream_reader(payload, read_across_frames=False) as reader:
                filled, n = 0, dst.size
                view = memoryview(dst)
                while filled < n:
                    got = reader.readinto(view[filled:])
                    if not got:
                        break
                    filled += got
                if filled != n or reader.read(1):
                    raise ChecksumError("payload decodes to the wrong length")
        except zstandard.ZstdError as exc:
            raise ChecksumError(f"payload does not decompress: {exc}") from exc

    def encode(self, raw: memoryview | bytes, dtype: str, shape: tuple[int, ...], csum: int | None = None,
               lossy: str = "") -> bytes:
        """Encode one block into a record.

        :param raw: the block's bytes (C-contiguous).
        :param dtype: element type name.
        :param shape: ``[2, layers, kv_heads, tokens, head_dim]``.
        :param csum: the raw bytes' checksum when already known (saves a pass).
        :param lossy: a lossy codec spec (a namespace's ``cold_codec``, e.g. ``"fp8_e4m3"``) to encode with
            instead of this codec; the record's checksum is then of the decoded bytes (``csum`` unused).
            A block the lossy codec refuses (non-finite values, an empty block) is stored losslessly.
        :returns: header ‖ payload.
        :raises InvalidBlock: if ``raw`` does not hold ``shape`` elements of ``dtype``.
        """
        item = itemsize(dtype)
        raw = memoryview(raw).cast("B")
        if len(shape) != 5 or shape[0] != 2 or int(np.prod(shape)) * item != len(raw):
            raise InvalidBlock(f"{len(raw)} bytes do not hold a {dtype} block of shape {tuple(shape)}", field="payload")
        codec_id, payload = int(self.codec), None
        if lossy and len(raw):
            lc = for_spec(lossy)
            try:
                payload = lc.encode(raw, dtype, tuple(shape))
                csum, codec_id = checksum(lc.decode(payload, dtype, tuple(shape))), lc.codec_id
            except InvalidBlock:  # e.g. non-finite values: this block is stored exactly instead
                payload = None
        if payload is None:
            csum = checksum(raw) if csum is None else csum
            payload = self._payload(raw, item)
        _, layers, heads, tokens, head_dim = shape
        header = HEADER.pack(MAGIC, FORMAT_VERSION, codec_id, DTYPES[dtype][1], 0,
                             tokens, layers, heads, head_dim, len(raw), csum)
        return header + payload

    def _payload(self, raw: memoryview, item: int) -> bytes:
        """The lossless payload of this codec."""
        if self.codec is CodecId.RAW:
            return bytes(raw)
        if self.codec is CodecId.ZSTD:
            return self._cctx().compress(raw)
        if self.codec is CodecId.BLOSC2_ZSTD:
            if not len(raw):
                return b""
            b2 = _blosc2()
            return b2.compress2(raw, codec=b2.Codec.ZSTD, clevel=blosc2_clevel(self.level), typesize=item,
                                filters=[b2.Filter.SHUFFLE if item > 1 else b2.Filter.NOFILTER],
                                filters_meta=[0], nthreads=1, blocksize=BLOSC2_BLOCK_BYTES)
        return self._cctx().compress(shuffle(raw, item))

    @staticmethod
    def read_header(record: bytes | memoryview) -> RecordHeader:
        """Parse a record's header without touching the payload.

        :raises ChecksumError: if the header is damaged or of an unknown version/codec/dtype.
        """
        if len(record) < HEADER.size:
            raise ChecksumError("record shorter than its header")
        magic, version, codec, dtype_code, _flags, tokens, layers, heads, head_dim, raw_len, csum = \
            HEADER.unpack_from(record)
        if magic != MAGIC or version != FORMAT_VERSION or dtype_code not in DTYPE_BY_CODE:
            raise ChecksumError("record header is damaged or of an unknown format")
        try:
            codec_id = codec if is_lossy(codec) else CodecId(codec)
        except ValueError:
            raise ChecksumError(f"unknown codec id {codec}") from None
        dtype = DTYPE_BY_CODE[dtype_code]
        if 2 * layers * heads * tokens * head_dim * itemsize(dtype) != raw_len:
            raise ChecksumError("record header's shape and length disagree")
        return RecordHeader(codec_id, dtype, tokens, layers, heads, head_dim, raw_len, csum)

    def decode(self, record: bytes | memoryview, out: np.ndarray | None = None) -> tuple[RecordHeader, np.ndarray]:
        """Decode a record into a fresh uint8 array (or into ``out``), verifying its checksum.

        :param out: optional destination of exactly ``raw_length`` bytes (e.g. a pinned buffer).
        :returns: the header and the raw bytes.
        :raises ChecksumError: on any damage; no bytes that failed the check are returned.
        """
        header = self.read_header(record)
        payload = memoryview(record)[HEADER.size:]
        if header.lossy:
            try:
                raw = by_id(int(header.codec)).decode(payload, header.dtype, header.shape, out)
            except (LossyPayloadError, InvalidBlock) as exc:
                raise ChecksumError(f"lossy payload does not decode: {exc}") from exc
            if checksum(raw) != header.checksum:
                raise ChecksumError("checksum of the decoded block does not match its record")
            return header, raw
        raw = np.empty(header.raw_length, dtype=np.uint8) if out is None else out
        if raw.size != header.raw_length:
            raise InvalidBlock(f"destination of {raw.size} bytes for a block of {header.raw_length}", field="out")
        if header.codec is CodecId.RAW:
            if len(payload) != header.raw_length:
                raise ChecksumError("payload decodes to the wrong length")
            raw[:] = np.frombuffer(payload, dtype=np.uint8)
        elif header.codec is CodecId.BLOSC2_ZSTD:
            self._blosc2_into(payload, raw)
        elif header.codec is CodecId.ZSTD or itemsize(header.dtype) == 1:
            self._decompress_into(payload, raw)  # 1-byte elements: the shuffle is the identity
        else:
            shuffled = self._scratch(header.raw_length)
            self._decompress_into(payload, shuffled)
            unshuffle(shuffled, itemsize(header.dtype), raw)
        if checksum(raw) != header.checksum:
            raise ChecksumError("checksum of the decoded block does not match its record")
        return header, raw

    @staticmethod
    def _blosc2_into(payload: memoryview, dst: np.ndarray) -> None:
        """Decode the blosc2 chunk ``payload`` into ``dst`` (unshuffled by blosc2, in place).

        :raises ChecksumError: if it is no blosc2 chunk of exactly ``dst``'s size, or does not decode.
        """
        if not dst.size:
            if len(payload):
                raise ChecksumError("payload decodes to the wrong length")
            return
        b2 = _blosc2()
        # blosc2 itself ignores its chunk's format byte; a damaged one must not pass unnoticed
        if not len(payload) or not 1 <= payload[0] <= _BLOSC2[1]:
            raise ChecksumError(f"blosc2 chunk of unknown format version {payload[0]}")
        try:
            nbytes, cbytes, _ = b2.get_cbuffer_sizes(payload)
            if nbytes != dst.size or cbytes != len(payload):
                raise ChecksumError("payload decodes to the wrong length")
            b2.decompress2(payload, dst=dst, nthreads=1)
        except (RuntimeError, ValueError) as exc:
            raise ChecksumError(f"payload does not decompress: {exc}") from exc
