"""tiering/codec.py: records round-trip every KV dtype under every codec; damage is detected."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.tiering.codec import HEADER, Codec, CodecId, checksum, shuffle, unshuffle
from kvtier.tiering.dtypes import TORCH_DTYPES as TORCH
from kvtier.tiering.errors import ChecksumError, InvalidBlock

SHAPE = (2, 3, 2, 5, 8)


def _block(dtype: str, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if dtype in ("uint8", "int8"):
        t = torch.randint(-128 if dtype == "int8" else 0, 128, SHAPE, generator=g, dtype=TORCH[dtype])
    else:
        t = (torch.randn(SHAPE, generator=g) * 3).to(TORCH[dtype])
    return t.contiguous().view(torch.uint8).reshape(-1).numpy(), t


@pytest.mark.parametrize("codec", list(CodecId))
@pytest.mark.parametrize("dtype", list(TORCH))
def test_round_trip(dtype, codec):
    raw, tensor = _block(dtype)
    c = Codec(level=3, codec=codec)
    record = c.encode(raw, dtype, SHAPE)
    header, out = c.decode(record)
    assert header.codec is codec and header.dtype == dtype and header.shape == SHAPE
    assert header.raw_length == raw.nbytes and header.checksum == checksum(raw)
    assert out.tobytes() == raw.tobytes()
    back = torch.from_numpy(out).view(TORCH[dtype]).reshape(SHAPE)
    assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))  # bitwise (NaNs included)


@pytest.mark.parametrize("codec", list(CodecId))
def test_decode_into_out_buffer_and_any_codec_decodes(codec):
    raw, _ = _block("bfloat16", 1)
    record = Codec(codec=codec).encode(raw, "bfloat16", SHAPE)
    out = np.empty(raw.nbytes, dtype=np.uint8)
    _, got = Codec(codec=CodecId.RAW).decode(record, out)  # the decoder's own codec does not matter
    assert got is out and out.tobytes() == raw.tobytes()


def test_shuffle_is_an_involution():
    data = bytes(range(256)) * 3
    for item in (1, 2, 4):
        s = shuffle(data, item)
        assert len(s) == len(data)
        assert unshuffle(s, item).tobytes() == data
    assert shuffle(b"\x01\x02\x03\x04", 2) == b"\x01\x03\x02\x04"


def test_encode_rejects_wrong_sizes():
    raw, _ = _block("float16")
    with pytest.raises(InvalidBlock):
        Codec().encode(raw[:-2], "float16", SHAPE)
    with pytest.raises(InvalidBlock):
        Codec().encode(raw, "float16", (3, 3, 2, 5, 8))


def _damaged(record: bytes, at: int) -> bytes:
    b = bytearray(record)
    b[at] ^= 0x5A
    return bytes(b)


@pytest.mark.parametrize("codec", list(CodecId))
def test_damage_anywhere_raises_checksum_error(codec):
    raw, _ = _block("bfloat16", 2)
    c = Codec(codec=codec)
    record = c.encode(raw, "bfloat16", SHAPE)
    # header fields (magic, version, codec, dtype, shape, length, checksum) and payload bytes
    for at in [0, 4, 5, 6, 8, 12, 24, HEADER.size - 1, HEADER.size, HEADER.size + 7, len(record) // 2, len(record) - 1]:
        with pytest.raises(ChecksumError):
            c.decode(_damaged(record, at))
    with pytest.raises(ChecksumError):
        c.decode(record[:HEADER.size - 1])
    with pytest.raises(ChecksumError):
        c.decode(record[:-1])
    try:  # trailing bytes after a zstd frame are ignored: harmless, the checksum still holds
        assert c.decode(record + b"\0")[1].tobytes() == raw.tobytes()
    except ChecksumError:
        pass


def test_unknown_codec_id_raises_checksum_error():
    raw, _ = _block("float16")
    record = bytearray(Codec().encode(raw, "float16", SHAPE))
    record[5] = 99
    with pytest.raises(ChecksumError):
        Codec.read_header(bytes(record))


def test_codec_is_thread_safe():
    from concurrent.futures import ThreadPoolExecutor
    c = Codec()
    blocks = [_block("float32", i)[0] for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda r: c.decode(c.encode(r, "float32", SHAPE))[1].tobytes(), blocks))
    assert outs == [b.tobytes() for b in blocks]


@pytest.mark.parametrize("codec", list(CodecId))
@pytest.mark.parametrize("dtype", list(TORCH))
@pytest.mark.parametrize("shape", [(2, 1, 1, 1, 1), (2, 1, 1, 3, 7), (2, 3, 5, 17, 9)])
def test_odd_sizes_round_trip_bit_exact_into_an_unaligned_buffer(dtype, codec, shape):
    g = torch.Generator().manual_seed(sum(shape))
    raw = torch.randint(0, 256, (int(np.prod(shape)) * TORCH[dtype].itemsize,), generator=g,
                        dtype=torch.uint8).numpy()  # every bit pattern: NaNs, infinities, subnormals
    c = Codec(level=3, codec=codec)
    record = c.encode(raw, dtype, shape)
    assert record[5] == int(codec)  # the codec id byte means what it always meant
    assert c.decode(record)[1].tobytes() == raw.tobytes()
    backing = np.full(raw.nbytes + 3, 0xEE, dtype=np.uint8)
    out = backing[1:1 + raw.nbytes]  # odd offset: no alignment for 2- or 4-byte elements
    _, got = Codec(codec=CodecId.RAW).decode(record, out)
    assert got is out and out.tobytes() == raw.tobytes()
    assert backing[0] == 0xEE and (backing[1 + raw.nbytes:] == 0xEE).all()  # nothing written outside


@pytest.mark.parametrize("item", [1, 2, 4])
def test_unshuffle_into_a_buffer_matches_the_element_order(item):
    data = np.random.default_rng(item).integers(0, 256, 6 * 4 * 5, dtype=np.uint8)
    out = np.empty(data.size + 1, dtype=np.uint8)[1:]
    assert unshuffle(shuffle(data, item), item, out) is out and out.tobytes() == data.tobytes()


def test_the_blosc2_chunk_format_byte_is_checked():
    raw, _ = _block("float16", 4)
    c = Codec(codec=CodecId.BLOSC2_ZSTD)
    record = bytearray(c.encode(raw, "float16", SHAPE))
    record[HEADER.size] = 0xFF  # a format version no blosc2 here writes (blosc2 would ignore it)
    with pytest.raises(ChecksumError, match="format version"):
        c.decode(bytes(record))


def test_a_destination_of_the_wrong_size_is_refused():
    raw, _ = _block("float16", 5)
    record = Codec().encode(raw, "float16", SHAPE)
    with pytest.raises(InvalidBlock):
        Codec().decode(record, np.empty(raw.nbytes - 2, dtype=np.uint8))
