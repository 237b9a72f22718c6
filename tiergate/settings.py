"""One typed settings object for gateway and cloud: defaults, then a TOML file, then TIERGATE_* env overrides."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiergate.constants import MODEL_NAME

ENV_PREFIX = "TIERGATE_"
DEFAULT_MODELS_DIR = Path("artifacts/models/default")
DEFAULT_KEYRING = Path("artifacts/keys/seal-keys.json")


@dataclass
class RoutingSettings:
    """Escalation rules. `None` takes the value calibrated into the model manifest."""

    signal: str | None = None
    threshold: float | None = None
    # Heavy-request rules: rows longer than this many tokens, or batches larger
    # than this many rows, go straight to the heavy tier.
    max_edge_tokens: int = 24
    max_edge_batch: int = 256
    # The tier heavy rows (and `tier=cloud` requests) start at; unset, the last tier of the chain.
    heavy_tier: str | None = None
    # Honour the request parameter `tier` ("auto", "edge", "cloud").
    allow_client_hint: bool = True
    # Time kept back from a caller's deadline to return the edge's answer when the cloud cannot make it: a row
    # escalates only if the time left covers the hop's recent p95 plus this.
    deadline_reserve_s: float = 0.02
    # When the rows needed a later tier that failed or ran out of time: "fail_open" answers them from an
    # earlier tier, flagged degraded; "fail_closed" fails the request (UNAVAILABLE / DEADLINE_EXCEEDED).
    failure_policy: str = "fail_open"
    # Grey-band hedging: rows whose routing signal is within `hedge_band` under their tier's threshold are
    # sent on at once in a call of their own, beside the rest of the batch's work; once the rest is answered,
    # the request waits for that call at most `hedge_wait_s`, then keeps the earlier answer and cancels the
    # call. 0 turns hedging off.
    hedge_band: float = 0.0
    hedge_wait_s: float = 0.05

    def __post_init__(self) -> None:
        if self.failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"routing.failure_policy must be one of {', '.join(FAILURE_POLICIES)}")


# What the cascade does with rows whose later tier failed: answer them from an earlier tier, or fail.
FAILURE_POLICIES = ("fail_open", "fail_closed")


@dataclass
class LimitSettings:
    """Input limits; a request over them is refused with a message, not truncated."""

    max_batch_rows: int = 1024
    max_text_bytes: int = 2048
    max_message_bytes: int = 4 * 1024 * 1024
    # Admission control: past these many requests or rows in flight, new requests get RESOURCE_EXHAUSTED at once.
    max_inflight_requests: int = 256
    max_inflight_rows: int = 8192
    # The gateway sends a remote tier at most this many rows per call: a larger escalation goes as several
    # sealed calls, two at a time.
    hop_chunk_rows: int = 64


@dataclass
class BatchingSettings:
    """Dynamic batching at the edge: rows of concurrent requests share one model call (see tiergate/batching.py).

    Off by default: `make bench` measures no gain from it with the edge models built here, whose call is a small
    part of a request (turn it on for a heavier edge model, and measure)."""

    enabled: bool = False
    # A batch goes out at this many rows, at a preferred size, or once its oldest request waited the delay.
    # A delay of 0 adds no wait: batches form from what queued while the model was busy.
    max_batch_rows: int = 64
    max_queue_delay_us: int = 0
    preferred_batch_sizes: list[int] = field(default_factory=list)


@dataclass
class HopBatchingSettings:
    """Escalated rows of concurrent requests gathered into one sealed call per remote tier (tiergate/batching.py).

    Each request keeps its own deadline: one whose time runs out while its rows wait, or while the shared call
    runs, gets its earlier answers alone; the call goes on for the others.
    """

    enabled: bool = True
    # A shared call goes out at this many rows, or once its oldest request waited the delay.
    max_batch_rows: int = 64
    max_queue_delay_us: int = 500
    # Shared calls in flight to one tier at once; the next gathers meanwhile.
    max_inflight_calls: int = 4


@dataclass
class CacheSettings:
    """The response cache (gateway/cache.py): final answers by model version, routing hint and the query as
    shoppers type it. Off by default, as in Triton; a request opts out with the parameter `cache = false`."""

    enabled: bool = False
    # Bounded both ways: the least recently used entries go first once either bound is reached.
    max_entries: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    # An entry older than this is not served.
    ttl_s: float = 300.0


@dataclass
class TracingSettings:
    """OpenTelemetry tracing. The standard `OTEL_*` variables override each field (as the
    `TIERGATE_*` variables override the rest of the file); with no endpoint nothing is exported."""

    # False turns tracing off, as OTEL_SDK_DISABLED=true does.
    enabled: bool = True
    # OTLP collector, e.g. http://jaeger:4317 (OTEL_EXPORTER_OTLP_ENDPOINT).
    endpoint: str | None = None
    # grpc or http/protobuf (OTEL_EXPORTER_OTLP_PROTOCOL).
    protocol: str = "grpc"
    # Defaults to tiergate-gateway / tiergate-cloud (OTEL_SERVICE_NAME).
    service_name: str | None = None
    # always_on, always_off, traceidratio or their parentbased_ forms (OTEL_TRACES_SAMPLER).
    sampler: str = "parentbased_always_on"
    # The ratio for the traceidratio samplers (OTEL_TRACES_SAMPLER_ARG).
    sampler_arg: float | None = None
    # "key=value,key=value" resource attributes (OTEL_RESOURCE_ATTRIBUTES).
    resource_attributes: str | None = None
    # Spans wait in a bounded queue for the exporter thread; when it is full, new spans are dropped.
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay_s: float = 1.0
    # A collector that is down or slow costs the exporter thread at most this per batch, never a request.
    export_timeout_s: float = 3.0


@dataclass
class MetricsSettings:
    """The Prometheus endpoint, on an HTTP port of its own (`GET /metrics`)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    # 0 picks a free port; the gateway's default is 8002, the cloud's 8102.
    port: int = 8002


