"""The peers of the performance section: KServe and MLServer, each in a venv of its own, serving a do-nothing model.

Each peer is installed (pinned) into `<build>/bench-peers/<name>/venv`, never into the project's venv, and kept
there: a stamp file records what was installed, so a later run reuses it. A peer whose install fails or times out
is reported and left out. Each serves, over OIP gRPC on a free loopback port, a model that answers every row with
the same canned outputs the bare floor returns (the gateway's four), the way that server's own docs write a model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from proto.inference import grpc_service_pb2 as pb
from proto.inference import grpc_service_pb2_grpc as pb_grpc
from tiergate.constants import MODEL_NAME

STAMP = ".tiergate-bench-installed"

# KServe's do-nothing model: a kserve.Model whose predict returns canned outputs, one row per input row.
# KServe parses its own argv at import time, so the ports come on its command line (--grpc_port, --http_port).
KSERVE_MODEL = '''"""A KServe model that does nothing: canned outputs, one per row."""
import numpy as np
from kserve import Model, ModelServer
from kserve.protocol.infer_type import InferOutput, InferResponse

NAME = "%(model)s"


class DoNothing(Model):
    def __init__(self) -> None:
        super().__init__(NAME)
        self.ready = True

    async def predict(self, payload, headers=None):
        rows = payload.inputs[0].shape[0]
        outputs = []
        for name, datatype, value in (("label", "BYTES", b"fresh vegetables"), ("confidence", "FP32", 0.9),
                                      ("tier", "BYTES", b"edge"), ("routing_signal", "FP32", 0.9)):
            array = np.array([value] * rows, dtype=np.object_ if datatype == "BYTES" else np.float32)
            output = InferOutput(name=name, shape=[rows], datatype=datatype)
            output.set_data_from_numpy(array)
            outputs.append(output)
        return InferResponse(response_id=payload.id, model_name=NAME, infer_outputs=outputs)


if __name__ == "__main__":
    ModelServer(workers=1, enable_latency_logging=False).start([DoNothing()])
'''

# MLServer's do-nothing model: an MLModel (model-settings.json names it), served with metrics, request logging
# (debug) and parallel workers off, so no interprocess hop or per-request log line stands between call and answer.
MLSERVER_MODEL = '''"""An MLServer model that does nothing: canned outputs, one per row."""
from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


class DoNothing(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = payload.inputs[0].shape[0]
        outputs = [
            ResponseOutput(name="label", shape=[rows], datatype="BYTES", data=[b"fresh vegetables"] * rows),
            ResponseOutput(name="confidence", shape=[rows], datatype="FP32", data=[0.9] * rows),
            ResponseOutput(name="tier", shape=[rows], datatype="BYTES", data=[b"edge"] * rows),
            ResponseOutput(name="routing_signal", shape=[rows], datatype="FP32", data=[0.9] * rows),
        ]
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=outputs)
'''


@dataclass(frozen=True)
class Peer:
    """A server a user would pick instead: its pinned requirement and what it is called in the report."""

    name: str
    title: str
    requirement: str


PEERS = (
    Peer("kserve", "KServe ModelServer", "kserve==0.21.0"),
    Peer("mlserver", "Seldon MLServer", "mlserver==1.7.1"),
)


def peer_venv(build_dir: Path, peer: Peer) -> Path:
    # Absolute, not resolved: the venv's python is a symlink that must keep its venv, and peers run in other cwds.
    return build_dir.absolute() / "bench-peers" / peer.name / "venv"


def ensure_installed(build_dir: Path, peer: Peer, timeout_s: float = 600.0) -> tuple[Path | None, str]:
    """The peer's venv python and how it got there ("cached", "installed in N s"), or None and why not."""
    venv = peer_venv(build_dir, peer)
    python = venv / "bin" / "python"
    stamp = venv / STAMP
    if python.exists() and stamp.exists() and stamp.read_text(encoding="utf-8").strip() == peer.requirement:
        return python, "cached"
    log_path = venv.parent / "install.log"
    started = time.perf_counter()
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    deadline = started + timeout_s
    steps = (
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", peer.requirement],
    )
    with log_path.open("wb") as log:
        for step in steps:
            try:
                done = subprocess.run(
                    step,
                    check=False,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=max(1.0, deadline - time.perf_counter()),
                )
            except subprocess.TimeoutExpired:
                return None, f"install timed out after {timeout_s:.0f} s (log: {log_path})"
            if done.returncode != 0:
                return None, f"install failed, exit {done.returncode} (log: {log_path})"
    stamp.write_text(peer.requirement, encoding="utf-8")
    return python, f"installed in {time.perf_counter() - started:.0f} s"


def free_port() -> int:
    """A loopback port free right now (the peers take ports on their command lines, not port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_model_ready(target: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Block until OIP ModelReady says the bench model is ready at `target`."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"exited with code {process.returncode} before it was ready")
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=1.0).ready:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready within {timeout_s:.0f} s")
            time.sleep(0.2)


class PeerServer:
    """A peer serving its do-nothing model in a process of its own, on free loopback ports."""

    def __init__(self, peer: Peer, python: Path, startup_timeout_s: float = 90.0) -> None:
        self.peer = peer
        self._python = python.absolute()
        self._startup_timeout_s = startup_timeout_s
        self._work = self._python.parent.parent.parent / "serve"
        self.target = ""
        self.process: subprocess.Popen[bytes] | None = None

    def _command(self, grpc_port: int) -> list[str]:
        http_port = free_port()
        shutil.rmtree(self._work, ignore_errors=True)
        self._work.mkdir(parents=True)
        if self.peer.name == "kserve":
            script = self._work / "do_nothing.py"
            script.write_text(KSERVE_MODEL % {"model": MODEL_NAME}, encoding="utf-8")
            return [str(self._python), str(script), "--grpc_port", str(grpc_port), "--http_port", str(http_port)]
        (self._work / "do_nothing.py").write_text(MLSERVER_MODEL, encoding="utf-8")
        settings = {
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_endpoint": None,
            "debug": False,
            "parallel_workers": 0,
        }
        (self._work / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
        model = {"name": MODEL_NAME, "implementation": "do_nothing.DoNothing"}
        (self._work / "model-settings.json").write_text(json.dumps(model), encoding="utf-8")
        return [str(self._python.parent / "mlserver"), "start", str(self._work)]

    def __enter__(self) -> PeerServer:
        grpc_port = free_port()
        command = self._command(grpc_port)
        log = (self._work / "server.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for variable in ("VIRTUAL_ENV", "PYTHONPATH"):  # the peer's venv, not the project's
            env.pop(variable, None)
        self.process = subprocess.Popen(command, cwd=self._work, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.target = f"127.0.0.1:{grpc_port}"
        try:
            wait_model_ready(self.target, self._startup_timeout_s, self.process)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 5) -> str:
        path = self._work / "server.log"
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
