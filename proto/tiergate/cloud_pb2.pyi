from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("version", "key_id", "nonce", "request_id", "issued_at_unix_ms", "ciphertext")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    version: int
    key_id: str
    nonce: bytes
    request_id: str
    issued_at_unix_ms: int
    ciphertext: bytes
    def __init__(self, version: _Optional[int] = ..., key_id: _Optional[str] = ..., nonce: _Optional[bytes] = ..., request_id: _Optional[str] = ..., issued_at_unix_ms: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class TensorRows(_message.Message):
    __slots__ = ("datatype", "shape", "data")
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CloudInferRequest(_message.Message):
    __slots__ = ("model_name", "texts", "gateway_request_id", "tensor")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    gateway_request_id: str
    tensor: TensorRows
    def __init__(self, model_name: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., gateway_request_id: _Optional[str] = ..., tensor: _Optional[_Union[TensorRows, _Mapping]] = ...) -> None: ...

class CloudPrediction(_message.Message):
    __slots__ = ("label", "signal", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    signal: float
    probability: float
    def __init__(self, label: _Optional[str] = ..., signal: _Optional[float] = ..., probability: _Optional[float] = ...) -> None: ...

class CloudInferResponse(_message.Message):
    __slots__ = ("model_version", "predictions")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    predictions: _containers.RepeatedCompositeFieldContainer[CloudPrediction]
    def __init__(self, model_version: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[CloudPrediction, _Mapping]]] = ...) -> None: ...