@dataclass
class CostSettings:
    """Prices per 1,000 rows each tier processes, to account for what tiering spends and saves.

    The defaults are placeholders: set your own prices. A row the edge escalates is paid twice.
    """

    edge_per_1k_rows: float = 0.002
    cloud_per_1k_rows: float = 0.40
    currency: str = "USD"


@dataclass
class DriftSettings:
    """Drift watch: shadow-sample rows the edge answered confidently to the last tier, off the request path."""

    # Share of confidently answered rows sampled (0 turns the watch off). Each sample is a cloud row to pay for.
    sample_rate: float = 0.02
    # Sampled rows waiting for the cloud; when full, new samples are dropped (and counted), never waited for.
    queue_size: int = 256
    # Rows per shadow call to the cloud, and the time each call may take.
    batch_rows: int = 32
    timeout_s: float = 2.0
    # Agreement is measured over this many latest comparisons; the alarm needs min_samples of them.
    window: int = 500
    min_samples: int = 200
    # Agreement below this level raises the alarm (one warning, and the tiergate_drift_alarm gauge). Unset, the
    # level is the agreement the calibration measured on validation (in the manifest) less alarm_drop.
    alarm_agreement: float | None = None
    alarm_drop: float = 0.05
    # JSON-lines file the disagreeing rows are appended to (None: not recorded).
    record_path: Path | None = None
    # Keep the row's text in the record (otherwise only its sha256).
    record_text: bool = False
    # Record the rows the cloud agreed with too; each line says "agree": true or false. `tiergate calibrate
    # --feedback` needs both kinds to re-pick the threshold on live traffic; false keeps disagreements only.
    record_agreeing: bool = True


@dataclass
class ReplaySettings:
    """Freshness and replay guard for sealed envelopes (the cloud on requests, the gateway on responses)."""

    # An envelope issued further than this from the receiver's clock, either way, is stale.
    skew_s: float = 30.0
    # (key id, nonce) and request ids seen inside the skew window are remembered in a bounded cache;
    # when it is full the receiver answers RESOURCE_EXHAUSTED rather than forget one early.
    max_entries: int = 200_000


@dataclass
class TlsSettings:
    """TLS for one side of a connection: PEM files. A server with `ca` set verifies client certificates."""

    # The CA that signs the peer's certificate (a server: clients' certificates; a client: the server's).
    ca: Path | None = None
    # This side's certificate chain and private key.
    cert: Path | None = None
    key: Path | None = None
    # A server refuses clients without a certificate signed by `ca`.
    require_client_cert: bool = False
    # A client checks the server's certificate for this name (default: the target's host). For tests.
    server_name: str | None = None

    @property
    def configured(self) -> bool:
        return self.cert is not None or self.ca is not None


