"""Lossy cold codecs (opt-in): fp8_e4m3, int8 and int4 behind one small registry keyed by name and codec id.

Imports only its own modules and ``tiering.lossy_spec`` (the names; numpy and zstandard underneath; no
torch); the record format, the store and the tiers use it, never the other way round.

A lossy codec turns one block's raw bytes into a *payload* and back. The cold record around it
(header, codec-id byte, checksum) is the record codec's business: the record's codec-id byte selects
the codec here (:func:`by_id`), and its checksum is of the *decoded* (lossy) bytes, so a damaged
payload that still parses is caught there and becomes a miss like any corruption. Codec ids 0–2 are
the lossless ones of ``tiering/codec.py``; 16–18 are reserved here. Never renumber, only append.

>>> codec = by_name("int4")
>>> payload = codec.encode(raw, "bfloat16", (2, 30, 3, 16, 64))        # doctest: +SKIP
>>> codec.decode(payload, "bfloat16", (2, 30, 3, 16, 64), out=buffer)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .fp8 import Fp8E4M3Codec
from .kivi import DEFAULT_GROUP, KiviCodec
from ..lossy_spec import CODEC_IDS, parse_spec
from .payload import FLOAT_DTYPES, LossyPayloadError, as_float32

__all__ = ["CODEC_IDS", "DEFAULT_GROUP", "FLOAT_DTYPES", "LossyCodec", "LossyPayloadError", "by_id", "by_name",
           "for_spec", "is_lossy", "make", "parse_spec", "values_of"]


@runtime_checkable
class LossyCodec(Protocol):
    """What the record format needs of a lossy codec. Implementations are thread-safe.

    ``shape`` is always ``(2, layers, kv_heads, tokens, head_dim)``; ``dtype`` one of
    :data:`FLOAT_DTYPES` (``float32``, ``float16``, ``bfloat16``).
    """

    name: str
    codec_id: int

    def encode(self, raw, dtype: str, shape: tuple[int, ...]) -> bytes:
        """Payload of one block; ``raw`` is any buffer of its bytes (only read).

        :raises InvalidBlock: on a size/dtype/shape mismatch or non-finite values."""

    def decode(self, payload, dtype: str, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
        """The block's approximate bytes in ``dtype``: written into ``out`` (uint8, exactly the block's
        size) when given, else a fresh uint8 array; returns that array.

        :raises LossyPayloadError: on a damaged payload. :raises InvalidBlock: on a bad ``out``."""

    def max_abs_error_bound(self, values: np.ndarray, dtype: str) -> np.ndarray:
        """Element-wise bound on the round trip's absolute error for float32 block ``values`` (tests)."""




def make(name: str, *, group: int = DEFAULT_GROUP, zstd_level: int | None = 1) -> LossyCodec:
    """A new codec ``name`` (``fp8_e4m3``, ``int8``, ``int4``) with its own settings.

    :param group: KIVI group size (int codecs; ignored by fp8). Decoding reads it from each payload.
    :param zstd_level: level of the zstd stage (kept per payload only where it saves ≥ 5%); ``None``: off.
    :raises ValueError: on an unknown name or a bad group.
    """
    if name == "fp8_e4m3":
        return Fp8E4M3Codec(zstd_level)
    if name == "int8":
        return KiviCodec("int8", 17, 8, group, zstd_level)
    if name == "int4":
        return KiviCodec("int4", 18, 4, group, zstd_level)
    raise ValueError(f"unknown lossy codec {name!r}; choose from {', '.join(CODEC_IDS.values())}")


_DEFAULTS: dict[str, LossyCodec] = {name: make(name) for name in CODEC_IDS.values()}


def by_name(name: str) -> LossyCodec:
    """The shared default-settings codec ``name``. :raises ValueError: on an unknown name."""
    try:
        return _DEFAULTS[name]
    except KeyError:
        raise ValueError(f"unknown lossy codec {name!r}; choose from {', '.join(_DEFAULTS)}") from None


_BY_SPEC: dict[str, LossyCodec] = {}


def for_spec(spec: str) -> LossyCodec:
    """The shared codec a namespace's ``cold_codec`` names (see :func:`parse_spec`). Thread-safe.

    :raises ValueError: as :func:`parse_spec`."""
    codec = _BY_SPEC.get(spec)
    if codec is None:
        name, group = parse_spec(spec)
        codec = _BY_SPEC.setdefault(spec, by_name(name) if group is None else make(name, group=group))
    return codec


def by_id(codec_id: int) -> LossyCodec:
    """The shared codec a record's codec-id byte names (any payload of it decodes, whatever its group).

    :raises KeyError: if ``codec_id`` is not a lossy codec (see :func:`is_lossy`).
    """
    return _DEFAULTS[CODEC_IDS[codec_id]]


def is_lossy(codec_id: int) -> bool:
    """Whether a record's codec-id byte names a lossy codec (its bytes are not exact)."""
    return codec_id in CODEC_IDS


def values_of(raw, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A block's bytes as float32 values of ``shape`` (a fresh array): for error checks and the bench."""
    return as_float32(raw, dtype, shape)
