"""Open Inference Protocol v2 servicer: each RPC validates, converts, calls the tiered model and converts back."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import grpc

from gateway.auth import authorize, current_client_name
from gateway.cascade import TieredModel
from gateway.codec import decode_request, encode_metadata, encode_response
from proto.inference import grpc_service_pb2 as pb
from proto.inference import grpc_service_pb2_grpc as pb_grpc
from tiergate import __version__
from tiergate.admission import Admission
from tiergate.audit import audit_detail
from tiergate.constants import REQUEST_ID_METADATA
from tiergate.errors import ModelNotFoundError, NotReadyError
from tiergate.logs import NO_REQUEST_ID, REQUEST_ID
from tiergate.settings import LimitSettings
from tiergate.telemetry import annotate_server_span

SERVER_NAME = "tiergate"

# The servicer context of each RPC, typed by its request and response messages.
_Context = grpc.aio.ServicerContext
# A caller's request id is kept when it is short and plain; anything else gets a fresh one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's `x-request-id`, if it is well formed, else a new random id."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves the tiered models over OIP v2."""

    def __init__(self, models: list[TieredModel], limits: LimitSettings) -> None:
        self._models = {model.name: model for model in models}
        self._limits = limits
        self.admission = Admission(limits.max_inflight_requests, limits.max_inflight_rows)
        self.draining = False
        # (host, port) the server is bound to, for the server span's attributes.
        self.bound: tuple[str, int] = ("", 0)

    def _model(self, name: str, version: str) -> TieredModel:
        audit_detail(client=current_client_name(), model=name)
        # Permission first, so a client learns nothing of the models it may not call.
        authorize(name)
        model = self._models.get(name)
        if model is None:
            served = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(f"model {name!r} is not served here; available models: {served}")
        if version and version != model.version:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}; available: {model.version!r}")
        return model

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: _Context[pb.ServerLiveRequest, pb.ServerLiveResponse]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: _Context[pb.ServerReadyRequest, pb.ServerReadyResponse]
    ) -> pb.ServerReadyResponse:
        ready = not self.draining and all(model.ready() for model in self._models.values())
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: _Context[pb.ModelReadyRequest, pb.ModelReadyResponse]
    ) -> pb.ModelReadyResponse:
        model = self._model(request.name, request.version)
        return pb.ModelReadyResponse(ready=not self.draining and model.ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: _Context[pb.ServerMetadataRequest, pb.ServerMetadataResponse]
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: _Context[pb.ModelMetadataRequest, pb.ModelMetadataResponse]
    ) -> pb.ModelMetadataResponse:
        return encode_metadata(self._model(request.name, request.version))

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: _Context[pb.ModelInferRequest, pb.ModelInferResponse]
    ) -> pb.ModelInferResponse:
        request_id = REQUEST_ID.get()
        if request_id == NO_REQUEST_ID:  # not audited: no interceptor named this call
            request_id = request_id_of(context)
            REQUEST_ID.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
        annotate_server_span(context, *self.bound).set_attribute("tiergate.request_id", request_id)
        model = self._model(request.model_name, request.model_version)
        if self.draining:
            raise NotReadyError("the gateway is shutting down; retry on another instance")
        batch = decode_request(request, self._limits)
        audit_detail(version=model.version, rows=len(batch.texts))
        remaining = context.time_remaining()
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
        with self.admission.admit(len(batch.texts)):
            result = await model.infer(batch.texts, batch.hint, deadline)
        return encode_response(
            batch,
            result,
            model_name=model.name,
            model_version=model.version,
            chain=model.tier_names,
            signal=model.cascade.policy.signal,
        )
