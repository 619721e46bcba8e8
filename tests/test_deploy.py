"""The deployment material: Kubernetes manifests, the KServe InferenceService, the Dockerfile, installs.

The Kubernetes objects are checked against the API's own schemas by kubernetes-validate (``--strict``:
unknown fields are errors; the schemas ship with it, no cluster or network is needed), the KServe
object against ``deploy/kserve/inferenceservice.schema.json`` with its pod fields as a strict PodSpec,
and all of them against this project's rules (``rule_problems``): probes on the container's gRPC port,
container flags that the server really has, resources, no root, a read-only root filesystem. Each rule
is also shown to reject a broken copy.
"""

from __future__ import annotations

import atexit
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2
from layergrad_server import config as server_config
from layergrad_server.launch import ServerProcess
from layergrad_server.server import SERVICE_NAME
from layergrad_server.weights import cli as weights_cli
from layergrad_server.weights import store

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = REPO / "deploy" / "kubernetes"
KSERVE = REPO / "deploy" / "kserve"
KSERVE_SCHEMA = KSERVE / "inferenceservice.schema.json"
KUBERNETES_VERSION = "1.37.0"
# The port names the serving container's gRPC port may have: KServe routes HTTP/2 cleartext to "h2c".
GRPC_PORT_NAMES = ("grpc", "h2c")

Manifest = dict[str, Any]


def load_objects(path: Path) -> list[Manifest]:
    with open(path) as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def manifest_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")


def kubernetes_objects(directory: Path) -> list[Manifest]:
    return [obj for path in manifest_files(directory) for obj in load_objects(path)]


def one(objects: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def schema_problems(obj: Manifest) -> list[str]:
    """kubernetes-validate --strict's verdict on one object, as messages (none when valid)."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(p) for p in error.path)
        return [f"{obj['kind']}/{obj['metadata']['name']}: {where}: {error.message}"]
    return []


# --- KServe ----------------------------------------------------------------------------------------


def predictor_component_fields() -> set[str]:
    """Fields of the predictor that KServe adds to a PodSpec (the rest is a PodSpec)."""
    schema = json.loads(KSERVE_SCHEMA.read_text())
    fields = schema["properties"]["spec"]["properties"]["predictor"]["properties"]
    return set(fields) - {"containers"}


def kserve_pod(isvc: Manifest) -> Manifest:
    """The predictor's pod fields as a Pod object, for kubernetes-validate."""
    predictor = isvc["spec"]["predictor"]
    spec = {k: v for k, v in predictor.items() if k not in predictor_component_fields()}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]}, "spec": spec}


def kserve_problems(isvc: Manifest) -> list[str]:
    schema = json.loads(KSERVE_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    problems = [
        f"InferenceService: {'.'.join(str(p) for p in e.path)}: {e.message}"
        for e in validator.iter_errors(isvc)
    ]
    return problems + schema_problems(kserve_pod(isvc))


# --- the project's rules ---------------------------------------------------------------------------


def server_option_strings() -> set[str]:
    return {s for action in server_config.build_parser()._actions for s in action.option_strings}


def parse_server_args(args: list[str]) -> server_config.ServerConfig:
    """The server's own parser and checks on a container's args; SystemExit on anything it refuses.

    The pod's /models is the checked-in ConfigMap's files, laid out as the pod mounts them."""
    args = list(args)
    if "--model-repository" in args and args[args.index("--model-repository") + 1] == "/models":
        args[args.index("--model-repository") + 1] = str(mounted_models())
    return server_config.from_args(server_config.build_parser().parse_args(args))


@functools.cache
def mounted_models() -> Path:
    """The checked-in models ConfigMap written as the Deployment mounts it at /models."""
    objects = kubernetes_objects(KUBERNETES)
    (volume,) = [
        v for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "models"
    ]
    data = one(objects, "ConfigMap")["data"]
    root = Path(tempfile.mkdtemp(prefix="layergrad-models-"))
    atexit.register(shutil.rmtree, root, True)
    for item in volume["configMap"]["items"]:
        path = root / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data[item["key"]])
    return root


def command_line(container: Manifest) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def grpc_port(container: Manifest) -> Manifest | None:
    ports = [p for p in container.get("ports", []) if p.get("name") in GRPC_PORT_NAMES]
    return ports[0] if len(ports) == 1 else None


