"""The cloud tier server process: every model of the repository (its ONNX file, or the upstream OIP server that
answers for it) behind health, reflection and sealed envelopes."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from cloud_runtime.metrics import CloudMetrics
from cloud_runtime.model import CloudModel
from cloud_runtime.servicer import CloudInferenceServicer, CloudServed
from cloud_runtime.upstream import UpstreamModel
from proto.tiergate import cloud_pb2, cloud_pb2_grpc
from tiergate.constants import REQUEST_ID_METADATA
from tiergate.envelope import Keyring, Sealer
from tiergate.keys import apply_key_dir, load_keyring
from tiergate.manifest import CLOUD_ROLES, SPELLING_ROLE, model_directories, newest_verified
from tiergate.metrics import MetricsServer
from tiergate.rpc import AuditInterceptor, ManagedServer
from tiergate.security import Boundary, serving_credentials
from tiergate.settings import CloudSettings
from tiergate.telemetry import Tracing

logger = logging.getLogger(__name__)

SERVICE_NAME = cloud_pb2.DESCRIPTOR.services_by_name["CloudInference"].full_name


def _metadata_request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    # Until the envelope is open (it carries the gateway's id sealed), the clear metadata names the call.
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA and isinstance(value, str):
            return value[:128]
    return "-"


def connection_age_options(age_s: float, grace_s: float) -> list[tuple[str, int]]:
    """Server arguments that close connections older than `age_s` (none for 0), giving calls `grace_s` to end."""
    if age_s < 0 or grace_s < 0:
        raise ValueError(f"max_connection_age_s and its grace must be 0 or more, got {age_s} and {grace_s}")
    if age_s == 0:
        return []
    return [
        ("grpc.max_connection_age_ms", max(1, round(age_s * 1000))),
        ("grpc.max_connection_age_grace_ms", round(grace_s * 1000)),
    ]


class CloudServer:
    """Owns the model, the servicer, the managed gRPC server and the telemetry of the cloud tier."""

    def __init__(
        self, settings: CloudSettings, keyring: Keyring | None = None, *, tracing: Tracing | None = None
    ) -> None:
        """`keyring` overrides the one at `settings.keyring_path`; `tracing` replaces the one the settings
        describe (tests hand in one with an in-memory processor)."""
        apply_key_dir(settings)
        self.settings = settings
        self.tracing = tracing or Tracing.from_settings(settings.tracing, "tiergate-cloud")
        self.metrics = CloudMetrics()
        self.metrics_server = MetricsServer(self.metrics.registry) if settings.metrics.enabled else None
        credentials = serving_credentials(settings.tls, settings.insecure, "the cloud tier's port", "insecure")
        self.boundary = Boundary(settings.audit)
        # A keyring read from its file is watched and reloads; one handed in is the caller's to manage.
        self.sealer = Sealer(keyring if keyring is not None else load_keyring(settings.keyring_path))
        if keyring is None:
            self.boundary.watch_keyring(settings.keyring_path, self.sealer)
        # Per model: one built set, or a directory of numbered versions (as `tiergate models fetch` fills): its
        # newest version that verifies. With an upstream, its server answers for every model.
        self.upstream: grpc.aio.Channel | None = None
        if settings.upstream:
            self.upstream = grpc.aio.insecure_channel(settings.upstream)
        models: dict[str, CloudServed] = {}
        for name, root in model_directories(settings.models_dir, settings.model_name).items():
            # Relaying, the cloud reads no model file of its own but the spelling vocabulary, where there is one.
            chosen = newest_verified(root, [SPELLING_ROLE] if self.upstream is not None else CLOUD_ROLES)
            manifest = chosen.manifest
            model: CloudModel | UpstreamModel
            if self.upstream is not None:
                model = UpstreamModel.for_manifest(
                    self.upstream,
                    settings.upstream,
                    name,
                    manifest,
                    timeout_s=settings.upstream_timeout_s,
                    model_dir=chosen.path,
                )
            else:
                model = CloudModel.load(chosen.path, manifest, intra_op_threads=settings.intra_op_threads)
            models[name] = CloudServed(model, manifest.version, manifest.input)
        self.servicer = CloudInferenceServicer(
            models,
            self.sealer,
            limits=settings.limits,
            tracer=self.tracing.tracer,
            metrics=self.metrics,
            replay=settings.replay,
            chunk_rows=settings.model_chunk_rows,
        )

        def register(server: grpc.aio.Server) -> list[str]:
            cloud_pb2_grpc.add_CloudInferenceServicer_to_server(self.servicer, server)
            return [SERVICE_NAME]

        audit = self.boundary.audit
        self.managed = ManagedServer(
            register,
            max_message_bytes=settings.limits.max_message_bytes,
            interceptors=self.tracing.server_interceptors(),
            inner_interceptors=[] if audit is None else [AuditInterceptor(audit, ("Infer",), _metadata_request_id)],
            on_error=self.metrics.rpc_failed,
            credentials=credentials,
            options=connection_age_options(settings.max_connection_age_s, settings.max_connection_age_grace_s),
        )

    async def start(self) -> int:
        self.boundary.start()
        port = await self.managed.start(self.settings.host, self.settings.port)
        self.servicer.bound = (self.settings.host, port)
        if self.metrics_server is not None:
            self.metrics_server.start(self.settings.metrics.host, self.settings.metrics.port)
        logger.info(
            "cloud tier serving %s on %s:%d%s",
            ", ".join(repr(name) for name in self.servicer.models),
            self.settings.host,
            port,
            f", relayed to the upstream OIP server {self.settings.upstream}" if self.upstream is not None else "",
        )
        return port

    @property
    def metrics_port(self) -> int:
        return 0 if self.metrics_server is None else self.metrics_server.port

    async def stop(self, grace_s: float | None = None) -> None:
        await self.managed.stop(self.settings.grace_s if grace_s is None else grace_s)
        self.servicer.close()
        if self.upstream is not None:
            await self.upstream.close()
        await self.boundary.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.tracing.shutdown()

    async def serve_forever(self) -> None:
        await self.managed.wait_for_signal()
        await self.stop()
