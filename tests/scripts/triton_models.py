"""Drive a Tiergate gateway serving several models with the unmodified tritonclient.grpc library; print JSON.

Usage: triton_models.py URL STEPS_JSON. Each step is an object: {"op": "index"}, {"op": "ready", "model": M},
{"op": "metadata", "model": M}, or {"op": "infer", "model": M, "version": V, "texts": [...]} (a BYTES input
"text") or {"op": "infer", "model": M, "tensor": [[...]], "name": N, "datatype": D} (a numeric input), with
optional "parameters". Each step's result, or its error as {"status": ..., "message": ...}, is printed in order.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def infer(client: grpcclient.InferenceServerClient, step: dict) -> dict:
    if "texts" in step:
        tensor = grpcclient.InferInput(step.get("name", "text"), [len(step["texts"])], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in step["texts"]], dtype=np.object_))
    else:
        datatype = step.get("datatype", "FP32")
        values = np.array(step["tensor"], dtype=np.float32 if datatype == "FP32" else np.int64)
        tensor = grpcclient.InferInput(step.get("name", "features"), list(values.shape), datatype)
        tensor.set_data_from_numpy(values)
    result = client.infer(
        step["model"], [tensor], model_version=step.get("version", ""), parameters=step.get("parameters")
    )
    response = result.get_response(as_json=True)
    return {
        "model_version": response.get("model_version"),
        "label": [v.decode() for v in result.as_numpy("label").tolist()],
        "tier": [v.decode() for v in result.as_numpy("tier").tolist()],
        "confidence": result.as_numpy("confidence").tolist(),
        "reasons": json.loads(response["parameters"]["escalation_reasons"]["string_param"]),
    }


def main(url: str, steps: list[dict]) -> None:
    client = grpcclient.InferenceServerClient(url=url)
    seen: list = []
    for step in steps:
        try:
            if step["op"] == "index":
                seen.append(client.get_model_repository_index(as_json=True).get("models", []))
            elif step["op"] == "ready":
                seen.append(client.is_model_ready(step["model"], step.get("version", "")))
            elif step["op"] == "metadata":
                seen.append(client.get_model_metadata(step["model"], as_json=True))
            elif step["op"] == "infer":
                seen.append(infer(client, step))
            else:
                raise SystemExit(f"unknown op {step['op']!r}")
        except InferenceServerException as error:
            seen.append({"status": error.status(), "message": error.message()})
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
