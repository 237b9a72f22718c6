"""Key directories: the sealing keyring, a development CA, both tiers' certificates and the token file, in one place.

`tiergate keys init DIR` writes:

    seal-keys.json            the AES-256-GCM keyring both tiers seal the hop with      (0600)
    ca.pem, ca-key.pem        a development CA that signs the certificates below        (key 0600)
    cloud.pem, cloud-key.pem  the cloud's server certificate (serverAuth)               (key 0600)
    gateway.pem, gateway-key.pem
                              the gateway's certificate: its client certificate on the
                              hop, and usable as the public port's server certificate   (key 0600)
    tokens.json               the client token file, empty                              (0600)

`serve gateway --keys DIR` and `serve cloud --keys DIR` take their files from it (`apply_key_dir`);
settings given explicitly win. Private files are created at 0600, never chmod-ed afterwards.
For production, sign the certificates with your own CA and set the TLS paths explicitly.

Rotating the sealing key takes two steps, because either tier may open what the other sealed:

1. `tiergate keys rotate DIR --stage` adds a new key without sealing with it. Give the new keyring
   to both tiers and let both load it (file change or SIGHUP); now either can open the new key.
2. `tiergate keys rotate DIR --activate [KEY_ID]` makes it (default: the newest key) the key that
   seals. Distribute again. Envelopes sealed with the old key still open, as the old key stays.

Plain `tiergate keys rotate DIR` does both at once: fine when both tiers read the same file.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tiergate.envelope import Keyring
from tiergate.settings import DEFAULT_KEYRING, CloudSettings, GatewaySettings
from tiergate.tokens import check_client_name, render_token_file, write_private_file

KEYRING_FILE = "seal-keys.json"
CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
CLOUD_CERT = "cloud.pem"
CLOUD_KEY = "cloud-key.pem"
GATEWAY_CERT = "gateway.pem"
GATEWAY_KEY = "gateway-key.pem"
TOKENS_FILE = "tokens.json"
CLIENTS_DIR = "clients"

CLOUD_CN = "tiergate-cloud"
GATEWAY_CN = "tiergate-gateway"
CA_CN = "Tiergate development CA"
DEFAULT_CLOUD_NAMES = ("localhost", CLOUD_CN, "127.0.0.1")
DEFAULT_GATEWAY_NAMES = ("localhost", GATEWAY_CN, "127.0.0.1")
DEFAULT_DAYS = 365
# Certificates start a little in the past, so a peer whose clock is slightly behind accepts them.
_BACKDATE = datetime.timedelta(minutes=5)

PRIVATE_FILES = (KEYRING_FILE, CA_KEY, CLOUD_KEY, GATEWAY_KEY, TOKENS_FILE)
KEY_DIR_FILES = (KEYRING_FILE, CA_CERT, CA_KEY, CLOUD_CERT, CLOUD_KEY, GATEWAY_CERT, GATEWAY_KEY, TOKENS_FILE)

logger = logging.getLogger(__name__)


class KeyDirError(ValueError):
    """A key directory or keyring is missing, incomplete or cannot be changed as asked; the message says what to do."""


def missing_keys_message(path: Path) -> str:
    """What a server started without its keyring tells the operator."""
    return (
        f"no keyring at {path}; create a key directory with `tiergate keys init DIR` and pass --keys DIR "
        "(servers no longer create keys on their own)"
    )


def load_keyring(path: Path) -> Keyring:
    """The keyring at `path`; KeyDirError saying how to create one if there is none. Never creates keys."""
    if not path.is_file():
        raise KeyDirError(missing_keys_message(path))
    try:
        return Keyring.load(path)
    except ValueError as error:
        raise KeyDirError(str(error)) from error


# --- writing files ---------------------------------------------------------------------------------------------


def _create_file(path: Path, data: bytes, *, private: bool) -> None:
    """Create `path` (it must not exist), at 0600 when private: the mode is set at creation, not after."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_new_files(directory: Path, files: dict[str, tuple[bytes, bool]], *, force: bool) -> None:
    existing = sorted(name for name in files if (directory / name).exists())
    if existing and not force:
        raise KeyDirError(
            f"{directory} already holds {', '.join(existing)}; refusing to overwrite keys "
            "(pass --force to replace them: whatever uses the old ones stops working)"
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in existing:
        (directory / name).unlink()
    for name, (data, private) in files.items():
        _create_file(directory / name, data, private=private)


# --- certificates ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _subject(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tiergate"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _alt_names(names: Iterable[str]) -> list[x509.GeneralName]:
    """DNS names, and IP addresses for the names that are addresses; duplicates dropped, order kept."""
    general: list[x509.GeneralName] = []
    for name in dict.fromkeys(n.strip() for n in names if n.strip()):
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return general


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    if days <= 0:
        raise KeyDirError(f"certificates must be valid for at least one day, got {days}")
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - _BACKDATE).not_valid_after(now + datetime.timedelta(days=days))


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signing only; a CA also signs certificates and revocation lists."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(days: int) -> _Issuer:
    key = _new_key()
    name = _subject(CA_CN)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return _Issuer(_validity(builder, days).sign(key, hashes.SHA256()), key)


