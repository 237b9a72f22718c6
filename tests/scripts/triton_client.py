"""Drive a Tiergate gateway with the unmodified tritonclient.grpc library; print what it saw as JSON."""

import json
import os
import sys

import numpy as np
import tritonclient.grpc as grpcclient

MODEL = "product-category"


def main(url: str, texts: list[str]) -> None:
    client = grpcclient.InferenceServerClient(url=url)
    # The client token goes in every call's headers, as tritonclient users send any auth header.
    headers = {"authorization": f"Bearer {os.environ['TIERGATE_TOKEN']}"}
    seen: dict = {
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready(MODEL, headers=headers),
    }
    metadata = client.get_model_metadata(MODEL, headers=headers, as_json=True)
    seen["inputs"] = metadata["inputs"]
    seen["outputs"] = [o["name"] for o in metadata["outputs"]]
    tensor = grpcclient.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    outputs = [grpcclient.InferRequestedOutput(name) for name in ("label", "confidence", "tier")]
    result = client.infer(MODEL, [tensor], outputs=outputs, request_id="triton-1", headers=headers)
    seen["label"] = [v.decode() for v in result.as_numpy("label").tolist()]
    seen["confidence"] = result.as_numpy("confidence").tolist()
    seen["tier"] = [v.decode() for v in result.as_numpy("tier").tolist()]
    response = result.get_response(as_json=True)
    seen["id"] = response.get("id")
    seen["parameters"] = response.get("parameters", {})
    refusals = {
        "unknown_model": ("no-such-model", headers),
        "no_token": (MODEL, None),
        "other_token": (MODEL, {"authorization": f"Bearer {os.environ['TIERGATE_OTHER_TOKEN']}"}),
    }
    for name, (model, sent) in refusals.items():
        try:
            client.infer(model, [tensor], headers=sent)
        except grpcclient.InferenceServerException as error:
            seen[f"{name}_status"] = error.status()
            seen[f"{name}_message"] = error.message()
    client.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
