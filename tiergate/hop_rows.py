"""A hop call's rows in the sealed request: texts as strings, tensor rows as one row-major little-endian array."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from proto.tiergate import cloud_pb2
from tiergate.errors import InvalidInputError
from tiergate.inputs import Row, Vector, stack
from tiergate.manifest import InputSpec

# OIP datatypes of tensor inputs, as little-endian numpy types.
NUMPY_TYPES: dict[str, np.dtype[np.generic]] = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}


def pack_rows(request: cloud_pb2.CloudInferRequest, rows: Sequence[Row]) -> None:
    """Put `rows` into `request`: texts into `texts`, tensor rows into `tensor`."""
    if rows and isinstance(rows[0], Vector):
        array = stack(rows)
        datatype = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}.get(array.dtype)
        if datatype is None:
            raise TypeError(f"tensor rows of dtype {array.dtype} cannot cross the hop; expected float32 or int64")
        request.tensor.datatype = datatype
        request.tensor.shape.extend(array.shape)
        request.tensor.data = np.ascontiguousarray(array, dtype=NUMPY_TYPES[datatype]).tobytes()
        return
    for row in rows:
        if not isinstance(row, str):
            raise TypeError("a hop call carries texts or tensor rows, not both")
    request.texts.extend(rows)  # type: ignore[arg-type]  # every row is a str (checked above)


def unpack_rows(request: cloud_pb2.CloudInferRequest, spec: InputSpec) -> list[Row]:
    """The rows of `request` for a model taking `spec`; InvalidInputError when they do not fit it."""
    if not request.HasField("tensor"):
        if not spec.text:
            raise InvalidInputError(f"model {request.model_name!r} takes tensor input {spec.describe()}, not texts")
        return list(request.texts)
    if spec.text or request.texts:
        raise InvalidInputError(f"model {request.model_name!r} takes input {spec.describe()}; got a tensor")
    tensor = request.tensor
    shape = tuple(int(dim) for dim in tensor.shape)
    if tensor.datatype != spec.datatype or shape[1:] != spec.row_shape or not shape or shape[0] < 0:
        raise InvalidInputError(
            f"model {request.model_name!r} takes {spec.describe()}; got {tensor.datatype} of shape {list(shape)}"
        )
    dtype = NUMPY_TYPES[spec.datatype]
    if len(tensor.data) != int(np.prod(shape)) * dtype.itemsize:
        raise InvalidInputError(f"the tensor's {len(tensor.data)} bytes do not fill shape {list(shape)}")
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    return [Vector(row) for row in array]
