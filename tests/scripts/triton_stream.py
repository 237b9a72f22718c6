"""Drive ModelStreamInfer on a Tiergate gateway with the unmodified tritonclient.grpc stream API; print JSON.

Run in a process of its own: tritonclient's protobuf descriptors clash with the project's.
Usage: triton_stream.py URL TEXT [TEXT ...]; tokens come from TIERGATE_TOKEN (may call every model) and
TIERGATE_OTHER_TOKEN (may call another model only).
"""

import json
import os
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

MODEL = "product-category"
REQUESTS = 100
# Mid-stream requests that must fail alone: a wrong datatype and a model the gateway does not serve.
BAD_DATATYPE_AT = 40
UNKNOWN_MODEL_AT = 41
WAIT_S = 60.0


def text_input(texts: list[str]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    return tensor


def fp32_input() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("text", [1], "FP32")
    tensor.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    return tensor


class Collected:
    """The stream callback's (result, error) pairs, in the order they arrived."""

    def __init__(self) -> None:
        self.replies: queue.Queue[tuple[object, object]] = queue.Queue()

    def __call__(self, result: object, error: object) -> None:
        self.replies.put((result, error))

    def next(self) -> dict[str, Any]:
        result, error = self.replies.get(timeout=WAIT_S)
        if error is not None:
            assert isinstance(error, grpcclient.InferenceServerException)
            return {"error": error.message(), "status": error.status()}
        assert isinstance(result, grpcclient.InferResult)
        return {
            "id": result.get_response().id,
            "label": [v.decode() for v in result.as_numpy("label").tolist()],
            "tier": [v.decode() for v in result.as_numpy("tier").tolist()],
        }


def rows_of(number: int, texts: list[str]) -> list[str]:
    """Request `number`'s rows: one to three texts, different from its neighbours'."""
    count = 1 + number % 3
    return [texts[(number + k) % len(texts)] for k in range(count)]


# One request: (model, inputs, request id).
Request = tuple[str, list[grpcclient.InferInput], str]


def one_stream(
    client: grpcclient.InferenceServerClient, headers: dict[str, str] | None, requests: list[Request]
) -> list[dict[str, Any]]:
    """Send `requests` ((model, inputs, request id) each) on one stream and collect one reply per request."""
    collected = Collected()
    client.start_stream(callback=collected, headers=headers)
    for model, inputs, request_id in requests:
        client.async_stream_infer(model, inputs, request_id=request_id)
    replies = [collected.next() for _ in requests]
    client.stop_stream()
    return replies


def refused_stream(client: grpcclient.InferenceServerClient, request: Request) -> dict[str, Any]:
    """A stream the gateway refuses: the callback gets its status once. Sending on it may already fail
    (tritonclient then says the error comes through the callback), depending on how soon the refusal lands."""
    collected = Collected()
    client.start_stream(callback=collected, headers=None)
    try:
        client.async_stream_infer(request[0], request[1], request_id=request[2])
    except grpcclient.InferenceServerException as error:
        assert "no longer in valid state" in error.message(), error.message()
    reply = collected.next()
    client.stop_stream()
    return reply


def main(url: str, texts: list[str]) -> None:
    client = grpcclient.InferenceServerClient(url=url)
    headers = {"authorization": f"Bearer {os.environ['TIERGATE_TOKEN']}"}
    seen: dict[str, Any] = {}

    requests: list[Request] = []
    for number in range(REQUESTS):
        inputs = [text_input(rows_of(number, texts))]
        model = MODEL
        if number == BAD_DATATYPE_AT:
            inputs = [fp32_input()]
        if number == UNKNOWN_MODEL_AT:
            model = "no-such-model"
        requests.append((model, inputs, f"r{number}"))
    seen["stream"] = one_stream(client, headers, requests)
    # The same requests one by one (unary), to compare each streamed answer with.
    seen["unary_labels"] = [
        [v.decode() for v in client.infer(MODEL, inputs, headers=headers).as_numpy("label").tolist()]
        for model, inputs, _ in requests
        if model == MODEL and inputs[0].datatype() == "BYTES"
    ]

    # No token: the stream itself is refused (the callback gets the stream's status).
    seen["no_token"] = refused_stream(client, (MODEL, [text_input(texts[:1])], "n0"))
    # A token for another model: each request is refused in the stream, which stays open.
    other = {"authorization": f"Bearer {os.environ['TIERGATE_OTHER_TOKEN']}"}
    seen["other_token"] = one_stream(client, other, [(MODEL, [text_input(texts[:1])], f"o{n}") for n in range(2)])
    client.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
