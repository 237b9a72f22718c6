"""Application-layer sealing of what crosses the edge/cloud boundary (AES-256-GCM envelopes)."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError, Message

from proto.tiergate import cloud_pb2
from tiergate.errors import SealError

ENVELOPE_VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
# Longest piece of a sender's header text repeated in an error message.
_ECHO_CHARS = 64

Direction = Literal["request", "response"]
M = TypeVar("M", bound=Message)
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Keyring:
    """Named AES-256 keys shared by gateway and cloud; `active_key_id` seals, any key opens."""

    keys: dict[str, bytes]
    active_key_id: str

    def __post_init__(self) -> None:
        if self.active_key_id not in self.keys:
            raise ValueError(f"active key id {self.active_key_id!r} is not in the keyring")
        for key_id, key in self.keys.items():
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id!r} must be {KEY_BYTES} bytes, got {len(key)}")

    @classmethod
    def generate(cls, key_id: str | None = None) -> Keyring:
        key_id = key_id or f"k-{secrets.token_hex(4)}"
        return cls(keys={key_id: AESGCM.generate_key(bit_length=256)}, active_key_id=key_id)

    @classmethod
    def from_json(cls, text: str) -> Keyring:
        doc = json.loads(text)
        keys = {kid: base64.b64decode(value) for kid, value in doc["keys"].items()}
        return cls(keys=keys, active_key_id=doc["active"])

    def to_json(self) -> str:
        keys = {kid: base64.b64encode(key).decode("ascii") for kid, key in self.keys.items()}
        return json.dumps({"active": self.active_key_id, "keys": keys}, indent=2)

    @classmethod
    def load(cls, path: Path) -> Keyring:
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"cannot read keyring {path}: {error}") from error

    def save(self, path: Path) -> None:
        """Write the keyring readable by its owner only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.to_json())

    @classmethod
    def load_or_create(cls, path: Path) -> Keyring:
        """Load the keyring at `path`, creating a fresh one first if there is none."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process created it first; read theirs
            else:
                # Convenient on one machine; across machines both sides must be given the same file.
                logger.warning("no keyring at %s: created a new one; give the other tier the same file", path)
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(cls.generate().to_json())
        return cls.load(path)


_DIRECTIONS: dict[str, bytes] = {"request": b"request", "response": b"response"}


def _associated_data(envelope: cloud_pb2.Envelope, direction: Direction) -> bytes:
    # Binding the clear header fields means a changed key id, request id,
    # timestamp or direction makes the tag check fail.
    return _header(direction, envelope.version, envelope.key_id, envelope.request_id, envelope.issued_at_unix_ms)


def _header(direction: Direction, version: int, key_id: str, request_id: str, issued_at_ms: int) -> bytes:
    """The associated data, from the header's values (sealing has them at hand; no field reads)."""
    return b"|".join(
        (
            b"tiergate.cloud.v1",
            _DIRECTIONS[direction],
            str(version).encode(),
            key_id.encode(),
            request_id.encode(),
            str(issued_at_ms).encode(),
        )
    )


class Sealer:
    """Seals protobuf messages into envelopes and opens them again."""

    def __init__(self, keyring: Keyring, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.update(keyring)

    def update(self, keyring: Keyring) -> None:
        """Seal with the new active key and open with every key of `keyring` from now on (a rotation)."""
        ciphers = {kid: AESGCM(key) for kid, key in keyring.keys.items()}
        # One assignment each: a call in flight sees the old keyring or the new one, never a mix.
        self._keyring, self._ciphers = keyring, ciphers

    @property
    def active_key_id(self) -> str:
        return self._keyring.active_key_id

    def seal(self, message: Message, *, request_id: str, direction: Direction) -> cloud_pb2.Envelope:
        keyring, ciphers = self._keyring, self._ciphers  # one rotation-consistent view
        key_id = keyring.active_key_id
        nonce = os.urandom(NONCE_BYTES)
        issued = int(self._clock() * 1000)
        aad = _header(direction, ENVELOPE_VERSION, key_id, request_id, issued)
        ciphertext = ciphers[key_id].encrypt(nonce, message.SerializeToString(), aad)
        return cloud_pb2.Envelope(
            version=ENVELOPE_VERSION,
            key_id=key_id,
            nonce=nonce,
            request_id=request_id,
            issued_at_unix_ms=issued,
            ciphertext=ciphertext,
        )

    def open(self, envelope: cloud_pb2.Envelope, message_type: type[M], *, direction: Direction) -> M:
        """Authenticate and decrypt; raise `SealError` (cause `malformed`, `unknown_key_id` or `tampered`).

        Authentication only: whether the envelope is fresh and new is `tiergate.replay`'s to decide, after this.
        """
        version, key_id, nonce = envelope.version, envelope.key_id, envelope.nonce
        if version != ENVELOPE_VERSION:
            raise SealError(
                f"envelope is malformed (tampered or truncated): unsupported envelope version {version}; "
                f"expected {ENVELOPE_VERSION}"
            )
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            # The id is the sender's text: echo a bounded prefix of it only.
            raise SealError(f"envelope sealed with unknown key id {key_id[:_ECHO_CHARS]!r}", cause="unknown_key_id")
        if len(nonce) != NONCE_BYTES:
            raise SealError("envelope is malformed (tampered or truncated): its nonce has the wrong length")
        aad = _header(direction, version, key_id, envelope.request_id, envelope.issued_at_unix_ms)
        try:
            plaintext = cipher.decrypt(nonce, envelope.ciphertext, aad)
        except InvalidTag:
            raise SealError(
                "envelope failed authentication (tampered, or sealed with another key)", cause="tampered"
            ) from None
        message = message_type()
        try:
            message.ParseFromString(plaintext)
        except DecodeError:
            # Authentic but unparseable: the sender sealed something else; still refused before any use.
            raise SealError(
                "envelope is malformed (tampered or truncated): its plaintext is not a valid message"
            ) from None
        return message