def _issue(
    issuer: _Issuer,
    common_name: str,
    usages: Sequence[x509.ObjectIdentifier],
    names: Iterable[str],
    days: int,
    *,
    extra: Sequence[x509.GeneralName] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(common_name))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    alt_names = [*_alt_names(names), *extra]
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return _validity(builder, days).sign(issuer.key, hashes.SHA256()), key


def _load_issuer(directory: Path) -> _Issuer:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise KeyDirError(
            f"{directory} has no development CA ({CA_CERT}, {CA_KEY}); create it with `tiergate keys init {directory}`"
        )
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyDirError(f"{key_path} is not an EC private key")
    return _Issuer(cert, key)


# --- the key directory -----------------------------------------------------------------------------------------


def init_key_dir(
    directory: Path,
    *,
    cloud_names: Sequence[str] = (),
    gateway_names: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> Path:
    """Write a complete key directory (see the module docstring) and return it.

    `cloud_names` / `gateway_names` are extra DNS names or IP addresses for the certificates (e.g. the
    host name the gateway dials the cloud by). An existing key directory is refused unless `force`.
    """
    directory = Path(directory)
    ca = _make_ca(days)
    cloud_cert, cloud_key = _issue(
        ca, CLOUD_CN, [ExtendedKeyUsageOID.SERVER_AUTH], [*DEFAULT_CLOUD_NAMES, *cloud_names], days
    )
    gateway_cert, gateway_key = _issue(
        ca,
        GATEWAY_CN,
        [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        [*DEFAULT_GATEWAY_NAMES, *gateway_names],
        days,
    )
    files = {
        KEYRING_FILE: (Keyring.generate().to_json().encode("utf-8"), True),
        CA_CERT: (_cert_pem(ca.cert), False),
        CA_KEY: (_key_pem(ca.key), True),
        CLOUD_CERT: (_cert_pem(cloud_cert), False),
        CLOUD_KEY: (_key_pem(cloud_key), True),
        GATEWAY_CERT: (_cert_pem(gateway_cert), False),
        GATEWAY_KEY: (_key_pem(gateway_key), True),
        TOKENS_FILE: (render_token_file().encode("utf-8"), True),
    }
    _write_new_files(directory, files, force=force)
    return directory


def ensure_key_dir(directory: Path) -> Path:
    """A usable key directory at `directory`: created when there is none, checked when there is (the demo's path).

    A directory holding only some of the files is refused rather than completed, as new certificates
    would not match the keys already handed out.
    """
    directory = Path(directory)
    present = [name for name in KEY_DIR_FILES if (directory / name).exists()]
    if not present:
        return init_key_dir(directory)
    missing = [name for name in KEY_DIR_FILES if name not in present]
    if missing:
        raise KeyDirError(
            f"key directory {directory} lacks {', '.join(missing)}; recreate it with "
            f"`tiergate keys init {directory} --force`"
        )
    load_keyring(directory / KEYRING_FILE)
    return directory


def client_uri(name: str) -> str:
    """The URI subject alternative name of client `name`'s certificate (its CN is the name itself)."""
    return f"urn:tiergate:client:{name}"


def mint_client_cert(directory: Path, name: str, *, days: int = DEFAULT_DAYS, force: bool = False) -> tuple[Path, Path]:
    """A client certificate with subject CN `name`, signed by the directory's CA; returns (cert, key) paths.

    Written to `clients/NAME.pem` and `clients/NAME-key.pem` (the key at 0600). For clients of the
    public port identified by their certificate subject (auth.allow_cert_subjects).
    """
    directory = Path(directory)
    try:
        check_client_name(name)
    except ValueError as error:
        raise KeyDirError(str(error)) from None
    issuer = _load_issuer(directory)
    # Verifiers (the web PKI profile) require a subject alternative name even on client certificates.
    cert, key = _issue(
        issuer,
        name,
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        [],
        days,
        extra=[x509.UniformResourceIdentifier(client_uri(name))],
    )
    clients = directory / CLIENTS_DIR
    _write_new_files(
        clients, {f"{name}.pem": (_cert_pem(cert), False), f"{name}-key.pem": (_key_pem(key), True)}, force=force
    )
    return clients / f"{name}.pem", clients / f"{name}-key.pem"


# --- keyring rotation ------------------------------------------------------------------------------------------


def _keyring_path(target: Path) -> Path:
    target = Path(target)
    return target / KEYRING_FILE if target.is_dir() else target


def rotate_keyring(target: Path, *, stage: bool = False) -> str:
    """Add a new key to the keyring at `target` (a key directory or a keyring file); return its id.

    The new key seals from now on, unless `stage`: then it is only added, and `activate_key` makes it
    the sealing key once every tier has loaded it. Old keys stay, so what they sealed still opens.
    The file is replaced atomically at 0600.
    """
    path = _keyring_path(target)
    keyring = load_keyring(path)
    fresh = Keyring.generate()
    while fresh.active_key_id in keyring.keys:  # 32 random bits: a clash is unlikely, but cheap to rule out
        fresh = Keyring.generate()
    new_id = fresh.active_key_id
    keys = {**keyring.keys, new_id: fresh.keys[new_id]}  # insertion order is age order: the newest is last
    write_private_file(path, Keyring(keys, keyring.active_key_id if stage else new_id).to_json())
    return new_id


def activate_key(target: Path, key_id: str | None = None) -> str:
    """Make `key_id` (default: the newest key) the sealing key of the keyring at `target`; return its id."""
    path = _keyring_path(target)
    keyring = load_keyring(path)
    chosen = key_id if key_id is not None else list(keyring.keys)[-1]
    if chosen not in keyring.keys:
        raise KeyDirError(f"no key {chosen!r} in {path}; its keys are {', '.join(keyring.keys)}")
    write_private_file(path, Keyring(dict(keyring.keys), chosen).to_json())
    return chosen


# --- settings --------------------------------------------------------------------------------------------------


def _check_files(directory: Path, names: Iterable[str]) -> None:
    if not directory.is_dir():
        raise KeyDirError(f"no key directory at {directory}; create it with `tiergate keys init {directory}`")
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise KeyDirError(
            f"key directory {directory} lacks {', '.join(missing)}; create it with `tiergate keys init {directory}`"
        )
    for name in names:
        # Group bits are how a Secret volume (0440 with fsGroup) lets the server's group read; others' are not.
        if name in PRIVATE_FILES and stat.S_IMODE((directory / name).stat().st_mode) & 0o007:
            logger.warning("%s is readable by other users; chmod 600 it (or 640 for a group)", directory / name)


def apply_key_dir(settings: GatewaySettings | CloudSettings) -> None:
    """Fill the keyring, TLS and token paths of `settings` from `settings.keys_dir`, if one is set.

    Only settings still at their default are filled (a certificate and its key as a pair), so explicit
    settings win. Gateway: the hop's TLS (ca, gateway.pem, gateway-key.pem) and the token file, which
    turns client authentication on. Cloud: its serving TLS (ca, cloud.pem, cloud-key.pem).
    KeyDirError naming `tiergate keys init` if a file it needs is missing.
    """
    if settings.keys_dir is None:
        return
    directory = Path(settings.keys_dir)
    gateway = isinstance(settings, GatewaySettings)
    tls = settings.hop_tls if isinstance(settings, GatewaySettings) else settings.tls
    cert, key = (GATEWAY_CERT, GATEWAY_KEY) if gateway else (CLOUD_CERT, CLOUD_KEY)
    fill_keyring = settings.keyring_path == DEFAULT_KEYRING
    fill_ca = tls.ca is None
    fill_pair = tls.cert is None and tls.key is None
    fill_tokens = isinstance(settings, GatewaySettings) and settings.auth.tokens_path is None
    needed = [
        *([KEYRING_FILE] if fill_keyring else []),
        *([CA_CERT] if fill_ca else []),
        *([cert, key] if fill_pair else []),
        *([TOKENS_FILE] if fill_tokens else []),
    ]
    _check_files(directory, needed)  # before changing anything
    if fill_keyring:
        settings.keyring_path = directory / KEYRING_FILE
    if fill_ca:
        tls.ca = directory / CA_CERT
    if fill_pair:
        tls.cert, tls.key = directory / cert, directory / key
    if fill_tokens and isinstance(settings, GatewaySettings):
        settings.auth.tokens_path = directory / TOKENS_FILE
        settings.auth.enabled = True
