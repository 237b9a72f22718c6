"""Open Inference Protocol v2 servicer: each RPC validates, converts, calls the tiered model and converts back."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from gateway.auth import authorize, current_client_name, may_use
from gateway.cascade import TieredModel
from gateway.codec import declared_rows, decode_request, encode_metadata, encode_response
from gateway.repository import ModelLoadError, ModelRepository, ModelVersions
from proto.inference import grpc_service_pb2 as pb
from proto.inference import grpc_service_pb2_grpc as pb_grpc
from tiergate import __version__
from tiergate.admission import Admission
from tiergate.audit import audit_detail
from tiergate.constants import REQUEST_ID_METADATA
from tiergate.errors import InvalidInputError, NotReadyError
from tiergate.logs import NO_REQUEST_ID, REQUEST_ID
from tiergate.rpc import answer_each
from tiergate.settings import LimitSettings
from tiergate.telemetry import annotate_server_span

SERVER_NAME = "tiergate"

# The servicer context of each RPC, typed by its request and response messages.
_Context = grpc.aio.ServicerContext
# A caller's request id is kept when it is short and plain; anything else gets a fresh one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _stream_refusal(code: grpc.StatusCode, message: str) -> pb.ModelStreamInferResponse:
    # tritonclient raises InferenceServerException(msg=error_message), with no status of its own: the code
    # leads the text, as in the unary status ("INVALID_ARGUMENT: ...").
    return pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}")


def request_id_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's `x-request-id`, if it is well formed, else a new random id."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves the tiered models over OIP v2."""

    def __init__(self, repository: ModelRepository, limits: LimitSettings) -> None:
        self.repository = repository
        self._limits = limits
        self.admission = Admission(limits.max_inflight_requests, limits.max_inflight_rows)
        self.draining = False
        # (host, port) the server is bound to, for the server span's attributes.
        self.bound: tuple[str, int] = ("", 0)

    def _versions(self, name: str) -> ModelVersions:
        audit_detail(client=current_client_name(), model=name)
        # Permission first, so a client learns nothing of the models it may not call.
        authorize(name)
        return self.repository.versions(name)

    def _model(self, name: str, version: str) -> TieredModel:
        """Version `version` of `name` as loaded now (the newest when none is named); requests keep the object
        they get here, so a version swapped in meanwhile never changes a request already running."""
        model = self._versions(name).current(version)
        assert isinstance(model, TieredModel)
        return model

    def _ready(self, name: str) -> bool:
        versions = self.repository.versions(name)
        return not self.draining and not versions.unloaded and versions.serving is not None and versions.serving.ready()

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: _Context[pb.ServerLiveRequest, pb.ServerLiveResponse]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: _Context[pb.ServerReadyRequest, pb.ServerReadyResponse]
    ) -> pb.ServerReadyResponse:
        ready = all(self._ready(name) for name in self.repository.names())
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: _Context[pb.ModelReadyRequest, pb.ModelReadyResponse]
    ) -> pb.ModelReadyResponse:
        if self._versions(request.name).unloaded:
            return pb.ModelReadyResponse(ready=False)
        self._model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self._ready(request.name))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: _Context[pb.ServerMetadataRequest, pb.ServerMetadataResponse]
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: _Context[pb.ModelMetadataRequest, pb.ModelMetadataResponse]
    ) -> pb.ModelMetadataResponse:
        model = self._model(request.name, request.version)
        versions = [state.version for state in self.repository.versions(request.name).index()]
        return encode_metadata(model, versions)

    def _name_call(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """The call's request id (the audit interceptor's, else the caller's or a new one), sent back as
        trailing metadata and put on the server span."""
        request_id = REQUEST_ID.get()
        if request_id == NO_REQUEST_ID:  # not audited: no interceptor named this call
            request_id = request_id_of(context)
            REQUEST_ID.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
        annotate_server_span(context, *self.bound).set_attribute("tiergate.request_id", request_id)
        return request_id

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: _Context[pb.ModelInferRequest, pb.ModelInferResponse]
    ) -> pb.ModelInferResponse:
        self._name_call(context)
        return await self._infer(request, context)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: _Context[pb.ModelInferRequest, pb.ModelStreamInferResponse],
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request is answered as ModelInfer would answer it, in order; one that fails gets its status in
        `error_message` ("CODE: message") and the stream goes on. The stream's request id is the trailing
        metadata; each request's own is `<stream id>.<n>` in logs, the audit log and the cloud's records."""
        self._name_call(context)

        async def answer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, context))

        async for response in answer_each(request_iterator, answer, _stream_refusal):
            yield response

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        """One inference request, whether unary or one message of a stream: permission, admission, the
        caller's deadline (the stream's, for a stream), the tiered model and the response."""
        model = self._model(request.model_name, request.model_version)
        if self.draining:
            raise NotReadyError("the gateway is shutting down; retry on another instance")
        # Admission before any per-row work, on the rows the request declares: refusing stays cheap under
        # overload, so it never slows the requests admitted. A request over the row limit is not "at capacity":
        # the codec says what is wrong with it (its checks stop before any per-row work).
        declared = declared_rows(request)
        if declared > self._limits.max_batch_rows:
            decode_request(request, self._limits, model.input)
        with self.admission.admit(declared):
            batch = decode_request(request, self._limits, model.input)
            audit_detail(version=model.version, rows=len(batch.texts))
            remaining = context.time_remaining()
            deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
            result = await model.infer(batch.texts, batch.hint, deadline, use_cache=batch.use_cache)
            return encode_response(
                batch,
                result,
                model_name=model.name,
                model_version=model.version,
                chain=model.tier_names,
                signal=model.cascade.policy.signal,
            )

    async def RepositoryIndex(
        self,
        request: pb.RepositoryIndexRequest,
        context: _Context[pb.RepositoryIndexRequest, pb.RepositoryIndexResponse],
    ) -> pb.RepositoryIndexResponse:
        # Only the models this client may call are listed.
        allowed = [name for name in self.repository.names() if may_use(name)]
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=state.model, version=state.version, state=state.state.value, reason=state.reason)
                for state in self.repository.index(ready_only=request.ready)
                if state.model in allowed
            ]
        )

    async def RepositoryModelLoad(
        self,
        request: pb.RepositoryModelLoadRequest,
        context: _Context[pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse],
    ) -> pb.RepositoryModelLoadResponse:
        """Serve the newest version of the model that loads (a newer one on disk is verified and swapped in)."""
        versions = self._versions(request.model_name)
        try:
            await versions.load()
        except ModelLoadError as error:
            raise InvalidInputError(str(error)) from None
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self,
        request: pb.RepositoryModelUnloadRequest,
        context: _Context[pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse],
    ) -> pb.RepositoryModelUnloadResponse:
        """Stop serving the model until it is loaded again: its requests get UNAVAILABLE meanwhile."""
        self._versions(request.model_name).unload()
        return pb.RepositoryModelUnloadResponse()
