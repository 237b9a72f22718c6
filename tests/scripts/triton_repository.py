"""Drive a Tiergate gateway's repository calls with the unmodified tritonclient.grpc library; print JSON.

Usage: triton_repository.py URL STEP...; steps: index, unload, load, ready, versions, load-unknown.
"""

import json
import sys

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

MODEL = "product-category"


def main(url: str, steps: list[str]) -> None:
    client = grpcclient.InferenceServerClient(url=url)
    seen: list = []
    for step in steps:
        if step == "index":
            seen.append(client.get_model_repository_index(as_json=True).get("models", []))
        elif step == "unload":
            client.unload_model(MODEL)
            seen.append("unloaded")
        elif step == "load":
            client.load_model(MODEL)
            seen.append("loaded")
        elif step == "ready":
            seen.append(client.is_model_ready(MODEL))
        elif step == "versions":
            seen.append(client.get_model_metadata(MODEL, as_json=True)["versions"])
        elif step == "load-unknown":
            try:
                client.load_model("no-such-model")
                seen.append("loaded")
            except InferenceServerException as error:
                seen.append(str(error))
        else:
            raise SystemExit(f"unknown step {step!r}")
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
