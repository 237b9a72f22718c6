"""The cloud tier in front of an OIP v2 server the user already runs (Triton, KServe, MLServer).

`serve cloud --upstream HOST:PORT`: each sealed envelope is opened at the boundary as usual, its rows are sent
to the upstream server as an ordinary `ModelInfer` call inside the cloud network, the output named in the
manifest is mapped onto the model's declared labels (logits, probabilities, or one probability), and the
answer is sealed back. The user keeps their serving stack; Tiergate adds the boundary and the routing.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from proto.inference import grpc_service_pb2 as pb
from proto.inference import grpc_service_pb2_grpc as pb_grpc
from tiergate.errors import TierDeadlineError, TierUnavailableError
from tiergate.hop_rows import NUMPY_TYPES
from tiergate.inputs import Row, stack, texts_of
from tiergate.manifest import InputSpec, Manifest, UpstreamSpec
from tiergate.scoring import Scored, as_logits, score
from tiergate.spelling import Vocabulary

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("<I")
# Output datatypes read from the upstream's answer, as little-endian numpy types.
_OUTPUT_TYPES: dict[str, np.dtype[np.generic]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
}
_TYPED_OUTPUTS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}


class UpstreamModel:
    """One model of the repository answered by an upstream OIP v2 server over one shared channel."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        target: str,
        *,
        name: str,
        input_spec: InputSpec,
        labels: list[str],
        spec: UpstreamSpec,
        temperature: float,
        signal: str,
        timeout_s: float = 5.0,
        spelling: Vocabulary | None = None,
    ) -> None:
        """`timeout_s`: the longest one upstream call may take (less when the gateway's deadline is nearer)."""
        self.labels = labels
        self.timeout_s = timeout_s
        self.signal = signal
        self.temperature = temperature
        self.target = target
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self._input = input_spec
        self._model_name = spec.model_name or name
        self._model_version = spec.model_version
        self._output = spec.output_name
        self._scores = spec.scores
        self.spelling = spelling

    @classmethod
    def for_manifest(
        cls,
        channel: grpc.aio.Channel,
        target: str,
        name: str,
        manifest: Manifest,
        timeout_s: float = 5.0,
        model_dir: Path | None = None,
    ) -> UpstreamModel:
        """The upstream as the manifest's `cloud.upstream` declares it (defaults: the same model name, its first
        output, holding logits), with the cloud tier's temperature and the routing signal. Where the manifest
        names a spelling vocabulary (read from `model_dir`), texts are corrected before they are relayed, as the
        edge corrects them: the routing was calibrated on both tiers reading them so."""
        spec = manifest.cloud.upstream or UpstreamSpec(scores=manifest.cloud.scores)
        spelling = None
        if manifest.spelling is not None:
            if model_dir is None:
                raise ValueError(f"model {name!r} names a spelling vocabulary; its directory is needed to read it")
            spelling = Vocabulary.load(Path(model_dir) / manifest.spelling.path)
        return cls(
            channel,
            target,
            name=name,
            input_spec=manifest.input,
            labels=list(manifest.labels),
            spec=spec,
            temperature=manifest.cloud.temperature,
            signal=manifest.routing.signal,
            timeout_s=timeout_s,
            spelling=spelling,
        )

    def _request(self, rows: Sequence[Row]) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=self._model_name, model_version=self._model_version)
        tensor = request.inputs.add(name=self._input.name, datatype=self._input.datatype)
        if self._input.text:
            texts = texts_of(rows if self.spelling is None else self.spelling.correct_rows(rows))
            tensor.shape.append(len(texts))
            request.raw_input_contents.append(b"".join(_LENGTH.pack(len(b)) + b for b in (t.encode() for t in texts)))
        else:
            array = stack(rows)
            tensor.shape.extend(array.shape)
            request.raw_input_contents.append(np.ascontiguousarray(array, NUMPY_TYPES[self._input.datatype]).tobytes())
        if self._output:
            request.outputs.add(name=self._output)
        return request

    def _scores_of(self, response: pb.ModelInferResponse, rows: int) -> np.ndarray:
        outputs = list(response.outputs)
        if not outputs:
            raise TierUnavailableError(f"upstream model {self._model_name!r} answered no output")
        index = next((i for i, out in enumerate(outputs) if out.name == self._output), None) if self._output else 0
        if index is None:
            names = [out.name for out in outputs]
            raise TierUnavailableError(f"upstream model {self._model_name!r} has no output {self._output!r}: {names}")
        out = outputs[index]
        if out.datatype not in _OUTPUT_TYPES:
            raise TierUnavailableError(
                f"upstream output {out.name!r} is {out.datatype}; expected scores in FP32, FP64 or FP16"
            )
        if response.raw_output_contents:
            values = np.frombuffer(response.raw_output_contents[index], dtype=_OUTPUT_TYPES[out.datatype])
        elif out.datatype in _TYPED_OUTPUTS:
            values = np.asarray(getattr(out.contents, _TYPED_OUTPUTS[out.datatype]), dtype=np.float64)
        else:
            raise TierUnavailableError(f"upstream output {out.name!r} ({out.datatype}) came without raw contents")
        shape = [int(dim) for dim in out.shape]
        if int(np.prod(shape)) != values.size or not shape or shape[0] != rows:
            raise TierUnavailableError(
                f"upstream output {out.name!r} has shape {shape} for {rows} rows ({values.size} values)"
            )
        shaped: np.ndarray = values.reshape(shape)
        return shaped

    async def predict(self, rows: Sequence[Row], timeout: float | None) -> Scored:
        """Labels, calibrated probabilities and routing signal of `rows`, as the upstream model scores them;
        `timeout`: the caller's time left (None: none), capped at `timeout_s`."""
        limit = self.timeout_s if timeout is None else min(timeout, self.timeout_s)
        try:
            response = await self._stub.ModelInfer(self._request(rows), timeout=limit)
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TierDeadlineError("the upstream server did not answer in time") from None
            details = (error.details() or "")[:200]
            raise TierUnavailableError(
                f"upstream server {self.target} failed with {error.code().name}: {details}"
            ) from None
        try:
            logits = as_logits(self._scores_of(response, len(rows)), self._scores, len(self.labels))
        except ValueError as error:
            raise TierUnavailableError(f"upstream model {self._model_name!r}: {error}") from None
        return score(logits, self.temperature, self.signal)
