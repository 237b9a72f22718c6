"""The cloud tier's gRPC servicer: open the sealed request, run the full model, seal the answer."""

from __future__ import annotations

import asyncio
import concurrent.futures

import grpc

from cloud_runtime.model import CloudModel
from proto.tiergate import cloud_pb2, cloud_pb2_grpc
from tiergate.envelope import Sealer
from tiergate.errors import InvalidInputError, ModelNotFoundError, RequestTooLargeError
from tiergate.settings import LimitSettings


class CloudInferenceServicer(cloud_pb2_grpc.CloudInferenceServicer):
    """Thin adapter over `CloudModel`; inference runs off the event loop."""

    def __init__(
        self, model: CloudModel, sealer: Sealer, *, model_name: str, model_version: str, limits: LimitSettings
    ) -> None:
        self._model = model
        self._sealer = sealer
        self._model_name = model_name
        self._model_version = model_version
        self._limits = limits
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-model")

    def _check(self, request: cloud_pb2.CloudInferRequest) -> list[str]:
        if request.model_name != self._model_name:
            raise ModelNotFoundError(
                f"model {request.model_name!r} is not served here; this tier serves {self._model_name!r}"
            )
        texts = list(request.texts)
        if not texts:
            raise InvalidInputError("the request holds no rows")
        if len(texts) > self._limits.max_batch_rows:
            raise RequestTooLargeError(f"{len(texts)} rows exceed the limit of {self._limits.max_batch_rows}")
        return texts

    def _predict(self, texts: list[str]) -> cloud_pb2.CloudInferResponse:
        scored = self._model.predict(texts)
        labels = self._model.labels
        return cloud_pb2.CloudInferResponse(
            model_version=self._model_version,
            predictions=[
                cloud_pb2.CloudPrediction(label=labels[int(i)], confidence=float(c))
                for i, c in zip(scored.label_index, scored.confidence, strict=True)
            ],
        )

    async def Infer(
        self, request: cloud_pb2.Envelope, context: grpc.aio.ServicerContext[cloud_pb2.Envelope, cloud_pb2.Envelope]
    ) -> cloud_pb2.Envelope:
        plain = self._sealer.open(request, cloud_pb2.CloudInferRequest, direction="request")
        texts = self._check(plain)
        loop = asyncio.get_running_loop()
        response = await loop.run_in_executor(self._executor, self._predict, texts)
        return self._sealer.seal(response, request_id=request.request_id, direction="response")

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._model.close()
