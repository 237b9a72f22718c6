"""Assembles the gateway process from settings: model manifest, tier chain, routing policy and the gRPC server."""

from __future__ import annotations

import logging

import grpc

from gateway.cascade import Cascade, TieredModel
from gateway.cloud_tier import CloudTier
from gateway.cost import CostModel
from gateway.drift import DriftWatch
from gateway.edge_tier import EdgeTier
from gateway.metrics import GatewayMetrics
from gateway.routing import RoutingPolicy
from gateway.servicer import InferenceServicer
from gateway.tier import Tier
from proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from tiergate.envelope import Keyring, Sealer
from tiergate.manifest import EDGE_VARIANT_ROLES, Manifest, load_manifest
from tiergate.metrics import MetricsServer
from tiergate.rpc import ManagedServer
from tiergate.settings import GatewaySettings
from tiergate.telemetry import Tracing

logger = logging.getLogger(__name__)

SERVICE_NAME = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def routing_policy(settings: GatewaySettings, manifest: Manifest) -> RoutingPolicy:
    """Settings override the threshold calibrated into the manifest."""
    routing = settings.routing
    if routing.signal is not None and routing.signal != manifest.routing.signal:
        raise ValueError(
            f"routing signal {routing.signal!r} differs from the calibrated {manifest.routing.signal!r}; "
            "recalibrate the models instead"
        )
    threshold = manifest.routing.threshold if routing.threshold is None else routing.threshold
    return RoutingPolicy(
        threshold=threshold,
        max_edge_tokens=routing.max_edge_tokens,
        max_edge_batch=routing.max_edge_batch,
        allow_client_hint=routing.allow_client_hint,
        signal=manifest.routing.signal,
    )


def cost_model(settings: GatewaySettings) -> CostModel:
    cost = settings.cost
    prices = {"edge": cost.edge_per_1k_rows, "cloud": cost.cloud_per_1k_rows}
    return CostModel(prices, reference_tier=settings.chain[-1], currency=cost.currency)


def build_tiers(
    settings: GatewaySettings,
    manifest: Manifest,
    keyring: Keyring | None,
    tracing: Tracing | None = None,
    metrics: GatewayMetrics | None = None,
) -> list[Tier]:
    tracing = tracing or Tracing.from_settings(settings.tracing, "tiergate-gateway")
    tiers: list[Tier] = []
    for name in settings.chain:
        if name == "edge":
            tiers.append(
                EdgeTier.load(
                    settings.models_dir, manifest, backend=settings.edge_backend, tracer=tracing.tracer, metrics=metrics
                )
            )
        elif name == "cloud":
            if keyring is None:
                raise ValueError("the cloud tier needs a keyring to seal requests")
            tiers.append(
                CloudTier(
                    settings.cloud_target,
                    Sealer(keyring),
                    model_name=settings.model_name,
                    timeout_s=settings.cloud_timeout_s,
                    max_message_bytes=settings.limits.max_message_bytes,
                    tracer=tracing.tracer,
                    interceptors=tracing.client_interceptors(settings.cloud_target),
                    metrics=metrics,
                    replay=settings.replay,
                )
            )
        else:
            raise ValueError(f"unknown tier {name!r} in the chain; known tiers: edge, cloud")
    return tiers


class GatewayServer:
    """Owns the tiers, the OIP servicer, the managed gRPC server and the telemetry of the gateway."""

    def __init__(self, settings: GatewaySettings, keyring: Keyring | None, *, tracing: Tracing | None = None) -> None:
        """`tracing` replaces the one the settings describe (tests hand in one with an in-memory processor)."""
        self.settings = settings
        self.tracing = tracing or Tracing.from_settings(settings.tracing, "tiergate-gateway")
        self.metrics = GatewayMetrics()
        self.metrics_server = MetricsServer(self.metrics.registry) if settings.metrics.enabled else None
        roles = [EDGE_VARIANT_ROLES["int8"]] if "edge" in settings.chain else []
        manifest = load_manifest(settings.models_dir, roles=roles)
        self.tiers = build_tiers(settings, manifest, keyring, self.tracing, self.metrics)
        cascade = Cascade(self.tiers, routing_policy(settings, manifest), tracer=self.tracing.tracer)
        # The watch compares the first tier's confident answers with the last tier's; one tier has no reference.
        self.drift = (
            DriftWatch(
                settings.drift,
                self.tiers[-1],
                model=settings.model_name,
                model_version=manifest.version,
                metrics=self.metrics,
                expected_agreement=manifest.routing.calibration.get("confident_agreement"),
            )
            if len(self.tiers) > 1
            else None
        )
        model = TieredModel(
            settings.model_name,
            manifest.version,
            cascade,
            metrics=self.metrics,
            cost=cost_model(settings),
            drift=self.drift,
        )
        self.servicer = InferenceServicer([model], settings.limits)

        def register(server: grpc.aio.Server) -> list[str]:
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
            return [SERVICE_NAME]

        self.managed = ManagedServer(
            register,
            max_message_bytes=settings.limits.max_message_bytes,
            interceptors=self.tracing.server_interceptors(),
            on_error=self.metrics.rpc_failed,
        )

    async def start(self) -> int:
        port = await self.managed.start(self.settings.host, self.settings.port)
        self.servicer.bound = (self.settings.host, port)
        if self.metrics_server is not None:
            self.metrics_server.start(self.settings.metrics.host, self.settings.metrics.port)
        if self.drift is not None:
            self.drift.start()
        logger.info("gateway serving %r on %s:%d", self.settings.model_name, self.settings.host, port)
        return port

    @property
    def metrics_port(self) -> int:
        return 0 if self.metrics_server is None else self.metrics_server.port

    async def stop(self, grace_s: float | None = None) -> None:
        self.servicer.draining = True
        await self.managed.stop(self.settings.grace_s if grace_s is None else grace_s)
        if self.drift is not None:
            await self.drift.stop()
        await self._close_tiers()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.tracing.shutdown()

    async def serve_forever(self) -> None:
        await self.managed.wait_for_signal()
        await self.stop()

    async def _close_tiers(self) -> None:
        for tier in self.tiers:
            await tier.close()