def container_problems(container: Manifest, pod_security: Manifest) -> list[str]:
    name = container["name"]
    problems = []
    resources = container.get("resources", {})
    for path in ("requests.cpu", "requests.memory", "limits.memory"):
        section, key = path.split(".")
        if key not in resources.get(section, {}):
            problems.append(f"{name}: resources.{path} is not set")
    security = container.get("securityContext", {})
    if security.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{name}: securityContext.readOnlyRootFilesystem is not true")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{name}: securityContext.allowPrivilegeEscalation is not false")
    if security.get("runAsUser", pod_security.get("runAsUser")) in (0, None):
        problems.append(f"{name}: runs as root (runAsUser 0 or unset)")
    if security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is not True:
        problems.append(f"{name}: runAsNonRoot is not true")
    if "ALL" not in security.get("capabilities", {}).get("drop", []):
        problems.append(f"{name}: capabilities are not all dropped")
    return problems


def serving_container_problems(container: Manifest) -> list[str]:
    name = container["name"]
    line = command_line(container)
    if line[:1] != ["layergrad-server"]:
        return [f"{name}: does not run layergrad-server: {line}"]
    args = line[1:]
    unknown = [a.split("=")[0] for a in args if a.startswith("--")]
    unknown = [a for a in unknown if a not in server_option_strings()]
    if unknown:
        return [f"{name}: layergrad-server has no flag {', '.join(unknown)}"]
    try:
        config = parse_server_args(args)
    except SystemExit:
        return [f"{name}: layergrad-server refuses its args {args}"]
    problems = []
    port = grpc_port(container)
    listen_port = int(config.address.rsplit(":", 1)[1])
    if port is None:
        return [f"{name}: no single container port named {' or '.join(GRPC_PORT_NAMES)}"]
    if port["containerPort"] != listen_port:
        problems.append(
            f"{name}: port {port['name']} is {port['containerPort']}, the server listens on {listen_port}"
        )
    if not config.address.startswith(("0.0.0.0:", "[::]:")):
        problems.append(f"{name}: --address {config.address} is not reachable from outside the pod")
    if "--workers" not in args:
        problems.append(f"{name}: --workers not set (the default counts the node's CPUs, not the pod's)")
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(probe_name)
        if probe is None or "grpc" not in probe:
            problems.append(f"{name}: {probe_name} is not a gRPC health probe")
            continue
        if probe["grpc"]["port"] != port["containerPort"]:
            problems.append(f"{name}: {probe_name} checks port {probe['grpc']['port']}, not the gRPC port")
        if probe["grpc"].get("service", "") not in ("", SERVICE_NAME):
            problems.append(f"{name}: {probe_name} checks service {probe['grpc']['service']!r}")
    startup = container.get("startupProbe", {})
    if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < 120:
        problems.append(f"{name}: startupProbe allows less than 2 minutes for the model to load")
    return problems


