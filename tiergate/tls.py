"""TLS credentials for both servers and the hop, built from TlsSettings; server certificates reload without a restart.

A server's credentials are gRPC's dynamic SSL credentials: before each new handshake they check the
files' modification times (a `stat` each, no read) and load a changed certificate, key or CA, so a
renewed certificate is served to the next connection while open ones keep theirs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import cast

import grpc

from tiergate.settings import TlsSettings

logger = logging.getLogger(__name__)


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(
            f"cannot read the {what} {path}: {error.strerror}; create TLS files with `tiergate keys init DIR`"
        ) from None


def _stamp(paths: list[Path]) -> tuple[tuple[int, int], ...]:
    stamps = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            stamps.append((0, 0))
        else:
            stamps.append((info.st_mtime_ns, info.st_size))
    return tuple(stamps)


class ReloadingServerCertificates:
    """Loads a server's certificate, key and client CA, and again whenever one of the files changes."""

    def __init__(self, tls: TlsSettings) -> None:
        if tls.cert is None or tls.key is None:
            raise ValueError("a TLS server needs both a certificate and a key (tls.cert, tls.key)")
        if tls.require_client_cert and tls.ca is None:
            raise ValueError("requiring client certificates needs the CA that signs them (tls.ca)")
        self.tls = tls
        self._paths = [Path(p) for p in (tls.cert, tls.key, tls.ca) if p is not None]
        self._stamp = _stamp(self._paths)
        self.reloads = 0
        self.initial = self._configuration()

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key = _read(self.tls.cert, "certificate"), _read(self.tls.key, "private key")
        assert cert is not None and key is not None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=_read(self.tls.ca, "CA"))

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's per-handshake callback: a new configuration when the files changed, else None (keep)."""
        stamp = _stamp(self._paths)
        if stamp == self._stamp:
            return None
        try:
            configuration = self._configuration()
        except ValueError as error:
            # A half-written or broken file: keep serving the last good certificate.
            logger.error("TLS files changed but cannot be loaded (%s); keeping the previous certificate", error)
            return None
        self._stamp = stamp
        self.reloads += 1
        logger.info("TLS certificate reloaded from %s", self.tls.cert)
        return configuration

    def credentials(self) -> grpc.ServerCredentials:
        # The fetcher may return None ("keep the current configuration"); the stubs do not say so.
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self.fetch)
        return grpc.dynamic_ssl_server_credentials(
            self.initial, fetch, require_client_authentication=self.tls.require_client_cert
        )


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """Credentials for a serving port, or None for plaintext (no certificate configured)."""
    if tls.cert is None and tls.key is None:
        return None
    return ReloadingServerCertificates(tls).credentials()


def check_pem(tls: TlsSettings) -> None:
    """Raise ValueError, naming the file, unless every configured file parses as what it should be."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    for path, what in ((tls.ca, "CA"), (tls.cert, "certificate")):
        data = _read(path, what)
        if data is not None:
            try:
                x509.load_pem_x509_certificates(data)
            except ValueError:
                raise ValueError(f"{path} is not a PEM {what}") from None
    key = _read(tls.key, "private key")
    if key is not None:
        try:
            serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError):
            raise ValueError(f"{tls.key} is not an unencrypted PEM private key") from None


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials:
    """Client credentials for the hop: the server's CA, and this side's certificate for mutual TLS."""
    check_pem(tls)
    if tls.ca is None:
        raise ValueError("the hop's TLS needs the CA that signs the cloud's certificate (hop_tls.ca)")
    if (tls.cert is None) != (tls.key is None):
        raise ValueError("a client certificate needs both hop_tls.cert and hop_tls.key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca, "CA"),
        private_key=_read(tls.key, "private key"),
        certificate_chain=_read(tls.cert, "certificate"),
    )


def channel_options(tls: TlsSettings) -> list[tuple[str, str]]:
    """The name the server's certificate is checked against, when it is not the target's host."""
    if tls.server_name:
        return [("grpc.ssl_target_name_override", tls.server_name)]
    return []
