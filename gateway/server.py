"""Assembles the gateway process from settings: model manifest, tier chain, routing policy and the gRPC server."""

from __future__ import annotations

import logging

import grpc

from gateway.cascade import Cascade, TieredModel
from gateway.cloud_tier import CloudTier
from gateway.edge_tier import EdgeTier
from gateway.routing import RoutingPolicy
from gateway.servicer import InferenceServicer
from gateway.tier import Tier
from proto.inference import grpc_service_pb2, grpc_service_pb2_grpc
from tiergate.envelope import Keyring, Sealer
from tiergate.manifest import EDGE_VARIANT_ROLES, Manifest, load_manifest
from tiergate.rpc import ManagedServer
from tiergate.settings import GatewaySettings

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
    )


def build_tiers(settings: GatewaySettings, manifest: Manifest, keyring: Keyring | None) -> list[Tier]:
    tiers: list[Tier] = []
    for name in settings.chain:
        if name == "edge":
            tiers.append(EdgeTier.load(settings.models_dir, manifest, backend=settings.edge_backend))
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
                )
            )
        else:
            raise ValueError(f"unknown tier {name!r} in the chain; known tiers: edge, cloud")
    return tiers


class GatewayServer:
    """Owns the tiers, the OIP servicer and the managed gRPC server of the gateway."""

    def __init__(self, settings: GatewaySettings, keyring: Keyring | None) -> None:
        self.settings = settings
        roles = [EDGE_VARIANT_ROLES["int8"]] if "edge" in settings.chain else []
        manifest = load_manifest(settings.models_dir, roles=roles)
        self.tiers = build_tiers(settings, manifest, keyring)
        cascade = Cascade(self.tiers, routing_policy(settings, manifest))
        model = TieredModel(settings.model_name, manifest.version, cascade)
        self.servicer = InferenceServicer([model], settings.limits)

        def register(server: grpc.aio.Server) -> list[str]:
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
            return [SERVICE_NAME]

        self.managed = ManagedServer(register, max_message_bytes=settings.limits.max_message_bytes)

    async def start(self) -> int:
        port = await self.managed.start(self.settings.host, self.settings.port)
        logger.info("gateway serving %r on %s:%d", self.settings.model_name, self.settings.host, port)
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        self.servicer.draining = True
        await self.managed.stop(self.settings.grace_s if grace_s is None else grace_s)
        await self._close_tiers()

    async def serve_forever(self) -> None:
        await self.managed.wait_for_signal()
        await self.stop()

    async def _close_tiers(self) -> None:
        for tier in self.tiers:
            await tier.close()
