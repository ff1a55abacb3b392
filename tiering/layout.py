"""BlockLayout: the dtype and shape of one KV block, and the byte sizes that follow from them.
Imports ``errors`` only.

A block holds K and V of ``block_tokens`` consecutive tokens for every layer of one model, as one
contiguous tensor of shape ``[2, layers, kv_heads, tokens, head_dim]`` in the model's dtype. The last
block of a sequence may be partial (``tokens < block_tokens``); every other block is full.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidBlock

#: dtype name -> (bytes per element, small integer code used in record headers). Codes are part of
#: the on-disk format: never renumber, only append.
DTYPES: dict[str, tuple[int, int]] = {
    "float32": (4, 1),
    "float16": (2, 2),
    "bfloat16": (2, 3),
    "float8_e4m3fn": (1, 4),
    "float8_e5m2": (1, 5),
    "uint8": (1, 6),
    "int8": (1, 7),
}
DTYPE_BY_CODE: dict[int, str] = {code: name for name, (_, code) in DTYPES.items()}

#: Upper bounds that keep a hostile layout from asking for absurd sizes.
MAX_DIM = 1 << 16
MAX_BLOCK_BYTES = 1 << 30


def blocks_for(tokens: int, block_tokens: int) -> int:
    """How many blocks of ``block_tokens`` cover ``tokens`` (the last one may be partial): a ceiling
    division, also used for bytes over pages or alignment units."""
    return -(-tokens // block_tokens)


def itemsize(dtype: str) -> int:
    """Bytes per element of ``dtype``.

    :raises InvalidBlock: if the dtype is not one kvtier stores.
    """
    try:
        return DTYPES[dtype][0]
    except KeyError:
        raise InvalidBlock(
            f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}", field="layout.dtype"
        ) from None


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """What every block of one namespace looks like. Immutable and hashable.

    :param dtype: element type name, one of :data:`DTYPES`.
    :param layers: transformer layers covered by a block.
    :param kv_heads: key/value heads per layer.
    :param head_dim: elements per head.
    :param block_tokens: tokens in a full block.
    """

    dtype: str
    layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int

    def __post_init__(self) -> None:
        itemsize(self.dtype)
        for name in ("layers", "kv_heads", "head_dim", "block_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 < value <= MAX_DIM:
                raise InvalidBlock(
                    f"layout.{name} must be an integer in 1..{MAX_DIM}, got {value!r}",
                    field=f"layout.{name}",
                )
        if self.block_bytes() > MAX_BLOCK_BYTES:
            raise InvalidBlock(
                f"a block of this layout would be {self.block_bytes()} bytes, over the "
                f"{MAX_BLOCK_BYTES}-byte limit; use fewer block_tokens",
                field="layout",
            )

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)

    def shape(self, tokens: int | None = None) -> tuple[int, int, int, int, int]:
        """Shape of a block holding ``tokens`` tokens (a full block when omitted)."""
        t = self.block_tokens if tokens is None else tokens
        return (2, self.layers, self.kv_heads, t, self.head_dim)

    def block_bytes(self, tokens: int | None = None) -> int:
        """Payload bytes of a block holding ``tokens`` tokens (a full block when omitted)."""
        t = self.block_tokens if tokens is None else tokens
        return 2 * self.layers * self.kv_heads * t * self.head_dim * self.itemsize

    def tokens_for(self, nbytes: int) -> int:
        """Number of tokens a payload of ``nbytes`` holds.

        :raises InvalidBlock: if ``nbytes`` is not a whole number of tokens, or more than a full block.
        """
        per_token = self.block_bytes(1)
        tokens, rest = divmod(nbytes, per_token)
        if rest or not 0 < tokens <= self.block_tokens:
            raise InvalidBlock(
                f"payload of {nbytes} bytes does not match layout {self.describe()}: expected a "
                f"multiple of {per_token} bytes per token, at most {self.block_bytes()} bytes",
                field="payload",
            )
        return tokens

    def describe(self) -> str:
        """Canonical text form, used in the namespace hash: ``float16:30x3x64/16``."""
        return f"{self.dtype}:{self.layers}x{self.kv_heads}x{self.head_dim}/{self.block_tokens}"
