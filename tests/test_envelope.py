"""AEAD envelopes: real AES-256-GCM sealing, tamper detection, key ids and keyring files."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from proto.tiergate import cloud_pb2
from tiergate.envelope import Keyring, Sealer
from tiergate.errors import SealError

TEXT = "Organic Whole Milk half gallon"


def _request() -> cloud_pb2.CloudInferRequest:
    return cloud_pb2.CloudInferRequest(model_name="product-category", texts=[TEXT])


def test_roundtrip_and_plaintext_absent() -> None:
    sealer = Sealer(Keyring.generate("k1"))
    envelope = sealer.seal(_request(), request_id="r1", direction="request")
    assert envelope.key_id == "k1" and len(envelope.nonce) == 12
    assert TEXT.encode() not in envelope.SerializeToString()
    opened = sealer.open(envelope, cloud_pb2.CloudInferRequest, direction="request")
    assert list(opened.texts) == [TEXT]


def test_nonces_are_fresh() -> None:
    sealer = Sealer(Keyring.generate())
    nonces = {sealer.seal(_request(), request_id="r", direction="request").nonce for _ in range(50)}
    assert len(nonces) == 50


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: setattr(e, "request_id", "other"), "failed authentication"),
        (lambda e: setattr(e, "issued_at_unix_ms", e.issued_at_unix_ms + 1), "failed authentication"),
        (lambda e: setattr(e, "ciphertext", bytes([e.ciphertext[0] ^ 1]) + e.ciphertext[1:]), "failed authentication"),
        (lambda e: setattr(e, "key_id", "nope"), "unknown key id 'nope'"),
        (lambda e: setattr(e, "version", 9), "unsupported envelope version"),
        (lambda e: setattr(e, "nonce", b"short"), "nonce"),
    ],
)
def test_tampering_is_rejected(mutate: Callable[[cloud_pb2.Envelope], object], message: str) -> None:
    sealer = Sealer(Keyring.generate("k1"))
    envelope = sealer.seal(_request(), request_id="r1", direction="request")
    mutate(envelope)
    with pytest.raises(SealError, match=message):
        sealer.open(envelope, cloud_pb2.CloudInferRequest, direction="request")


def test_direction_is_bound() -> None:
    sealer = Sealer(Keyring.generate())
    envelope = sealer.seal(_request(), request_id="r1", direction="response")
    with pytest.raises(SealError):
        sealer.open(envelope, cloud_pb2.CloudInferRequest, direction="request")


def test_other_keyring_cannot_open() -> None:
    envelope = Sealer(Keyring.generate("k1")).seal(_request(), request_id="r", direction="request")
    with pytest.raises(SealError):
        Sealer(Keyring.generate("k1")).open(envelope, cloud_pb2.CloudInferRequest, direction="request")


def test_rotation_old_key_still_opens() -> None:
    old = Keyring.generate("old")
    envelope = Sealer(old).seal(_request(), request_id="r", direction="request")
    rotated = Keyring(keys={**old.keys, **Keyring.generate("new").keys}, active_key_id="new")
    assert Sealer(rotated).seal(_request(), request_id="r", direction="request").key_id == "new"
    assert list(Sealer(rotated).open(envelope, cloud_pb2.CloudInferRequest, direction="request").texts) == [TEXT]


def test_keyring_file_is_private_and_roundtrips(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "ring.json"
    created = Keyring.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Keyring.load_or_create(path) == created


def test_keyring_rejects_bad_keys() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Keyring(keys={"k": b"short"}, active_key_id="k")
    with pytest.raises(ValueError, match="not in the keyring"):
        Keyring(keys={}, active_key_id="k")
