"""Assembles the gateway process from settings: the model repository (each model's manifest, tier chain and
routing policy) and the gRPC server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from gateway.auth import AuthInterceptor
from gateway.cache import ResponseCache
from gateway.cascade import Cascade, ChainRules, RowAnswer, TieredModel, row_answer_bytes
from gateway.cloud_tier import CloudTier
from gateway.cost import CostModel
from gateway.drift import DriftWatch
from gateway.edge_tier import EdgeTier
from gateway.metrics import GatewayMetrics
from gateway.policy import BoundaryPolicy
from gateway.repository import ModelRepository, ModelVersions
from gateway.routing import RoutingPolicy
from gateway.servicer import InferenceServicer, request_id_of
from gateway.tier import Tier
from proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from tiergate.envelope import Keyring, Sealer
from tiergate.keys import apply_key_dir, load_keyring
from tiergate.manifest import EDGE_ROLES, Manifest, load_manifest, model_directories, newest_verified
from tiergate.metrics import MetricsServer
from tiergate.rpc import AuditInterceptor, ManagedServer
from tiergate.security import Boundary, require_tls_or_insecure
from tiergate.settings import (
    FAILURE_POLICIES,
    AuthSettings,
    CacheSettings,
    GatewaySettings,
    TierSettings,
    TlsSettings,
)
from tiergate.tasks import cancel_and_wait
from tiergate.telemetry import Tracing
from tiergate.tls import channel_credentials, channel_options, server_credentials
from tiergate.tokens import TokenStore

logger = logging.getLogger(__name__)

SERVICE_NAME = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def routing_policy(settings: GatewaySettings, manifest: Manifest) -> RoutingPolicy:
    """Settings override the threshold calibrated into the manifest; the manifest's own heavy-request rules
    override the settings'."""
    routing = settings.routing
    rules = manifest.routing
    if routing.signal is not None and routing.signal != manifest.routing.signal:
        raise ValueError(
            f"routing signal {routing.signal!r} differs from the calibrated {manifest.routing.signal!r}; "
            "recalibrate the models instead"
        )
    return RoutingPolicy(
        threshold=first_threshold(settings, manifest),
        max_edge_tokens=routing.max_edge_tokens if rules.max_edge_tokens is None else rules.max_edge_tokens,
        max_edge_batch=routing.max_edge_batch if rules.max_edge_batch is None else rules.max_edge_batch,
        allow_client_hint=routing.allow_client_hint,
        signal=manifest.routing.signal,
        deadline_reserve_s=routing.deadline_reserve_s,
    )


def first_threshold(settings: GatewaySettings, manifest: Manifest) -> float:
    """The first tier's threshold: its tier entry, else routing.threshold, else the calibrated one."""
    entry = settings.tiers.get(settings.chain[0])
    if entry is not None and entry.threshold is not None:
        return entry.threshold
    return manifest.routing.threshold if settings.routing.threshold is None else settings.routing.threshold


def chain_rules(settings: GatewaySettings, manifest: Manifest) -> ChainRules:
    """Per-tier thresholds, the heavy tier, the failure policy and hedging, from settings."""
    routing = settings.routing
    if routing.failure_policy not in FAILURE_POLICIES:
        raise ValueError(
            f"routing.failure_policy must be one of {', '.join(FAILURE_POLICIES)}, got {routing.failure_policy!r}"
        )
    default = first_threshold(settings, manifest)
    thresholds = [default]
    for name in settings.chain[1:-1]:
        entry = settings.tiers.get(name)
        thresholds.append(default if entry is None or entry.threshold is None else entry.threshold)
    heavy_level = None
    if routing.heavy_tier is not None:
        if routing.heavy_tier not in settings.chain:
            raise ValueError(
                f"routing.heavy_tier {routing.heavy_tier!r} is not in the chain {', '.join(settings.chain)}"
            )
        heavy_level = settings.chain.index(routing.heavy_tier)
    return ChainRules(
        thresholds=tuple(thresholds[: len(settings.chain) - 1]),
        heavy_level=heavy_level,
        fail_closed=routing.failure_policy == "fail_closed",
        hedge_band=routing.hedge_band,
        hedge_wait_s=routing.hedge_wait_s,
    )


