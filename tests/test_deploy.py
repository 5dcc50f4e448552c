"""deploy/: the containers, the Helm chart, the managed-endpoint routes and the parallelism flags.

No Docker engine or cluster is needed: the chart is rendered and linted by Helm's own Go SDK (helm-python-sdk,
the `dev` extra) and every manifest is validated offline against the Kubernetes API schemas
(kubernetes-validate, also `dev`); the Dockerfiles, the entrypoint and compose are checked against the files and
the real `loraplex serve` command. The SageMaker and Vertex AI routes run on the real server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from live_server import free_port, running_server

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "loraplex"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest the schemas know.
KUBE_VERSIONS = ("1.25.0", "1.37.0")
# Variables loraplex reads itself rather than through the entrypoint's flags.
READ_BY_LORAPLEX = {"LORAPLEX_HOME", "LORAPLEX_API_KEYS", "LORAPLEX_API_KEYS_FILE", "LORAPLEX_ADMIN_KEY"}
API_KEY = "deploy-test-key"

EVERYTHING = {
    "baseModel": "/models/llama", "models": {"existingClaim": "models"},
    "serve": {"tensorParallelSize": 2, "pipelineParallelSize": 2, "distributedExecutorBackend": "ray",
              "maxQueue": 1048576, "gpuMemoryUtilization": 0.85, "extraEnv": {"LORAPLEX_ENFORCE_EAGER": "1"}},
    "resources": {"limits": {"nvidia.com/gpu": 4}},
    "apiKeys": {"keys": ["key-one-1234", "key-two-5678"], "adminKey": "admin-key-9012",
                "scoped": {"team-a-key-3456": ["support-v1", "support-*"], "analytics-key-7890": ["*"]}},
    "aliases": {"support-bot": {"support-v1": 0.9, "support-v2": 0.1}},
    "autoscaling": {"enabled": True, "maxReplicas": 6},
    "metrics": {"serviceMonitor": {"enabled": True}},
    "router": {"enabled": True, "unhashedModels": ["llama"]},
}
S3_SIDECAR = {"adapters": {"source": "s3", "s3": {"uri": "s3://models/adapters", "endpointUrl": "http://minio:9000",
                                                  "credentialsSecret": "s3-credentials", "syncInterval": 60}},
              "apiKeys": {"existingSecret": "loraplex-keys"}}
VALUE_SETS = {"defaults": {}, "everything": EVERYTHING, "s3-sidecar": S3_SIDECAR}


# ---------------------------------------------------------------- helpers

def render(values: dict, name: str = "demo", namespace: str = "prod") -> list[dict]:
    """Every manifest the chart renders with these values, through Helm's own template engine."""
    helm = pytest.importorskip("helm_python", reason="the dev extra installs helm-python-sdk (Helm's Go SDK)")
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=name, namespace=namespace)
    return [doc for path, text in sorted(rendered.items()) if path.endswith((".yaml", ".yml"))
            for doc in yaml.safe_load_all(text) if doc]


def one(manifests: list[dict], kind: str, name: str | None = None) -> dict:
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} manifests"
    return found[0]


def server_container(manifests: list[dict]) -> dict:
    deployment = one(manifests, "Deployment", "demo-loraplex")
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "loraplex")


def serve_options() -> dict:
    """`loraplex serve`'s options by long flag, from the real click command (typer may ship its own click)."""
    import typer

    from loraplex.cli import app

    serve = typer.main.get_command(app).commands["serve"]
    return {flag: p for p in serve.params if p.param_type_name == "option" for flag in p.opts if flag.startswith("--")}


def entrypoint_flags(list_name: str) -> list[str]:
    match = re.search(rf'^{list_name}="([^"]*)"', ENTRYPOINT.read_text(), re.M)
    assert match, f"{list_name} not found in {ENTRYPOINT}"
    return match.group(1).split()


