"""What both servers do the same way at the trust boundary: TLS or an explicit plaintext, reloading files, audit.

Each server builds a `Boundary` from its settings: it refuses to start on plaintext unless told so,
watches its keyring (and any other file handed to it) for changes and SIGHUP, and owns the audit log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from tiergate.audit import AuditLog
from tiergate.envelope import Keyring, Sealer
from tiergate.reload import FileWatch, on_sighup
from tiergate.settings import AuditSettings, TlsSettings
from tiergate.tls import server_credentials

logger = logging.getLogger(__name__)

T = TypeVar("T")


def require_tls_or_insecure(tls: TlsSettings, insecure: bool, what: str, setting: str) -> bool:
    """True when `tls` is configured; with neither TLS nor `insecure`, a clear error; insecure logs a warning."""
    if tls.configured:
        return True
    if not insecure:
        raise ValueError(
            f"{what} has no TLS configured: create a key directory with `tiergate keys init DIR` and pass "
            f"--keys DIR (or set the TLS files), or set {setting} = true to run it in plaintext on a trusted network"
        )
    logger.warning("%s runs in PLAINTEXT (%s = true): envelopes are still sealed, but not the channel", what, setting)
    return False


class Boundary:
    """One server's reloading files, SIGHUP handler and audit log."""

    def __init__(self, audit: AuditSettings) -> None:
        self.audit = AuditLog(audit) if audit.path is not None else None
        self._watches: list[FileWatch[Any]] = []
        self._undo_sighup: Callable[[], None] | None = None

    def watch(
        self, paths: Path | Sequence[Path], load: Callable[[], T], on_change: Callable[[T], None], name: str
    ) -> None:
        """Reload `paths` with `load` on change or SIGHUP and hand the new value to `on_change`."""
        files = [paths] if isinstance(paths, Path) else list(paths)
        self._watches.append(FileWatch(files, load, on_change, name=name))

    def watch_keyring(self, path: Path, sealer: Sealer) -> None:
        def rotated(keyring: Keyring) -> None:
            sealer.update(keyring)
            logger.info("keyring reloaded: sealing with key %s, %d keys open", keyring.active_key_id, len(keyring.keys))

        self.watch(path, lambda: Keyring.load(path), rotated, f"keyring {path}")

    def start(self) -> None:
        """Start every watch (in the running loop) and take SIGHUP as 'reload now'."""
        for watch in self._watches:
            watch.start()
        if self._watches:
            self._undo_sighup = on_sighup(self.reload)

    def reload(self) -> None:
        for watch in self._watches:
            watch.trigger()

    async def stop(self) -> None:
        if self._undo_sighup is not None:
            self._undo_sighup()
            self._undo_sighup = None
        for watch in self._watches:
            await watch.stop()
        if self.audit is not None:
            self.audit.close()


def serving_credentials(tls: TlsSettings, insecure: bool, what: str, setting: str) -> grpc.ServerCredentials | None:
    """TLS credentials for a serving port that must be secure unless `insecure` says otherwise."""
    if require_tls_or_insecure(tls, insecure, what, setting):
        return server_credentials(tls)
    return None
