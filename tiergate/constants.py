"""The names of the served model's wire contract: model, input, outputs and parameters, in one place."""

from __future__ import annotations

from typing import Final

MODEL_NAME: Final = "product-category"

INPUT_NAME: Final = "text"
INPUT_DATATYPE: Final = "BYTES"

LABEL_OUTPUT: Final = "label"
CONFIDENCE_OUTPUT: Final = "confidence"
TIER_OUTPUT: Final = "tier"
# The value a tier's threshold was applied to (the manifest's signal: max_prob, margin or entropy); `confidence`
# is the calibrated probability of the returned label.
SIGNAL_OUTPUT: Final = "routing_signal"
# Output name -> OIP datatype, in the order responses list them.
OUTPUTS: Final[dict[str, str]] = {
    LABEL_OUTPUT: "BYTES",
    CONFIDENCE_OUTPUT: "FP32",
    TIER_OUTPUT: "BYTES",
    SIGNAL_OUTPUT: "FP32",
}
# Response parameter: the name of the routing signal (`routing_signal` output) the thresholds apply to.
SIGNAL_NAME_PARAMETER: Final = "routing_signal_name"

# Request parameter: the caller's routing hint (auto, edge, cloud).
HINT_PARAMETER: Final = "tier"
# Request parameter (bool): false opts this request out of the response cache, both reading and filling it.
CACHE_PARAMETER: Final = "cache"
# Response parameters.
REASONS_PARAMETER: Final = "escalation_reasons"
DEGRADED_PARAMETER: Final = "degraded"
ROWS_PARAMETER_SUFFIX: Final = "_rows"  # "<tier>_rows": how many rows that tier answered
CACHE_HITS_PARAMETER: Final = "cache_hits"  # how many rows were answered from the response cache

# gRPC metadata key of the gateway's request id: read from callers, echoed back, sent on the cloud hop,
# so one id joins logs, traces and the audit log.
REQUEST_ID_METADATA: Final = "x-request-id"
