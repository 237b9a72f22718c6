"""The cloud tier server process: full model behind health, reflection and sealed envelopes."""

from __future__ import annotations

import logging

import grpc

from cloud_runtime.metrics import CloudMetrics
from cloud_runtime.model import CloudModel
from cloud_runtime.servicer import CloudInferenceServicer
from proto.tiergate import cloud_pb2, cloud_pb2_grpc
from tiergate.envelope import Keyring, Sealer
from tiergate.manifest import CLOUD_ROLES, load_manifest
from tiergate.metrics import MetricsServer
from tiergate.rpc import ManagedServer
from tiergate.settings import CloudSettings
from tiergate.telemetry import Tracing

logger = logging.getLogger(__name__)

SERVICE_NAME = cloud_pb2.DESCRIPTOR.services_by_name["CloudInference"].full_name


class CloudServer:
    """Owns the model, the servicer, the managed gRPC server and the telemetry of the cloud tier."""

    def __init__(self, settings: CloudSettings, keyring: Keyring, *, tracing: Tracing | None = None) -> None:
        """`tracing` replaces the one the settings describe (tests hand in one with an in-memory processor)."""
        self.settings = settings
        self.tracing = tracing or Tracing.from_settings(settings.tracing, "tiergate-cloud")
        self.metrics = CloudMetrics()
        self.metrics_server = MetricsServer(self.metrics.registry) if settings.metrics.enabled else None
        manifest = load_manifest(settings.models_dir, roles=CLOUD_ROLES)
        model = CloudModel.load(settings.models_dir, manifest, intra_op_threads=settings.intra_op_threads)
        self.servicer = CloudInferenceServicer(
            model,
            Sealer(keyring),
            model_name=settings.model_name,
            model_version=manifest.version,
            limits=settings.limits,
            tracer=self.tracing.tracer,
            metrics=self.metrics,
            replay=settings.replay,
        )

        def register(server: grpc.aio.Server) -> list[str]:
            cloud_pb2_grpc.add_CloudInferenceServicer_to_server(self.servicer, server)
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
        logger.info("cloud tier serving on %s:%d", self.settings.host, port)
        return port

    @property
    def metrics_port(self) -> int:
        return 0 if self.metrics_server is None else self.metrics_server.port

    async def stop(self, grace_s: float | None = None) -> None:
        await self.managed.stop(self.settings.grace_s if grace_s is None else grace_s)
        self.servicer.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.tracing.shutdown()

    async def serve_forever(self) -> None:
        await self.managed.wait_for_signal()
        await self.stop()
