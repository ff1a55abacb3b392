"""The names of the lossy cold codecs and the text a namespace chooses one with (``cold_codec``).
Imports the standard library only: the key vocabulary (``keys``) validates names without the codecs.

The codecs themselves are in ``tiering/lossy`` (numpy, zstandard); their ids are part of the on-disk
record format (the record's codec-id byte), their names part of the key spec (``keys``).
"""

from __future__ import annotations

#: codec id -> name. Part of the on-disk format: never renumber, only append.
CODEC_IDS: dict[int, str] = {16: "fp8_e4m3", 17: "int8", 18: "int4"}
#: the codecs that take a KIVI group size (``"int4/g32"``), and its bounds
GROUPED = ("int8", "int4")
MAX_GROUP = (1 << 16) - 1
#: KV element types a lossy codec accepts
LOSSY_DTYPES = ("float32", "float16", "bfloat16")


def parse_spec(spec: str) -> tuple[str, int | None]:
    """A namespace's ``cold_codec`` text as ``(name, group)``: ``"fp8_e4m3"``, ``"int8"``, ``"int4"``, or an
    int codec with its KIVI group size, ``"int4/g32"`` (``group`` is ``None`` when not given).

    :raises ValueError: on an unknown name, a group on fp8, or a group outside 1..65535.
    """
    name, sep, rest = spec.partition("/g")
    if name not in CODEC_IDS.values():
        raise ValueError(f"unknown lossy codec {spec!r}; choose from {', '.join(CODEC_IDS.values())} "
                         "(an int codec may name its group size, e.g. int4/g32)")
    if not sep:
        return name, None
    if name not in GROUPED or not rest.isdigit() or rest != str(int(rest)) or not 1 <= int(rest) <= MAX_GROUP:
        raise ValueError(f"bad lossy codec {spec!r}: only int8 and int4 take a group size, written /g<N> "
                         f"with 1 <= N <= {MAX_GROUP}")
    return name, int(rest)
