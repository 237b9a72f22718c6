"""AEAD envelopes: real AES-256-GCM sealing, tamper detection, key ids, keyring files, and the freshness and
replay guard (on an injected clock)."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from proto.tiergate import cloud_pb2
from tiergate import rpc
from tiergate.envelope import Keyring, Sealer
from tiergate.errors import OverloadedError, ReplayCacheFullError, SealError
from tiergate.replay import FreshnessCheck, ReplayGuard
from tiergate.settings import ReplaySettings

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
        (lambda e: setattr(e, "ciphertext", e.ciphertext[:-1]), "failed authentication"),
        (lambda e: setattr(e, "ciphertext", b""), "failed authentication"),
        (lambda e: setattr(e, "version", 9), r"malformed \(tampered or truncated\): unsupported envelope version"),
        (lambda e: setattr(e, "nonce", b"short"), r"malformed \(tampered or truncated\): its nonce"),
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


def test_unknown_key_id_echo_is_bounded() -> None:
    sealer = Sealer(Keyring.generate("k1"))
    envelope = sealer.seal(_request(), request_id="r1", direction="request")
    envelope.key_id = "x" * 10_000
    with pytest.raises(SealError) as caught:
        sealer.open(envelope, cloud_pb2.CloudInferRequest, direction="request")
    assert caught.value.cause == "unknown_key_id" and len(str(caught.value)) < 200


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _sealed(
    clock: Callable[[], float], request_id: str = "hop-1", keyring: Keyring | None = None
) -> cloud_pb2.Envelope:
    sealer = Sealer(keyring or Keyring.generate("k1"), clock=clock)
    return sealer.seal(_request(), request_id=request_id, direction="request")


@pytest.mark.parametrize("offset_s", [-31.0, 31.0, -3600.0, 3600.0])
def test_stale_either_way_is_refused(offset_s: float) -> None:
    clock = Clock()
    envelope = _sealed(lambda: clock.now + offset_s)
    for check in (FreshnessCheck(30.0, clock=clock).check, ReplayGuard(clock=clock).check):
        with pytest.raises(SealError, match="stale") as caught:
            check(envelope)
        assert caught.value.cause == "stale"


@pytest.mark.parametrize("offset_s", [-29.0, 0.0, 29.0])
def test_inside_the_window_is_fresh(offset_s: float) -> None:
    clock = Clock()
    envelope = _sealed(lambda: clock.now + offset_s)
    FreshnessCheck(30.0, clock=clock).check(envelope)
    ReplayGuard(clock=clock).check(envelope)


def test_stale_refusals_are_not_remembered() -> None:
    clock = Clock()
    guard = ReplayGuard(clock=clock)
    with pytest.raises(SealError, match="stale"):
        guard.check(_sealed(lambda: clock.now - 60))
    assert len(guard) == 0


def test_replayed_nonce_is_refused() -> None:
    clock = Clock()
    guard = ReplayGuard(clock=clock)
    envelope = _sealed(clock)
    guard.check(envelope)
    clock.now += 10
    with pytest.raises(SealError, match="replayed: its nonce") as caught:
        guard.check(envelope)
    assert caught.value.cause == "replayed"


def test_replayed_request_id_is_refused_even_with_a_new_nonce() -> None:
    clock = Clock()
    guard = ReplayGuard(clock=clock)
    keyring = Keyring.generate("k1")
    guard.check(_sealed(clock, "hop-1", keyring))
    again = _sealed(clock, "hop-1", keyring)
    with pytest.raises(SealError, match="replayed: its request id") as caught:
        guard.check(again)
    assert caught.value.cause == "replayed"
    guard.check(_sealed(clock, "hop-2", keyring))


def test_same_nonce_under_another_key_is_not_a_replay() -> None:
    clock = Clock()
    guard = ReplayGuard(clock=clock)
    first = _sealed(clock, "hop-1")
    second = cloud_pb2.Envelope()
    second.CopyFrom(first)
    second.key_id, second.request_id = "k2", "hop-2"
    guard.check(first)
    guard.check(second)


def test_full_cache_refuses_rather_than_forgets() -> None:
    clock = Clock()
    guard = ReplayGuard(ReplaySettings(skew_s=30.0, max_entries=3), clock=clock)
    kept = [_sealed(clock, f"hop-{i}") for i in range(3)]
    for envelope in kept:
        guard.check(envelope)
    with pytest.raises(ReplayCacheFullError) as caught:
        guard.check(_sealed(clock, "hop-new"))
    assert isinstance(caught.value, OverloadedError)
    assert rpc.status_for(caught.value)[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    # Nothing inside the window was evicted to make room: every kept envelope is still a replay.
    for envelope in kept:
        with pytest.raises(SealError, match="replayed"):
            guard.check(envelope)
    assert len(guard) == 3


def test_entries_expire_after_the_window() -> None:
    clock = Clock()
    guard = ReplayGuard(ReplaySettings(skew_s=30.0, max_entries=2), clock=clock)
    assert guard.ttl_s == 60.0
    # Issued at the future edge of the window: fresh until 60 s from now, so remembered that long.
    future = _sealed(lambda: clock.now + 30, "hop-future")
    guard.check(future)
    guard.check(_sealed(clock, "hop-now"))
    clock.now += 59
    with pytest.raises(SealError, match="replayed"):
        guard.check(future)
    with pytest.raises(ReplayCacheFullError):
        guard.check(_sealed(clock, "hop-later"))
    clock.now += 2
    # Both entries left the window: room again, and the old envelope is now refused as stale, not replayed.
    guard.check(_sealed(clock, "hop-later"))
    with pytest.raises(SealError, match="stale"):
        guard.check(future)
    assert len(guard) == 1


def test_guard_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="positive"):
        ReplayGuard(ReplaySettings(skew_s=0.0))
    with pytest.raises(ValueError, match="at least one"):
        ReplayGuard(ReplaySettings(max_entries=0))
