"""int8 (id 17) and int4 (id 18) lossy codecs, KIVI-style: keys quantised per channel, values per token.

Imports numpy and ``.payload`` only. One class, two registered instances (the bit width is
the only difference; int4 packs two codes per byte).

Grouping (KIVI, Liu et al. 2024): keys have outlier *channels*, so each (layer, head, channel) of
K gets its own min/step per run of ``group`` consecutive tokens; values are quantised per *token*,
each (layer, head, token) of V with a min/step per run of ``group`` consecutive channels. A block
shorter than the group (a 16-token block under the default group of 32) or not a multiple of it
has a short last group. Codes are asymmetric: ``x ≈ min + q * step`` with
``step = (max - min) / (2**bits - 1)`` and ``q`` rounded to nearest.

Body (after the 8-byte payload header, optionally zstd-compressed as a whole), scales in fp16 (or
fp32 when header flag bit 1 is set):

* ``k_min``, ``k_step``: ``[layers, kv_heads, ceil(tokens / group), head_dim]`` each
* ``v_min``, ``v_step``: ``[layers, kv_heads, tokens, ceil(head_dim / group)]`` each
* ``codes``: K then V, each ``[layers, kv_heads, tokens, head_dim]``; uint8 for int8, and for int4
  two codes per byte (element ``2i`` in the low nibble, ``2i + 1`` in the high one).

fp16 scales are rounded so the codes still cover each group (min rounded down, step up); a payload
falls back to fp32 scales when fp16 cannot hold them or would widen any group's step by more than
:data:`MAX_STEP_INFLATION`. Error bound per element: ``step / 2`` of its group, times at most
``1 + MAX_STEP_INFLATION``, plus float rounding and the output dtype's rounding.
"""

from __future__ import annotations

import math

import numpy as np

from .payload import (FLAG_FP32_SCALES, FLAG_ZSTD, PAYLOAD_VERSION, LossyPayloadError, PayloadHeader, ZstdStage,
                      as_float32, check_shape, output_rounding, read_header, require_finite, write_out)

DEFAULT_GROUP = 32
#: Largest relative widening of a group's step that fp16 scales may cause before a payload uses fp32.
MAX_STEP_INFLATION = 2.0 ** -6
_FP16_MIN_NORMAL = 2.0 ** -14


def _padded(a: np.ndarray, axis: int, group: int) -> np.ndarray:
    """``a`` with ``axis`` padded to a multiple of ``group`` by repeating its last element (which leaves
    every group's min and max unchanged)."""
    n = a.shape[axis]
    padded = math.ceil(n / group) * group
    return a if padded == n else np.take(a, np.minimum(np.arange(padded), n - 1), axis=axis)