@dataclass
class AuthSettings:
    """Client authentication at the public port: bearer tokens from a token file, or mTLS subjects."""

    enabled: bool = False
    # JSON token file written by `tiergate tokens add` (sha256 of each token, never the token).
    tokens_path: Path | None = None
    # RPCs callable without a token.
    exempt_health: bool = True
    exempt_reflection: bool = True
    # With client certificates on the public port, a certificate whose subject CN names a client in the
    # token file identifies that client without a token.
    allow_cert_subjects: bool = False


@dataclass
class AuditSettings:
    """The hash-chained audit log: one JSON line per request, never payloads, tokens or keys."""

    # None: no audit log.
    path: Path | None = None
    # Rotate to PATH.1, PATH.2, ... once the file reaches this size; the chain continues across files.
    max_bytes: int = 64 * 1024 * 1024
    backups: int = 10


@dataclass
class PolicySettings:
    """What may not leave the private side: applied on the gateway to every row before it is sealed."""

    # redact: matches are replaced by a typed placeholder before sealing;
    # keep_private: a matching row is never escalated (reason private_data).
    action: str = "redact"
    # Kinds of personal data to look for (email, phone, card, postcode); empty turns the policy off.
    kinds: list[str] = field(default_factory=lambda: ["email", "phone", "card", "postcode"])
    # Request parameters that may be forwarded to the cloud (none by default).
    forward_parameters: list[str] = field(default_factory=list)


@dataclass
class BreakerSettings:
    """Circuit breaker on each remote tier (see gateway/breaker.py)."""

    enabled: bool = True
    # Open on this many failed calls in a row...
    consecutive_failures: int = 5
    # ...or when this share of the last `window` calls failed (once `min_calls` were made).
    error_rate: float = 0.5
    window: int = 20
    min_calls: int = 10
    # Open this long before one probe call is let through.
    cool_off_s: float = 5.0


@dataclass
class TierSettings:
    """One tier of the chain, by name. `edge` and `cloud` need no entry: they are the in-process edge model
    and the remote tier at `cloud_target`. Any other name is a remote tier server (`tiergate serve cloud`),
    for example a larger model on a private GPU between edge and cloud, or a second cloud region as failover.
    """

    # "edge": the in-process INT8 model; "remote": a tier server reached over the sealed, mutual-TLS hop.
    kind: str = "remote"
    # host:port of a remote tier.
    target: str = ""
    # This tier's answers with a routing signal under this value climb to the next tier. Unset: the
    # gateway's routing.threshold, else the one calibrated into the manifest. The last tier's is unused.
    threshold: float | None = None
    # Per-call timeout of a remote tier; unset, the gateway's cloud_timeout_s.
    timeout_s: float | None = None
    # Its price per 1,000 rows for the cost account; unset, cost.edge_per_1k_rows or cost.cloud_per_1k_rows
    # by kind.
    price_per_1k_rows: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("edge", "remote"):
            raise ValueError(f"tier kind must be 'edge' or 'remote', got {self.kind!r}")


@dataclass
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8001
    model_name: str = MODEL_NAME
    models_dir: Path = DEFAULT_MODELS_DIR
    # A models_dir of numbered versions (1/, 2/, ...) is checked this often for a newer one, which is verified,
    # loaded and swapped in live; 0 checks only on a RepositoryModelLoad request.
    reload_poll_s: float = 5.0
    # How many of each model's newest numbered versions serve at once (Triton's `latest` policy): requests that
    # name a version get it while it is loaded; those naming none get the newest. 0: every version on disk.
    serve_versions: int = 1
    # Tier names in escalation order; the first runs in-process, every later one is remote (see `tiers`).
    chain: list[str] = field(default_factory=lambda: ["edge", "cloud"])
    # Tiers other than the implied `edge` and `cloud`, or overrides of theirs: [gateway.tiers.NAME].
    tiers: dict[str, TierSettings] = field(default_factory=dict)
    edge_backend: str = "onnxruntime"
    # Edge model calls of at most this many rows run on the event loop itself: a small call costs less than the
    # hand-off to the edge worker thread and back. Larger calls (and calls while the worker is busy) run on the
    # worker, so the loop keeps serving meanwhile. 0: every call on the worker.
    edge_inline_rows: int = 64
    cloud_target: str = "127.0.0.1:8101"
    cloud_timeout_s: float = 2.0
    keyring_path: Path = DEFAULT_KEYRING
    grace_s: float = 5.0
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    hop_batching: HopBatchingSettings = field(default_factory=HopBatchingSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    cost: CostSettings = field(default_factory=CostSettings)
    drift: DriftSettings = field(default_factory=DriftSettings)
    # A key directory written by `tiergate keys init` fills in the keyring, the hop's TLS files and the
    # token file (see tiergate.keys.apply_key_dir); explicit settings win.
    keys_dir: Path | None = None
    # The hop to the cloud: mTLS with these files; plaintext only with hop_insecure = true (logs a warning).
    hop_tls: TlsSettings = field(default_factory=TlsSettings)
    hop_insecure: bool = False
    # The public OIP port: plaintext unless a certificate is given.
    public_tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)


