"""Encryption at rest of cold records: AES-256-GCM of the payload, header and block key as AAD.
Imports ``codec``, ``errors`` only (and `cryptography` once a key is used).

A sealed record is ``header ‖ nonce(12) ‖ AES-GCM(payload) ‖ tag(16)``. The header
(``tiering/codec.py``) stays readable, so ``kvtier inspect`` and the compression ratio still work,
but its :data:`FLAG_SEALED` bit is set and it is authenticated together with the block's 16-byte key:
a tampered header or payload, or a record copied under another key, fails to open, and the cold
tier treats it like any other damaged record (a miss, counted in ``checksum_failures``).

The nonce is 96 random bits per record. With one key, the birthday bound of random nonces (2^32
records at a 2^-32 collision risk) is far beyond what one store writes between key rotations.

Key material: 32 bytes, given as a file or the :data:`KEY_ENV` variable, hex (64 characters) or
base64 (44). The store remembers a key id (an HMAC of a fixed label, not the key) in LMDB so that
opening it without the key, or with another one, fails at startup with a clear message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from .codec import HEADER
from .errors import ChecksumError

#: Header ``flags`` bit of a sealed record (bit 0; the other bits stay reserved).
FLAG_SEALED = 0x01
#: Byte offset of ``flags`` in the header (after magic 4, version 1, codec id 1, dtype code 1).
FLAGS_OFFSET = 7
#: Env var holding the key when no key file is configured.
KEY_ENV = "KVTIER_COLD_KEY"
NONCE_BYTES = 12
KEY_BYTES = 32


def parse_key(text: str | bytes) -> bytes:
    """32 key bytes from hex (64 characters) or base64 text; surrounding whitespace is ignored.

    :raises ValueError: if the text is neither, or does not hold exactly 32 bytes. The message never
        quotes the text.
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = text.strip()
    for decode in (bytes.fromhex, lambda s: base64.b64decode(s, validate=True)):
        try:
            key = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(key) == KEY_BYTES:
            return key
    raise ValueError("the cold-tier key must be 32 bytes, written as 64 hex characters or 44 base64 characters")


def load_key(key_file: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> bytes | None:
    """The configured key: from ``key_file`` if given, else from ``$KVTIER_COLD_KEY``, else ``None``.

    :raises ValueError: if the file cannot be read or the key is malformed (see :func:`parse_key`).
    """
    env = os.environ if env is None else env
    if key_file is not None:
        try:
            text = Path(key_file).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the cold-tier key file {str(key_file)!r}: {exc.strerror}") from None
        return parse_key(text)
    if env.get(KEY_ENV):
        return parse_key(env[KEY_ENV])
    return None


class RecordSealer:
    """Seals and opens cold records with one AES-256-GCM key. Thread-safe (no mutable state).

    :param key: 32 bytes.
    :raises ValueError: on a key of another length.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("the cold-tier key must be 32 bytes")
        # Imported here: encryption is opt-in, and a store without it needs no `cryptography`.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        #: public fingerprint of the key, stored in the cold tier to detect a missing or wrong key
        self.key_id = hmac.new(key, b"kvtier-cold-key-id-v1", hashlib.sha256).digest()[:16]

    def __repr__(self) -> str:  # never the key
        return f"RecordSealer(key_id={self.key_id.hex()})"

    def seal(self, block_key: bytes, record: bytes) -> bytes:
        """Encrypt the payload of a plain record (``Codec.encode`` output) bound to ``block_key``."""
        header = bytearray(record[:HEADER.size])
        header[FLAGS_OFFSET] |= FLAG_SEALED
        header = bytes(header)
        nonce = secrets.token_bytes(NONCE_BYTES)
        body = self._aead.encrypt(nonce, memoryview(record)[HEADER.size:], header + block_key)
        return header + nonce + body

    def open(self, block_key: bytes, record: bytes | memoryview) -> bytes:
        """The plain record (header with the flag cleared ‖ payload) of a sealed one.

        :raises ChecksumError: if the record is not sealed, was tampered with, or belongs to another key.
        """
        record = memoryview(record)
        if len(record) < HEADER.size + NONCE_BYTES + 16 or not record[FLAGS_OFFSET] & FLAG_SEALED:
            raise ChecksumError("record is not encrypted, but this store requires encryption")
        header = bytes(record[:HEADER.size])
        nonce = bytes(record[HEADER.size:HEADER.size + NONCE_BYTES])
        from cryptography.exceptions import InvalidTag

        try:
            payload = self._aead.decrypt(nonce, bytes(record[HEADER.size + NONCE_BYTES:]), header + block_key)
        except InvalidTag:
            raise ChecksumError("record fails authentication (tampered, or stored under another key)") from None
        plain = bytearray(header)
        plain[FLAGS_OFFSET] &= ~FLAG_SEALED & 0xFF
        return bytes(plain) + payload


def is_sealed(record: bytes | memoryview) -> bool:
    """Whether a record's header says its payload is encrypted."""
    return len(record) > FLAGS_OFFSET and bool(record[FLAGS_OFFSET] & FLAG_SEALED)
