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
base64 (44). The store remembers each key's fingerprint (an HMAC of a fixed label, not the key) in
LMDB so that opening it without its key, or with another key under the same id, fails at startup.

Rotation: a key file may hold several keys, one a line, ``ID:KEY`` (``ID`` in 0..127; a bare ``KEY``
is id 0, what a single-key file always was). The FIRST line seals new records; every listed key
opens the records sealed under its id. The id travels in the header's ``flags`` byte (bits 1-7, see
:data:`KEY_ID_SHIFT`; records sealed before rotation existed have 0 there: key id 0). A record
sealed under an id that is not configured raises :class:`UnknownKeyId` (a miss for the tiers).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from collections.abc import Mapping

from .codec import HEADER
from .errors import ChecksumError

#: Header ``flags`` bit of a sealed record (bit 0).
FLAG_SEALED = 0x01
#: Bits 1-7 of a sealed record's ``flags`` hold the id of the key that sealed it (0 for records
#: written before key rotation existed, and for a single key without an id).
KEY_ID_SHIFT = 1
MAX_KEY_ID = 0x7F
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


def parse_keyring(text: str) -> dict[int, bytes]:
    """Key id → key from a key file's text: one key a line, ``ID:KEY`` or a bare ``KEY`` (id 0);
    blank lines and ``#`` comments are skipped. Order is kept: the first key seals new records.

    :raises ValueError: on a malformed line (its number, never its text), an id outside 0..127, an id
        given twice, or no key at all.
    """
    keys: dict[int, bytes] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        ident, sep, rest = line.partition(":")
        try:
            kid = int(ident) if sep else 0
            key = parse_key(rest if sep else line)
        except ValueError:
            raise ValueError(f"cold-tier key file line {n}: want ID:KEY or KEY, with ID in 0..{MAX_KEY_ID} "
                             "and KEY 64 hex or 44 base64 characters") from None
        if not 0 <= kid <= MAX_KEY_ID or kid in keys:
            raise ValueError(f"cold-tier key file line {n}: key id {kid} is outside 0..{MAX_KEY_ID} or repeated")
        keys[kid] = key
    if not keys:
        raise ValueError("the cold-tier key file holds no key")
    return keys


def load_keys(key_file: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> dict[int, bytes] | None:
    """The configured keys (id → key, the first one current): from ``key_file`` if given (see
    :func:`parse_keyring`), else the one key of ``$KVTIER_COLD_KEY`` (id 0), else ``None``.

    :raises ValueError: if the file cannot be read or a key is malformed (see :func:`parse_key`).
    """
    env = os.environ if env is None else env
    if key_file is not None:
        try:
            text = Path(key_file).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the cold-tier key file {str(key_file)!r}: {exc.strerror}") from None
        return parse_keyring(text)
    if env.get(KEY_ENV):
        return {0: parse_key(env[KEY_ENV])}
    return None


class UnknownKeyId(ChecksumError):
    """A record sealed under a key id that is not configured (its key was removed from the key file)."""

    def __init__(self, key_id: int) -> None:
        super().__init__(f"record is sealed with key id {key_id}, which is not in the configured keys "
                         "(security.cold_key_file); it reads as a miss")
        self.key_id = key_id


class RecordSealer:
    """Seals and opens cold records with AES-256-GCM keys. Thread-safe (no mutable state).

    :param keys: one 32-byte key (id 0), or key id → key with the current key first (it seals new
        records; every key opens the records of its id).
    :raises ValueError: on a key of another length, an id outside 0..127, or no key.
    """

    def __init__(self, keys: bytes | Mapping[int, bytes]) -> None:
        ring = {0: keys} if isinstance(keys, (bytes, bytearray)) else dict(keys)
        if not ring:
            raise ValueError("no cold-tier key given")
        if any(len(k) != KEY_BYTES for k in ring.values()) or any(not 0 <= i <= MAX_KEY_ID for i in ring):
            raise ValueError(f"cold-tier keys must be 32 bytes, with ids in 0..{MAX_KEY_ID}")
        # Imported here: encryption is opt-in, and a store without it needs no `cryptography`.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = {i: AESGCM(bytes(k)) for i, k in ring.items()}
        #: id of the key that seals new records (the first one given)
        self.current = next(iter(ring))
        #: public fingerprint of each key by id, stored in the cold tier to detect a missing or wrong key
        self.fingerprints = {i: hmac.new(bytes(k), b"kvtier-cold-key-id-v1", hashlib.sha256).digest()[:16]
                             for i, k in ring.items()}

    def __repr__(self) -> str:  # never a key
        return f"RecordSealer(current={self.current}, ids={sorted(self._aead)})"

    def seal(self, block_key: bytes, record: bytes) -> bytes:
        """Encrypt the payload of a plain record (``Codec.encode`` output) bound to ``block_key``, with
        the current key, whose id goes into the header."""
        header = bytearray(record[:HEADER.size])
        header[FLAGS_OFFSET] = FLAG_SEALED | (self.current << KEY_ID_SHIFT)
        header = bytes(header)
        nonce = secrets.token_bytes(NONCE_BYTES)
        body = self._aead[self.current].encrypt(nonce, memoryview(record)[HEADER.size:], header + block_key)
        return header + nonce + body

    def open(self, block_key: bytes, record: bytes | memoryview) -> bytes:
        """The plain record (header with ``flags`` cleared ‖ payload) of a sealed one, opened with the
        key of the id in its header.

        :raises UnknownKeyId: if that id is not configured.
        :raises ChecksumError: if the record is not sealed, was tampered with, or belongs to another key.
        """
        record = memoryview(record)
        if len(record) < HEADER.size + NONCE_BYTES + 16 or not record[FLAGS_OFFSET] & FLAG_SEALED:
            raise ChecksumError("record is not encrypted, but this store requires encryption")
        aead = self._aead.get(key_id_of(record))
        if aead is None:
            raise UnknownKeyId(key_id_of(record))
        header = bytes(record[:HEADER.size])
        nonce = bytes(record[HEADER.size:HEADER.size + NONCE_BYTES])
        from cryptography.exceptions import InvalidTag

        try:
            payload = aead.decrypt(nonce, bytes(record[HEADER.size + NONCE_BYTES:]), header + block_key)
        except InvalidTag:
            raise ChecksumError("record fails authentication (tampered, or stored under another key)") from None
        plain = bytearray(header)
        plain[FLAGS_OFFSET] = 0
        return bytes(plain) + payload


def key_id_of(record: bytes | memoryview) -> int:
    """The id of the key a sealed record was sealed with (0 for records sealed before rotation existed)."""
    return record[FLAGS_OFFSET] >> KEY_ID_SHIFT


def is_sealed(record: bytes | memoryview) -> bool:
    """Whether a record's header says its payload is encrypted."""
    return len(record) > FLAGS_OFFSET and bool(record[FLAGS_OFFSET] & FLAG_SEALED)