def response_cache(settings: CacheSettings) -> ResponseCache[RowAnswer] | None:
    """A fresh response cache for one model version, or None when caching is off."""
    if not settings.enabled:
        return None
    return ResponseCache(
        max_entries=settings.max_entries, max_bytes=settings.max_bytes, ttl_s=settings.ttl_s, size_of=row_answer_bytes
    )


def cost_model(settings: GatewaySettings) -> CostModel:
    """Each tier's price: its own, else the edge or cloud price by kind; the last tier is the reference."""
    cost = settings.cost
    prices = {}
    for name in settings.chain:
        entry = tier_settings(settings, name)
        by_kind = cost.edge_per_1k_rows if entry.kind == "edge" else cost.cloud_per_1k_rows
        prices[name] = by_kind if entry.price_per_1k_rows is None else entry.price_per_1k_rows
    return CostModel(prices, reference_tier=settings.chain[-1], currency=cost.currency)


# gRPC targets with a resolver scheme are taken as given; anything else must be host:port.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


def check_target(target: str, where: str) -> str:
    """`target` if it is a gRPC target a channel can dial; ValueError naming `where` and the form wanted."""
    if target.startswith(_SCHEMES):
        return target
    host, _, port = target.rpartition(":")
    if _HOST.fullmatch(host) and port.isdigit() and 0 < int(port) < 65536:
        return target
    raise ValueError(f"{where} is {target!r}, which is not an address: expected host:port, e.g. 10.0.0.5:8101")


def tier_settings(settings: GatewaySettings, name: str) -> TierSettings:
    """The settings of tier `name`: its entry in `tiers`, or the implied `edge` and `cloud` tiers."""
    entry = settings.tiers.get(name)
    if entry is None:
        if name == "edge":
            return TierSettings(kind="edge")
        if name == "cloud":
            return TierSettings(kind="remote", target=settings.cloud_target)
        known = ", ".join(sorted({"edge", "cloud", *settings.tiers}))
        raise ValueError(f"unknown tier {name!r} in the chain; known tiers: {known} (add [gateway.tiers.{name}])")
    if entry.kind == "remote" and not entry.target:
        if name != "cloud":
            raise ValueError(f"remote tier {name!r} has no target (gateway.tiers.{name}.target = 'host:port')")
        return dataclasses.replace(entry, target=settings.cloud_target)
    return entry


def build_tiers(
    settings: GatewaySettings,
    manifest: Manifest,
    sealer: Sealer | None,
    tracing: Tracing | None = None,
    metrics: GatewayMetrics | None = None,
    model_name: str | None = None,
) -> list[Tier]:
    """The chain's tiers for model `model_name` (default: settings.model_name); remote tiers seal with `sealer`
    over mTLS (or plaintext if hop_insecure)."""
    tracing = tracing or Tracing.from_settings(settings.tracing, "tiergate-gateway")
    if not settings.chain:
        raise ValueError("the tier chain is empty: set gateway.chain, e.g. ['edge', 'cloud']")
    if len(set(settings.chain)) != len(settings.chain):
        raise ValueError(f"a tier appears twice in the chain {settings.chain}")
    tiers: list[Tier] = []
    for level, name in enumerate(settings.chain):
        entry = tier_settings(settings, name)
        if entry.kind == "edge":
            if level > 0:
                raise ValueError(f"tier {name!r} runs in-process (kind edge): only the first tier of the chain can")
            tiers.append(
                EdgeTier.load(
                    settings.models_dir,
                    manifest,
                    backend=settings.edge_backend,
                    name=name,
                    tracer=tracing.tracer,
                    metrics=metrics,
                    batching=settings.batching,
                    inline_rows=settings.edge_inline_rows,
                )
            )
            continue
        check_target(entry.target, f"the address of tier {name}")
        if sealer is None:
            raise ValueError(f"remote tier {name!r} needs a keyring to seal requests")
        secure = require_tls_or_insecure(
            settings.hop_tls, settings.hop_insecure, f"the hop to tier {name}", "hop_insecure"
        )
        tiers.append(
            CloudTier(
                entry.target,
                sealer,
                model_name=model_name or settings.model_name,
                name=name,
                timeout_s=settings.cloud_timeout_s if entry.timeout_s is None else entry.timeout_s,
                max_message_bytes=settings.limits.max_message_bytes,
                tracer=tracing.tracer,
                interceptors=tracing.client_interceptors(entry.target),
                metrics=metrics,
                replay=settings.replay,
                credentials=channel_credentials(settings.hop_tls) if secure else None,
                channel_options=channel_options(settings.hop_tls) if secure else (),
                breaker=settings.breaker,
                deadline_reserve_s=settings.routing.deadline_reserve_s,
                chunk_rows=settings.limits.hop_chunk_rows,
                batching=settings.hop_batching,
            )
        )
    return tiers


