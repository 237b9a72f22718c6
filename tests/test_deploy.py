"""Deployment files: Dockerfile, compose stack and kustomize manifests agree with the CLI, settings and each other."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from grpc_health.v1 import health_pb2

from app.cli import build_parser
from tiergate.envelope import Keyring
from tiergate.rpc import ManagedServer
from tiergate.settings import CloudSettings, GatewaySettings, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAYS = ("cpu-edge", "edge-gpu")
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
EDGE_BACKENDS = {"onnxruntime", "tensorrt"}
TIERS = ("gateway", "cloud")
DEFAULT_PORTS = {"gateway": GatewaySettings().port, "cloud": CloudSettings().port}
DRAIN_S = {"gateway": GatewaySettings().grace_s, "cloud": CloudSettings().grace_s}

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


def grpc_port(container: Doc) -> int:
    (port,) = [p for p in container["ports"] if p["name"] == "grpc"]
    return int(port["containerPort"])


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

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == args.port, f"{tier} {probe} checks another port"

    assert matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(service["spec"]["selector"], pod_labels)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in ("grpc", args.port)
    assert port["port"] == args.port
    assert port["appProtocol"] == "grpc"

    # Every TIERGATE_* variable must name a real setting: load_settings rejects unknown keys.
    env = env_of(container)
    load_settings(env={k: v for k, v in env.items() if k.startswith("TIERGATE_")})
    assert env["OTEL_SERVICE_NAME"] == f"tiergate-{tier}"


def test_gateway_cloud_target_names_the_cloud_service(base: dict[tuple[str, str], Doc]) -> None:
    gateway = tier_container(base[("Deployment", "tiergate-gateway")], "gateway")
    cloud_service = base[("Service", "tiergate-cloud")]
    args = build_parser().parse_args(gateway["args"])
    assert args.cloud == f"{cloud_service['metadata']['name']}:{cloud_service['spec']['ports'][0]['port']}"
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


@pytest.mark.parametrize("tier", TIERS)
def test_pod_disruption_budget_selects_its_tier(base: dict[tuple[str, str], Doc], tier: str) -> None:
    pdb = base[("PodDisruptionBudget", f"tiergate-{tier}")]
    for name in TIERS:
        labels = base[("Deployment", f"tiergate-{name}")]["spec"]["template"]["metadata"]["labels"]
        assert matches(pdb["spec"]["selector"]["matchLabels"], labels) == (name == tier)


def test_network_policy_admits_only_the_gateway_to_the_cloud_port(base: dict[tuple[str, str], Doc]) -> None:
    (policy,) = [doc for key, doc in base.items() if key[0] == "NetworkPolicy"]
    cloud = base[("Deployment", "tiergate-cloud")]["spec"]["template"]["metadata"]["labels"]
    gateway = base[("Deployment", "tiergate-gateway")]["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert matches(selector, cloud) and not matches(selector, gateway)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}, "a namespace or IP source would admit more than the gateway"
    assert matches(source["podSelector"]["matchLabels"], gateway)
    assert not matches(source["podSelector"]["matchLabels"], cloud)
    assert [p["port"] for p in rule["ports"]] == [DEFAULT_PORTS["cloud"]]


@pytest.mark.parametrize("tier", TIERS)
def test_keyring_and_models_are_mounted_where_the_args_point(
    base: dict[tuple[str, str], Doc], kustomization: Doc, tier: str
) -> None:
    deployment = base[("Deployment", f"tiergate-{tier}")]
    spec = deployment["spec"]["template"]["spec"]
    container = tier_container(deployment, tier)
    args = build_parser().parse_args(container["args"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    keyring_mount = mounts[str(args.keyring.parent)]
    secret = volumes[keyring_mount["name"]]["secret"]
    (generator,) = kustomization["secretGenerator"]
    assert secret["secretName"] == generator["name"]
    (item,) = generator["files"]
    key, _, source = item.partition("=")
    assert key == args.keyring.name
    assert (BASE / source).parent.joinpath(".gitignore").read_text(encoding="utf-8").splitlines()[-2:] == [
        "*",
        "!.gitignore",
    ], "the operator's keyring file must stay out of git"

    models_mount = next(m for path, m in mounts.items() if args.models.is_relative_to(path))
    assert models_mount["readOnly"] is True
    claim = volumes[models_mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in base
    (wait,) = spec["initContainers"]
    assert f"{args.models}/manifest.json" in " ".join(wait["command"])

    job = base[("Job", "tiergate-models-build")]["spec"]["template"]["spec"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in job["volumes"] if "persistentVolumeClaim" in v} == {claim}
    (build,) = job["containers"]
    assert f"mv /models/.build {args.models}" in " ".join(build["args"])


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


# --- rendered overlays (needs kubectl; no cluster) --------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[tuple[str, str], Doc]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH")
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree)
    # The operator's keyring file, as the README has them create it.
    Keyring.generate().save(tree / "base" / "keyring" / "seal-keys.json")
    runs = {
        overlay: subprocess.Popen(
            [kubectl, "kustomize", str(tree / "overlays" / overlay)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for overlay in OVERLAYS
    }
    out: dict[str, dict[tuple[str, str], Doc]] = {}
    for overlay, run in runs.items():
        stdout, stderr = run.communicate(timeout=60)
        assert run.returncode == 0, f"kubectl kustomize {overlay}: {stderr}"
        # libyaml's safe loader when present: same rules, several times faster on rendered output.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        out[overlay] = index([doc for doc in yaml.load_all(stdout, Loader=loader) if doc])
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_one_namespace_with_the_generated_secret(
    rendered: dict[str, dict[tuple[str, str], Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    assert {kind for kind, _ in docs} >= {
        "Namespace", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler",
        "PodDisruptionBudget", "NetworkPolicy", "PersistentVolumeClaim", "Job",
    }  # fmt: skip
    for (kind, name), doc in docs.items():
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == "tiergate", (kind, name)
    (secret,) = [name for kind, name in docs if kind == "Secret"]
    for tier in TIERS:
        volumes = docs[("Deployment", f"tiergate-{tier}")]["spec"]["template"]["spec"]["volumes"]
        assert secret in {v["secret"]["secretName"] for v in volumes if "secret" in v}


def test_edge_gpu_overlay_puts_the_gateway_on_gpu_nodes(rendered: dict[str, dict[tuple[str, str], Doc]]) -> None:
    docs = rendered["edge-gpu"]
    spec = docs[("Deployment", "tiergate-gateway")]["spec"]["template"]["spec"]
    gateway = tier_container(docs[("Deployment", "tiergate-gateway")], "gateway")
    assert gateway["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gateway["resources"]["limits"]["memory"], "the GPU patch must add to the base limits, not replace them"
    assert env_of(gateway)["TIERGATE_GATEWAY__EDGE_BACKEND"] == "tensorrt"
    assert spec["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    cloud = docs[("Deployment", "tiergate-cloud")]["spec"]["template"]["spec"]
    assert "nodeSelector" not in cloud and "tolerations" not in cloud


def test_cpu_edge_overlay_keeps_the_gateway_off_gpus(rendered: dict[str, dict[tuple[str, str], Doc]]) -> None:
    gateway = tier_container(rendered["cpu-edge"][("Deployment", "tiergate-gateway")], "gateway")
    assert "nvidia.com/gpu" not in gateway["resources"].get("limits", {})
    assert env_of(gateway)["TIERGATE_GATEWAY__EDGE_BACKEND"] == "onnxruntime"


# --- compose ----------------------------------------------------------------------------


def compose_args(service: Doc) -> Any:
    return build_parser().parse_args(service["command"])


def test_compose_services_and_gateway_target(compose: Doc) -> None:
    services = compose["services"]
    assert set(services) >= {"cloud", "gateway", "jaeger", "models", "keys"}
    cloud, gateway = compose_args(services["cloud"]), compose_args(services["gateway"])
    host, _, port = gateway.cloud.rpartition(":")
    assert host == "cloud" and int(port) == cloud.port
    assert gateway.keyring == cloud.keyring and gateway.models == cloud.models
    assert services["gateway"]["depends_on"]["cloud"]["condition"] == "service_healthy"
    for one_shot in ("keys", "models"):
        assert services["cloud"]["depends_on"][one_shot]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("tier", TIERS)
def test_compose_tier_health_mounts_and_tracing(compose: Doc, tier: str) -> None:
    service = compose["services"][tier]
    args = compose_args(service)
    assert args.host == "0.0.0.0"
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"] and test[-1] == str(args.port)
    for path in (args.models, args.keyring):
        (volume,) = [v.split(":")[0] for v in service["volumes"] if path.is_relative_to(v.split(":")[1])]
        assert volume in compose["volumes"], f"{path} is not on a named volume"
    env = service["environment"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    assert env["OTEL_SERVICE_NAME"] == f"tiergate-{tier}"
    load_settings(env={k: v for k, v in env.items() if k.startswith("TIERGATE_")})
    grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert grace is not None and int(grace[1]) > DRAIN_S[tier]


def test_compose_jaeger_takes_otlp(compose: Doc) -> None:
    jaeger = compose["services"]["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert any(port.endswith(":4317") for port in jaeger["ports"])


def test_compose_one_shots_fill_the_paths_the_tiers_read(compose: Doc, tmp_path: Path) -> None:
    services = compose["services"]
    cloud = compose_args(services["cloud"])
    assert f"mv /models/.build {cloud.models}" in services["models"]["command"][0]
    assert services["models"]["build"]["target"] == "train"

    # Run the keys one-shot's own code, twice, against a scratch path.
    code = services["keys"]["command"][0]
    assert str(cloud.keyring) in code
    path = tmp_path / "seal-keys.json"
    one_shot = compile(code.replace(str(cloud.keyring), str(path)), "keys", "exec")
    exec(one_shot, {})
    first = path.read_text(encoding="utf-8")
    exec(one_shot, {})
    assert path.read_text(encoding="utf-8") == first, "a second run must keep the existing keyring"
    assert path.stat().st_mode & 0o077 == 0
    Keyring.load(path)

    context = (COMPOSE.parent / services["cloud"]["build"]["context"]).resolve()
    assert (context / "pyproject.toml").is_file()
    assert (context / services["cloud"]["build"]["dockerfile"]).resolve() == DOCKERFILE.resolve()


async def _run_health_check(code: str, port: int) -> int:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
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


# --- image --------------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_tiergate_image() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.MULTILINE)
    assert stages[-1][1] == "runtime", "the default (last) stage must be the serving image"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.MULTILINE)
    runtime = text[text.index("AS runtime") :]
    assert re.search(r"pip install /src$", runtime, re.MULTILINE)
    assert re.search(r"^USER 10001:10001$", runtime, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["tiergate"\]$', runtime, re.MULTILINE)


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
