"""Key directories: files and modes, certificates checked by a real X.509 verifier and a real mTLS handshake,
keyring rotation (at once and staged), settings filled from the directory, servers refusing to start without keys."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from app.cli import main
from proto.tiergate import cloud_pb2
from tiergate.envelope import Keyring, Sealer
from tiergate.keys import (
    CA_CERT,
    CA_KEY,
    CLOUD_CERT,
    CLOUD_KEY,
    GATEWAY_CERT,
    GATEWAY_KEY,
    KEY_DIR_FILES,
    KEYRING_FILE,
    PRIVATE_FILES,
    TOKENS_FILE,
    KeyDirError,
    activate_key,
    apply_key_dir,
    ensure_key_dir,
    init_key_dir,
    load_keyring,
    mint_client_cert,
    missing_keys_message,
    rotate_keyring,
)
from tiergate.settings import DEFAULT_KEYRING, CloudSettings, GatewaySettings
from tiergate.tokens import TokenStore

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_key_dir(tmp_path_factory.mktemp("keys") / "k", cloud_names=["cloud.internal", "10.0.0.7"])


@pytest.fixture(scope="module")
def other_key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key directory with a CA of its own: its certificates must be refused by the first one's servers."""
    return init_key_dir(tmp_path_factory.mktemp("other") / "k")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _store(directory: Path) -> verification.Store:
    return verification.Store([_cert(directory / CA_CERT)])


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# --- the directory ---------------------------------------------------------------------------------------------


def test_init_writes_every_file_with_private_ones_at_0600(key_dir: Path) -> None:
    assert sorted(p.name for p in key_dir.iterdir()) == sorted(KEY_DIR_FILES)
    for name in KEY_DIR_FILES:
        mode = stat.S_IMODE((key_dir / name).stat().st_mode)
        if name in PRIVATE_FILES:
            assert mode == 0o600, f"{name}: {oct(mode)}"
        else:
            assert mode & 0o077 == 0o044, f"{name}: {oct(mode)}"  # certificates are public
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert load_keyring(key_dir / KEYRING_FILE).active_key_id in load_keyring(key_dir / KEYRING_FILE).keys
    assert TokenStore.load(key_dir / TOKENS_FILE).clients == ()


def test_private_files_are_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        directory = init_key_dir(tmp_path / "k")
    finally:
        os.umask(old)
    for name in PRIVATE_FILES:
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name


def test_an_existing_key_directory_is_not_overwritten(tmp_path: Path) -> None:
    directory = init_key_dir(tmp_path / "k")
    before = {name: (directory / name).read_bytes() for name in KEY_DIR_FILES}
    with pytest.raises(KeyDirError, match=r"already holds .*ca-key\.pem.*refusing to overwrite.*--force"):
        init_key_dir(directory)
    assert {name: (directory / name).read_bytes() for name in KEY_DIR_FILES} == before
    # One file left over is enough to refuse: nothing is half-replaced.
    (directory / CA_CERT).unlink()
    with pytest.raises(KeyDirError, match="already holds"):
        init_key_dir(directory)
    init_key_dir(directory, force=True)
    assert (directory / CA_KEY).read_bytes() != before[CA_KEY]
    assert stat.S_IMODE((directory / CA_KEY).stat().st_mode) == 0o600


def test_ensure_key_dir_creates_once_then_checks(tmp_path: Path) -> None:
    directory = ensure_key_dir(tmp_path / "demo")
    ca = (directory / CA_CERT).read_bytes()
    assert ensure_key_dir(directory) == directory
    assert (directory / CA_CERT).read_bytes() == ca  # kept, not re-created
    (directory / GATEWAY_KEY).unlink()
    with pytest.raises(KeyDirError, match=r"lacks gateway-key\.pem.*tiergate keys init .* --force"):
        ensure_key_dir(directory)


# --- certificates ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("localhost"),
        x509.DNSName("tiergate-cloud"),
        x509.DNSName("cloud.internal"),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        x509.IPAddress(ipaddress.IPv4Address("10.0.0.7")),
    ],
)
def test_the_cloud_certificate_verifies_as_a_server_for_its_names(
    key_dir: Path, name: x509.DNSName | x509.IPAddress
) -> None:
    verifier = verification.PolicyBuilder().store(_store(key_dir)).build_server_verifier(name)
    chain = verifier.verify(_cert(key_dir / CLOUD_CERT), [])
    assert chain[-1] == _cert(key_dir / CA_CERT)


