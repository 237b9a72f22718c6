"""The floor of the performance section: a bare grpc.aio OIP server that returns a canned answer, no model.

Run as `python -m app.bench_bare --port-file FILE`: it binds a free loopback port, writes `{"port": N}` there once
serving, and stops on SIGTERM. Each answer holds the gateway's four outputs, one canned value per row, raw when the
request was raw (as tritonclient sends it), so the bytes on the wire match what the gateway returns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import struct
import sys
from pathlib import Path

import grpc
import numpy as np

from proto.inference import grpc_service_pb2 as pb
from proto.inference import grpc_service_pb2_grpc as pb_grpc
from tiergate.constants import CONFIDENCE_OUTPUT, LABEL_OUTPUT, MODEL_NAME, SIGNAL_OUTPUT, TIER_OUTPUT

CANNED_LABEL = b"fresh vegetables"
CANNED_TIER = b"edge"
CANNED_NUMBER = 0.9


def canned_response(rows: int, raw: bool) -> pb.ModelInferResponse:
    """The answer to a request of `rows` texts: the gateway's outputs, each row the same canned value."""
    response = pb.ModelInferResponse(model_name=MODEL_NAME, model_version="canned")
    outputs = (
        (LABEL_OUTPUT, "BYTES", CANNED_LABEL),
        (CONFIDENCE_OUTPUT, "FP32", CANNED_NUMBER),
        (TIER_OUTPUT, "BYTES", CANNED_TIER),
        (SIGNAL_OUTPUT, "FP32", CANNED_NUMBER),
    )
    for name, datatype, value in outputs:
        tensor = response.outputs.add(name=name, datatype=datatype, shape=[rows])
        if isinstance(value, bytes):
            if raw:
                response.raw_output_contents.append((struct.pack("<I", len(value)) + value) * rows)
            else:
                tensor.contents.bytes_contents.extend([value] * rows)
        elif raw:
            response.raw_output_contents.append(np.full(rows, value, dtype="<f4").tobytes())
        else:
            tensor.contents.fp32_contents.extend([value] * rows)
    return response


def request_rows(request: pb.ModelInferRequest) -> int:
    """The rows the request's first input declares (0 for none)."""
    return int(request.inputs[0].shape[0]) if request.inputs and request.inputs[0].shape else 0


class CannedServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Liveness, readiness and ModelInfer with a canned answer; answers are built once per (rows, raw)."""

    def __init__(self) -> None:
        self._answers: dict[tuple[int, bool], pb.ModelInferResponse] = {}

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == MODEL_NAME)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelInferResponse:
        key = (request_rows(request), bool(request.raw_input_contents))
        if key not in self._answers:
            self._answers[key] = canned_response(*key)
        response = pb.ModelInferResponse()
        response.CopyFrom(self._answers[key])  # a copy: answers in flight at once carry their own ids
        response.id = request.id
        return response


async def serve(port_file: Path) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(CannedServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": port}), encoding="utf-8")
    tmp.replace(port_file)
    await stopping.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.bench_bare", description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", type=Path, required=True)
    asyncio.run(serve(parser.parse_args(argv).port_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
