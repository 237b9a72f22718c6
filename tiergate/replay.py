"""Freshness and replay guard for opened envelopes: a skew window on `issued_at` and a bounded seen-set."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cachetools import TTLCache

from proto.tiergate import cloud_pb2
from tiergate.errors import ReplayCacheFullError, SealError
from tiergate.settings import ReplaySettings

logger = logging.getLogger(__name__)


class FreshnessCheck:
    """Refuses envelopes issued further than `skew_s` from this side's clock, in either direction.

    The gateway applies it to responses; the cloud applies it (inside `ReplayGuard`) to requests. Call it only on
    an envelope that opened: `issued_at` is bound into the associated data, so only then is it the sender's.
    """

    def __init__(self, skew_s: float = ReplaySettings.skew_s, *, clock: Callable[[], float] = time.time) -> None:
        if skew_s <= 0:
            raise ValueError(f"the replay skew window must be positive, got {skew_s}")
        self.skew_s = skew_s
        self._clock = clock

    def check(self, envelope: cloud_pb2.Envelope) -> None:
        """Raise `SealError(cause="stale")` unless the envelope was issued inside the window."""
        offset_s = envelope.issued_at_unix_ms / 1000 - self._clock()
        if abs(offset_s) > self.skew_s:
            # Only the size of the offset is reported: enough to spot a drifting clock, nothing more.
            when = "in the future" if offset_s > 0 else "ago"
            raise SealError(
                f"envelope is stale: issued {abs(offset_s):.0f}s {when}, outside the {self.skew_s:g}s window; "
                "check both clocks",
                cause="stale",
            )


class ReplayGuard:
    """The cloud's check on each opened request envelope: fresh, and neither its `(key_id, nonce)` nor its
    `request_id` seen before inside the window.

    The seen-sets are bounded `TTLCache`s. A full one makes `check` raise `ReplayCacheFullError` (RESOURCE_EXHAUSTED)
    instead of letting the cache evict an entry that is still inside the window, which would reopen that envelope
    to replay. Only envelopes that opened may be passed in, so forged traffic cannot fill the cache.

    One guard remembers what one process saw: replicas behind a balancer each hold their own seen-set.
    Not thread-safe; call it from one event loop (it never awaits, so each check is atomic there).
    """

    def __init__(self, settings: ReplaySettings | None = None, *, clock: Callable[[], float] = time.time) -> None:
        settings = settings or ReplaySettings()
        if settings.max_entries <= 0:
            raise ValueError(f"the replay cache needs room for at least one entry, got {settings.max_entries}")
        self.freshness = FreshnessCheck(settings.skew_s, clock=clock)
        # An envelope issued up to skew_s ahead of this clock stays fresh until skew_s after its issue time,
        # i.e. up to 2 * skew_s after it was first accepted here; it must be remembered that long.
        self.ttl_s = 2 * settings.skew_s
        self.max_entries = settings.max_entries
        self._nonces: TTLCache[tuple[str, bytes], bool, float] = TTLCache(
            maxsize=settings.max_entries, ttl=self.ttl_s, timer=clock
        )
        self._request_ids: TTLCache[str, bool, float] = TTLCache(
            maxsize=settings.max_entries, ttl=self.ttl_s, timer=clock
        )
        self._full = False

    def __len__(self) -> int:
        """Envelopes remembered (expired ones may still count until the next check)."""
        return len(self._nonces)

    def check(self, envelope: cloud_pb2.Envelope) -> None:
        """Refuse a stale or replayed envelope, else remember it.

        Raises `SealError` with cause `stale` or `replayed`, or `ReplayCacheFullError` when there is no room
        to remember it.
        """
        self.freshness.check(envelope)
        nonce_key = (envelope.key_id, envelope.nonce)
        # `in` on a TTLCache ignores expired entries, so an old id that left the window is not a replay;
        # it is stale instead, which the freshness check above already refused.
        if nonce_key in self._nonces:
            raise SealError("envelope replayed: its nonce was already used", cause="replayed")
        if envelope.request_id in self._request_ids:
            raise SealError("envelope replayed: its request id was already used", cause="replayed")
        self._nonces.expire()
        self._request_ids.expire()
        # Both sets grow and expire together; checking both keeps the invariant local.
        if len(self._nonces) >= self.max_entries or len(self._request_ids) >= self.max_entries:
            if not self._full:
                logger.warning(
                    "replay cache full (%d envelopes in %gs): refusing requests until entries expire; "
                    "raise replay.max_entries if this is normal load",
                    self.max_entries,
                    self.ttl_s,
                )
            self._full = True
            raise ReplayCacheFullError("too many requests in the replay window; retry later")
        self._full = False
        self._nonces[nonce_key] = True
        self._request_ids[envelope.request_id] = True