def test_the_cloud_certificate_is_a_server_certificate_only(key_dir: Path) -> None:
    cloud = _cert(key_dir / CLOUD_CERT)
    assert _cn(cloud) == "tiergate-cloud"
    assert _eku(cloud) == {ExtendedKeyUsageOID.SERVER_AUTH}
    verifier = (
        verification.PolicyBuilder().store(_store(key_dir)).build_server_verifier(x509.DNSName("tiergate-gateway"))
    )
    with pytest.raises(verification.VerificationError):
        verifier.verify(cloud, [])


def test_the_gateway_certificate_serves_as_client_and_server(key_dir: Path) -> None:
    gateway = _cert(key_dir / GATEWAY_CERT)
    assert _cn(gateway) == "tiergate-gateway"
    assert _eku(gateway) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    sans = gateway.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "tiergate-gateway"}
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.IPv4Address("127.0.0.1")]
    client = verification.PolicyBuilder().store(_store(key_dir)).build_client_verifier().verify(gateway, [])
    assert client.chain[-1] == _cert(key_dir / CA_CERT)
    server = verification.PolicyBuilder().store(_store(key_dir)).build_server_verifier(x509.DNSName("tiergate-gateway"))
    server.verify(gateway, [])


def test_certificates_do_not_verify_against_another_ca(key_dir: Path, other_key_dir: Path) -> None:
    verifier = verification.PolicyBuilder().store(_store(other_key_dir)).build_client_verifier()
    with pytest.raises(verification.VerificationError):
        verifier.verify(_cert(key_dir / GATEWAY_CERT), [])


