"""Deployment files: Dockerfile, compose stack and kustomize manifests agree with the CLI, settings and each other."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app.cli import build_parser
from cloud_runtime.metrics import CloudMetrics
from gateway.metrics import GatewayMetrics
from gateway.server import check_target
from tiergate import telemetry
from tiergate.constants import MODEL_NAME
from tiergate.keys import (
    CA_KEY,
    CLOUD_CERT,
    CLOUD_KEY,
    GATEWAY_KEY,
    KEY_DIR_FILES,
    PRIVATE_FILES,
    TOKENS_FILE,
    apply_key_dir,
    load_keyring,
)
from tiergate.logs import LOG_FORMAT_ENV, LOG_LEVEL_ENV
from tiergate.rpc import ManagedServer
from tiergate.settings import ENV_PREFIX, CloudSettings, GatewaySettings, Settings, load_settings
from tiergate.tls import channel_credentials, server_credentials
from tiergate.tokens import TokenStore

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAYS = ("cpu-edge",)
# Each overlay rendered as is, and with every optional component enabled.
RENDERINGS = (*OVERLAYS, *(f"{overlay}+components" for overlay in OVERLAYS))
COMPONENTS = K8S / "components"
COMPONENT_NAMES = ("tracing", "prometheus-operator", "model-build", "custom-metrics-hpa")
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
# The in-cluster build Job: its name carries the version it publishes.
MODEL_BUILD_JOB = "tiergate-models-build-1"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
README = DEPLOY / "README.md"
# Backends a pod may select: only ones that run (no TensorRT backend exists yet, so no overlay names it).
EDGE_BACKENDS = {"onnxruntime"}
TIERS = ("gateway", "cloud")
DEFAULT_PORTS = {"gateway": GatewaySettings().port, "cloud": CloudSettings().port}
DRAIN_S = {"gateway": GatewaySettings().grace_s, "cloud": CloudSettings().grace_s}
DEFAULT_METRICS_PORTS = {"gateway": GatewaySettings().metrics.port, "cloud": CloudSettings().metrics.port}
# The OTEL_* variables the servers read: every name quoted in telemetry.resolve.
OTEL_READ = frozenset(re.findall(r'"(OTEL_[A-Z_]+)"', inspect.getsource(telemetry.resolve)))
# TIERGATE_* variables outside the settings tree (read by the CLI's logging set-up).
TIERGATE_NON_SETTINGS = frozenset({LOG_LEVEL_ENV, LOG_FORMAT_ENV})
SCRAPER_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# Private files a tier's pod must never hold: the other tier's key (and the gateway's client list),
# and the CA's key, which stays with the operator.
NOT_FOR = {"gateway": {CLOUD_KEY, CA_KEY}, "cloud": {GATEWAY_KEY, TOKENS_FILE, CA_KEY}}
# The CLI installed beside this interpreter: the README's recipe and the compose one-shot run it.
TIERGATE_CLI = Path(sys.executable).with_name("tiergate")

Doc = dict[str, Any]


def load_yaml(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def index(docs: list[Doc]) -> dict[tuple[str, str], Doc]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def pod_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def tier_container(deployment: Doc, tier: str) -> Doc:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == tier]
    return container


def env_of(container: Doc) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def container_port(container: Doc, name: str) -> int:
    (port,) = [p for p in container["ports"] if p["name"] == name]
    return int(port["containerPort"])


def grpc_port(container: Doc) -> int:
    return container_port(container, "grpc")


def tier_settings(env: dict[str, str], tier: str) -> GatewaySettings | CloudSettings:
    """The tier's settings as a server started with `env` sees them; fails on any variable it would not read."""
    for name in env:
        if name.startswith("OTEL_"):
            assert name in OTEL_READ, f"{name} is not read by tiergate.telemetry.resolve"
        elif name not in TIERGATE_NON_SETTINGS:
            # Other tiers' sections would load but never reach this server; a name without `__` is ignored.
            assert name.startswith(f"TIERGATE_{tier.upper()}__"), f"{name} is no {tier} setting"
    # load_settings rejects a key that names no settings field.
    settings: GatewaySettings | CloudSettings = getattr(
        load_settings(env={k: v for k, v in env.items() if k.startswith("TIERGATE_")}), tier
    )
    # resolve rejects an unknown protocol or sampler and a sampler argument outside [0, 1].
    tracing = telemetry.resolve(
        settings.tracing, f"tiergate-{tier}", env={k: v for k, v in env.items() if k.startswith("OTEL_")}
    )
    assert tracing.service_name == f"tiergate-{tier}"
    return settings


def setting_exists(name: str) -> bool:
    """Whether `TIERGATE_SECTION__KEY...` names a field of the settings tree (what load_settings would set)."""
    node: Any = Settings()
    for part in name[len(ENV_PREFIX) :].lower().split("__"):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return not dataclasses.is_dataclass(node)


def probe_port(probe: Doc) -> int:
    """The port a probe checks: native grpc, tcpSocket, or the health script's first argument."""
    if "grpc" in probe:
        return int(probe["grpc"]["port"])
    if "tcpSocket" in probe:
        return int(probe["tcpSocket"]["port"])
    command = probe["exec"]["command"]
    assert command[:2] == ["python", "-c"], command
    return int(command[3])


def secret_generators(kustomization: Doc) -> dict[str, dict[str, str]]:
    """Each generated Secret: its keys, each with the operator's file (relative to the base) it comes from."""
    secrets: dict[str, dict[str, str]] = {}
    for generator in kustomization["secretGenerator"]:
        files: dict[str, str] = {}
        for entry in generator["files"]:
            key, _, source = entry.partition("=")
            files[key if source else Path(key).name] = source or key
        secrets[generator["name"]] = files
    return secrets


