"""What every lossy codec shares: the payload header, float views of a block's bytes, the zstd stage.

Imports numpy, zstandard and ``tiering.errors`` only (never the store or a tier).

A lossy payload is ``header ‖ body`` (the cold record's own header, codec-id byte and checksum sit
outside it). The header (little-endian, :data:`PAYLOAD_HEADER`, 8 bytes):

=============  ======  =======================================================================
field          bytes   meaning
=============  ======  =======================================================================
codec id       1       the codec that wrote it (16 fp8_e4m3, 17 int8, 18 int4): a cross-check
version        1       payload format version of that codec (:data:`PAYLOAD_VERSION`)
flags          1       bit 0: body is zstd-compressed; bit 1: scales are fp32 (else fp16)
bits           1       bits per code (8 or 4)
group size     2       KIVI group size (0 for fp8)
reserved       2       0
=============  ======  =======================================================================

The body's layout is the codec's (see its module); a compressed body is one zstd frame with its
content size and checksum. A payload that fails any structural check (header, lengths, frame) raises
:class:`LossyPayloadError`; damage inside a plain body cannot be seen here, so the record checksum (of
the *decoded* bytes) catches the rest.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import numpy as np
import zstandard

from ..errors import ChecksumError, InvalidBlock

PAYLOAD_HEADER = struct.Struct("<BBBBHH")
PAYLOAD_VERSION = 1
FLAG_ZSTD = 1
FLAG_FP32_SCALES = 2
#: Keep the zstd stage only where it saves at least this fraction of the body (else store it plain).
ZSTD_MIN_SAVING = 0.05
#: KV element types the lossy codecs accept: name -> bytes per element.
FLOAT_DTYPES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}


class LossyPayloadError(ChecksumError):
    """A lossy payload is damaged (header, length, zstd frame). The store treats it like any
    :class:`~tiering.errors.ChecksumError`: the block becomes a miss."""


@dataclass(frozen=True, slots=True)
class PayloadHeader:
    """Decoded lossy payload header (see the module docstring)."""

    codec_id: int
    version: int
    flags: int
    bits: int
    group: int

    def pack(self) -> bytes:
        return PAYLOAD_HEADER.pack(self.codec_id, self.version, self.flags, self.bits, self.group, 0)

    @property
    def scale_dtype(self) -> np.dtype:
        return np.dtype(np.float32 if self.flags & FLAG_FP32_SCALES else np.float16)


def check_shape(raw_len: int | None, dtype: str, shape: tuple[int, ...]) -> int:
    """Validate a block description; returns its element count.

    :param raw_len: the block's byte length, or ``None`` when there is no raw buffer to check.
    :raises InvalidBlock: unknown/unsupported dtype, a shape that is not ``[2, L, H, T, D]`` with
        positive sizes, or a byte length that does not match.
    """
    if dtype not in FLOAT_DTYPES:
        raise InvalidBlock(f"lossy codecs take {', '.join(FLOAT_DTYPES)} KV, not {dtype!r}", field="layout.dtype")
    if len(shape) != 5 or shape[0] != 2 or min(shape) <= 0:
        raise InvalidBlock(f"block shape {tuple(shape)} is not [2, layers, kv_heads, tokens, head_dim]",
                           field="payload")
    n = int(np.prod(shape))
    if raw_len is not None and raw_len != n * FLOAT_DTYPES[dtype]:
        raise InvalidBlock(f"{raw_len} bytes do not hold a {dtype} block of shape {tuple(shape)}", field="payload")
    return n


def as_float32(raw, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The block's values as a fresh float32 array of ``shape`` (1 copy; ``raw`` is only read, so
    read-only buffers such as bytes or LMDB views are fine). bf16 widens by a 16-bit shift (exact).

    :raises InvalidBlock: see :func:`check_shape`.
    """
    arr = raw.reshape(-1).view(np.uint8) if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
    check_shape(arr.size, dtype, shape)
    if dtype == "float32":
        f = arr.view(np.float32).copy()
    elif dtype == "float16":
        f = arr.view(np.float16).astype(np.float32)
    else:
        f = (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return f.reshape(shape)


def require_finite(*reductions: np.ndarray) -> None:
    """Raise :class:`InvalidBlock` unless every element of the (small, reduced) arrays is finite."""
    for r in reductions:
        if not np.isfinite(r).all():
            raise InvalidBlock("block holds NaN or infinite values; lossy codecs cannot scale them", field="payload")


def destination(out: np.ndarray | None, nbytes: int) -> np.ndarray:
    """``out`` checked to be ``nbytes`` writable contiguous uint8 bytes, or a fresh such array.

    :raises InvalidBlock: if it is not.
    """
    if out is None:
        return np.empty(nbytes, dtype=np.uint8)
    if out.dtype != np.uint8 or out.size != nbytes or not out.flags.c_contiguous or not out.flags.writeable:
        raise InvalidBlock(f"destination must be {nbytes} writable contiguous uint8 bytes", field="out")
    return out


def write_out(values: np.ndarray, dtype: str, out: np.ndarray | None) -> np.ndarray:
    """Cast float32 ``values`` to ``dtype`` (round to nearest even) into ``out`` (uint8, exactly the
    block's bytes) or a fresh uint8 array; returns that array.

    :raises InvalidBlock: if ``out`` has the wrong size or type, or is not writable and contiguous.
    """
    out = destination(out, values.size * FLOAT_DTYPES[dtype])
    flat = values.reshape(-1)
    if dtype == "float32":
        np.copyto(out.reshape(-1).view(np.float32), flat)
    elif dtype == "float16":
        np.copyto(out.reshape(-1).view(np.float16), flat, casting="same_kind")
    else:  # bf16: keep the high half of the fp32 bits, rounded to nearest even (values are finite)
        bits = flat.view(np.uint32)
        rounded = bits >> 16
        rounded &= 1
        rounded += np.uint32(0x7FFF)
        rounded += bits
        rounded >>= 16
        np.copyto(out.reshape(-1).view(np.uint16), rounded, casting="unsafe")
    return out


class ZstdStage:
    """The optional zstd stage after quantisation. Thread-safe: contexts are kept per thread.

    :param level: zstd level; ``None`` turns the stage off (bodies are always stored plain).
    """

    def __init__(self, level: int | None = 1) -> None:
        self.level = level
        self._local = threading.local()

    def pack(self, body: bytes) -> tuple[bytes, bool]:
        """``(stored body, compressed?)``: compressed only when that saves ≥ :data:`ZSTD_MIN_SAVING`."""
        if self.level is None:
            return body, False
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level, write_checksum=True)
        z = c.compress(body)
        if len(z) <= len(body) * (1 - ZSTD_MIN_SAVING):
            return z, True
        return body, False

    def unpack(self, stored: memoryview, compressed: bool, expected: int) -> memoryview | bytes:
        """The body, decompressed when ``compressed``; exactly ``expected`` bytes.

        :raises LossyPayloadError: on a bad zstd frame or a body of the wrong length.
        """
        if compressed:
            d = getattr(self._local, "d", None)
            if d is None:
                d = self._local.d = zstandard.ZstdDecompressor()
            try:  # the frame header's size first: a damaged one must not make us inflate gigabytes
                declared = zstandard.frame_content_size(stored)
            except zstandard.ZstdError as exc:
                raise LossyPayloadError(f"lossy payload body is not a zstd frame: {exc}") from exc
            if declared != expected:
                raise LossyPayloadError(f"lossy payload body declares {declared} bytes, expected {expected}")
            frame = d.decompressobj()  # unlike decompress(), it tells a cut frame and trailing bytes apart
            try:
                stored = frame.decompress(stored)
            except zstandard.ZstdError as exc:
                raise LossyPayloadError(f"lossy payload body does not decompress: {exc}") from exc
            if not frame.eof or frame.unused_data:
                raise LossyPayloadError("lossy payload body is not exactly one whole zstd frame")
        if len(stored) != expected:
            raise LossyPayloadError(f"lossy payload body is {len(stored)} bytes, expected {expected}")
        return stored


