"""Drive a Tiergate gateway with the unmodified tritonclient.grpc library; print what it saw as JSON."""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient

MODEL = "product-category"


def main(url: str, texts: list[str]) -> None:
    client = grpcclient.InferenceServerClient(url=url)
    seen: dict = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(MODEL),
    }
    metadata = client.get_model_metadata(MODEL, as_json=True)
    seen["inputs"] = metadata["inputs"]
    seen["outputs"] = [o["name"] for o in metadata["outputs"]]
    tensor = grpcclient.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    outputs = [grpcclient.InferRequestedOutput(name) for name in ("label", "confidence", "tier")]
    result = client.infer(MODEL, [tensor], outputs=outputs, request_id="triton-1")
    seen["label"] = [v.decode() for v in result.as_numpy("label").tolist()]
    seen["confidence"] = result.as_numpy("confidence").tolist()
    seen["tier"] = [v.decode() for v in result.as_numpy("tier").tolist()]
    response = result.get_response(as_json=True)
    seen["id"] = response.get("id")
    seen["parameters"] = response.get("parameters", {})
    try:
        client.infer("no-such-model", [tensor])
    except grpcclient.InferenceServerException as error:
        seen["unknown_model_status"] = error.status()
        seen["unknown_model_message"] = error.message()
    client.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