def key_volume(deployment: Doc, tier: str) -> tuple[Doc, Doc]:
    """The container's mount at its --keys directory, and the volume behind it."""
    container = tier_container(deployment, tier)
    keys = build_parser().parse_args(container["args"]).keys
    assert keys is not None, f"{tier} is started without --keys"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(keys)]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def pod_key_files(deployment: Doc, tier: str, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The files the pod sees in its key directory, each with what `secrets` says its Secret key holds."""
    _, volume = key_volume(deployment, tier)
    files: dict[str, str] = {}
    for source in volume["projected"]["sources"]:
        assert set(source) == {"secret"}, source
        secret = source["secret"]
        data = secrets[secret["name"]]
        for item in secret.get("items") or [{"key": key, "path": key} for key in data]:
            assert item["path"] not in files, f"{item['path']} is projected twice into the {tier} pod"
            files[item["path"]] = data[item["key"]]
    return files


def probe_key_files(container: Doc, keys: Path) -> set[str]:
    """Files of the key directory the container's exec probes read."""
    return {
        Path(arg).name
        for probe in PROBES
        for arg in container[probe].get("exec", {}).get("command", [])
        if Path(arg).parent == keys
    }


def san_names(cert: Path) -> set[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    names = (
        x509.load_pem_x509_certificate(cert.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    return {*names.get_values_for_type(x509.DNSName), *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))}


def readme_key_recipe() -> list[list[str]]:
    """The README's Kubernetes key recipe: the `tiergate` lines of the block that runs `keys init keys/`."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    (block,) = [b for b in blocks if "tiergate keys init keys/" in b]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip().startswith("tiergate ")]


def cli_env() -> dict[str, str]:
    if not TIERGATE_CLI.is_file():
        pytest.skip(f"no tiergate command beside {sys.executable}")
    return {**os.environ, "PATH": f"{TIERGATE_CLI.parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def copy_pod_key_dir(target: Path, files: dict[str, str], operator_base: Path, mode: int) -> Path:
    """What the pod's projected volume holds: its files only, at the volume's mode."""
    target.mkdir()
    for name, source in files.items():
        shutil.copyfile(operator_base / source, target / name)
        (target / name).chmod(mode)
    return target


async def health_call(port: int, credentials: grpc.ChannelCredentials, name: str) -> int:
    """grpc.health.v1 Check over TLS, the server's certificate checked for `name`."""
    options = [("grpc.ssl_target_name_override", name)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], Doc]:
    docs = [doc for path in sorted(BASE.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in load_yaml(path)]
    return index(docs)


@pytest.fixture(scope="module")
def kustomization() -> Doc:
    (doc,) = load_yaml(BASE / "kustomization.yaml")
    return doc


@pytest.fixture(scope="module")
def compose() -> Doc:
    (doc,) = load_yaml(COMPOSE)
    return doc


@pytest.fixture(scope="module")
def operator_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch `k8s/base` holding `keys/` as the README's recipe writes it (run with the real CLI)."""
    env = cli_env()
    root = tmp_path_factory.mktemp("base")
    recipe = readme_key_recipe()
    assert recipe, "the README shows no key recipe"
    for argv in recipe:
        run = subprocess.run(
            [str(TIERGATE_CLI), *argv[1:]], check=False, cwd=root, env=env, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, f"{shlex.join(argv)}: {run.stderr}"
    return root


# --- every file parses ----------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    assert load_yaml(path), f"{path.name} holds no document"


def test_base_lists_every_manifest(kustomization: Doc) -> None:
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk


# --- Kubernetes base ------------------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
def test_container_args_ports_service_and_probes_agree(base: dict[tuple[str, str], Doc], tier: str) -> None:
    deployment = base[("Deployment", f"tiergate-{tier}")]
    service = base[("Service", f"tiergate-{tier}")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = tier_container(deployment, tier)

    args = build_parser().parse_args(container["args"])
    assert (args.command, args.server) == ("serve", tier)
    assert args.host == "0.0.0.0", "a server bound to loopback is unreachable from its Service and probes"
    assert args.port == DEFAULT_PORTS[tier]
    assert grpc_port(container) == args.port

    for probe in PROBES:
        assert probe_port(container[probe]) == args.port, f"{tier} {probe} checks another port"
    if tier == "cloud":
        # Its port takes mutual TLS only; a native grpc probe speaks plaintext and could never pass.
        assert not any("grpc" in container[probe] for probe in PROBES)
        assert "exec" in container["readinessProbe"], "only a health call sees NOT_SERVING while draining"
    else:
        # The public port is plaintext and health needs no token, so the native probe works.
        assert all("grpc" in container[probe] for probe in PROBES)

    assert matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(service["spec"]["selector"], pod_labels)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in ("grpc", args.port)
    assert port["port"] == args.port
    assert port["appProtocol"] == "grpc"

    tier_settings(env_of(container), tier)
    assert env_of(container)["OTEL_SERVICE_NAME"] == f"tiergate-{tier}"


@pytest.mark.parametrize("tier", TIERS)
def test_metrics_port_is_reachable_and_annotated(base: dict[tuple[str, str], Doc], tier: str) -> None:
    deployment = base[("Deployment", f"tiergate-{tier}")]
    container = tier_container(deployment, tier)
    metrics = tier_settings(env_of(container), tier).metrics
    assert metrics.enabled
    assert metrics.port == DEFAULT_METRICS_PORTS[tier] != grpc_port(container)
    assert container_port(container, "metrics") == metrics.port
    assert metrics.host == "0.0.0.0", "the default loopback host is unreachable from outside the pod"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics.port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # The public Services carry gRPC only; the metrics Services come with the prometheus-operator component.
    assert [p["name"] for p in base[("Service", f"tiergate-{tier}")]["spec"]["ports"]] == ["grpc"]


def test_gateway_cloud_target_names_the_cloud_service(base: dict[tuple[str, str], Doc]) -> None:
    gateway = tier_container(base[("Deployment", "tiergate-gateway")], "gateway")
    cloud_service = base[("Service", "tiergate-cloud")]
    args = build_parser().parse_args(gateway["args"])
    # gRPC balances over the replicas itself: a headless Service (one address per ready pod) behind `dns:///`.
    assert args.cloud == f"dns:///{cloud_service['metadata']['name']}:{cloud_service['spec']['ports'][0]['port']}"
    assert cloud_service["spec"]["clusterIP"] == "None"
    assert check_target(args.cloud, "--cloud") == args.cloud
    assert env_of(gateway)["TIERGATE_GATEWAY__EDGE_BACKEND"] in EDGE_BACKENDS


@pytest.mark.parametrize("tier", TIERS)
def test_termination_grace_covers_prestop_and_drain(base: dict[tuple[str, str], Doc], tier: str) -> None:
    spec = base[("Deployment", f"tiergate-{tier}")]["spec"]["template"]["spec"]
    command = tier_container(base[("Deployment", f"tiergate-{tier}")], tier)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > int(command[1]) + DRAIN_S[tier]


def test_hpa_scales_the_cloud_deployment_on_cpu(base: dict[tuple[str, str], Doc]) -> None:
    hpa = base[("HorizontalPodAutoscaler", "tiergate-cloud")]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    deployment = base[("Deployment", target["name"])]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; re-applying must not reset it"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # CPU utilisation is measured against the request, so the container must have one.
    assert tier_container(deployment, "cloud")["resources"]["requests"]["cpu"]


def test_custom_metrics_hpa_keeps_cpu_and_adds_a_metric_the_cloud_exports(base: dict[tuple[str, str], Doc]) -> None:
    (patch,) = component_docs("custom-metrics-hpa", "patches")
    assert (patch["kind"], patch["metadata"]["name"]) == ("HorizontalPodAutoscaler", "tiergate-cloud")
    by_type = {metric["type"]: metric for metric in patch["spec"]["metrics"]}
    # A strategic merge patch replaces the list: the base's CPU metric must be in it again, unchanged.
    (cpu,) = base[("HorizontalPodAutoscaler", "tiergate-cloud")]["spec"]["metrics"]
    assert by_type["Resource"] == cpu
    pods = by_type["Pods"]["pods"]
    exported = {metric.name for metric in CloudMetrics().registry.collect()}
    assert pods["metric"]["name"] in exported, "the HPA must read a gauge the cloud serves"
    assert pods["target"]["type"] == "AverageValue" and float(pods["target"]["averageValue"]) > 0


@pytest.mark.parametrize("tier", TIERS)
def test_pod_disruption_budget_selects_its_tier(base: dict[tuple[str, str], Doc], tier: str) -> None:
    pdb = base[("PodDisruptionBudget", f"tiergate-{tier}")]
    for name in TIERS:
        labels = base[("Deployment", f"tiergate-{name}")]["spec"]["template"]["metadata"]["labels"]
        assert matches(pdb["spec"]["selector"]["matchLabels"], labels) == (name == tier)


def test_network_policy_admits_only_the_gateway_to_the_cloud_port(base: dict[tuple[str, str], Doc]) -> None:
    (policy,) = [doc for key, doc in base.items() if key[0] == "NetworkPolicy"]
    cloud_deployment = base[("Deployment", "tiergate-cloud")]
    cloud = cloud_deployment["spec"]["template"]["metadata"]["labels"]
    gateway = base[("Deployment", "tiergate-gateway")]["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert matches(selector, cloud) and not matches(selector, gateway)
    # Ingress only: egress stays open, so the OTLP exporter needs no rule.
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        assert rule.get("ports"), "a rule without ports admits every port"
    rules = {tuple(p["port"] for p in rule["ports"]): rule for rule in policy["spec"]["ingress"]}
    metrics_port = tier_settings(env_of(tier_container(cloud_deployment, "cloud")), "cloud").metrics.port
    assert set(rules) == {(DEFAULT_PORTS["cloud"],), (metrics_port,)}, "each port in a rule of its own"

    (source,) = rules[(DEFAULT_PORTS["cloud"],)]["from"]
    assert set(source) == {"podSelector"}, "a namespace or IP source would admit more than the gateway"
    assert matches(source["podSelector"]["matchLabels"], gateway)
    assert not matches(source["podSelector"]["matchLabels"], cloud)

    # The scraper's namespace reaches the metrics port and nothing else.
    (source,) = rules[(metrics_port,)]["from"]
    assert set(source) == {"namespaceSelector"}
    assert source["namespaceSelector"] == {"matchLabels": SCRAPER_NAMESPACE}


@pytest.mark.parametrize("tier", TIERS)
def test_key_directory_and_models_are_mounted_where_the_args_point(
    base: dict[tuple[str, str], Doc], kustomization: Doc, tier: str, tmp_path: Path
) -> None:
    deployment = base[("Deployment", f"tiergate-{tier}")]
    spec = deployment["spec"]["template"]["spec"]
    container = tier_container(deployment, tier)
    args = build_parser().parse_args(container["args"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    assert args.keyring is None, "--keys names the keyring; a second path could point elsewhere"
    mount, volume = key_volume(deployment, tier)
    assert mount["readOnly"] is True
    assert "subPath" not in mount, "a subPath mount never sees an updated Secret"
    # Group-readable for the pod's fsGroup (the server's own group), never for other users.
    assert volume["projected"]["defaultMode"] == 0o440
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]

    secrets = secret_generators(kustomization)
    files = pod_key_files(deployment, tier, secrets)
    assert not set(files) & NOT_FOR[tier], f"the {tier} pod must not hold {sorted(set(files) & NOT_FOR[tier])}"
    # Exactly what its server reads from the key directory (apply_key_dir), plus what its probes read.
    scratch = tmp_path / "keys"
    scratch.mkdir()
    for name in files:
        (scratch / name).touch(mode=0o600)
    settings = tier_settings(env_of(container), tier)
    settings.keys_dir = scratch
    apply_key_dir(settings)
    tls = settings.hop_tls if isinstance(settings, GatewaySettings) else settings.tls
    read = {settings.keyring_path, tls.ca, tls.cert, tls.key}
    if isinstance(settings, GatewaySettings):
        assert settings.auth.enabled, "the gateway's token file turns client authentication on"
        read.add(settings.auth.tokens_path)
    assert {Path(str(path)).name for path in read} | probe_key_files(container, args.keys) == set(files)

    # Every file comes from the operator's key directory, which git ignores.
    for source in {source for data in secrets.values() for source in data.values()}:
        top = Path(source).parts[0]
        assert top != source, f"{source} is not inside an ignored folder"
        assert (BASE / top / ".gitignore").read_text(encoding="utf-8").splitlines()[-2:] == [
            "*",
            "!.gitignore",
        ], f"the operator's key directory {top}/ must stay out of git"

    # The model set: fetched by the init container into the pod's own volume, verified, served from there.
    models_mount = next(m for path, m in mounts.items() if args.models.is_relative_to(path))
    assert models_mount["readOnly"] is True
    assert "emptyDir" in volumes[models_mount["name"]]
    (fetcher,) = spec["initContainers"]
    fetch_args = build_parser().parse_args(fetcher["args"])
    assert (fetch_args.command, fetch_args.action) == ("models", "fetch")
    assert fetch_args.versions_dir == args.models, "the server reads where the init container fetched to"
    store = next(e for e in fetcher["env"] if e["name"] == "MODEL_STORE")
    assert fetch_args.store == f"$({store['name']})"
    assert store["valueFrom"]["configMapKeyRef"] == {"name": "tiergate-models", "key": "store"}
    store_literals = dict(
        literal.split("=", 1)
        for generator in kustomization["configMapGenerator"]
        if generator["name"] == "tiergate-models"
        for literal in generator["literals"]
    )
    assert store_literals["store"].startswith("s3://"), "the base names a placeholder store an overlay replaces"
    fetched_into = {m["name"]: m for m in fetcher["volumeMounts"]}[models_mount["name"]]
    assert fetched_into["mountPath"] == models_mount["mountPath"] and not fetched_into.get("readOnly")


@pytest.mark.parametrize("tier", TIERS)
def test_audit_log_and_plaintext_settings(base: dict[tuple[str, str], Doc], tier: str) -> None:
    deployment = base[("Deployment", f"tiergate-{tier}")]
    container = tier_container(deployment, tier)
    settings = tier_settings(env_of(container), tier)
    assert settings.audit.path is not None, f"{tier} keeps no audit log"
    # The root filesystem is read-only: the log needs a writable mount of its own.
    (mount,) = [m for m in container["volumeMounts"] if settings.audit.path.is_relative_to(m["mountPath"])]
    assert not mount.get("readOnly", False)
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume
    insecure = settings.hop_insecure if isinstance(settings, GatewaySettings) else settings.insecure
    assert insecure is False, f"{tier} must not run in plaintext"


def test_readme_key_recipe_writes_every_secret_file_privately(
    base: dict[tuple[str, str], Doc], kustomization: Doc, operator_base: Path
) -> None:
    sources = {source for data in secret_generators(kustomization).values() for source in data.values()}
    for source in sources:
        path = operator_base / source
        assert path.is_file(), f"the README's recipe does not write {source}"
        if path.name in PRIVATE_FILES or path.name.endswith("-key.pem"):
            assert path.stat().st_mode & 0o077 == 0, f"{source} is readable by other users"
    assert not any(Path(source).name == CA_KEY for source in sources), "the CA's key never enters the cluster"
    # A client with a token for the served model.
    (client,) = TokenStore.load(operator_base / "keys" / TOKENS_FILE).clients
    assert client.may_call(MODEL_NAME)
    # The gateway checks the cloud's certificate for the host it dials; the probe for the name it passes.
    names = san_names(operator_base / "keys" / CLOUD_CERT)
    gateway = build_parser().parse_args(tier_container(base[("Deployment", "tiergate-gateway")], "gateway")["args"])
    assert dialled(gateway.cloud)[0] in names
    cloud = tier_container(base[("Deployment", "tiergate-cloud")], "cloud")
    assert cloud["readinessProbe"]["exec"]["command"][-1] in names
    # No shell redirect writes key material (it would land world-readable under a usual umask).
    text = README.read_text(encoding="utf-8")
    assert not re.search(r">\s*\S*(keys|keyring)/", text)
    assert "--keyring" not in text


async def test_each_pods_key_files_make_the_mtls_hop_and_the_cloud_probe(
    base: dict[tuple[str, str], Doc], kustomization: Doc, operator_base: Path, tmp_path: Path
) -> None:
    settings: dict[str, Any] = {}
    key_dirs: dict[str, Path] = {}
    for tier in TIERS:
        deployment = base[("Deployment", f"tiergate-{tier}")]
        _, volume = key_volume(deployment, tier)
        files = pod_key_files(deployment, tier, secret_generators(kustomization))
        key_dirs[tier] = copy_pod_key_dir(tmp_path / tier, files, operator_base, volume["projected"]["defaultMode"])
        # As `serve --keys DIR` does: the pod's files alone must satisfy its server.
        settings[tier] = tier_settings(env_of(tier_container(deployment, tier)), tier)
        settings[tier].keys_dir = key_dirs[tier]
        apply_key_dir(settings[tier])
        load_keyring(settings[tier].keyring_path)
    cloud, gateway = settings["cloud"], settings["gateway"]
    assert TokenStore.load(gateway.auth.tokens_path).clients

    gateway_args = build_parser().parse_args(
        tier_container(base[("Deployment", "tiergate-gateway")], "gateway")["args"]
    )
    host = dialled(gateway_args.cloud)[0]
    server = ManagedServer(lambda _: [], max_message_bytes=1 << 20, credentials=server_credentials(cloud.tls))
    port = await server.start("127.0.0.1", 0)
    try:
        # The hop as the gateway dials it: its client certificate, the cloud's checked for the target's host.
        assert (
            await health_call(port, channel_credentials(gateway.hop_tls), host)
            == health_pb2.HealthCheckResponse.SERVING
        )
        # Without a client certificate the cloud refuses the connection.
        ca_only = grpc.ssl_channel_credentials((key_dirs["cloud"] / "ca.pem").read_bytes())
        with pytest.raises(grpc.aio.AioRpcError):
            await health_call(port, ca_only, host)

        # The cloud's readiness probe, run on the cloud pod's files alone.
        cloud_container = tier_container(base[("Deployment", "tiergate-cloud")], "cloud")
        keys = build_parser().parse_args(cloud_container["args"]).keys
        _, _, code, _, *rest = cloud_container["readinessProbe"]["exec"]["command"]
        argv = [str(key_dirs["cloud"] / Path(arg).name) if Path(arg).parent == keys else arg for arg in rest]
        assert await _run_health_check(code, port, *argv) == 0
        await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # what SIGTERM does first
        assert await _run_health_check(code, port, *argv) != 0
    finally:
        await server.stop(0)


def test_pods_run_restricted(base: dict[tuple[str, str], Doc], kustomization: Doc) -> None:
    user = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)
    assert user is not None
    images = {image["name"] for image in kustomization["images"]}
    namespace = base[("Namespace", kustomization["namespace"])]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, spec in pod_specs(list(base.values())):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert (pod["runAsUser"], pod["runAsGroup"]) == (int(user[1]), int(user[2])), name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec.get("initContainers", []) + spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert security["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            assert container["image"] in images, (name, container["name"])
            assert container["resources"]["limits"]["memory"], (name, container["name"])


def test_overlay_patches_target_base_objects(base: dict[tuple[str, str], Doc]) -> None:
    for overlay in OVERLAYS:
        (kust,) = load_yaml(K8S / "overlays" / overlay / "kustomization.yaml")
        assert kust["resources"] == ["../../base"]
        for patch in kust["patches"]:
            for doc in load_yaml(K8S / "overlays" / overlay / patch["path"]):
                assert (doc["kind"], doc["metadata"]["name"]) in base, (overlay, patch["path"])
                for container in doc["spec"]["template"]["spec"].get("containers", []):
                    backend = env_of(container).get("TIERGATE_GATEWAY__EDGE_BACKEND")
                    assert backend in EDGE_BACKENDS | {None}
                    tier_settings(env_of(container), container["name"])


# --- optional components ----------------------------------------------------------------


def component(name: str) -> Doc:
    (doc,) = load_yaml(COMPONENTS / name / "kustomization.yaml")
    return doc


def dialled(target: str) -> tuple[str, str]:
    """The host and port of a gateway's `--cloud` target: the name gRPC checks in the cloud's certificate."""
    host, _, port = target.removeprefix("dns:///").rpartition(":")
    return host, port


def component_docs(name: str, key: str) -> list[Doc]:
    entries = component(name).get(key, [])
    return [
        doc
        for entry in entries
        for doc in load_yaml(COMPONENTS / name / (entry if key == "resources" else entry["path"]))
    ]


@pytest.mark.parametrize("name", COMPONENT_NAMES)
def test_component_is_opt_in_and_fits_the_base(base: dict[tuple[str, str], Doc], name: str) -> None:
    assert {p.name for p in COMPONENTS.iterdir() if p.is_dir()} == set(COMPONENT_NAMES)
    kust = component(name)
    assert (kust["apiVersion"], kust["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
    listed = [*kust.get("resources", []), *(patch["path"] for patch in kust.get("patches", []))]
    assert sorted(listed) == sorted(
        p.name for p in (COMPONENTS / name).glob("*.yaml") if p.name != "kustomization.yaml"
    )
    for doc in component_docs(name, "patches"):
        assert (doc["kind"], doc["metadata"]["name"]) in base, (name, doc["metadata"]["name"])
        for container in doc["spec"].get("template", {}).get("spec", {}).get("containers", []):
            tier_settings(env_of(container), container["name"])
    for doc in component_docs(name, "resources"):
        assert (doc["kind"], doc["metadata"]["name"]) not in base
        # A component's resources are not in the base, so the base's `namespace:` never reaches them.
        assert doc["metadata"]["namespace"] == "tiergate", doc["metadata"]["name"]
    for overlay in OVERLAYS:
        text = (K8S / "overlays" / overlay / "kustomization.yaml").read_text(encoding="utf-8")
        assert f"#   - ../../components/{name}\n" in text, f"{overlay} does not show how to enable {name}"


def test_model_build_job_publishes_the_version_its_name_carries() -> None:
    (job,) = component_docs("model-build", "resources")
    assert job["metadata"]["name"] == MODEL_BUILD_JOB
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (script,) = container["args"]
    steps = [shlex.split(step) for step in script.split("&&")]
    assert [step[0] for step in steps] == ["tiergate", "tiergate"]
    build, publish = (build_parser().parse_args(step[1:]) for step in steps)
    assert (build.action, publish.action) == ("build", "publish")
    assert publish.model_dir == build.out, "it publishes the set it built"
    assert MODEL_BUILD_JOB.endswith(f"-{publish.version}"), "a new version is a new Job, never an edited one"
    assert publish.store == "$MODEL_STORE"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[str(build.data)]["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts[str(build.data)]["name"]]["persistentVolumeClaim"]["claimName"] == "tiergate-catalogue"


@pytest.mark.parametrize("tier", TIERS)
def test_tracing_component_exports_both_tiers_with_a_ratio_sampler(base: dict[tuple[str, str], Doc], tier: str) -> None:
    patches = index(component_docs("tracing", "patches"))
    env = {
        **env_of(tier_container(base[("Deployment", f"tiergate-{tier}")], tier)),
        **env_of(tier_container(patches[("Deployment", f"tiergate-{tier}")], tier)),
    }
    config = telemetry.resolve(tier_settings(env, tier).tracing, f"tiergate-{tier}", env=env)
    assert config.exporting and config.protocol == "grpc"
    assert (config.sampler, config.sampler_arg) == ("parentbased_traceidratio", 0.1)
    endpoints = {
        env_of(doc["spec"]["template"]["spec"]["containers"][0])["OTEL_EXPORTER_OTLP_ENDPOINT"]
        for doc in patches.values()
    }
    assert endpoints == {config.endpoint}, "both tiers must report to one collector"


def test_service_monitor_scrapes_each_tiers_metrics_port(base: dict[tuple[str, str], Doc]) -> None:
    docs = index(component_docs("prometheus-operator", "resources"))
    (monitor,) = [doc for (kind, _), doc in docs.items() if kind == "ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [doc for (kind, _), doc in docs.items() if kind == "Service"]
    for tier in TIERS:
        deployment = base[("Deployment", f"tiergate-{tier}")]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        metrics_port = tier_settings(env_of(tier_container(deployment, tier)), tier).metrics.port
        (service,) = [doc for doc in services if matches(doc["spec"]["selector"], pod_labels)]
        assert matches(selector, service["metadata"]["labels"])
        (port,) = service["spec"]["ports"]
        assert port["name"] == endpoint["port"] == "metrics"
        assert port["port"] == metrics_port and port["targetPort"] in ("metrics", metrics_port)
        # The public Service keeps gRPC alone and is not scraped.
        assert not matches(selector, base[("Service", f"tiergate-{tier}")]["metadata"]["labels"])


# --- rendered overlays (needs kubectl; no cluster) --------------------------------------


@pytest.fixture(scope="module")
def rendered(rendered_text: dict[str, str]) -> dict[str, dict[tuple[str, str], Doc]]:
    # libyaml's safe loader when present: same rules, several times faster on rendered output.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return {
        overlay: index([doc for doc in yaml.load_all(text, Loader=loader) if doc])
        for overlay, text in rendered_text.items()
    }


@pytest.fixture(scope="module")
def rendered_text(tmp_path_factory: pytest.TempPathFactory, operator_base: Path) -> dict[str, str]:
    """`kubectl kustomize` of each overlay, alone and with every component, on a copy of the tree holding a key
    directory made by the README's recipe. kubectl comes from the test extra (beside this interpreter)."""
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the test extra has it)")
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree)
    # The operator's key directory, as the README's recipe writes it.
    shutil.copytree(operator_base / "keys", tree / "base" / "keys", dirs_exist_ok=True)
    # Each overlay with every component enabled, as the overlays' comments show.
    for overlay in OVERLAYS:
        with_components = tree / "overlays" / f"{overlay}+components"
        with_components.mkdir()
        kust = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [f"../{overlay}"],
            "components": [f"../../components/{name}" for name in COMPONENT_NAMES],
        }
        (with_components / "kustomization.yaml").write_text(yaml.safe_dump(kust), encoding="utf-8")
    runs = {
        overlay: subprocess.Popen(
            [kubectl, "kustomize", str(tree / "overlays" / overlay)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for overlay in RENDERINGS
    }
    out: dict[str, str] = {}
    for overlay, run in runs.items():
        stdout, stderr = run.communicate(timeout=60)
        assert run.returncode == 0, f"kubectl kustomize {overlay}: {stderr}"
        out[overlay] = stdout
    return out


@pytest.mark.parametrize("overlay", RENDERINGS)
def test_overlay_renders_into_one_namespace_with_the_generated_secrets(
    rendered: dict[str, dict[tuple[str, str], Doc]], kustomization: Doc, overlay: str
) -> None:
    docs = rendered[overlay]
    assert {kind for kind, _ in docs} >= {
        "Namespace", "Secret", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
        "PodDisruptionBudget", "NetworkPolicy",
    }  # fmt: skip
    for (kind, name), doc in docs.items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "tiergate", (kind, name)
    # Fixed names: an updated Secret reaches the running pods in place (key rotation, tokens).
    generators = secret_generators(kustomization)
    secrets = {name: {key: key for key in doc["data"]} for (kind, name), doc in docs.items() if kind == "Secret"}
    assert {name: set(data) for name, data in secrets.items()} == {name: set(data) for name, data in generators.items()}
    assert not any(CA_KEY in data for data in secrets.values())
    for tier in TIERS:
        files = pod_key_files(docs[("Deployment", f"tiergate-{tier}")], tier, secrets)
        assert not set(files) & NOT_FOR[tier], (tier, sorted(set(files) & NOT_FOR[tier]))


def test_no_overlay_selects_a_backend_that_cannot_run() -> None:
    """Every overlay directory is one the tests render, and none asks for a GPU or for the TensorRT backend."""
    assert sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir()) == sorted(OVERLAYS)
    for path in (K8S / "overlays").rglob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        assert "nvidia.com/gpu" not in text and "tensorrt" not in text.lower(), path


@pytest.mark.parametrize("overlay", RENDERINGS)
def test_each_rendering_validates_against_the_kubernetes_schemas(
    rendered_text: dict[str, str], overlay: str, tmp_path: Path
) -> None:
    validate = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubernetes-validate"
    )
    if validate is None:
        pytest.skip("kubernetes-validate is not installed (the test extra has it)")
    rendered_file = tmp_path / f"{overlay}.yaml"
    rendered_file.write_text(rendered_text[overlay], encoding="utf-8")
    # The Prometheus Operator's ServiceMonitor is a custom resource: no built-in schema to check it against.
    run = subprocess.run(
        [validate, "--strict", "--quiet", str(rendered_file)], capture_output=True, text=True, check=False, timeout=120
    )
    problems = [
        line for line in (run.stdout + run.stderr).splitlines() if line.strip() and "ServiceMonitor" not in line
    ]
    assert not problems, "\n".join(problems)


def test_cpu_edge_overlay_keeps_the_gateway_off_gpus(rendered: dict[str, dict[tuple[str, str], Doc]]) -> None:
    gateway = tier_container(rendered["cpu-edge"][("Deployment", "tiergate-gateway")], "gateway")
    assert "nvidia.com/gpu" not in gateway["resources"].get("limits", {})
    assert env_of(gateway)["TIERGATE_GATEWAY__EDGE_BACKEND"] == "onnxruntime"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_components_add_to_an_overlay_without_replacing_it(
    rendered: dict[str, dict[tuple[str, str], Doc]], overlay: str
) -> None:
    plain, docs = rendered[overlay], rendered[f"{overlay}+components"]
    assert set(docs) - set(plain) == {
        ("Service", "tiergate-gateway-metrics"),
        ("Service", "tiergate-cloud-metrics"),
        ("ServiceMonitor", "tiergate"),
        ("Job", MODEL_BUILD_JOB),
    }
    for tier in TIERS:
        before = tier_container(plain[("Deployment", f"tiergate-{tier}")], tier)
        after = tier_container(docs[("Deployment", f"tiergate-{tier}")], tier)
        assert env_of(before).items() < env_of(after).items(), "the tracing patch must add to the env, not replace it"
        assert after["ports"] == before["ports"]
        env = env_of(after)
        assert telemetry.resolve(tier_settings(env, tier).tracing, f"tiergate-{tier}", env=env).exporting


# --- compose ----------------------------------------------------------------------------


def compose_args(service: Doc) -> Any:
    return build_parser().parse_args(service["command"])


def test_compose_services_and_gateway_target(compose: Doc) -> None:
    services = compose["services"]
    assert set(services) >= {"cloud", "gateway", "jaeger", "models", "keys"}
    cloud, gateway = compose_args(services["cloud"]), compose_args(services["gateway"])
    host, port = dialled(gateway.cloud)
    assert host == "cloud" and int(port) == cloud.port
    assert gateway.keys == cloud.keys is not None and gateway.models == cloud.models
    assert gateway.keyring is None and cloud.keyring is None, "--keys names the keyring"
    assert services["gateway"]["depends_on"]["cloud"]["condition"] == "service_healthy"
    for one_shot in ("keys", "models"):
        assert services["cloud"]["depends_on"][one_shot]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("tier", TIERS)
def test_compose_tier_health_mounts_and_tracing(compose: Doc, tier: str) -> None:
    service = compose["services"][tier]
    args = compose_args(service)
    assert args.host == "0.0.0.0"
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and test[4] == str(args.port)
    env = service["environment"]
    settings = tier_settings(env, tier)
    assert settings.audit.path is not None
    insecure = settings.hop_insecure if isinstance(settings, GatewaySettings) else settings.insecure
    assert insecure is False, f"{tier} must not run in plaintext"
    for path, read_only in ((args.models, True), (args.keys, True), (settings.audit.path, False)):
        (volume,) = [v.split(":") for v in service["volumes"] if path.is_relative_to(v.split(":")[1])]
        assert volume[0] in compose["volumes"], f"{path} is not on a named volume"
        assert (volume[2:] == ["ro"]) == read_only, volume
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    assert env["OTEL_SERVICE_NAME"] == f"tiergate-{tier}"
    assert telemetry.resolve(tier_settings(env, tier).tracing, f"tiergate-{tier}", env=env).exporting
    grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert grace is not None and int(grace[1]) > DRAIN_S[tier]


@pytest.mark.parametrize("tier", TIERS)
def test_compose_metrics_port(compose: Doc, tier: str) -> None:
    service = compose["services"][tier]
    metrics = tier_settings(service["environment"], tier).metrics
    assert metrics.enabled and metrics.port == DEFAULT_METRICS_PORTS[tier]
    assert metrics.host == "0.0.0.0", "the default loopback host is unreachable from outside the container"
    published = []
    for entry in service.get("ports", []):
        host_ip, host_port, container_port = ["", *entry.split(":")][-3:]
        if int(container_port) == metrics.port:
            published.append((host_ip, int(host_port)))
    if tier == "gateway":
        assert published == [("127.0.0.1", metrics.port)], "the gateway's metrics are published on localhost only"
    else:
        assert published == [], "the cloud tier is reachable only inside the compose network"
        assert [int(port) for port in service["expose"]] == [metrics.port]


def test_compose_jaeger_takes_otlp(compose: Doc) -> None:
    jaeger = compose["services"]["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert any(port.endswith(":4317") for port in jaeger["ports"])


@pytest.fixture(scope="module")
def compose_keys(
    compose: Doc, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[str], list[dict[str, bytes]]]:
    """The `keys` one-shot's script run twice against a scratch /keys: the directory, each run's output and files."""
    env = cli_env()
    service = compose["services"]["keys"]
    assert service["entrypoint"] == ["sh", "-c"]
    (script,) = service["command"]
    assert not re.search(r"(?<!\$)\$(?!\$)", script), "compose interpolates a lone $; write $$"
    directory = tmp_path_factory.mktemp("compose") / "keys"
    script = script.replace("$$", "$").replace("/keys", str(directory))
    outputs, snapshots = [], []
    for _ in range(2):
        run = subprocess.run(["sh", "-c", script], check=False, env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout)
        snapshots.append({p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()})
    return directory, outputs, snapshots


def test_compose_keys_one_shot_writes_the_key_directory_once(
    compose: Doc, compose_keys: tuple[Path, list[str], list[dict[str, bytes]]]
) -> None:
    directory, (first, second), (before, after) = compose_keys
    services = compose["services"]
    cloud, gateway = compose_args(services["cloud"]), compose_args(services["gateway"])
    assert f"tiergate keys init {cloud.keys}" in services["keys"]["command"][0]
    assert set(before) == set(KEY_DIR_FILES)
    assert after == before, "a second run must keep the existing key directory"
    for name in PRIVATE_FILES:
        assert (directory / name).stat().st_mode & 0o077 == 0, name
    # The first run prints the demo client's token, last; it opens the served model.
    token = first.split()[-1]
    client = TokenStore.load(directory / TOKENS_FILE).authenticate(token)
    assert client is not None and client.may_call(MODEL_NAME)
    assert token not in second
    # The cloud's certificate names the host the gateway dials and the one its healthcheck checks.
    names = san_names(directory / CLOUD_CERT)
    assert dialled(gateway.cloud)[0] in names
    assert services["cloud"]["healthcheck"]["test"][-1] in names


# Stands in for `tiergate` in the models one-shot's script: records how it was called and writes what a build
# leaves (a manifest in --out), so the script's choices are tested without minutes of training.
RECORDING_CLI = """#!/bin/sh
echo "$*" >> "$CALLS"
while [ $# -gt 0 ]; do
  if [ "$1" = --out ]; then mkdir -p "$2"; echo '{}' > "$2/manifest.json"; fi
  shift
done
"""


def test_compose_models_one_shot_builds_from_a_mounted_catalogue_or_says_it_is_the_demo(
    compose: Doc, tmp_path: Path
) -> None:
    service = compose["services"]["models"]
    cloud = compose_args(compose["services"]["cloud"])
    (script,) = service["command"]
    assert not re.search(r"(?<!\$)\$(?!\$)", script), "compose interpolates a lone $; write $$"
    # The catalogue comes from CATALOGUE_DIR, read-only; an empty directory of the repository stands in.
    (data,) = [v for v in service["volumes"] if v.endswith(":/data:ro")]
    source, _, _ = data.rpartition(":/data")
    assert source == "${CATALOGUE_DIR:-./no-catalogue}"
    assert (COMPOSE.parent / "no-catalogue").is_dir()
    bin_dir, catalogue, models = tmp_path / "bin", tmp_path / "data", tmp_path / "models"
    for directory in (bin_dir, catalogue, models):
        directory.mkdir()
    (bin_dir / "tiergate").write_text(RECORDING_CLI, encoding="utf-8")
    (bin_dir / "tiergate").chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls)}
    script = script.replace("$$", "$").replace("/data", str(catalogue)).replace("/models", str(models))

    def run() -> tuple[str, list[str]]:
        calls.write_text("", encoding="utf-8")
        done = subprocess.run(["sh", "-c", script], check=False, env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout, calls.read_text(encoding="utf-8").splitlines()

    served = models / cloud.models.relative_to("/models")
    out, built = run()
    assert "DEMO catalogue" in out and "synthetic" in out
    assert built == [f"models build --out {models}/.build"] and (served / "manifest.json").is_file()
    assert run()[1] == [], "a second run keeps the set it built"
    (catalogue / "products.csv").write_text("product_id,product_name,aisle_id,department_id\n", encoding="utf-8")
    out, built = run()
    assert "DEMO" not in out
    assert built == [f"models build --data {catalogue} --out {models}/.build"], "a mounted catalogue is built"
    assert not (models / ".build").exists() and (served / "manifest.json").is_file()
    assert run()[1] == []


def test_compose_one_shots_fill_the_paths_the_tiers_read(compose: Doc) -> None:
    services = compose["services"]
    cloud = compose_args(services["cloud"])
    assert f"mv /models/.build {cloud.models}" in services["models"]["command"][0]
    assert services["models"]["build"]["target"] == "train"
    for one_shot, path in (("keys", cloud.keys), ("models", cloud.models)):
        (volume,) = [v for v in services[one_shot]["volumes"] if path.is_relative_to(v.split(":")[1])]
        assert not volume.endswith(":ro"), f"{one_shot} must write {path}"

    context = (COMPOSE.parent / services["cloud"]["build"]["context"]).resolve()
    assert (context / "pyproject.toml").is_file()
    assert (context / services["cloud"]["build"]["dockerfile"]).resolve() == DOCKERFILE.resolve()


async def _run_health_check(code: str, port: int, *args: str) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(port), *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return await asyncio.wait_for(process.wait(), timeout=20)


async def test_compose_healthcheck_follows_the_servers_health(compose: Doc) -> None:
    code = compose["services"]["gateway"]["healthcheck"]["test"][3]
    server = ManagedServer(lambda _: [], max_message_bytes=1 << 20)
    port = await server.start("127.0.0.1", 0)
    try:
        assert await _run_health_check(code, port) == 0
        await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # what SIGTERM does first
        assert await _run_health_check(code, port) != 0
    finally:
        await server.stop(0)


async def test_compose_cloud_healthcheck_speaks_mtls(
    compose: Doc, base: dict[tuple[str, str], Doc], compose_keys: tuple[Path, list[str], list[dict[str, bytes]]]
) -> None:
    directory = compose_keys[0]
    service = compose["services"]["cloud"]
    keys = compose_args(service).keys
    _, _, _, code, _, *rest = service["healthcheck"]["test"]
    # One health script for compose and the Kubernetes readiness probe.
    assert (
        code == tier_container(base[("Deployment", "tiergate-cloud")], "cloud")["readinessProbe"]["exec"]["command"][2]
    )
    settings = tier_settings(service["environment"], "cloud")
    settings.keys_dir = directory
    apply_key_dir(settings)
    server = ManagedServer(lambda _: [], max_message_bytes=1 << 20, credentials=server_credentials(settings.tls))
    port = await server.start("127.0.0.1", 0)
    argv = [str(directory / Path(arg).relative_to(keys)) if Path(arg).is_relative_to(keys) else arg for arg in rest]
    try:
        assert await _run_health_check(code, port, *argv) == 0
        # The plaintext check cannot reach a port that takes mTLS only.
        assert await _run_health_check(compose["services"]["gateway"]["healthcheck"]["test"][3], port) != 0
        await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await _run_health_check(code, port, *argv) != 0
    finally:
        await server.stop(0)


# --- image --------------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_tiergate_image() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.MULTILINE)
    assert stages[-1][1] == "runtime", "the default (last) stage must be the serving image"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.MULTILINE)
    runtime = text[text.index("AS runtime") :]
    assert re.search(r'pip install "/src\[store\]"$', runtime, re.MULTILINE), "the pods fetch from object stores"
    assert re.search(r"^USER 10001:10001$", runtime, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["tiergate"\]$', runtime, re.MULTILINE)
    (expose,) = re.findall(r"^EXPOSE (.+)$", runtime, re.MULTILINE)
    assert {int(port) for port in expose.split()} == {*DEFAULT_PORTS.values(), *DEFAULT_METRICS_PORTS.values()}


# --- README ---------------------------------------------------------------------------------


def exposed_metric_names() -> set[str]:
    suffix = {"counter": "_total", "info": "_info"}
    return {
        family.name + suffix.get(family.type, "")
        for registry in (GatewayMetrics().registry, CloudMetrics().registry)
        for family in registry.collect()
    }


def test_readme_names_exactly_the_metrics_the_servers_export() -> None:
    named = set(re.findall(r"\btiergate_[a-z0-9_]+", README.read_text(encoding="utf-8")))
    assert named == exposed_metric_names()


def test_every_tiergate_variable_in_deploy_names_a_setting() -> None:
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".md")):
        for name in set(re.findall(r"\bTIERGATE_[A-Z0-9_]+", path.read_text(encoding="utf-8"))):
            assert name in TIERGATE_NON_SETTINGS or setting_exists(name), f"{path.name}: {name} is no setting"


def test_readme_documents_the_ports_and_components() -> None:
    text = README.read_text(encoding="utf-8")
    for port in (*DEFAULT_PORTS.values(), *DEFAULT_METRICS_PORTS.values()):
        assert str(port) in text
    for name in COMPONENT_NAMES:
        assert f"components/{name}/" in text


def test_dockerignore_lets_through_everything_pip_install_needs() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= allowed
    assert {"pyproject.toml", project["project"]["readme"]} <= allowed
