"""The boundary end to end on real servers with `keys init` certificates: mTLS hop, tokens, audit, rotation."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.inference import grpc_service_pb2 as pb
from proto.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import StackFactory
from tests.test_gateway import infer_request
from tiergate.audit import verify
from tiergate.constants import MODEL_NAME
from tiergate.envelope import Keyring
from tiergate.keys import activate_key, rotate_keyring
from tiergate.settings import CloudSettings, GatewaySettings
from tiergate.tokens import add as add_token


def new_client(key_dir: Path, models: list[str]) -> tuple[str, str]:
    """A fresh client in the key directory's token file: (name, token)."""
    name = f"client-{uuid.uuid4().hex[:8]}"
    return name, add_token(key_dir / "tokens.json", name, models)


async def call(target: str, request: pb.ModelInferRequest, token: str | None = None, raw: str | None = None) -> None:
    """One ModelInfer with a token (or a raw authorization value); raises AioRpcError on refusal."""
    metadata = [] if token is None else [("authorization", f"Bearer {token}")]
    if raw is not None:
        metadata = [("authorization", raw)]
    async with grpc.aio.insecure_channel(target) as channel:
        await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata, timeout=10.0)


async def refusal(target: str, **kwargs: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(target, infer_request(["whole milk"]), **kwargs)  # type: ignore[arg-type]
    return error.value


async def test_clients_need_a_token_and_a_permitted_model(
    start_stack: StackFactory, key_dir: Path, tmp_path: Path
) -> None:
    name, token = new_client(key_dir, [MODEL_NAME])
    _, other_token = new_client(key_dir, ["query-intent"])
    stack = await start_stack(keys=key_dir, token=token, audit_dir=tmp_path)
    assert stack.gateway.tiers[-1].secure, "with a key directory the hop is mutual TLS"  # type: ignore[attr-defined]

    reply = await stack.stub.ModelInfer(infer_request(["whole milk"], tier="cloud"), timeout=10.0)
    assert reply.outputs[2].contents.bytes_contents == [b"cloud"], "answered by the cloud, over mTLS"

    missing = await refusal(stack.target)
    assert missing.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in (missing.details() or "")
    unknown = await refusal(stack.target, token="not-a-token")
    assert unknown.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "not accepted" in (unknown.details() or "")
    for raw in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer two words", "x" * 600):
        malformed = await refusal(stack.target, raw=raw)
        assert malformed.code() is grpc.StatusCode.UNAUTHENTICATED and "malformed" in (malformed.details() or "")
    denied = await refusal(stack.target, token=other_token)
    assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
    assert MODEL_NAME in (denied.details() or "") and "not-a-token" not in (denied.details() or "")
    # Refusals never say whether a token exists: the unknown and the missing one read alike in kind.
    assert "exist" not in (unknown.details() or "") + (missing.details() or "")

    # Health and reflection stay open (balancers and grpcurl need them).
    health = health_pb2_grpc.HealthStub(stack.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING

    await stack.gateway.stop(0)
    assert stack.cloud is not None
    await stack.cloud.stop(0)
    for log in ("gateway-audit.log", "cloud-audit.log"):
        assert verify(tmp_path / log).ok, verify(tmp_path / log).message
    lines = [json.loads(line) for line in (tmp_path / "gateway-audit.log").read_text().splitlines()]
    statuses = [(line.get("client"), line["status"]) for line in lines if line["method"] == "ModelInfer"]
    assert (name, "OK") in statuses
    assert statuses.count((None, "UNAUTHENTICATED")) == 6
    assert any(status == "PERMISSION_DENIED" for _, status in statuses)
    ok = next(line for line in lines if line["status"] == "OK")
    assert ok["model"] == MODEL_NAME and ok["rows"] == 1 and ok["tiers"] == {"cloud": 1} and ok["latency_ms"] > 0
    text = (tmp_path / "gateway-audit.log").read_text() + (tmp_path / "cloud-audit.log").read_text()
    assert "whole milk" not in text and token not in text, "never the payload or a token"
    cloud_lines = [json.loads(line) for line in (tmp_path / "cloud-audit.log").read_text().splitlines()]
    assert {line["request_id"] for line in cloud_lines} <= {line["request_id"] for line in lines}
    assert cloud_lines[0]["key_id"] and cloud_lines[0]["rows"] == 1 and cloud_lines[0]["status"] == "OK"


def expired_copy(keys: Path, name: str, out: Path) -> Path:
    """`name`'s certificate re-issued by the same CA for the same key, but valid only in the past."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca = x509.load_pem_x509_certificate((keys / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((keys / "ca-key.pem").read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate((keys / name).read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(ca.subject)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=10))
        .not_valid_after(now - datetime.timedelta(days=1))
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    out.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("fault", ["another CA", "expired"])
async def test_a_cloud_certificate_that_does_not_verify_is_refused(
    start_stack: StackFactory, key_dir: Path, tmp_path: Path, fault: str
) -> None:
    from tiergate.keys import init_key_dir

    _, token = new_client(key_dir, ["*"])

    def bad_cloud_certificate(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        if fault == "another CA":
            other = init_key_dir(tmp_path / "other")
            cloud.tls.cert, cloud.tls.key, cloud.tls.ca = other / "cloud.pem", other / "cloud-key.pem", other / "ca.pem"
        else:
            cloud.tls.cert = expired_copy(key_dir, "cloud.pem", tmp_path / "expired-cloud.pem")
            cloud.tls.key, cloud.tls.ca = key_dir / "cloud-key.pem", key_dir / "ca.pem"

    stack = await start_stack(keys=key_dir, token=token, threshold=1.0, configure=bad_cloud_certificate)
    reply = await stack.stub.ModelInfer(infer_request(["whole milk"]), timeout=10.0)
    assert reply.parameters["degraded"].bool_param, "the hop refused the handshake; the edge answered"
    assert json.loads(reply.parameters["escalation_reasons"].string_param) == ["low_confidence+tier_unavailable"]


async def test_broken_key_and_token_files_keep_the_last_good_ones(
    start_stack: StackFactory, key_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    keys = tmp_path / "keys"
    shutil.copytree(key_dir, keys)
    _, token = new_client(keys, [MODEL_NAME])
    stack = await start_stack(keys=keys, token=token, threshold=1.0)
    (keys / "tokens.json").write_text("{not json", encoding="utf-8")
    (keys / "seal-keys.json").write_text("[]", encoding="utf-8")
    stack.gateway.boundary.reload()
    assert stack.cloud is not None
    stack.cloud.boundary.reload()
    await asyncio.sleep(0.2)
    assert "keeping the last good version" in caplog.text and "tokens.json" in caplog.text
    reply = await stack.stub.ModelInfer(infer_request(["whole milk"]), timeout=10.0)
    assert not reply.parameters["degraded"].bool_param, "old token accepted, hop still sealed with the old keyring"


def test_a_plaintext_hop_must_be_asked_for(key_dir: Path, tiny_models: Path) -> None:
    from gateway.server import GatewayServer

    settings = GatewaySettings(port=0, models_dir=tiny_models, keyring_path=key_dir / "seal-keys.json")
    with pytest.raises(ValueError, match="hop_insecure = true"):
        GatewayServer(settings)


async def test_two_step_key_rotation_under_traffic_fails_no_request(
    start_stack: StackFactory, key_dir: Path, tmp_path: Path, tiny_rows: list[tuple[str, str]]
) -> None:
    import shutil

    keys = tmp_path / "keys"
    shutil.copytree(key_dir, keys)
    _, token = new_client(keys, ["*"])
    stack = await start_stack(keys=keys, token=token, threshold=1.0)  # every row crosses the hop
    assert stack.cloud is not None
    sealers = [stack.gateway.sealer, stack.cloud.sealer]
    old = Keyring.load(keys / "seal-keys.json").active_key_id
    texts = [text for text, _ in tiny_rows]
    degraded = 0

    async def traffic(count: int) -> None:
        nonlocal degraded
        for i in range(count):
            reply = await stack.stub.ModelInfer(infer_request([texts[i % len(texts)]]), timeout=10.0)
            degraded += reply.parameters["degraded"].bool_param

    async def until(predicate: object) -> None:
        for _ in range(200):  # bounded: 10 s
            if predicate():  # type: ignore[operator]
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the servers did not pick up the new keyring")

    async def rollout() -> str:
        await asyncio.sleep(0.2)
        new = rotate_keyring(keys, stage=True)  # step 1: every side can open the new key
        stack.gateway.boundary.reload()  # as SIGHUP would; the file watch would also see it within a second
        stack.cloud.boundary.reload()  # type: ignore[union-attr]
        await until(lambda: all(new in s._ciphers for s in sealers))  # type: ignore[union-attr]
        activate_key(keys, new)  # step 2: only now seal with it
        await until(lambda: all(s.active_key_id == new for s in sealers))  # type: ignore[union-attr]
        return new

    _, new = await asyncio.gather(traffic(2000), rollout())
    assert new != old and degraded == 0
    assert stack.gateway.sealer is not None and stack.gateway.sealer.active_key_id == new


def test_audit_verify_on_a_real_log_names_the_first_bad_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tiergate.audit import AuditLog
    from tiergate.settings import AuditSettings

    path = tmp_path / "audit.log"
    with AuditLog(AuditSettings(path=path)) as log:
        for i in range(5):
            log.write({"request_id": f"r{i}", "status": "OK", "rows": 1})

    def verify_cli() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "app.cli", "audit", "verify", str(path)]
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)

    intact = verify_cli()
    assert intact.returncode == 0 and "OK: 5 lines" in intact.stdout
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:2], lines[2].replace('"rows":1', '"rows":2'), *lines[3:]]) + "\n")
    edited = verify_cli()
    assert edited.returncode == 1 and "line 4" in edited.stdout and "line 3 was edited" in edited.stdout
    path.write_text("\n".join([*lines[:1], *lines[2:]]) + "\n")
    deleted = verify_cli()
    assert deleted.returncode == 1 and "deleted" in deleted.stdout and "line 2" in deleted.stdout


async def test_the_public_port_serves_tls_and_knows_clients_by_their_certificate(
    start_stack: StackFactory, key_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from tiergate.keys import init_key_dir, mint_client_cert

    keys = tmp_path / "keys"
    shutil.copytree(key_dir, keys)
    add_token(keys / "tokens.json", "storefront", [MODEL_NAME])  # the client's entry: its models
    cert, key = mint_client_cert(keys, "storefront")

    def public_mtls(gateway: GatewaySettings, cloud: CloudSettings) -> None:
        tls = gateway.public_tls
        tls.cert, tls.key, tls.ca = keys / "gateway.pem", keys / "gateway-key.pem", keys / "ca.pem"
        tls.require_client_cert = True
        gateway.auth.allow_cert_subjects = True

    stack = await start_stack(keys=keys, configure=public_mtls)
    ca = (keys / "ca.pem").read_bytes()

    async def infer_with(credentials: grpc.ChannelCredentials) -> pb.ModelInferResponse:
        async with grpc.aio.secure_channel(stack.target, credentials) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return await stub.ModelInfer(infer_request(["whole milk"]), timeout=10.0)

    # No token: the certificate's subject names the client.
    reply = await infer_with(grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes()))
    assert reply.model_name == MODEL_NAME
    # Without a client certificate, or with one from another CA, the handshake itself fails.
    other = init_key_dir(tmp_path / "other")
    for credentials in (
        grpc.ssl_channel_credentials(ca),
        grpc.ssl_channel_credentials(
            ca, (other / "gateway-key.pem").read_bytes(), (other / "gateway.pem").read_bytes()
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await infer_with(credentials)
        assert error.value.code() is grpc.StatusCode.UNAVAILABLE
    # A plaintext client cannot talk to a TLS port at all.
    with pytest.raises(grpc.aio.AioRpcError):
        await call(stack.target, infer_request(["whole milk"]))


async def test_renewed_hop_certificates_are_used_without_a_restart(
    start_stack: StackFactory, key_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    from tiergate.keys import mint_client_cert

    keys = tmp_path / "keys"
    shutil.copytree(key_dir, keys)
    _, token = new_client(keys, ["*"])
    stack = await start_stack(keys=keys, token=token, threshold=1.0)
    hop = stack.gateway.tiers[-1]
    first = hop._channel  # type: ignore[attr-defined]

    # A renewed gateway certificate from the same CA replaces the old one in place.
    cert, key = mint_client_cert(keys, "tiergate-gateway-renewed")
    shutil.copyfile(cert, keys / "gateway.pem")
    shutil.copyfile(key, keys / "gateway-key.pem")
    stack.gateway.boundary.reload()
    await asyncio.sleep(0.1)
    assert hop._channel is not first  # type: ignore[attr-defined]
    reply = await stack.stub.ModelInfer(infer_request(["whole milk"]), timeout=10.0)
    assert not reply.parameters["degraded"].bool_param, "the cloud accepted the renewed certificate"

    # A broken certificate file is refused; the last good channel stays.
    second = hop._channel  # type: ignore[attr-defined]
    (keys / "gateway.pem").write_text("not a certificate", encoding="utf-8")
    stack.gateway.boundary.reload()
    await asyncio.sleep(0.1)
    assert hop._channel is second and "is not a PEM certificate" in caplog.text  # type: ignore[attr-defined]
    reply = await stack.stub.ModelInfer(infer_request(["whole milk"]), timeout=10.0)
    assert not reply.parameters["degraded"].bool_param