@dataclass
class CloudSettings:
    host: str = "127.0.0.1"
    port: int = 8101
    # Must match the gateway's model_name when models_dir holds one model (a repository names its own models).
    model_name: str = MODEL_NAME
    models_dir: Path = DEFAULT_MODELS_DIR
    # An OIP v2 server inside the cloud network (HOST:PORT) that answers for every model instead of the ONNX
    # files (Triton, KServe, MLServer); the boundary, sealing and replay guard stay here. "": run the ONNX files.
    upstream: str = ""
    # The longest one call to the upstream may take (less when the gateway's deadline is nearer).
    upstream_timeout_s: float = 5.0
    keyring_path: Path = DEFAULT_KEYRING
    grace_s: float = 5.0
    intra_op_threads: int = 1
    # The model runs a request this many rows at a time; between chunks it stops if the caller has gone, so
    # abandoned work costs later requests one chunk at most.
    model_chunk_rows: int = 32
    # A connection older than this is closed gracefully (GOAWAY; 0: never), so gateways reconnect, resolve the
    # tier's name again and spread their calls over replicas added since. Calls in flight get the grace to end.
    max_connection_age_s: float = 300.0
    max_connection_age_grace_s: float = 30.0
    limits: LimitSettings = field(default_factory=LimitSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    metrics: MetricsSettings = field(default_factory=lambda: MetricsSettings(port=8102))
    keys_dir: Path | None = None
    # The serving port: mTLS (client certificates required) with these files; plaintext only with insecure = true.
    tls: TlsSettings = field(default_factory=lambda: TlsSettings(require_client_cert=True))
    insecure: bool = False
    audit: AuditSettings = field(default_factory=AuditSettings)
    replay: ReplaySettings = field(default_factory=ReplaySettings)


@dataclass
class Settings:
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    cloud: CloudSettings = field(default_factory=CloudSettings)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        return _coerce(value, options[0], where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: expected a boolean, got {value!r}")
    if origin is list:
        items = value.split(",") if isinstance(value, str) else list(value)
        (item_type,) = typing.get_args(annotation) or (str,)
        texts = [str(item).strip() for item in items if str(item).strip()]
        return [_coerce(text, item_type, f"{where}[{index}]") for index, text in enumerate(texts)]
    try:
        return annotation(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: cannot read {value!r} as {annotation.__name__}") from error


def _apply(target: Any, values: Mapping[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(target))
    names = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(names))}")
        current = getattr(target, key)
        table = _table_of(hints[key])
        if table is not None:
            # A table of named sections, e.g. [gateway.tiers.NAME]: each entry starts from the defaults.
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}.{key}: expected a table")
            for name, entry in value.items():
                if not isinstance(entry, Mapping):
                    raise ValueError(f"{where}.{key}.{name}: expected a table")
                section = current.get(name) or table()
                _apply(section, entry, f"{where}.{key}.{name}")
                section.__post_init__()
                current[name] = section
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}.{key}: expected a table")
            _apply(current, value, f"{where}.{key}")
        else:
            setattr(target, key, _coerce(value, hints[key], f"{where}.{key}"))


def _table_of(annotation: Any) -> Any:
    """The section class of a `dict[str, Section]` setting, else None."""
    if typing.get_origin(annotation) is dict:
        value = typing.get_args(annotation)[1]
        if dataclasses.is_dataclass(value):
            return value
    return None


def _env_tree(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from defaults, an optional TOML file, then `TIERGATE_SECTION__KEY` variables.

    Example: `TIERGATE_GATEWAY__ROUTING__THRESHOLD=0.4` sets gateway.routing.threshold.
    """
    settings = Settings()
    if path is not None:
        with path.open("rb") as handle:
            _apply(settings, tomllib.load(handle), "settings")
    _apply(settings, _env_tree(os.environ if env is None else env), "env")
    return settings
