"""The one converter between Open Inference Protocol v2 messages and the gateway's batches of rows: texts for a
text model, tensor rows (typed or raw contents, as OIP allows) for a tensor model."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gateway.cascade import CascadeResult, TieredModel
from gateway.routing import Hint
from proto.inference import grpc_service_pb2 as pb
from tiergate.constants import (
    CACHE_HITS_PARAMETER,
    CACHE_PARAMETER,
    CONFIDENCE_OUTPUT,
    DEGRADED_PARAMETER,
    HINT_PARAMETER,
    INPUT_NAME,
    LABEL_OUTPUT,
    OUTPUTS,
    REASONS_PARAMETER,
    ROWS_PARAMETER_SUFFIX,
    SIGNAL_NAME_PARAMETER,
    SIGNAL_OUTPUT,
    TIER_OUTPUT,
)
from tiergate.errors import InvalidInputError, RequestTooLargeError
from tiergate.hop_rows import NUMPY_TYPES
from tiergate.inputs import Row, Vector
from tiergate.manifest import TEXT_INPUT, InputSpec
from tiergate.settings import LimitSettings

PLATFORM = "tiergate_tiered"
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class TextBatch:
    """A decoded inference request: its rows (texts, or tensor rows) plus what the response must look like."""

    texts: list[Row]
    request_id: str = ""
    hint: Hint = Hint.AUTO
    # Mirror the caller: raw_input_contents in, raw_output_contents out.
    raw_output: bool = False
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))
    # False: the caller opted out of the response cache (request parameter `cache`).
    use_cache: bool = True


def _split_raw_bytes(raw: bytes, name: str = INPUT_NAME) -> list[bytes]:
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInputError(f"raw contents of input {name!r} end inside a 4-byte length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInputError(f"raw contents of input {name!r}: element {len(items)} overruns the buffer")
        items.append(raw[offset : offset + length])
        offset += length
    return items


def _rows(shape: Sequence[int], name: str = INPUT_NAME) -> int:
    dims = list(shape)
    if len(dims) == 1 or (len(dims) == 2 and dims[1] == 1):
        if dims[0] < 0:
            raise InvalidInputError(f"input {name!r} has a negative dimension in shape {dims}")
        return dims[0]
    raise InvalidInputError(f"input {name!r} must have shape [N] or [N, 1], got {dims}")


def _hint(request: pb.ModelInferRequest) -> Hint:
    if HINT_PARAMETER not in request.parameters:
        return Hint.AUTO
    parameter = request.parameters[HINT_PARAMETER]
    kind = parameter.WhichOneof("parameter_choice")
    allowed = ", ".join(h.value for h in Hint)
    if kind != "string_param":
        sent = "no value" if kind is None else f"{kind} {getattr(parameter, kind)!r}"
        raise InvalidInputError(f"parameter {HINT_PARAMETER!r} must be a string, one of {allowed}; got {sent}")
    try:
        return Hint(parameter.string_param)
    except ValueError:
        raise InvalidInputError(
            f"parameter {HINT_PARAMETER!r} must be one of {allowed}; got {parameter.string_param!r}"
        ) from None


def _use_cache(request: pb.ModelInferRequest) -> bool:
    if CACHE_PARAMETER not in request.parameters:
        return True
    parameter = request.parameters[CACHE_PARAMETER]
    kind = parameter.WhichOneof("parameter_choice")
    if kind != "bool_param":
        sent = "no value" if kind is None else f"{kind} {getattr(parameter, kind)!r}"
        raise InvalidInputError(f"parameter {CACHE_PARAMETER!r} must be a bool (false opts out); got {sent}")
    return bool(parameter.bool_param)


def declared_rows(request: pb.ModelInferRequest) -> int:
    """The rows the request's first input declares (at least 1), read without decoding anything: what admission
    counts. `decode_request` checks the declaration against the contents."""
    if not request.inputs or not request.inputs[0].shape:
        return 1
    return max(1, int(request.inputs[0].shape[0]))


def decode_request(request: pb.ModelInferRequest, limits: LimitSettings, spec: InputSpec = TEXT_INPUT) -> TextBatch:
    """Validate an OIP request for a model taking `spec` and decode its rows (the model name is checked by the
    caller). Every refusal names the input the model expects."""
    names = [tensor.name for tensor in request.inputs]
    if spec.name not in names:
        sent = ", ".join(f"{t.name!r} ({t.datatype or 'no datatype'})" for t in request.inputs) or "no inputs"
        raise InvalidInputError(f"missing input {spec.name!r}: this model takes {spec.describe()}; got {sent}")
    if len(names) != 1:
        extra = [name for name in names if name != spec.name] or names[1:]
        raise InvalidInputError(f"unexpected inputs {extra}; this model takes only {spec.describe()}")
    tensor = request.inputs[0]
    if tensor.datatype != spec.datatype:
        raise InvalidInputError(
            f"input {spec.name!r} must have datatype {spec.datatype}, got {tensor.datatype or 'none'!r}; "
            f"this model takes {spec.describe()}"
        )
    raw = bool(request.raw_input_contents)
    if raw and tensor.HasField("contents"):
        raise InvalidInputError("send input data in either contents or raw_input_contents, not both")
    if raw and len(request.raw_input_contents) != 1:
        raise InvalidInputError(f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input")
    texts = _decode_texts(request, tensor, limits, spec) if spec.text else _decode_tensor(request, tensor, limits, spec)
    outputs = [out.name for out in request.outputs] or list(OUTPUTS)
    unknown = [name for name in outputs if name not in OUTPUTS]
    if unknown:
        raise InvalidInputError(f"unknown requested outputs {unknown}; this model has {list(OUTPUTS)}")
    return TextBatch(
        texts=texts,
        request_id=request.id,
        hint=_hint(request),
        raw_output=raw,
        outputs=outputs,
        use_cache=_use_cache(request),
    )


def _check_rows(rows: int, name: str, limits: LimitSettings) -> None:
    if rows == 0:
        raise InvalidInputError(f"input {name!r} is an empty batch; send at least one row")
    if rows > limits.max_batch_rows:
        raise RequestTooLargeError(f"batch of {rows} rows exceeds the limit of {limits.max_batch_rows}; split it")


def _decode_texts(
    request: pb.ModelInferRequest, tensor: pb.ModelInferRequest.InferInputTensor, limits: LimitSettings, spec: InputSpec
) -> list[Row]:
    name = spec.name
    rows = _rows(tensor.shape, name)
    _check_rows(rows, name, limits)
    if request.raw_input_contents:
        items = _split_raw_bytes(request.raw_input_contents[0], name)
    else:
        items = list(tensor.contents.bytes_contents)
    if len(items) != rows:
        raise InvalidInputError(f"input {name!r} has shape {list(tensor.shape)} but carries {len(items)} elements")
    texts: list[Row] = []
    for row, item in enumerate(items):
        if len(item) > limits.max_text_bytes:
            raise InvalidInputError(
                f"row {row} is {len(item)} bytes; the limit is {limits.max_text_bytes} bytes per row"
            )
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(f"row {row} of input {name!r} is not valid UTF-8") from None
        if not text.strip():
            raise InvalidInputError(f"row {row} of input {name!r} is empty")
        texts.append(text)
    return texts


# Where typed contents carry each tensor datatype.
_TYPED_FIELDS = {"FP32": "fp32_contents", "INT64": "int64_contents"}


def _decode_tensor(
    request: pb.ModelInferRequest, tensor: pb.ModelInferRequest.InferInputTensor, limits: LimitSettings, spec: InputSpec
) -> list[Row]:
    name, shape = spec.name, [int(dim) for dim in tensor.shape]
    if len(shape) != len(spec.shape) or tuple(shape[1:]) != spec.row_shape or shape[0] < 0:
        raise InvalidInputError(f"input {name!r} has shape {shape}; this model takes {spec.describe()}")
    _check_rows(shape[0], name, limits)
    dtype = NUMPY_TYPES[spec.datatype]
    count = int(np.prod(shape))
    if request.raw_input_contents:
        data = request.raw_input_contents[0]
        if len(data) != count * dtype.itemsize:
            raise InvalidInputError(
                f"raw contents of input {name!r} hold {len(data)} bytes; shape {shape} of {spec.datatype} needs "
                f"{count * dtype.itemsize}"
            )
        array = np.frombuffer(data, dtype=dtype)
    else:
        field_name = _TYPED_FIELDS[spec.datatype]
        others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field_name]
        if others:
            raise InvalidInputError(f"input {name!r} is {spec.datatype}: send its values in {field_name}, not {others}")
        values = getattr(tensor.contents, field_name)
        if len(values) != count:
            raise InvalidInputError(f"input {name!r} has shape {shape} but carries {len(values)} values")
        array = np.asarray(values, dtype=dtype)
    array = array.reshape(shape)
    if spec.datatype == "FP32" and not np.isfinite(array).all():
        row = int(np.argwhere(~np.isfinite(array))[0][0])
        raise InvalidInputError(f"row {row} of input {name!r} holds NaN or infinity")
    return [Vector(values) for values in array]


def _bytes_raw(values: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(v)) + v for v in values)


def encode_response(
    batch: TextBatch,
    result: CascadeResult,
    *,
    model_name: str,
    model_version: str,
    chain: Sequence[str] = (),
    signal: str = "",
) -> pb.ModelInferResponse:
    """Build the OIP response: outputs label/confidence/tier/routing_signal plus routing parameters.

    `<tier>_rows` is sent for every tier of `chain`, zero included, so callers need not guess.
    """
    n = len(result.rows)
    byte_columns = {
        LABEL_OUTPUT: [row.label.encode("utf-8") for row in result.rows],
        TIER_OUTPUT: [row.tier.encode("utf-8") for row in result.rows],
    }
    fp32_columns = {
        CONFIDENCE_OUTPUT: [row.probability for row in result.rows],
        SIGNAL_OUTPUT: [row.signal for row in result.rows],
    }
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=batch.request_id)
    for name in batch.outputs:
        datatype = OUTPUTS[name]
        out = response.outputs.add(name=name, datatype=datatype, shape=[n])
        if datatype == "BYTES":
            texts = byte_columns[name]
            if batch.raw_output:
                response.raw_output_contents.append(_bytes_raw(texts))
            else:
                out.contents.bytes_contents.extend(texts)
        else:
            numbers = fp32_columns[name]
            if batch.raw_output:
                response.raw_output_contents.append(np.asarray(numbers, dtype="<f4").tobytes())
            else:
                out.contents.fp32_contents.extend(numbers)
    reasons = ["+".join(reason.value for reason in row.reasons) for row in result.rows]
    response.parameters[REASONS_PARAMETER].string_param = json.dumps(reasons)
    tiers = [row.tier for row in result.rows]
    for tier in dict.fromkeys([*chain, *tiers]):
        response.parameters[f"{tier}{ROWS_PARAMETER_SUFFIX}"].int64_param = tiers.count(tier)
    response.parameters[DEGRADED_PARAMETER].bool_param = result.degraded
    response.parameters[CACHE_HITS_PARAMETER].int64_param = result.cache_hits
    if signal:
        response.parameters[SIGNAL_NAME_PARAMETER].string_param = signal
    return response


def encode_metadata(model: TieredModel, versions: Sequence[str] = ()) -> pb.ModelMetadataResponse:
    """The OIP model metadata: the versions on disk (the serving one if none are numbered), the model's input
    (BYTES of shape [-1], or its tensor) and the outputs, in response order."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[version for version in versions if version] or [model.version],
        platform=PLATFORM,
        inputs=[tensor(name=model.input.name, datatype=model.input.datatype, shape=model.input.shape)],
        outputs=[tensor(name=name, datatype=datatype, shape=[-1]) for name, datatype in OUTPUTS.items()],
    )