def test_a_client_certificate_carries_its_name_and_verifies(tmp_path: Path, key_dir: Path) -> None:
    cert_path, key_path = mint_client_cert(key_dir, "shop-frontend")
    assert cert_path == key_dir / "clients" / "shop-frontend.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = _cert(cert_path)
    assert _cn(cert) == "shop-frontend"
    assert _eku(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    verified = verification.PolicyBuilder().store(_store(key_dir)).build_client_verifier().verify(cert, [])
    assert verified.subjects == [x509.UniformResourceIdentifier("urn:tiergate:client:shop-frontend")]
    with pytest.raises(KeyDirError, match="already holds"):
        mint_client_cert(key_dir, "shop-frontend")
    with pytest.raises(KeyDirError, match="invalid client name"):
        mint_client_cert(key_dir, "../escape")
    with pytest.raises(KeyDirError, match=r"no development CA.*tiergate keys init"):
        mint_client_cert(tmp_path, "someone")


# --- a real mTLS handshake -------------------------------------------------------------------------------------


@dataclass
class TlsServer:
    target: str
    server: grpc.aio.Server


@pytest.fixture
async def cloud_tls_server(key_dir: Path) -> AsyncIterator[TlsServer]:
    """A gRPC server with the cloud's certificate that demands client certificates signed by the key dir's CA."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials(
        [((key_dir / CLOUD_KEY).read_bytes(), (key_dir / CLOUD_CERT).read_bytes())],
        root_certificates=(key_dir / CA_CERT).read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    yield TlsServer(f"127.0.0.1:{port}", server)
    await server.stop(0)


async def _health_check(target: str, credentials: grpc.ChannelCredentials) -> health_pb2.HealthCheckResponse:
    async with grpc.aio.secure_channel(target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response: health_pb2.HealthCheckResponse = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return response


async def test_the_gateway_completes_an_mtls_handshake_with_the_cloud(
    cloud_tls_server: TlsServer, key_dir: Path
) -> None:
    credentials = grpc.ssl_channel_credentials(
        (key_dir / CA_CERT).read_bytes(), (key_dir / GATEWAY_KEY).read_bytes(), (key_dir / GATEWAY_CERT).read_bytes()
    )
    response = await _health_check(cloud_tls_server.target, credentials)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_client_certificate_from_another_ca_is_refused(
    cloud_tls_server: TlsServer, key_dir: Path, other_key_dir: Path
) -> None:
    credentials = grpc.ssl_channel_credentials(
        (key_dir / CA_CERT).read_bytes(),
        (other_key_dir / GATEWAY_KEY).read_bytes(),
        (other_key_dir / GATEWAY_CERT).read_bytes(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _health_check(cloud_tls_server.target, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_without_a_certificate_is_refused(cloud_tls_server: TlsServer, key_dir: Path) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _health_check(cloud_tls_server.target, grpc.ssl_channel_credentials((key_dir / CA_CERT).read_bytes()))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_gateway_refuses_a_cloud_its_ca_did_not_sign(
    cloud_tls_server: TlsServer, key_dir: Path, other_key_dir: Path
) -> None:
    credentials = grpc.ssl_channel_credentials(
        (other_key_dir / CA_CERT).read_bytes(),
        (key_dir / GATEWAY_KEY).read_bytes(),
        (key_dir / GATEWAY_CERT).read_bytes(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _health_check(cloud_tls_server.target, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


# --- keyring rotation ------------------------------------------------------------------------------------------


def _request() -> cloud_pb2.CloudInferRequest:
    return cloud_pb2.CloudInferRequest(model_name="product-category", texts=["oat milk"])


def test_rotation_adds_an_active_key_and_old_envelopes_still_open(tmp_path: Path) -> None:
    directory = init_key_dir(tmp_path / "k")
    old = load_keyring(directory / KEYRING_FILE)
    sealed_before = Sealer(old).seal(_request(), request_id="r1", direction="request")

    new_id = rotate_keyring(directory)

    rotated = load_keyring(directory / KEYRING_FILE)
    assert rotated.active_key_id == new_id != old.active_key_id
    assert set(rotated.keys) == {old.active_key_id, new_id}
    assert stat.S_IMODE((directory / KEYRING_FILE).stat().st_mode) == 0o600
    assert [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []
    sealer = Sealer(rotated)
    opened = sealer.open(sealed_before, cloud_pb2.CloudInferRequest, direction="request")
    assert list(opened.texts) == ["oat milk"]
    sealed_after = sealer.seal(_request(), request_id="r2", direction="request")
    assert sealed_after.key_id == new_id


def test_staged_rotation_adds_first_and_seals_only_once_activated(tmp_path: Path) -> None:
    path = tmp_path / "seal-keys.json"
    Keyring.generate("k-old").save(path)

    staged = rotate_keyring(path, stage=True)
    keyring = load_keyring(path)
    assert keyring.active_key_id == "k-old" and staged in keyring.keys
    # A tier that loaded the staged file opens what a tier already on the new key seals.
    ahead = Sealer(Keyring({staged: keyring.keys[staged], "k-old": keyring.keys["k-old"]}, staged))
    envelope = ahead.seal(_request(), request_id="r", direction="request")
    Sealer(keyring).open(envelope, cloud_pb2.CloudInferRequest, direction="request")

    assert activate_key(path) == staged  # default: the newest
    assert load_keyring(path).active_key_id == staged
    assert activate_key(path, "k-old") == "k-old"
    with pytest.raises(KeyDirError, match=r"no key 'k-nope' in .*k-old"):
        activate_key(path, "k-nope")


def test_the_cli_rotates_in_two_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "init", str(tmp_path / "k")]) == 0
    first = load_keyring(tmp_path / "k" / KEYRING_FILE).active_key_id
    assert main(["keys", "rotate", str(tmp_path / "k"), "--stage"]) == 0
    assert "--activate" in capsys.readouterr().out
    keyring = load_keyring(tmp_path / "k" / KEYRING_FILE)
    assert keyring.active_key_id == first and len(keyring.keys) == 2
    assert main(["keys", "rotate", str(tmp_path / "k"), "--activate"]) == 0
    assert load_keyring(tmp_path / "k" / KEYRING_FILE).active_key_id == list(keyring.keys)[-1]
    assert main(["keys", "rotate", str(tmp_path / "k")]) == 0
    assert len(load_keyring(tmp_path / "k" / KEYRING_FILE).keys) == 3
    assert main(["keys", "client-cert", str(tmp_path / "k"), "ops"]) == 0
    assert (tmp_path / "k" / "clients" / "ops.pem").is_file()
    assert main(["keys", "init", str(tmp_path / "k")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


# --- settings --------------------------------------------------------------------------------------------------


def test_apply_key_dir_fills_the_gateway_settings(key_dir: Path) -> None:
    settings = GatewaySettings(keys_dir=key_dir)
    apply_key_dir(settings)
    assert settings.keyring_path == key_dir / KEYRING_FILE
    assert (settings.hop_tls.ca, settings.hop_tls.cert, settings.hop_tls.key) == (
        key_dir / CA_CERT,
        key_dir / GATEWAY_CERT,
        key_dir / GATEWAY_KEY,
    )
    assert settings.auth.enabled and settings.auth.tokens_path == key_dir / TOKENS_FILE
    assert settings.public_tls.cert is None  # the public port's TLS is a choice of its own


def test_apply_key_dir_fills_the_cloud_settings(key_dir: Path) -> None:
    settings = CloudSettings(keys_dir=key_dir)
    apply_key_dir(settings)
    assert settings.keyring_path == key_dir / KEYRING_FILE
    assert (settings.tls.ca, settings.tls.cert, settings.tls.key) == (
        key_dir / CA_CERT,
        key_dir / CLOUD_CERT,
        key_dir / CLOUD_KEY,
    )
    assert settings.tls.require_client_cert


def test_explicit_settings_win_over_the_key_dir(key_dir: Path, tmp_path: Path) -> None:
    settings = GatewaySettings(keys_dir=key_dir, keyring_path=tmp_path / "mine.json")
    settings.hop_tls.cert = tmp_path / "mine.pem"  # a certificate without a key: the pair is left alone
    settings.auth.tokens_path = tmp_path / "tokens.json"
    apply_key_dir(settings)
    assert settings.keyring_path == tmp_path / "mine.json"
    assert settings.hop_tls.ca == key_dir / CA_CERT
    assert (settings.hop_tls.cert, settings.hop_tls.key) == (tmp_path / "mine.pem", None)
    assert settings.auth.tokens_path == tmp_path / "tokens.json" and not settings.auth.enabled


def test_apply_key_dir_without_a_key_dir_changes_nothing() -> None:
    settings = CloudSettings()
    apply_key_dir(settings)
    assert settings == CloudSettings()


def test_apply_key_dir_names_the_missing_files_and_the_fix(tmp_path: Path) -> None:
    directory = init_key_dir(tmp_path / "k")
    (directory / CLOUD_KEY).unlink()
    settings = CloudSettings(keys_dir=directory)
    with pytest.raises(KeyDirError, match=r"lacks cloud-key\.pem; create it with `tiergate keys init "):
        apply_key_dir(settings)
    assert settings.keyring_path == DEFAULT_KEYRING  # nothing changed on failure
    with pytest.raises(KeyDirError, match=r"no key directory at .*tiergate keys init"):
        apply_key_dir(GatewaySettings(keys_dir=tmp_path / "absent"))


def test_a_missing_keyring_is_never_created(tmp_path: Path) -> None:
    path = tmp_path / "none" / "seal-keys.json"
    with pytest.raises(KeyDirError) as caught:
        load_keyring(path)
    assert str(caught.value) == missing_keys_message(path)
    assert "`tiergate keys init DIR`" in str(caught.value) and "--keys DIR" in str(caught.value)
    assert not path.exists() and not path.parent.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "cloud", "--keyring", "/nonexistent/seal-keys.json"],
        ["serve", "gateway", "--keyring", "/nonexistent/seal-keys.json"],
        ["serve", "cloud", "--keys", "/nonexistent-key-dir"],
    ],
)
def test_servers_refuse_to_start_without_keys(argv: list[str], tmp_path: Path) -> None:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", *argv, "--models", str(tmp_path), "--port", "0", "--metrics-port", "0"],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TIERGATE_LOG_FORMAT": "plain"},
    )
    assert result.returncode == 2, result.stderr
    assert "tiergate keys init" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert time.perf_counter() - started < 30  # it fails on the keys, before loading any model