def group_ranges(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-group ``(k_min, k_max, v_min, v_max)`` of a float32 block ``[2, L, H, T, D]`` (shapes in the
    module docstring)."""
    _, layers, heads, tokens, dim = x.shape
    kg = _padded(x[0], 2, group).reshape(layers, heads, -1, group, dim)
    vg = _padded(x[1], 3, group).reshape(layers, heads, tokens, -1, group)
    return kg.min(3), kg.max(3), vg.min(4), vg.max(4)


def _inplace(op, half: np.ndarray, stat: np.ndarray, axis: int, group: int) -> None:
    """``half = op(half, stat spread over its groups)`` in place, for K (``axis`` 2: groups of tokens)
    or V (``axis`` 3: groups of channels) of one contiguous ``[L, H, T, D]`` half. Groups are broadcast
    through a reshaped view where the axis divides evenly; only a short last group costs a repeat."""
    n = half.shape[axis]
    if stat.shape[axis] == 1:
        op(half, stat, out=half)
    elif n % group == 0:
        view = half.reshape(half.shape[:axis] + (n // group, group) + half.shape[axis + 1:])
        op(view, np.expand_dims(stat, axis + 1), out=view)
    else:
        op(half, np.repeat(stat, group, axis=axis)[(slice(None),) * axis + (slice(0, n),)], out=half)


def _directed_fp16(a: np.ndarray, up: bool) -> np.ndarray:
    """``a`` rounded to fp16 towards +inf (``up``) or -inf."""
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    wrong = h.astype(np.float32) < a if up else h.astype(np.float32) > a
    return np.where(wrong, np.nextafter(h, np.float16(np.inf if up else -np.inf)), h)


def fit_scales(mn: np.ndarray, mx: np.ndarray, levels: int, fp16: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """``(min, step)`` of groups as stored: fp16 (min rounded down, step up), or fp32.

    :returns: ``None`` when ``fp16`` is asked for and cannot represent them faithfully.
    """
    data_step = (mx - mn) / np.float32(levels)
    if not fp16:
        return mn, data_step
    mn16 = _directed_fp16(mn, up=False)
    with np.errstate(over="ignore", invalid="ignore"):
        st16 = _directed_fp16((mx - mn16.astype(np.float32)) / np.float32(levels), up=True)
        st = st16.astype(np.float32)
        ok = (np.isfinite(mn16).all() and np.isfinite(st16).all()
              and ((st == 0) | (st >= _FP16_MIN_NORMAL)).all()
              and (st <= data_step * np.float32(1 + MAX_STEP_INFLATION)).all())
    return (mn16, st16) if ok else None


class KiviCodec:
    """KIVI-style integer lossy codec. Stateless but for per-thread zstd contexts: thread-safe.

    :param name: registry name (``"int8"``/``"int4"``). :param codec_id: record codec id (17/18).
    :param bits: 8 or 4. :param group: tokens per key group and channels per value group.
    :param zstd_level: level of the zstd stage (kept per payload only where it saves ≥ 5%); ``None``
        turns it off.
    """

    def __init__(self, name: str, codec_id: int, bits: int, group: int = DEFAULT_GROUP,
                 zstd_level: int | None = 1) -> None:
        if bits not in (4, 8) or not 1 <= group < 1 << 16:
            raise ValueError(f"KIVI codec needs 4 or 8 bits and a group in [1, 65535], not {bits}, {group}")
        self.name, self.codec_id, self.bits, self.group = name, codec_id, bits, group
        self._levels = (1 << bits) - 1
        self._zstd = ZstdStage(zstd_level)

    def encode(self, raw, dtype: str, shape: tuple[int, ...]) -> bytes:
        """Encode one block (``raw``: its bytes, ``dtype`` elements of ``shape``) into a payload.

        :raises InvalidBlock: wrong size/dtype/shape, or non-finite values.
        """
        shape = tuple(int(s) for s in shape)
        x = as_float32(raw, dtype, shape)
        kmn, kmx, vmn, vmx = group_ranges(x, self.group)
        require_finite(kmn, kmx, vmn, vmx)
        flags = 0
        k_fit, v_fit = fit_scales(kmn, kmx, self._levels, True), fit_scales(vmn, vmx, self._levels, True)
        if k_fit is None or v_fit is None:
            flags |= FLAG_FP32_SCALES
            k_fit, v_fit = fit_scales(kmn, kmx, self._levels, False), fit_scales(vmn, vmx, self._levels, False)
        for i, (mn, st) in enumerate((k_fit, v_fit)):  # K (groups of tokens: axis 2), then V (of channels: 3)
            st = np.where(st == 0, 1, st).astype(np.float32)  # a constant group: every code is 0
            _inplace(np.subtract, x[i], mn.astype(np.float32), 2 + i, self.group)
            _inplace(np.divide, x[i], st, 2 + i, self.group)
        np.rint(x, out=x)
        np.clip(x, 0, self._levels, out=x)
        codes = x.astype(np.uint8).reshape(-1)
        if self.bits == 4:
            codes = codes[0::2] | (codes[1::2] << 4)
        parts = [a.tobytes() for a in (*k_fit, *v_fit)] + [codes.tobytes()]
        body, packed = self._zstd.pack(b"".join(parts))
        flags |= FLAG_ZSTD if packed else 0
        return PayloadHeader(self.codec_id, PAYLOAD_VERSION, flags, self.bits, self.group).pack() + body

    def decode(self, payload, dtype: str, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
        """Decode a payload into ``out`` (uint8, exactly the block's bytes) or a fresh uint8 array.

        The group size is read from the payload, so payloads of any group decode.

        :returns: the block's bytes in ``dtype``.
        :raises LossyPayloadError: on a damaged payload. :raises InvalidBlock: on a bad ``out``.
        """
        shape = tuple(int(s) for s in shape)
        n = check_shape(None, dtype, shape)
        header, stored = read_header(payload, self.codec_id, self.bits)
        group = header.group
        if group < 1:
            raise LossyPayloadError("lossy payload header names a group size of 0")
        _, layers, heads, tokens, dim = shape
        sdt = header.scale_dtype
        nk, nv = layers * heads * math.ceil(tokens / group) * dim, layers * heads * tokens * math.ceil(dim / group)
        ncode = n * self.bits // 8
        body = self._zstd.unpack(stored, bool(header.flags & FLAG_ZSTD), 2 * (nk + nv) * sdt.itemsize + ncode)
        offs = np.cumsum([0, nk, nk, nv, nv]) * sdt.itemsize
        k_min, k_step, v_min, v_step = (np.frombuffer(body, dtype=sdt, count=c, offset=int(o)).astype(np.float32)
                                        for c, o in zip((nk, nk, nv, nv), offs))
        kshape, vshape = (layers, heads, -1, dim), (layers, heads, tokens, -1)
        packed = np.frombuffer(body, dtype=np.uint8, count=ncode, offset=int(offs[-1]))
        if self.bits == 8:
            values = packed.astype(np.float32).reshape(shape)
        else:
            codes = np.empty(n, dtype=np.uint8)
            codes[0::2] = packed & 15
            codes[1::2] = packed >> 4
            values = codes.astype(np.float32).reshape(shape)
        for i, (mn, st) in enumerate(((k_min, k_step), (v_min, v_step))):
            stat_shape = kshape if i == 0 else vshape
            _inplace(np.multiply, values[i], st.reshape(stat_shape), 2 + i, group)
            _inplace(np.add, values[i], mn.reshape(stat_shape), 2 + i, group)
        return write_out(values, dtype, out)

    def max_abs_error_bound(self, values: np.ndarray, dtype: str) -> np.ndarray:
        """Element-wise bound on ``|decode(encode(x)) - x|`` for float32 ``values`` ``[2, L, H, T, D]``
        (the block as read): half the group's step ``(max - min) / (2**bits - 1)`` widened by at most
        :data:`MAX_STEP_INFLATION`, float32 rounding of the arithmetic, and the output dtype's rounding."""
        _, _, _, tokens, dim = values.shape
        kmn, kmx, vmn, vmx = group_ranges(values, self.group)
        levels = np.float32(self._levels)
        quant = np.zeros_like(values)
        for i, (mn, mx) in enumerate(((kmn, kmx), (vmn, vmx))):
            half = (mx - mn) / levels * np.float32((1 + MAX_STEP_INFLATION) / 2)
            slack = np.maximum(np.abs(mn), np.abs(mx)) * np.float32(2.0 ** -20)
            _inplace(np.add, quant[i], half + slack, 2 if i == 0 else 3, self.group)
        return quant + output_rounding(np.abs(values) + quant, dtype)