def mount_of(container: Manifest, path: str) -> Manifest | None:
    mounts = [
        m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    return mounts[0] if mounts else None


def pod_problems(pod_spec: Manifest) -> list[str]:
    """The project's rules for a layergrad pod: the Deployment's template or the KServe predictor."""
    security = pod_spec.get("securityContext", {})
    problems = []
    if security.get("runAsNonRoot") is not True or security.get("runAsUser") in (0, None):
        problems.append("pod: securityContext must set runAsNonRoot and a non-zero runAsUser")
    containers = pod_spec.get("containers", [])
    inits = pod_spec.get("initContainers", [])
    for container in [*inits, *containers]:
        problems += container_problems(container, security)
        if "/tmp" not in [m["mountPath"] for m in container.get("volumeMounts", [])]:
            problems.append(f"{container['name']}: no writable /tmp on a read-only root filesystem")
    if len(containers) != 1:
        return [*problems, f"pod: expected one serving container, found {len(containers)}"]
    server = containers[0]
    problems += serving_container_problems(server)
    fetchers = [c for c in inits if command_line(c)[:3] == ["layergrad-server", "weights", "fetch"]]
    if len(fetchers) != 1:
        return [*problems, "pod: no init container runs `layergrad-server weights fetch`"]
    try:
        fetch = weights_cli._parser().parse_args(command_line(fetchers[0])[2:])
    except SystemExit:
        return [*problems, f"{fetchers[0]['name']}: `weights fetch` refuses {command_line(fetchers[0])}"]
    if fetch.cache_dir is None:
        return [*problems, f"{fetchers[0]['name']}: `weights fetch` without --cache-dir"]
    fetched = str(fetch.cache_dir / store.PRETRAINED_NPZ_NAME)
    try:
        config = parse_server_args(command_line(server)[1:])
    except SystemExit:
        return problems  # reported above
    served = next((m.weights for m in config.models if m.default), config.weights)
    if served != fetched:
        problems.append(
            f"{server['name']}: the default model's weights {served} is not the fetched {fetched}"
        )
    into, read = mount_of(fetchers[0], fetched), mount_of(server, fetched)
    if into is None or read is None or into["name"] != read["name"]:
        problems.append(f"pod: {fetched} is not on a volume both the init container and the server mount")
    return problems


def kubernetes_rule_problems(objects: list[Manifest]) -> list[str]:
    deployment = one(objects, "Deployment")
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    problems = pod_problems(template["spec"])
    if deployment["spec"]["selector"]["matchLabels"].items() - labels.items():
        problems.append("Deployment: selector does not match its pod template")
    port_names = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    services = [o for o in objects if o["kind"] == "Service"]
    if sorted(s["spec"].get("clusterIP") == "None" for s in services) != [False, True]:
        problems.append("Services: expected one headless Service (clusterIP: None) and one ClusterIP Service")
    for service in services:
        name = service["metadata"]["name"]
        if service["spec"]["selector"].items() - labels.items():
            problems.append(f"Service {name}: selector does not match the pods")
        for port in service["spec"]["ports"]:
            if port["targetPort"] not in port_names:
                problems.append(f"Service {name}: targetPort {port['targetPort']} is no container port")
    hpa = one(objects, "HorizontalPodAutoscaler")
    if hpa["spec"]["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
        problems.append("HorizontalPodAutoscaler: does not scale the Deployment")
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        obj = one(objects, kind)
        selector = obj["spec"].get("selector", obj["spec"].get("podSelector", {}))
        if selector.get("matchLabels", {}).items() - labels.items():
            problems.append(f"{kind}: selector does not match the pods")
    policy = one(objects, "NetworkPolicy")
    for rule in policy["spec"].get("ingress", []):
        for port in rule.get("ports", []):
            if port["port"] not in port_names:
                problems.append(f"NetworkPolicy: ingress port {port['port']} is no container port")
    return problems


def all_problems(root: Path) -> list[str]:
    """Everything CI checks on a copy of ``deploy/`` at ``root``; empty when all is well."""
    objects = kubernetes_objects(root / "kubernetes")
    problems = [p for obj in objects for p in schema_problems(obj)]
    problems += kubernetes_rule_problems(objects)
    isvc = one(load_objects(root / "kserve" / "inferenceservice.yaml"), "InferenceService")
    problems += kserve_problems(isvc)
    problems += pod_problems(kserve_pod(isvc)["spec"])
    return problems


# --- the checked-in manifests ----------------------------------------------------------------------


def test_checked_in_manifests_pass_every_check() -> None:
    assert all_problems(REPO / "deploy") == []


def test_kubernetes_validate_cli_strict_passes_every_manifest() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION]
        + [str(p) for p in manifest_files(KUBERNETES)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {o["kind"] for o in kubernetes_objects(KUBERNETES)}
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    assert result.stdout.count(" passed for resource ") == len(kubernetes_objects(KUBERNETES))


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_objects(KUBERNETES / "kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files(KUBERNETES)]
    assert [i["name"] for i in kustomization["images"]] == ["layergrad-server"]


def test_kserve_and_kubernetes_pods_serve_alike() -> None:
    """The KServe predictor runs the Deployment's server and init container with the same args."""
    template = one(kubernetes_objects(KUBERNETES), "Deployment")["spec"]["template"]["spec"]
    predictor = kserve_pod(one(load_objects(KSERVE / "inferenceservice.yaml"), "InferenceService"))["spec"]
    for key in ("securityContext", "volumes"):
        assert predictor[key] == template[key]
    for field in ("command", "args", "resources", "securityContext", "volumeMounts"):
        assert predictor["containers"][0][field] == template["containers"][0][field]
        assert predictor["initContainers"][0].get(field) == template["initContainers"][0].get(field)


@pytest.fixture(scope="module")
def manifest_server(weights_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real server started with the Deployment's args (random weights, a free loopback port)."""
    objects = kubernetes_objects(KUBERNETES)
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = command_line(container)[1:]
    repository = model_repository(objects, tmp_path_factory.mktemp("models"), weights_file)
    local = (
        ("--address", "127.0.0.1:0"),
        ("--model-repository", str(repository)),
        ("--metrics-address", "127.0.0.1:0"),
    )
    for flag, value in local:
        args[args.index(flag) + 1] = value
    log = tmp_path_factory.mktemp("deploy") / "server.log"
    with ServerProcess(args, log) as server:
        server.wait_serving()
        yield server


def model_repository(objects: list[Manifest], root: Path, weights_file: Path) -> Path:
    """The Deployment's /models as files: the ConfigMap's keys at their mounted paths, each model's
    weights path pointed at the tests' random weights."""
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
    config_map = one(objects, "ConfigMap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    items = volume["configMap"]["items"]
    assert sorted(i["key"] for i in items) == sorted(config_map["data"]), "every model is mounted"
    for item in items:
        model = yaml.safe_load(config_map["data"][item["key"]])
        assert model["weights"].startswith("/weights/"), "weights come from the init container's volume"
        model["weights"] = str(weights_file)
        path = root / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(model))
    return root


def test_models_configmap_is_a_model_repository(tmp_path: Path, weights_file: Path) -> None:
    from layergrad_server.models.repository import read_repository

    root = model_repository(kubernetes_objects(KUBERNETES), tmp_path, weights_file)
    models = read_repository(root)
    assert [(m.name, m.architecture, m.default) for m in models] == [("vgg16", "vgg16", True)]


def test_server_started_with_the_manifest_args_answers_every_probe(manifest_server: ServerProcess) -> None:
    container = one(kubernetes_objects(KUBERNETES), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    services = {
        container[p]["grpc"].get("service", "") for p in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert services == {"", SERVICE_NAME}
    for service in services:
        assert manifest_server.health(service) == health_pb2.HealthCheckResponse.SERVING


# --- broken copies are rejected ----------------------------------------------------------------------


def edit_yaml(path: Path, kind: str, change: Callable[[Manifest], None]) -> None:
    objects = load_objects(path)
    change(next(o for o in objects if o["kind"] == kind))
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))


def server_container(deployment: Manifest) -> Manifest:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def set_command_arg(container: Manifest, flag: str, value: str) -> None:
    command = container["command"]
    command[command.index(flag) + 1] = value


def set_arg(container: Manifest, flag: str, value: str) -> None:
    container["args"][container["args"].index(flag) + 1] = value


BREAKAGES: dict[str, tuple[str, str, Callable[[Manifest], None], str]] = {
    "probe on another port": (
        "kubernetes/deployment.yaml",
        "Deployment",
        lambda d: server_container(d)["readinessProbe"]["grpc"].update(port=50052),
        "readinessProbe checks port 50052",
    ),
    "probe on an HTTP path": (
        "kubernetes/deployment.yaml",
        "Deployment",
        lambda d: server_container(d).update(livenessProbe={"httpGet": {"path": "/healthz", "port": 50051}}),
        "livenessProbe is not a gRPC health probe",
    ),
    "server listening elsewhere": (
        "kubernetes/deployment.yaml",
        "Deployment",
        lambda d: set_arg(server_container(d), "--address", "0.0.0.0:8080"),
        "the server listens on 8080",
    ),
    "flag the server lacks": (
        "kubernetes/deployment.yaml",
        "Deployment",
        lambda d: server_container(d)["args"].extend(["--metrics-port", "9090"]),
        "has no flag --metrics-port",
    ),
    "flag value the server refuses": (
        "kubernetes/deployment.yaml",
        "Deployment",
        lambda d: set_arg(server_container(d), "--max-batch-size", "0"),
        "refuses its args",
    ),
    "root user": (
        "kubernetes/deployment.yaml",
        "Deployment",
        lambda d: d["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0),
        "runs as root",
    ),
    "root allowed": (
        "kubernetes/deployment.yaml",
        "Deployment",
        lambda d: server_container(d)["securityContext"].update(runAsNonRoot=False),
        "server: runAsNonRoot is not true",
    ),
    "writable root filesystem": (
        "kubernetes/deployment.yaml",
        "Deployment",
        lambda d: d["spec"]["template"]["spec"]["initContainers"][0]["securityContext"].pop(
            "readOnlyRootFilesystem"
        ),
        "fetch-weights: securityContext.readOnlyRootFilesystem is not true",
    ),
    "no memory limit": (
        "kubernetes/deployment.yaml",
        "Deployment",
        lambda d: server_container(d)["resources"].pop("limits"),
        "resources.limits.memory is not set",
    ),
    "weights fetched elsewhere": (
        "kubernetes/deployment.yaml",
        "Deployment",
        lambda d: set_command_arg(d["spec"]["template"]["spec"]["initContainers"][0], "--cache-dir", "/data"),
        "is not the fetched",
    ),
    "misspelt field": (
        "kubernetes/deployment.yaml",
        "Deployment",
        lambda d: server_container(d).update(livenessProbes=server_container(d).pop("livenessProbe")),
        "Additional properties are not allowed ('livenessProbes' was unexpected)",
    ),
    "wrong type": (
        "kubernetes/service.yaml",
        "Service",
        lambda s: s["spec"]["ports"][0].update(port="50051"),
        "'50051' is not of type 'integer'",
    ),
    "service to a missing port": (
        "kubernetes/service.yaml",
        "Service",
        lambda s: s["spec"]["ports"][0].update(targetPort="http"),
        "targetPort http is no container port",
    ),
    "kserve port not h2c": (
        "kserve/inferenceservice.yaml",
        "InferenceService",
        lambda i: i["spec"]["predictor"]["containers"][0]["ports"][0].update(name="grpc"),
        "'h2c' was expected",
    ),
    "kserve misspelt predictor field": (
        "kserve/inferenceservice.yaml",
        "InferenceService",
        lambda i: i["spec"]["predictor"].update(minReplica=1),
        "'minReplica' was unexpected",
    ),
    "kserve unknown top-level field": (
        "kserve/inferenceservice.yaml",
        "InferenceService",
        lambda i: i["spec"].update(predictors={}),
        "'predictors' was unexpected",
    ),
    "kserve probe on another port": (
        "kserve/inferenceservice.yaml",
        "InferenceService",
        lambda i: i["spec"]["predictor"]["containers"][0]["startupProbe"]["grpc"].update(port=9000),
        "startupProbe checks port 9000",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_copy_is_rejected(breakage: str, tmp_path: Path) -> None:
    file, kind, change, expected = BREAKAGES[breakage]
    root = tmp_path / "deploy"
    shutil.copytree(REPO / "deploy", root)
    edit_yaml(root / file, kind, change)
    problems = all_problems(root)
    assert any(expected in p for p in problems), problems


def test_kubernetes_validate_cli_rejects_a_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "deployment.yaml"
    shutil.copy(KUBERNETES / "deployment.yaml", broken)
    edit_yaml(broken, "Deployment", lambda d: server_container(d).update(readOnlyRootFS=True))
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION, str(broken)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "readOnlyRootFS" in result.stdout + result.stderr


# --- the Dockerfile and the install script -----------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split at each FROM."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_pinned_non_root_and_installs_with_the_ci_script() -> None:
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base.group(1))
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert all(stage[0].split()[1] == "${PYTHON_IMAGE}" for stage in stages)
    build_runs = [line for line in stages[0] if line.startswith("RUN ")]
    assert any("scripts/install.sh" in line and "--dev" not in line for line in build_runs)
    final = stages[-1]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(line.startswith("COPY --from=") for line in final)
    entry = [line for line in final if line.startswith("ENTRYPOINT ")]
    assert entry == ['ENTRYPOINT ["layergrad-server"]']
    cmd = json.loads(next(line for line in final if line.startswith("CMD "))[4:])
    parse_server_args(cmd)
    uid = int(users[-1].split(":")[0])
    deployment = one(kubernetes_objects(KUBERNETES), "Deployment")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


def test_ci_and_make_setup_install_through_the_install_script() -> None:
    assert "make setup" in (REPO / ".ci" / "run").read_text()
    dry = subprocess.run(["make", "-n", "-B", "setup"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "scripts/install.sh --venv .venv --dev" in dry.stdout
    dry = subprocess.run(["make", "-n", "-B", "run"], cwd=REPO, capture_output=True, text=True, check=True)
    installs = [line for line in dry.stdout.splitlines() if "scripts/install.sh" in line]
    assert installs and all("--dev" not in line for line in installs)


def test_plain_make_prints_help_and_installs_nothing() -> None:
    dry = subprocess.run(["make", "-n"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "install.sh" not in dry.stdout and "pip" not in dry.stdout
    shown = subprocess.run(["make", "-s"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for target in ("setup", "run", "serve", "test", "lint"):
        assert re.search(rf"^  {target} ", shown, re.MULTILINE), shown


def test_install_script_help_lists_its_options() -> None:
    result = subprocess.run(
        ["bash", "scripts/install.sh", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0
    for option in ("--venv", "--dev", "--no-editable"):
        assert option in result.stdout
    bad = subprocess.run(["bash", "scripts/install.sh", "--nope"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --nope" in bad.stderr


def test_server_script_without_the_server_extra_says_what_to_install() -> None:
    # The SDK alone (`pip install .`) lacks Pillow, Chainer, ...: hide Pillow as such an install would.
    code = (
        "import sys; sys.modules['PIL'] = None; from layergrad_server.__main__ import main; "
        "sys.exit(main(['--help']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "missing: pillow" in result.stderr
    assert "pip install '.[server]'" in result.stderr
    assert 'pip install --no-build-isolation "chainer==7.8.1"' in result.stderr