# Each tier's readiness is reported as the health of service TIER_HEALTH_PREFIX + its name, checked this often.
TIER_HEALTH_PREFIX = "tiergate.tier."
TIER_HEALTH_EVERY_S = 0.25
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

# The OIP calls each written to the audit log (liveness and readiness probes are not).
AUDITED_METHODS = (
    "ModelInfer",
    "ModelStreamInfer",  # one line per streamed request
    "ModelMetadata",
    "ModelReady",
    "ServerMetadata",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
)


class GatewayServer:
    """Owns the tiers, the OIP servicer, the managed gRPC server, its boundary and telemetry of the gateway."""

    def __init__(
        self, settings: GatewaySettings, keyring: Keyring | None = None, *, tracing: Tracing | None = None
    ) -> None:
        """`keyring` overrides the one at `settings.keyring_path` (loaded when the chain has a cloud tier);
        `tracing` replaces the one the settings describe (tests hand in one with an in-memory processor)."""
        apply_key_dir(settings)
        self.settings = settings
        self._tier_health: asyncio.Future[None] | None = None
        self.tracing = tracing or Tracing.from_settings(settings.tracing, "tiergate-gateway")
        self.metrics = GatewayMetrics()
        self.metrics_server = MetricsServer(self.metrics.registry) if settings.metrics.enabled else None
        self.boundary = Boundary(settings.audit)
        remote = any(tier_settings(settings, name).kind == "remote" for name in settings.chain)
        # A keyring read from its file is watched and reloads; one handed in is the caller's to manage.
        from_file = keyring is None and remote
        if from_file:
            keyring = load_keyring(settings.keyring_path)
        self.sealer = Sealer(keyring) if keyring is not None else None
        if self.sealer is not None and from_file:
            self.boundary.watch_keyring(settings.keyring_path, self.sealer)
        in_process = tier_settings(settings, settings.chain[0]).kind == "edge" if settings.chain else False
        self._roles = list(EDGE_ROLES) if in_process else []
        # Each model of the repository gets its own chain (its edge model, and its own hop to each remote tier,
        # which asks for that model), its own routing, drift watch and versions.
        self.chains: dict[str, list[Tier]] = {}
        self.drifts: dict[str, DriftWatch] = {}
        served: list[ModelVersions] = []
        for name, root in model_directories(settings.models_dir, settings.model_name).items():
            chosen = newest_verified(root, self._roles)
            manifest = chosen.manifest
            tiers = build_tiers(
                dataclasses.replace(settings, models_dir=chosen.path),
                manifest,
                self.sealer,
                self.tracing,
                self.metrics,
                model_name=name,
            )
            self.chains[name] = tiers
            if len(tiers) > 1:
                # The watch compares the first tier's confident answers with the last tier's.
                self.drifts[name] = DriftWatch(
                    settings.drift,
                    tiers[-1],
                    model=name,
                    model_version=manifest.version,
                    metrics=self.metrics,
                    expected_agreement=manifest.routing.calibration.get("confident_agreement"),
                )
            owned = [tiers[0]] if isinstance(tiers[0], EdgeTier) else []
            model = self._assemble(name, manifest, chosen.version or manifest.version, tiers, owned=owned)
            versions = ModelVersions(
                name, root, self._loader(name), grace_s=settings.grace_s, keep=settings.serve_versions
            )
            versions.start_with(model, chosen.refused)
            served.append(versions)
        self._watch_hop_certificates(settings.hop_tls)
        self.repository = ModelRepository(served, poll_s=settings.reload_poll_s)
        self.servicer = InferenceServicer(self.repository, settings.limits)
        self.clients = self._client_directory(settings.auth)
        inner: list[grpc.aio.ServerInterceptor] = []
        if self.boundary.audit is not None:
            inner.append(AuditInterceptor(self.boundary.audit, AUDITED_METHODS, request_id_of))
        if self.clients is not None:
            inner.append(AuthInterceptor(settings.auth, lambda: self._directory))

        def register(server: grpc.aio.Server) -> list[str]:
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
            return [SERVICE_NAME]

        self.managed = ManagedServer(
            register,
            max_message_bytes=settings.limits.max_message_bytes,
            interceptors=self.tracing.server_interceptors(),
            inner_interceptors=inner,
            on_error=self.metrics.rpc_failed,
            # The public port is plaintext unless given a certificate: TLS usually ends at the balancer in front.
            credentials=server_credentials(settings.public_tls),
        )

    @property
    def tiers(self) -> list[Tier]:
        """Every model's tiers (the first model's first), each once."""
        return list({id(tier): tier for tiers in self.chains.values() for tier in tiers}.values())

    @property
    def drift(self) -> DriftWatch | None:
        """The drift watch of the model named `model_name` (or of the only model), if it has one."""
        name = self.settings.model_name if self.settings.model_name in self.chains else next(iter(self.chains))
        return self.drifts.get(name)

    def _assemble(
        self, name: str, manifest: Manifest, version: str, tiers: list[Tier], owned: Sequence[Tier] = ()
    ) -> TieredModel:
        """The served model of one version: its tiers under the routing that version was calibrated with."""
        settings = self.settings
        cascade = Cascade(
            tiers,
            routing_policy(settings, manifest),
            tracer=self.tracing.tracer,
            data_policy=BoundaryPolicy.from_settings(settings.policy),
            rules=chain_rules(settings, manifest),
        )
        return TieredModel(
            name,
            version,
            cascade,
            metrics=self.metrics,
            cost=cost_model(settings),
            drift=self.drifts.get(name),
            owned=owned,
            cache=response_cache(settings.cache),
            input_spec=manifest.input,
        )

    def _loader(self, name: str) -> Callable[[Path, str], Awaitable[TieredModel]]:
        async def load(model_dir: Path, version: str) -> TieredModel:
            return await self._load_version(name, model_dir, version)

        return load

    async def _load_version(self, name: str, model_dir: Path, version: str) -> TieredModel:
        """A new version of model `name`, verified and loaded off the event loop; it shares the remote tiers
        already open."""
        manifest = await asyncio.to_thread(load_manifest, model_dir, True, self._roles)
        routing_policy(self.settings, manifest)  # a version whose routing cannot work is refused here
        tiers = self.chains[name]
        serving = self.repository.versions(name).serving
        if isinstance(serving, TieredModel) and manifest.input != serving.input:
            raise ValueError(
                f"version {version} takes {manifest.input.describe()} where the version serving takes "
                f"{serving.input.describe()}: a new input is a new model name, or a restart"
            )
        first = tiers[0]
        if isinstance(first, EdgeTier):
            edge = await asyncio.to_thread(
                EdgeTier.load,
                model_dir,
                manifest,
                backend=self.settings.edge_backend,
                name=first.name,
                tracer=self.tracing.tracer,
                metrics=self.metrics,
                batching=self.settings.batching,
                inline_rows=self.settings.edge_inline_rows,
            )
            return self._assemble(name, manifest, version or manifest.version, [edge, *tiers[1:]], owned=[edge])
        return self._assemble(name, manifest, version or manifest.version, tiers)

    def _watch_hop_certificates(self, tls: TlsSettings) -> None:
        """Renewed hop certificates (CA, ours) take effect for new calls without a restart."""
        files = [Path(p) for p in (tls.ca, tls.cert, tls.key) if p is not None]
        hops = [tier for tier in self.tiers if isinstance(tier, CloudTier) and tier.secure]
        if not files or not hops:
            return

        def renewed(credentials: grpc.ChannelCredentials) -> None:
            for tier in hops:
                tier.use_credentials(credentials)

        self.boundary.watch(files, lambda: channel_credentials(tls), renewed, "the hop's TLS files")

    def _client_directory(self, auth: AuthSettings) -> TokenStore | None:
        if not auth.enabled:
            return None
        if auth.tokens_path is None:
            raise ValueError("client authentication is on but no token file is set (auth.tokens_path, or --keys DIR)")
        path = Path(auth.tokens_path)
        self._directory = TokenStore.load(path)

        def reloaded(store: TokenStore) -> None:
            self._directory = store

        self.boundary.watch(path, lambda: TokenStore.load(path), reloaded, f"token file {path}")
        return self._directory

    async def start(self) -> int:
        self.boundary.start()
        await self.repository.fill()  # the older versions the version policy keeps
        self.repository.start()
        for tier in self.tiers:
            tier.start()
        port = await self.managed.start(self.settings.host, self.settings.port)
        self._tier_health = asyncio.ensure_future(self._report_tiers())
        self.servicer.bound = (self.settings.host, port)
        if self.metrics_server is not None:
            self.metrics_server.start(self.settings.metrics.host, self.settings.metrics.port)
        for drift in self.drifts.values():
            drift.start()
        logger.info(
            "gateway serving %s on %s:%d (%s public port, %s)",
            ", ".join(repr(name) for name in self.repository.names()),
            self.settings.host,
            port,
            "TLS" if self.managed.secure else "plaintext",
            "client tokens required" if self.clients is not None else "no client authentication",
        )
        return port

    @property
    def metrics_port(self) -> int:
        return 0 if self.metrics_server is None else self.metrics_server.port

    async def _report_tiers(self) -> None:
        """Each tier's readiness as its own grpc.health.v1 service, `tiergate.tier.NAME`, kept current."""
        reported: dict[str, bool] = {}
        while True:
            # A tier name several models use (each model has its own hop to `cloud`) is ready when all are.
            readiness: dict[str, bool] = {}
            for tier in self.tiers:
                readiness[tier.name] = readiness.get(tier.name, True) and tier.ready()
            for name, ready in readiness.items():
                if reported.get(name) != ready:
                    status = SERVING if ready else NOT_SERVING
                    await self.managed.health.set(f"{TIER_HEALTH_PREFIX}{name}", status)
                    reported[name] = ready
            await asyncio.sleep(TIER_HEALTH_EVERY_S)

    async def stop(self, grace_s: float | None = None) -> None:
        self.servicer.draining = True
        health, self._tier_health = self._tier_health, None
        await cancel_and_wait(health)
        await self.managed.stop(self.settings.grace_s if grace_s is None else grace_s)
        for drift in self.drifts.values():
            await drift.stop()
        await self._close_tiers()
        await self.boundary.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.tracing.shutdown()

    async def serve_forever(self) -> None:
        await self.managed.wait_for_signal()
        await self.stop()

    async def _close_tiers(self) -> None:
        await self.repository.close()
        closed = set()
        for version in self.repository.served():
            if isinstance(version, TieredModel):
                for tier in version.cascade.tiers:
                    if id(tier) not in closed:
                        closed.add(id(tier))
                        await tier.close()
        for tier in self.tiers:
            if id(tier) not in closed:
                await tier.close()
