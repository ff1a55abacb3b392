"""fp8_e4m3 lossy codec (id 16): every value as an FP8 E4M3 byte under a per-(K/V, layer, head, channel) scale.

Imports numpy and ``.payload`` only.

Body (after the 8-byte payload header, optionally zstd-compressed as a whole):

* ``exponents``: int8 ``[2, layers, kv_heads, head_dim]`` — the scale of each (K or V, layer, head,
  channel) over the block's tokens is the power of two ``2**e``, the smallest that brings the
  channel's largest magnitude to ≤ 448 (E4M3's largest finite value).
* ``codes``: uint8 ``[2, layers, kv_heads, tokens, head_dim]`` — ``value / 2**e`` as E4M3 bits
  (round to nearest even).

Why a power of two, stored as its exponent: E4M3 is a floating-point format, so its relative
precision (3 mantissa bits) does not depend on the scale; a power-of-two scale is exact to apply
and to undo, loses at most one binade of headroom against a fitted fp16 scale, and costs 1 byte per
channel instead of 2–4 (on 16-token blocks that is the difference between 3.8× and 3.2× vs fp32).

Error bound per element: ``|x| * 2**-4`` (half of E4M3's relative step ``2**-3``) or, for values in
E4M3's subnormal range, ``2**-10 * 2**e``; plus the rounding of the output dtype.
"""

from __future__ import annotations

import numpy as np

from .payload import (FLAG_ZSTD, PAYLOAD_VERSION, PayloadHeader, ZstdStage, as_float32, check_shape, destination,
                      output_rounding, read_header, require_finite, write_out)

CODEC_ID = 16
E4M3_MAX = 448.0
_MIN_NORMAL_EXP = -6  # E4M3's smallest normal value is 2**-6; below it the spacing is 2**-9


def _decode_table() -> np.ndarray:
    """E4M3 (fn variant) bits -> float32 value; 0x7f and 0xff are NaN (encode never writes them)."""
    b = np.arange(256)
    exp, man = (b >> 3) & 15, (b & 7).astype(np.float64)
    mag = np.where(exp == 0, man * 2.0 ** -9, (1 + man / 8) * np.exp2(exp - 7.0))
    mag[(b & 127) == 127] = np.nan
    return np.where(b & 128, -mag, mag).astype(np.float32)


_LUT = _decode_table()


def _exponents(x: np.ndarray) -> np.ndarray:
    """Per (K/V, layer, head, channel): ``e`` with ``max|x| / 2**e < 448``, as int8 ``[2, L, H, 1, D]``."""
    amax = np.abs(x).max(axis=3, keepdims=True)
    require_finite(amax)
    _, e = np.frexp(amax / np.float32(E4M3_MAX))  # amax/448 = m * 2**e with m in [0.5, 1): amax / 2**e < 448
    return np.clip(e, -126, 127).astype(np.int8)


def _to_e4m3(y: np.ndarray) -> np.ndarray:
    """E4M3 bits of float32 ``|y| < 448`` (round to nearest even), from the float32 bits.

    Above E4M3's smallest normal (2**-6) the code is the float32 bit pattern rounded to 3 mantissa bits
    (the round-up carry lands in the exponent by itself) and rebiased (127 -> 7); the rare values below
    it are on E4M3's fixed subnormal grid of 2**-9.
    """
    bits = y.reshape(-1).view(np.uint32)
    mag = bits & np.uint32(0x7FFFFFFF)
    code = (mag >> 20) & 1
    code += np.uint32(0x7FFFF)
    code += mag
    code >>= 20
    code -= np.uint32((127 - 7) << 3)
    small = np.flatnonzero(mag < np.uint32((127 + _MIN_NORMAL_EXP) << 23))
    code[small] = np.rint(np.abs(y.reshape(-1)[small]) * np.float32(2.0 ** 9)).astype(np.uint32)
    code |= (bits >> 24) & np.uint32(0x80)
    return code.astype(np.uint8)


#: Channel exponents for which every decoded value is a normal float32/bf16 (E4M3 spans 2**-9 .. 2**8.75).
_SAFE_EXP = (-117, 118)


class Fp8E4M3Codec:
    """fp8_e4m3 lossy codec. Stateless but for per-thread zstd contexts: thread-safe.

    :param zstd_level: level of the zstd stage (kept per payload only where it saves ≥ 5%); ``None``
        turns the stage off.
    """

    name = "fp8_e4m3"
    codec_id = CODEC_ID

    def __init__(self, zstd_level: int | None = 1) -> None:
        self._zstd = ZstdStage(zstd_level)

    def encode(self, raw, dtype: str, shape: tuple[int, ...]) -> bytes:
        """Encode one block (``raw``: its bytes, ``dtype`` elements of ``shape``) into a payload.

        :raises InvalidBlock: wrong size/dtype/shape, or non-finite values.
        """
        shape = tuple(int(s) for s in shape)
        x = as_float32(raw, dtype, shape)
        e = _exponents(x)
        x *= np.ldexp(np.float32(1), -e.astype(np.int32))  # a power of two: exact
        body, packed = self._zstd.pack(e.tobytes() + _to_e4m3(x).tobytes())
        header = PayloadHeader(CODEC_ID, PAYLOAD_VERSION, FLAG_ZSTD if packed else 0, 8, 0)
        return header.pack() + body

    def decode(self, payload, dtype: str, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
        """Decode a payload into ``out`` (uint8, exactly the block's bytes) or a fresh uint8 array.

        :returns: the block's bytes in ``dtype``: a table lookup, a power-of-two scale and the output cast
            (for bf16 a shift: no rounding is needed).
        :raises LossyPayloadError: on a damaged payload. :raises InvalidBlock: on a bad ``out``.
        """
        shape = tuple(int(s) for s in shape)
        n = check_shape(None, dtype, shape)
        header, stored = read_header(payload, CODEC_ID, 8)
        two, layers, heads, _tokens, dim = shape
        ns = two * layers * heads * dim
        body = self._zstd.unpack(stored, bool(header.flags & FLAG_ZSTD), ns + n)
        e = np.frombuffer(body, dtype=np.int8, count=ns).reshape(two, layers, heads, 1, dim)
        values = np.take(_LUT, np.frombuffer(body, dtype=np.uint8, count=n, offset=ns)).reshape(shape)
        values *= np.ldexp(np.float32(1), e.astype(np.int32))  # a power of two per channel: exact
        if dtype != "bfloat16" or not _SAFE_EXP[0] <= int(e.min()) <= int(e.max()) <= _SAFE_EXP[1]:
            return write_out(values, dtype, out)
        # bf16 holds every E4M3 value times a power of two exactly: its bits are the float32's high half.
        half = destination(out, n * 2)
        np.right_shift(values.reshape(-1).view(np.uint32), 16, out=half.view(np.uint16), casting="unsafe")
        return half

    @staticmethod
    def max_abs_error_bound(values: np.ndarray, dtype: str) -> np.ndarray:
        """Element-wise bound on ``|decode(encode(x)) - x|`` for float32 ``values`` ``[2, L, H, T, D]``
        (the block as read): E4M3's half relative step of each value, its subnormal spacing under the
        channel's scale, and the output dtype's rounding."""
        scale = np.ldexp(np.float32(1), _exponents(values).astype(np.int32))
        quant = np.maximum(np.abs(values) * np.float32(2.0 ** -4), scale * np.float32(2.0 ** -10))
        return quant + output_rounding(np.abs(values) + quant, dtype)