def read_header(payload, codec_id: int, bits: int) -> tuple[PayloadHeader, memoryview]:
    """Parse and check a payload's header; returns it and the stored body.

    :raises LossyPayloadError: short payload, another codec's id, unknown version, flags or bits.
    """
    view = memoryview(payload).cast("B")
    if len(view) < PAYLOAD_HEADER.size:
        raise LossyPayloadError("lossy payload is shorter than its header")
    cid, version, flags, nbits, group, reserved = PAYLOAD_HEADER.unpack_from(view)
    if cid != codec_id:
        raise LossyPayloadError(f"lossy payload was written by codec {cid}, not {codec_id}")
    if version != PAYLOAD_VERSION or flags & ~(FLAG_ZSTD | FLAG_FP32_SCALES) or nbits != bits or reserved:
        raise LossyPayloadError(f"lossy payload header is damaged or of an unknown version ({version})")
    return PayloadHeader(cid, version, flags, nbits, group), view[PAYLOAD_HEADER.size:]


def output_rounding(magnitudes: np.ndarray, dtype: str) -> np.ndarray:
    """Largest error of casting float32 values of these ``magnitudes`` to ``dtype`` (round to nearest),
    element-wise: half a unit in the last place, including the type's subnormal spacing."""
    if dtype == "float32":
        return np.zeros_like(magnitudes)
    mant, tiny = (7, 2.0 ** -134) if dtype == "bfloat16" else (10, 2.0 ** -25)
    return magnitudes * np.float32(2.0 ** -(mant + 1)) + np.float32(tiny)