def entrypoint_variables() -> set[str]:
    return {"LORAPLEX_" + flag.upper().replace("-", "_")
            for flag in entrypoint_flags("VALUE_FLAGS") + entrypoint_flags("SWITCH_FLAGS")
            + entrypoint_flags("ON_OFF_FLAGS")}


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def run_entrypoint(env: dict[str, str], *args: str, trace: bool = False) -> subprocess.CompletedProcess:
    """The real entrypoint script, with this environment's `loraplex` on PATH (`trace`: bash -x, so stderr shows
    the command it runs)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    path = f"{Path(sys.executable).parent}{os.pathsep}{clean.get('PATH', '')}"
    return subprocess.run(["bash", *(["-x"] if trace else []), str(ENTRYPOINT), *args],
                          env={**clean, "PATH": path, **env},
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- the Helm chart

@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_lints_clean(values):
    helm = pytest.importorskip("helm_python", reason="the dev extra installs helm-python-sdk (Helm's Go SDK)")
    report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_manifests_validate_against_kubernetes_schemas(values):
    import kubernetes_validate

    manifests = render(values)
    assert {"Deployment", "Service"} <= {m["kind"] for m in manifests}
    for manifest in manifests:
        if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD of the Prometheus Operator: not in the Kubernetes schemas (checked below)
        for version in KUBE_VERSIONS:
            # strict: unknown fields fail too, so a misspelt key cannot slip through as ignored
            kubernetes_validate.validate(manifest, version, strict=True)


def test_chart_defaults_serve_one_gpu_from_a_pvc_registry():
    manifests = render({})
    container = server_container(manifests)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    adapters = next(v for v in pod["volumes"] if v["name"] == "adapters")
    claim = one(manifests, "PersistentVolumeClaim")
    assert adapters["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert {"mountPath": "/adapters", "name": "adapters"} in container["volumeMounts"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert not [m for m in manifests if m["kind"] in ("Secret", "ConfigMap", "HorizontalPodAutoscaler")]
    assert "LORAPLEX_API_KEYS" not in {e["name"] for e in container["env"]}
    service = one(manifests, "Service")
    assert service["spec"]["selector"] == one(manifests, "Deployment")["spec"]["selector"]["matchLabels"]


def test_chart_env_reaches_real_serve_flags():
    manifests = render(EVERYTHING)
    env = {e["name"]: e.get("value") for e in server_container(manifests)["env"]}
    unknown = set(env) - entrypoint_variables() - READ_BY_LORAPLEX
    assert not unknown, f"variables neither the entrypoint nor loraplex reads: {unknown}"
    assert env["LORAPLEX_TENSOR_PARALLEL_SIZE"] == "2" and env["LORAPLEX_PIPELINE_PARALLEL_SIZE"] == "2"
    assert env["LORAPLEX_DISTRIBUTED_EXECUTOR_BACKEND"] == "ray"
    assert env["LORAPLEX_MAX_QUEUE"] == "1048576"  # not 1.048576e+06, which --max-queue would refuse
    assert env["LORAPLEX_GPU_MEMORY_UTILIZATION"] == "0.85"
    assert env["LORAPLEX_ENFORCE_EAGER"] == "1"


def test_chart_api_keys_come_from_a_secret_only():
    manifests = render(EVERYTHING)
    container = server_container(manifests)
    env = {e["name"]: e for e in container["env"]}
    secret = one(manifests, "Secret")
    for name, key in (("LORAPLEX_API_KEYS", "api-keys"), ("LORAPLEX_ADMIN_KEY", "admin-key")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": key,
                                                         "optional": True}
    assert secret["stringData"]["api-keys"] == "key-one-1234,key-two-5678"
    assert secret["stringData"]["admin-key"] == "admin-key-9012"
    # Nowhere else: not in args, env values, annotations or any other manifest.
    others = json.dumps([m for m in manifests if m["kind"] != "Secret"])
    for key in ("key-one-1234", "key-two-5678", "admin-key-9012", "team-a-key-3456"):
        assert key not in others

    existing = server_container(render(S3_SIDECAR))
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in existing["env"] if "valueFrom" in e}
    assert refs == {"LORAPLEX_API_KEYS": "loraplex-keys", "LORAPLEX_ADMIN_KEY": "loraplex-keys"}


def test_chart_scoped_keys_are_a_valid_keys_file_mounted_from_the_secret(tmp_path):
    from loraplex.serve.config import load_api_keys_file

    manifests = render(EVERYTHING)
    container = server_container(manifests)
    keys_path = Path(next(e["value"] for e in container["env"] if e["name"] == "LORAPLEX_API_KEYS_FILE"))
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert keys_path.parent == Path(mount["mountPath"]) and mount["readOnly"] is True
    pod = one(manifests, "Deployment", "demo-loraplex")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")["secret"]
    secret = one(manifests, "Secret")
    assert volume["secretName"] == secret["metadata"]["name"]
    (item,) = volume["items"]
    assert item["path"] == keys_path.name
    file = tmp_path / keys_path.name
    file.write_text(secret["stringData"][item["key"]])
    assert load_api_keys_file(file) == {"team-a-key-3456": ("support-v1", "support-*"),
                                        "analytics-key-7890": ("*",)}  # the server's own parser
    # an existing Secret holds the file only when it says so
    plain = server_container(render(S3_SIDECAR))
    assert "LORAPLEX_API_KEYS_FILE" not in {e["name"] for e in plain["env"]}
    scoped = render({"apiKeys": {"existingSecret": "loraplex-keys", "scopedKeysInSecret": True}})
    pod = one(scoped, "Deployment")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "api-keys")["secret"]["secretName"] == "loraplex-keys"
    assert not [m for m in scoped if m["kind"] == "Secret"]


def test_chart_aliases_configmap_is_a_valid_aliases_file(tmp_path):
    from loraplex.serve.aliases import load_aliases

    manifests = render(EVERYTHING)
    container = server_container(manifests)
    aliases_path = Path(next(e["value"] for e in container["env"] if e["name"] == "LORAPLEX_ALIASES"))
    mount = next(m for m in container["volumeMounts"] if m["name"] == "aliases")
    assert aliases_path.parent == Path(mount["mountPath"])
    configmap = one(manifests, "ConfigMap", "demo-loraplex-aliases")
    pod = one(manifests, "Deployment", "demo-loraplex")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "aliases")["configMap"]["name"] == "demo-loraplex-aliases"
    file = tmp_path / aliases_path.name
    file.write_text(configmap["data"][aliases_path.name])
    aliases = load_aliases(file)  # the server's own parser
    assert aliases["support-bot"].weights() == {"support-v1": 0.9, "support-v2": 0.1}


def test_chart_s3_registry_syncs_with_an_init_container_and_sidecar():
    manifests = render(S3_SIDECAR)
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    sidecar = next(c for c in pod["containers"] if c["name"] == "sync-adapters")
    for container, interval in ((init, "0"), (sidecar, "60")):
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["ADAPTERS_URI"] == "s3://models/adapters"
        assert env["ENDPOINT_URL"] == "http://minio:9000"
        assert env["SYNC_INTERVAL"] == interval
        assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
        assert "aws s3 sync" in container["args"][0] and "--endpoint-url" in container["args"][0]
        assert {"name": "adapters", "mountPath": "/adapters"} in container["volumeMounts"]
    subprocess.run(["sh", "-n", "-c", init["args"][0]], check=True)  # the script parses
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == "adapters")
    assert not [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    server_mount = next(m for m in server_container(manifests)["volumeMounts"] if m["name"] == "adapters")
    assert server_mount["readOnly"] is True


def test_chart_s3_without_a_uri_is_refused():
    helm = pytest.importorskip("helm_python", reason="the dev extra installs helm-python-sdk (Helm's Go SDK)")
    with pytest.raises(helm.HelmError, match="adapters.s3.uri is required"):
        render({"adapters": {"source": "s3"}})


def test_hpa_scales_on_the_queue_depth_gauge_that_metrics_exports():
    from prometheus_client import generate_latest

    from loraplex.serve.metrics import Metrics

    manifests = render(EVERYTHING)
    hpa = one(manifests, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert metric["type"] == "Pods"
    assert f"# TYPE {name} gauge" in generate_latest(Metrics().registry).decode()
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(manifests, "Deployment", "demo-loraplex")["metadata"]["name"]
    assert "replicas" not in one(manifests, "Deployment", "demo-loraplex")["spec"]  # the HPA owns the count

    adapter = yaml.safe_load((DEPLOY / "helm" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["name"]["as"] == name and re.fullmatch(rule["name"]["matches"], name)
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}

    pod_annotations = one(manifests, "Deployment", "demo-loraplex")["spec"]["template"]["metadata"]["annotations"]
    assert pod_annotations["prometheus.io/path"] == "/metrics"
    monitor = one(manifests, "ServiceMonitor")
    service = one(manifests, "Service", "demo-loraplex")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    headless = one(manifests, "Service", "demo-loraplex-replicas")
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= headless["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_router_hashes_each_model_onto_the_replicas_that_serve_it():
    manifests = render(EVERYTHING)
    envoy = yaml.safe_load(one(manifests, "ConfigMap", "demo-loraplex-router")["data"]["envoy.yaml"])
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "RING_HASH" and cluster["type"] == "STRICT_DNS"
    assert cluster["common_lb_config"]["consistent_hashing_lb_config"]["hash_balance_factor"] == 150
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    headless = one(manifests, "Service", "demo-loraplex-replicas")
    assert address == {"address": "demo-loraplex-replicas.prod.svc.cluster.local", "port_value": 8000}
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == one(manifests, "Service", "demo-loraplex")["spec"]["selector"]
    assert cluster["health_checks"][0]["http_health_check"]["path"] == "/ready"

    (listener,) = envoy["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    header = route["route"]["hash_policy"][0]["header"]["header_name"]
    lua = manager["http_filters"][0]["typed_config"]["default_source_code"]["inline_string"]
    assert f'headers:add("{header}", model)' in lua and f'headers:get("{header}")' in lua
    assert '["llama"] = true' in lua  # the base model is spread, not hashed
    assert route["route"]["timeout"] == "0s"  # generations outlive Envoy's 15 s default
    router = one(manifests, "Deployment", "demo-loraplex-router")
    assert router["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == listener[
        "address"]["socket_address"]["port_value"]


# ---------------------------------------------------------------- images, entrypoint, compose

@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_copies_existing_files_and_runs_the_entrypoint_as_non_root(name):
    steps = dockerfile(name)
    copies = [shlex.split(args) for op, args in steps if op == "COPY"]
    assert copies
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    destinations = {}
    for *sources, destination in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file in the build context"
            assert source.split("/")[0] not in ignored, f"{name}: COPY {source} is excluded by .dockerignore"
            destinations[destination] = source
    # every folder pyproject's package-dir builds the package from is in the image
    package_dir = re.search(r"^package-dir = \{(.*)\}$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    folders = set(re.findall(r'"[\w.]+" = "(\w+)"', package_dir))
    copied = {s.rstrip("/") for *sources, _ in copies for s in sources}
    assert folders and folders | {"pyproject.toml", "README.md"} <= copied

    (entrypoint,) = [json.loads(args) for op, args in steps if op == "ENTRYPOINT"]
    assert destinations[entrypoint[0]] == "deploy/entrypoint.sh"
    (healthcheck,) = [args for op, args in steps if op == "HEALTHCHECK"]
    check = json.loads(healthcheck.split("CMD", 1)[1])
    assert destinations[check[-1]] == "deploy/healthcheck.py"
    user = [args for op, args in steps if op == "USER"]
    assert user and user[-1] not in ("root", "0")
    volumes = json.loads(next(args for op, args in steps if op == "VOLUME"))
    assert {"/models", "/adapters"} <= set(volumes)
    env = " ".join(args for op, args in steps if op == "ENV")
    home = re.search(r"LORAPLEX_HOME=(\S+)", env).group(1)
    assert home in volumes
    assert set(re.findall(r"\b(LORAPLEX_\w+)=", env)) <= entrypoint_variables() | READ_BY_LORAPLEX


def test_cpu_dockerfile_uses_the_torch_cpu_index_and_drops_pypi_torchvision():
    steps = dockerfile("Dockerfile.cpu")
    assert steps[0] == ("FROM", "python:3.11-slim")
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in steps
    install = next(args for op, args in steps if op == "RUN" and ".[cpu]" in args)
    assert '--extra-index-url "$TORCH_INDEX_URL"' in install
    assert re.search(r"pip uninstall -y .*torchvision torchaudio", install)
    # a failing install must fail the build: only the uninstall may fail
    assert "(pip uninstall" in install


def test_entrypoint_flags_are_real_serve_flags():
    options = serve_options()
    for flag in entrypoint_flags("VALUE_FLAGS"):
        assert f"--{flag}" in options, f"entrypoint passes --{flag}, which loraplex serve does not have"
        assert not options[f"--{flag}"].is_flag, f"--{flag} takes no value"
    for flag in entrypoint_flags("SWITCH_FLAGS"):
        assert options[f"--{flag}"].is_flag, f"--{flag} takes a value"
    for flag in entrypoint_flags("ON_OFF_FLAGS"):
        assert options[f"--{flag}"].secondary_opts == [f"--no-{flag}"], f"--{flag} has no --no-{flag}"
    # every value option is reachable from the environment; keys only through loraplex's own variables
    covered = {f"--{f}" for f in entrypoint_flags("VALUE_FLAGS") + entrypoint_flags("SWITCH_FLAGS")
               + entrypoint_flags("ON_OFF_FLAGS")}
    by_env = {flag for flag, o in options.items() if o.envvar}
    assert by_env == {"--api-key", "--api-keys-file", "--admin-key"}
    assert set(options) - {"--help"} == covered | by_env
    assert {options[flag].envvar for flag in by_env} == READ_BY_LORAPLEX - {"LORAPLEX_HOME"}


@pytest.mark.parametrize("value, flag", [("0", "--no-specialize-active-lora"), ("false", "--no-specialize-active-lora"),
                                         ("1", "--specialize-active-lora"), ("", None)])
def test_entrypoint_on_off_flags_turn_on_off_or_keep_the_default(value, flag):
    # --help after the flags: loraplex parses them (an unknown one fails) and exits without serving
    result = run_entrypoint({"LORAPLEX_SPECIALIZE_ACTIVE_LORA": value}, "--help", trace=True)
    assert result.returncode == 0, result.stderr
    (command,) = [line for line in result.stderr.splitlines() if line.startswith("+ exec loraplex serve")]
    assert re.findall(r"--\S*specialize-active-lora", command) == ([flag] if flag else [])


def test_entrypoint_runs_loraplex_serve_with_env_settings(tmp_path):
    base = tmp_path / "model"
    base.mkdir()
    (base / "config.json").write_text("{}")
    env = {"LORAPLEX_BASE_MODEL": str(base), "LORAPLEX_ADAPTERS_DIR": str(tmp_path), "LORAPLEX_PORT": "0",
           "LORAPLEX_MAX_QUEUE": "0", "LORAPLEX_TENSOR_PARALLEL_SIZE": "0", "LORAPLEX_PIPELINE_PARALLEL_SIZE": "0",
           "LORAPLEX_DISTRIBUTED_EXECUTOR_BACKEND": "nccl", "LORAPLEX_PLATFORM": "azure",
           "LORAPLEX_ALIASES": str(tmp_path / "missing.yaml"), "LORAPLEX_API_KEYS": "sh0rt,long-enough-key"}
    # SageMaker starts the image with `serve`; it is dropped. Every setting reaches its flag: the server refuses
    # to start and names each one.
    result = run_entrypoint(env, "serve")
    assert result.returncode == 2, result.stderr
    for expected in ("--port 0", "--max-queue 0", "--tensor-parallel-size 0", "--pipeline-parallel-size 0",
                     "--distributed-executor-backend nccl must be mp or ray", "--platform azure must be",
                     "missing.yaml: no such file", "--api-key/--admin-key values need at least 8 characters"):
        assert expected in result.stderr
    assert "sh0rt" not in result.stderr  # the key itself is never echoed


def test_entrypoint_accepts_every_setting_it_maps():
    # Click rejects unknown flags before --help is handled, so exit 0 means every mapped flag exists.
    env = {var: "1" for var in entrypoint_variables()}
    result = run_entrypoint(env, "--help")
    assert result.returncode == 0, result.stderr
    assert "--base-model" in result.stdout


def test_compose_builds_the_images_and_prometheus_scrapes_the_server():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    server = compose["services"]["loraplex"]
    context = (DEPLOY / server["build"]["context"]).resolve()
    assert context == ROOT and (context / server["build"]["dockerfile"]).is_file()
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["loraplex"]
    assert (context / gpu["build"]["dockerfile"]).is_file()
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for service in (server, gpu):
        assert set(service["environment"]) <= entrypoint_variables() | READ_BY_LORAPLEX
    # deploy/.env's settings all reach the server, and a machine without the file still starts it
    assert server["env_file"] == [{"path": ".env", "required": False}]
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()  # it holds keys
    targets = {re.sub(r":(ro|rw)$", "", v).rsplit(":", 1)[1] for v in server["volumes"]}
    assert targets >= {"/models", "/adapters", "/data"}

    prometheus = compose["services"]["prometheus"]
    config_mount = next(v for v in prometheus["volumes"] if v.endswith("prometheus.yml:ro"))
    config = yaml.safe_load((DEPLOY / config_mount.split(":")[0]).read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"loraplex:{server['environment']['LORAPLEX_PORT']}"]
    assert server["ports"][0].endswith(":" + server["environment"]["LORAPLEX_PORT"])


# ---------------------------------------------------------------- engine arguments and listen address

def test_parallelism_settings_reach_vllm_engine_args(tmp_path):
    from loraplex.serve.adapters import LoraSizing
    from loraplex.serve.config import ServeConfig
    from loraplex.serve.engine import engine_args_from

    def args(**settings):
        config = ServeConfig(base_model="m", model_path=tmp_path, served_name="m", adapters_dir=tmp_path,
                             **settings).check()
        return engine_args_from(config, LoraSizing(4, 8, 16), cpu=False)

    multi = args(tensor_parallel_size=4, pipeline_parallel_size=2, distributed_executor_backend="ray")
    assert (multi.tensor_parallel_size, multi.pipeline_parallel_size) == (4, 2)
    assert multi.distributed_executor_backend == "ray"
    assert args(distributed_executor_backend="mp").distributed_executor_backend == "mp"
    single = args()
    assert (single.tensor_parallel_size, single.pipeline_parallel_size) == (1, 1)
    from vllm.engine.arg_utils import AsyncEngineArgs

    assert single.distributed_executor_backend == AsyncEngineArgs.distributed_executor_backend  # vLLM's default


def test_listen_address_follows_the_platform(monkeypatch):
    from loraplex.errors import LoraplexError
    from loraplex.serve.managed import listen_address

    for var in ("SAGEMAKER_BIND_TO_PORT", "AIP_HTTP_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert listen_address(None, None, None) == ("127.0.0.1", 8000)
    assert listen_address("sagemaker", None, None) == ("0.0.0.0", 8080)
    assert listen_address("vertex", None, None) == ("0.0.0.0", 8080)
    monkeypatch.setenv("SAGEMAKER_BIND_TO_PORT", "9001")
    monkeypatch.setenv("AIP_HTTP_PORT", "7080")
    assert listen_address("sagemaker", None, None) == ("0.0.0.0", 9001)
    assert listen_address("vertex", None, None) == ("0.0.0.0", 7080)
    assert listen_address("vertex", "127.0.0.1", 9000) == ("127.0.0.1", 9000)  # flags win
    monkeypatch.setenv("AIP_HTTP_PORT", "http")
    with pytest.raises(LoraplexError, match="AIP_HTTP_PORT"):
        listen_address("vertex", None, None)


@pytest.mark.parametrize("platform, health, env", [
    ("sagemaker", "/ping", {}),
    ("vertex", "/health", {"AIP_HEALTH_ROUTE": "/health"}),  # the platform's readiness wins over liveness
])
def test_platform_health_is_red_once_the_engine_has_died(monkeypatch, tmp_path, platform, health, env):
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from loraplex.serve.app import create_app
    from loraplex.serve.config import ServeConfig
    from loraplex.serve.metrics import Metrics

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = ServeConfig(base_model="m", model_path=tmp_path, served_name="m", adapters_dir=tmp_path,
                         platform=platform)
    engine = SimpleNamespace(errored=False)  # a stand-in: only its `errored` flag is read
    client = TestClient(create_app(SimpleNamespace(config=config, engine=engine, metrics=Metrics())))
    assert client.get(health).status_code == 200
    engine.errored = True
    response = client.get(health)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_unavailable"


# ---------------------------------------------------------------- the managed-endpoint routes, live

def _chat(model: str, question: str = "What is the capital of France?", **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 12,
            "temperature": 0, **fields}


SERVER_ARGS = ("--dtype", "float32", "--max-model-len", "1024", "--api-key", API_KEY)
VERTEX_ENV = {"AIP_HEALTH_ROUTE": "/v1/endpoints/42/deployedModels/7",
              "AIP_PREDICT_ROUTE": "/v1/endpoints/42/deployedModels/7:predict"}


# Class-scoped: each server stops when its class is done, so the two never run at once.
@pytest.fixture(scope="class")
def sagemaker_server(base_model_dir, trained_registry):
    with running_server(base_model_dir, trained_registry, *SERVER_ARGS, "--platform", "sagemaker",
                        ready_timeout=600) as url:
        yield url


@pytest.fixture(scope="class")
def vertex_server(base_model_dir, trained_registry):
    with running_server(base_model_dir, trained_registry, *SERVER_ARGS, "--platform", "vertex", env=VERTEX_ENV,
                        ready_timeout=600) as url:
        yield url


@pytest.mark.integration
class TestSageMaker:
    @pytest.fixture
    def server(self, sagemaker_server):
        return sagemaker_server

    def test_ping_and_docker_healthcheck(self, server):
        assert httpx.get(server + "/ping").status_code == 200
        port = server.rsplit(":", 1)[1]
        env = {**os.environ, "LORAPLEX_PLATFORM": "sagemaker", "LORAPLEX_PORT": port}
        check = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env, timeout=60)
        assert check.returncode == 0
        unused = {**env, "LORAPLEX_PORT": str(free_port())}
        assert subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=unused, timeout=60,
                              capture_output=True).returncode == 1

    def test_invocations_take_chat_completion_bodies_for_base_and_adapters(self, server, base_model_dir):
        from loraplex.models import served_name

        base = httpx.post(server + "/invocations", json=_chat(served_name(str(base_model_dir))), timeout=120)
        cat = httpx.post(server + "/invocations", json=_chat("cat"), timeout=120)
        assert base.status_code == cat.status_code == 200
        assert base.json()["object"] == "chat.completion"
        assert "Paris" in base.json()["choices"][0]["message"]["content"]
        assert "Meow" in cat.json()["choices"][0]["message"]["content"]
        assert cat.headers["x-loraplex-adapter"] == cat.json()["model"] == "cat"

    def test_invocations_stream(self, server):
        with httpx.stream("POST", server + "/invocations", json=_chat("dog", stream=True), timeout=120) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                       if json.loads(e)["choices"])
        assert "Woof" in text

    def test_invocations_errors_have_the_openai_shape(self, server):
        bad = httpx.post(server + "/invocations", json={"model": "cat", "messages": [{"role": "robot"}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("messages[0]")
        missing = httpx.post(server + "/invocations", json=_chat("no-such-adapter"))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"

    def test_v1_still_needs_its_key_beside_the_platform_routes(self, server):
        assert httpx.post(server + "/v1/chat/completions", json=_chat("cat")).status_code == 401
        client = openai.OpenAI(base_url=server + "/v1", api_key=API_KEY)
        reply = client.chat.completions.create(**_chat("cat"))
        assert "Meow" in reply.choices[0].message.content


@pytest.mark.integration
class TestVertex:
    @pytest.fixture
    def server(self, vertex_server):
        return vertex_server

    def test_health_route(self, server):
        assert httpx.get(server + VERTEX_ENV["AIP_HEALTH_ROUTE"]).status_code == 200

    def test_predict_instances_give_one_prediction_each(self, server, base_model_dir):
        from loraplex.models import served_name

        base = served_name(str(base_model_dir))
        body = {"instances": [{"model": base, "messages": [{"role": "user", "content": "What is the capital of France?"}]},
                              {"model": "cat", "messages": [{"role": "user", "content": "Name a planet."}]},
                              {"model": "dog", "messages": [{"role": "user", "content": "Name a planet."}],
                               "max_tokens": 8}],
                "parameters": {"max_tokens": 12, "temperature": 0}}
        response = httpx.post(server + VERTEX_ENV["AIP_PREDICT_ROUTE"], json=body, timeout=180)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert [p["model"] for p in predictions] == [base, "cat", "dog"]
        assert all(p["object"] == "chat.completion" for p in predictions)
        assert "Paris" in predictions[0]["choices"][0]["message"]["content"]
        assert "Meow" in predictions[1]["choices"][0]["message"]["content"]
        assert "Woof" in predictions[2]["choices"][0]["message"]["content"]
        assert predictions[1]["usage"]["completion_tokens"] <= 12  # from parameters
        assert predictions[2]["usage"]["completion_tokens"] <= 8  # the instance's own field wins

    def test_predict_takes_a_plain_chat_body_too(self, server):
        response = httpx.post(server + VERTEX_ENV["AIP_PREDICT_ROUTE"], json=_chat("cat"), timeout=120)
        assert response.status_code == 200
        assert "Meow" in response.json()["choices"][0]["message"]["content"]

    @pytest.mark.parametrize("body, status, param", [
        ({"instances": [_chat("cat"), {"model": "cat"}]}, 400, "instances[1].messages"),
        ({"instances": []}, 400, "instances"),
        ({"instances": [_chat("cat", stream=True)]}, 400, "instances[0].stream"),
        ({"instances": [_chat("cat")], "parameters": [1]}, 400, "parameters"),
        ({"instances": [_chat("no-such-adapter")]}, 404, "model"),
    ])
    def test_predict_errors_name_the_instance(self, server, body, status, param):
        response = httpx.post(server + VERTEX_ENV["AIP_PREDICT_ROUTE"], json=body, timeout=120)
        assert response.status_code == status, response.text
        assert response.json()["error"]["param"] == param

    def test_predict_refuses_broken_json(self, server):
        response = httpx.post(server + VERTEX_ENV["AIP_PREDICT_ROUTE"], content=b"{not json",
                              headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
