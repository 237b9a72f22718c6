"""proto/ is the source of truth: committed stubs match it, and our OIP wire format matches tritonclient's."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from grpc_tools import protoc

from tests.conftest import REPO_ROOT

PROTOS = ["proto/inference/grpc_service.proto", "proto/tiergate/cloud.proto"]


def test_committed_stubs_match_proto(tmp_path: Path) -> None:
    args = [
        "protoc",
        "-I",
        str(REPO_ROOT),
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
    ]
    assert protoc.main(args + [str(REPO_ROOT / p) for p in PROTOS]) == 0
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert len(generated) == 6
    stale = [str(rel) for rel in generated if (tmp_path / rel).read_bytes() != (REPO_ROOT / rel).read_bytes()]
    assert not stale, f"stubs drifted from proto/; run `make proto` and commit: {stale}"


def _descriptor(which: str) -> dict:
    script = REPO_ROOT / "tests" / "scripts" / "dump_descriptor.py"
    done = subprocess.run(
        [sys.executable, str(script), which], cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_oip_wire_compatible_with_tritonclient() -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    ours, theirs = _descriptor("ours"), _descriptor("tritonclient")
    assert ours["package"] == theirs["package"] == "inference"
    assert ours["services"]["GRPCInferenceService"] == [
        m for m in theirs["services"]["GRPCInferenceService"] if m in ours["services"]["GRPCInferenceService"]
    ]
    # The core calls, streaming and the repository extension.
    assert len(ours["services"]["GRPCInferenceService"]) == 10
    for name, fields in ours["messages"].items():
        assert name in theirs["messages"], f"{name} is not in the protocol"
        by_number = {f[1]: f for f in theirs["messages"][name]}
        for field in fields:
            assert by_number.get(field[1]) == field, f"{name}.{field[0]} differs from the protocol"
