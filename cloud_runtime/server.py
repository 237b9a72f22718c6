"""The cloud tier server process: full model behind health, reflection and sealed envelopes."""

from __future__ import annotations

import logging

import grpc

from cloud_runtime.model import CloudModel
from cloud_runtime.servicer import CloudInferenceServicer
from proto.tiergate import cloud_pb2, cloud_pb2_grpc
from tiergate.envelope import Keyring, Sealer
from tiergate.manifest import CLOUD_ROLES, load_manifest
from tiergate.rpc import ManagedServer
from tiergate.settings import CloudSettings

logger = logging.getLogger(__name__)

SERVICE_NAME = cloud_pb2.DESCRIPTOR.services_by_name["CloudInference"].full_name


class CloudServer:
    """Owns the model, the servicer and the managed gRPC server of the cloud tier."""

    def __init__(self, settings: CloudSettings, keyring: Keyring) -> None:
        self.settings = settings
        manifest = load_manifest(settings.models_dir, roles=CLOUD_ROLES)
        model = CloudModel.load(settings.models_dir, manifest, intra_op_threads=settings.intra_op_threads)
        self.servicer = CloudInferenceServicer(
            model,
            Sealer(keyring),
            model_name=settings.model_name,
            model_version=manifest.version,
            limits=settings.limits,
        )

        def register(server: grpc.aio.Server) -> list[str]:
            cloud_pb2_grpc.add_CloudInferenceServicer_to_server(self.servicer, server)
            return [SERVICE_NAME]

        self.managed = ManagedServer(register, max_message_bytes=settings.limits.max_message_bytes)

    async def start(self) -> int:
        port = await self.managed.start(self.settings.host, self.settings.port)
        logger.info("cloud tier serving on %s:%d", self.settings.host, port)
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        await self.managed.stop(self.settings.grace_s if grace_s is None else grace_s)
        self.servicer.close()

    async def serve_forever(self) -> None:
        await self.managed.wait_for_signal()
        await self.stop()
