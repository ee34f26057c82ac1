"""Deployment files, checked offline: Dockerfile, docker-compose.yml, .env.example, Helm chart.

No Docker engine or cluster is needed. The compose file is validated against the Compose
specification (check-jsonschema's vendored schema); the chart is rendered and linted with the
Helm SDK (helm-python-sdk) and every manifest is validated against the Kubernetes OpenAPI
schemas (kubernetes-validate, strict). KubeRay's RayService/RayJob cannot be validated that way
(no CRD is installable offline), so they are checked against tests/schemas/kuberay-v1.schema.json
(the ray.io/v1 fields, closed objects), every pod template inside them strictly as a core/v1
PodTemplate, and the RayService's serveConfigV2 against Ray Serve's schema and against what the
app's own ``deploy_config`` produces for the settings the pods get. Every ``chatreid ...``
command line these files run (RayJob entrypoints included) is parsed against the real CLI
(``chatreid.app.cli.app``), so a renamed command or flag fails here, not in a crash-looping pod.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
CHART = ROOT / "helm" / "chatreid"
GPU_VALUES = CHART / "values-gpu.yaml"
KUBERAY_SCHEMA = ROOT / "tests" / "schemas" / "kuberay-v1.schema.json"

BASE_IMAGE = "python:3.11.7-slim-bookworm"
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "reid", "chatreid"
# Settings the deployment files set before chatreid.config has them (ignored until then: the
# settings model ignores unknown keys). embedder.device: the GPU embedder needs it honoured.
PENDING_SETTINGS: set[tuple[str, ...]] = set()

Argv = list[str]


# --------------------------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuations joined, comments and heredoc bodies dropped."""
    out: list[tuple[str, str]] = []
    lines = iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            nxt = next(lines)
            if not nxt.lstrip().startswith("#"):
                line = line[:-1] + " " + nxt.strip()
        heredoc = re.search(r"<<-?'?(\w+)'?", line)
        if heredoc:
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
        instruction, _, args = line.strip().partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


_VAR = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose interpolation with an empty environment: ``${VAR:-default}`` takes the default;
    a required ``${VAR:?message}`` (a secret) becomes ``<VAR>``, as if set to that."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: f"<{m['name']}>" if (m["op"] or "").endswith("?")
                        else m["default"] or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def as_argv(value: str | list[str] | None) -> Argv:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def chatreid_in_shell(script: str) -> Iterator[Argv]:
    """``chatreid ...`` invocations inside a shell command (stops at redirections/operators)."""
    for segment in re.split(r"&&|\|\||;|\|", script):
        words = shlex.split(segment)
        if words and words[0] == "chatreid":
            argv = words[1:]
            redirect = next((i for i, w in enumerate(argv) if re.match(r"\d*[<>]", w)), None)
            yield argv[:redirect]


def settings_field(env_key: str) -> tuple[str, ...] | None:
    """CHATREID_SECTION__FIELD -> (section, field); CHATREID_FIELD -> (field,); else None."""
    if not env_key.startswith("CHATREID_"):
        return None
    return tuple(env_key.removeprefix("CHATREID_").lower().split("__"))


def assert_known_setting(env_key: str) -> None:
    from chatreid.config import Settings

    path = settings_field(env_key)
    assert path, env_key
    if path in PENDING_SETTINGS:
        return
    model: Any = Settings
    for part in path:
        assert part in model.model_fields, f"{env_key}: no setting {'.'.join(path)}"
        model = model.model_fields[part].annotation


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(compose_raw: dict[str, Any]) -> dict[str, Any]:
    return interpolate(compose_raw)


@pytest.fixture(scope="module")
def helm() -> Any:
    import helm_python  # required (dev extra): a broken install fails here, never skips

    return helm_python


@pytest.fixture(scope="module")
def gpu_values(helm: Any) -> dict[str, Any]:
    return helm.values_from_yaml(GPU_VALUES.read_text())


def merged(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Deep merge of values layers (later wins), the way ``-f a.yaml -f b.yaml`` combines them."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = json.loads(json.dumps(value))
    return out


# The secrets every install must give (the chart has no default for any of them).
SECRET_VALUES: dict[str, Any] = {
    "s3": {"accessKey": "s3-access-key", "secretKey": "s3-secret-key"},
    "retrieval": {"apiKey": "api-key-default"},
    "ray": {"auth": {"token": "ray-token-value"}},
}


def render_all(helm: Any, values: dict[str, Any] | None, secrets: bool = True) -> dict[str, str]:
    """Every rendered template (NOTES.txt included), by path; ``secrets``: with SECRET_VALUES
    under ``values``."""
    if secrets:
        values = merged(SECRET_VALUES, values)
    with helm.Chart.load(CHART) as chart:
        manifests: dict[str, str] = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    return manifests


def render(helm: Any, values: dict[str, Any] | None, secrets: bool = True) -> list[dict[str, Any]]:
    """Render the chart offline; the Kubernetes objects (NOTES.txt and empty docs dropped)."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render_all(helm, values, secrets).items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


# Everything on at once: GPUs, training, autoscaled ingestor and embedder, SASL, an API key, an
# Ingress. The validation tests run over this as well as over the defaults.
FULL_VALUES: dict[str, Any] = {
    "kafka": {"sasl": {"enabled": True, "username": "chatreid", "password": "kafka-pass"}},
    "ingestor": {"autoscaling": {"enabled": True},
                 "ingress": {"enabled": True, "host": "upload.example.com"}},
    "embedder": {"autoscaling": {"enabled": True}},
    "retrieval": {
        "apiKey": "api-key-value",
        "publicUrl": "https://reid.example.com",
        "rerankAutoscaling": {"enabled": True, "maxReplicas": 4},
        "prefilterShards": 3,  # the `prefilter` worker group and PrefilterShard0..2
        "ingress": {"enabled": True, "className": "nginx", "host": "reid.example.com",
                    "tls": [{"hosts": ["reid.example.com"], "secretName": "reid-tls"}]},
    },
    "training": {"enabled": True, "workers": 2},
    "extraConfig": {"CHATREID_INDEX__EXACT_MAX": "100000"},
}


@pytest.fixture(scope="module")
def rendered_default(helm: Any) -> list[dict[str, Any]]:
    return render(helm, None)


@pytest.fixture(scope="module")
def rendered_gpu(helm: Any, gpu_values: dict[str, Any]) -> list[dict[str, Any]]:
    return render(helm, gpu_values)


@pytest.fixture(scope="module")
def rendered_full(helm: Any, gpu_values: dict[str, Any]) -> list[dict[str, Any]]:
    return render(helm, merged(gpu_values, FULL_VALUES))


@pytest.fixture(scope="module")
def rendered_training(helm: Any) -> list[dict[str, Any]]:
    return render(helm, {"training": {"enabled": True}})


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


WORKLOAD_KINDS = {"Deployment", "Job", "StatefulSet", "DaemonSet", "CronJob"}
RAY_KINDS = {"RayService", "RayJob"}


def workload_template(doc: dict[str, Any]) -> dict[str, Any]:
    """The PodTemplateSpec of a workload (a CronJob's is inside its jobTemplate)."""
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    return spec["template"]


def ray_cluster(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayClusterSpec of a RayService or RayJob."""
    spec = doc["spec"]
    return spec["rayClusterConfig"] if doc["kind"] == "RayService" else spec["rayClusterSpec"]


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) of every pod the chart defines, Ray pods and submitters included."""
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in WORKLOAD_KINDS:
            yield where, workload_template(doc)
        elif doc["kind"] in RAY_KINDS:
            cluster = ray_cluster(doc)
            yield f"{where}/head", cluster["headGroupSpec"]["template"]
            for group in cluster.get("workerGroupSpecs", []):
                yield f"{where}/{group['groupName']}", group["template"]
            if "submitterPodTemplate" in doc["spec"]:
                yield f"{where}/submitter", doc["spec"]["submitterPodTemplate"]


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, template in pod_templates(docs):
        for c in template["spec"]["containers"]:
            yield f"{where}/{c['name']}", c


def secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """env name -> (Secret name, key) for the container's secretKeyRef variables."""
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------


def test_dockerfile_structure() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    global_args = {}
    for name, args in instructions:
        if name == "FROM":
            break
        if name == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default
    froms = [args for name, args in instructions if name == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    for spec in froms:
        image = spec.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], image)
        assert image == BASE_IMAGE, spec

    final_stage = instructions[max(i for i, (n, _) in enumerate(instructions) if n == "FROM") :]
    users = [args for name, args in final_stage if name == "USER"]
    assert users, "the runtime stage must drop root"
    assert users[-1].split(":")[0] not in {"root", "0"}

    args = {a.split("=")[0] for n, a in instructions if n == "ARG"}
    assert {"VARIANT", "TORCH_VERSION"} <= args
    text = DOCKERFILE.read_text()
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert '["optional-dependencies"]["gpu"]' in text  # the cuda variant adds the gpu extra

    entrypoints = [json.loads(a) for n, a in final_stage if n == "ENTRYPOINT"]
    assert entrypoints[-1] == ["chatreid"]


def test_dockerignore_keeps_context_small_and_secret_free() -> None:
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()}
    assert {".venv", ".git", ".env", "**/__pycache__"} <= patterns
    # What `pip install .` needs must stay in the context.
    for needed in ("pyproject.toml", "setup.py", "README.md", "chatreid", "schemas"):
        assert needed not in patterns


def dockerfile_commands() -> list[tuple[str, Argv]]:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    final = instructions[max(i for i, (n, _) in enumerate(instructions) if n == "FROM") :]
    entry = [json.loads(a) for n, a in final if n == "ENTRYPOINT"][-1]
    cmd = [json.loads(a) for n, a in final if n == "CMD"]
    found = [("Dockerfile ENTRYPOINT+CMD", [*entry[1:], *(cmd[-1] if cmd else [])])]
    for name, args in instructions:
        if name == "RUN":
            found += [("Dockerfile RUN", argv) for argv in chatreid_in_shell(args)]
    return found


# --------------------------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------------------------


def test_compose_validates_against_compose_spec(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    ok = subprocess.run([*cmd, str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # The check has teeth: a misspelt key is rejected.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:", "    healthchek:", 1))
    bad = subprocess.run([*cmd, str(broken)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "healthchek" in bad.stdout + bad.stderr


def chatreid_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("image", "").startswith("chatreid:")
    }


def test_compose_services_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "minio", "ray-head", "init", "ingestor", "ingestor-synth", "embedder"} <= set(
        services
    )
    assert {"embedder-gpu", "ray-worker", "ray-worker-gpu", "retrieval"} <= set(services)
    one_shots = {n for n, svc in services.items() if svc.get("restart") == "no"}
    assert one_shots == {"init", "train-embedder", "train-stage1", "train-stage2", "train-stage3",
                         "purge"}
    for name, svc in services.items():
        if name not in one_shots:  # long-running: compose must know when it is healthy
            assert "healthcheck" in svc, f"{name} has no health check"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond["condition"] in {
                "service_healthy",
                "service_completed_successfully",
            }
    # Everything that uses the bus waits for the one-shot init to have succeeded.
    for name in ("ingestor", "ingestor-synth", "embedder", "embedder-gpu"):
        cond = services[name]["depends_on"]["init"]["condition"]
        assert cond == "service_completed_successfully", name
    assert services["init"]["restart"] == "no"
    assert services["init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["ingestor-synth"]["profiles"] == ["demo"]
    assert services["embedder-gpu"]["profiles"] == ["gpu"]
    assert services["ray-worker-gpu"]["profiles"] == ["gpu"]
    # The API is deployed once the cluster and the topics exist; stages train in order.
    assert set(services["retrieval"]["depends_on"]) == {"init", "ray-head"}
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    for stage, before in (("train-stage2", "train-stage1"), ("train-stage3", "train-stage2")):
        cond = services[stage]["depends_on"][before]["condition"]
        assert cond == "service_completed_successfully", stage
    for name in ("train-embedder", "train-stage1", "train-stage2", "train-stage3"):
        assert services[name]["profiles"] == ["train"], name
    assert services["purge"]["profiles"] == ["maintenance"]
    assert services["purge"]["command"] == ["purge"]


def test_compose_kafka_is_kraft_and_images_are_pinned(compose: dict[str, Any]) -> None:
    services = compose["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "zookeeper" not in json.dumps(kafka).lower()
    assert "minio" in services["minio"]["image"]
    for name, svc in services.items():
        image = svc["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: image {image!r} is not pinned"


def test_compose_volumes_and_gpu_profile(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    for name, svc in compose["services"].items():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
            assert source in declared, f"{name}: undeclared named volume {source}"
    assert {"kafka-data", "minio-data"} <= declared

    for name in ("embedder-gpu", "ray-worker-gpu"):
        gpu = compose["services"][name]
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
        assert gpu["build"]["args"]["VARIANT"] == "cuda"
    assert compose["services"]["embedder-gpu"]["environment"]["CHATREID_EMBEDDER__DEVICE"] == "cuda"
    assert "--num-gpus=1" in compose["services"]["ray-worker-gpu"]["command"]
    # Ray nodes and training share the world and outputs at one path.
    work = {n for n, svc in compose["services"].items()
            if "work:/home/chatreid/work" in svc.get("volumes", [])}
    assert {"ray-head", "ray-worker", "ray-worker-gpu", "train-stage1"} <= work


def test_compose_settings_come_from_env(compose: dict[str, Any]) -> None:
    for name, svc in chatreid_services(compose).items():
        env = svc["environment"]
        assert env["CHATREID_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:19092", name
        assert env["CHATREID_S3__ENDPOINT"] == "minio:9000", name
        assert {"path": ".env", "required": False} in svc["env_file"], name
        for key in env:
            if not key.startswith("RAY_AUTH_"):  # Ray's own (token auth), not a setting
                assert_known_setting(key)
    # MinIO's root credentials and the clients' keys are one pair of variables.
    minio = compose["services"]["minio"]["environment"]
    embedder = compose["services"]["embedder"]["environment"]
    assert minio["MINIO_ROOT_USER"] == embedder["CHATREID_S3__ACCESS_KEY"]
    assert minio["MINIO_ROOT_PASSWORD"] == embedder["CHATREID_S3__SECRET_KEY"]
    # One prefilter shard count for every container (the `retrieval` deploy binds the shards,
    # the embedder re-indexes shard by shard); 1 unless .env says otherwise.
    shards = {name: svc["environment"]["CHATREID_INDEX__SHARDS"]
              for name, svc in chatreid_services(compose).items()}
    assert set(shards.values()) == {"1"}, shards
    assert "${CHATREID_INDEX__SHARDS:-1}" in COMPOSE.read_text()


def test_env_example_documents_every_variable() -> None:
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))
    yaml_lines = [ln for ln in COMPOSE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    used = {m["name"] for m in _VAR.finditer("\n".join(yaml_lines))}
    assert used <= documented, f"undocumented in .env.example: {sorted(used - documented)}"
    for key in documented:
        if "__" in key:  # CHATREID_SECTION__FIELD: must be a real setting
            assert_known_setting(key)


def test_compose_python_healthchecks_compile(compose: dict[str, Any]) -> None:
    """Inline ``python -c`` health checks: valid code whose imports exist."""
    for name, svc in compose["services"].items():
        test = as_argv(svc.get("healthcheck", {}).get("test"))
        if test[1:3] != ["python", "-c"]:
            continue
        tree = ast.parse(test[3])
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{name}: {node.module}.{alias.name}"


def compose_commands(compose: dict[str, Any]) -> list[tuple[str, Argv]]:
    found: list[tuple[str, Argv]] = []
    for name, svc in chatreid_services(compose).items():
        entry = as_argv(svc.get("entrypoint"))
        if entry in ([], ["chatreid"]):
            found.append((f"compose {name}", as_argv(svc.get("command"))))
        test = as_argv(svc.get("healthcheck", {}).get("test"))
        if test[:2] == ["CMD", "chatreid"]:
            found.append((f"compose {name} healthcheck", test[2:]))
        elif test[:1] == ["CMD-SHELL"]:
            found += [(f"compose {name} healthcheck", a) for a in chatreid_in_shell(test[1])]
    return found


def test_ray_head_flags_exist(compose: dict[str, Any]) -> None:
    """The Ray head runs `ray start` from the chatreid image: its flags must exist too."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray, "the ray CLI (ray[serve,train], a required dependency) is not installed"
    head = compose["services"]["ray-head"]
    assert as_argv(head["entrypoint"]) == ["ray"]
    argv = as_argv(head["command"])
    assert argv[0] == "start"
    out = subprocess.run([ray, "start", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in (w.split("=")[0] for w in argv if w.startswith("--")):
        assert flag in out.stdout, f"ray start has no {flag}"


# --------------------------------------------------------------------------------------------
# Helm chart
# --------------------------------------------------------------------------------------------


def test_values_gpu_file_parses(gpu_values: dict[str, Any]) -> None:
    assert gpu_values["embedder"]["imageVariant"] == "cuda"
    assert gpu_values["retrieval"]["rerankNumGpus"] == 1
    assert gpu_values["retrieval"]["gpuWorkers"]["enabled"] is True
    assert gpu_values["training"]["gpuWorkers"]["enabled"] is True


@pytest.mark.parametrize("variant", ["default", "gpu", "full"])
def test_chart_lints_clean(helm: Any, gpu_values: dict[str, Any], variant: str) -> None:
    values = {"default": None, "gpu": gpu_values, "full": merged(gpu_values, FULL_VALUES)}
    report = helm.lint(CHART, values=merged(SECRET_VALUES, values[variant]), strict=True,
                       namespace=NAMESPACE)
    assert report["errors"] == [], report
    # Severity 2 = warning, 3 = error; 1 (info, e.g. "icon is recommended") is fine.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


# -- KubeRay objects: no CRD can be installed offline, so a JSON Schema of the ray.io/v1 fields
# -- (tests/schemas/kuberay-v1.schema.json), strict core/v1 validation of every embedded pod
# -- template, and the Serve config checked against Ray Serve's own schema.


@pytest.fixture(scope="module")
def kuberay_validator() -> Any:
    import jsonschema

    schema = json.loads(KUBERAY_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def kuberay_schema_errors(validator: Any, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    ]


def validate_pod_template(kv: Any, template: dict[str, Any], where: str) -> None:
    """A PodTemplateSpec, strictly, as the core/v1 PodTemplate object that wraps one."""
    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
               "template": template}
    try:
        kv.validate(wrapper, KUBE_VERSION, strict=True)
    except kv.ValidationError as exc:
        pytest.fail(f"{where}: {exc.message}")


def serve_schema_check(config: dict[str, Any], where: str) -> None:
    """The Serve config validates against Ray Serve's ServeDeploySchema and loses nothing there
    (the schema ignores unknown fields, so a misspelt one shows up as a lost field)."""
    with warnings.catch_warnings():  # Ray Serve's own pydantic deprecations, on first import
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray.serve.schema import ServeDeploySchema

    model = ServeDeploySchema.model_validate(config)
    assert model.model_dump(mode="json", exclude_unset=True) == config, where


def validate_kuberay(kv: Any, validator: Any, doc: dict[str, Any]) -> None:
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    errors = kuberay_schema_errors(validator, doc)
    assert errors == [], f"{where}:\n" + "\n".join(errors)
    cluster = ray_cluster(doc)
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    for group in groups:
        # KubeRay hands these to `ray start --<key>=<value>`: strings only (the schema says so
        # too; this keeps the message plain).
        for key, value in group.get("rayStartParams", {}).items():
            assert isinstance(value, str), f"{where}: rayStartParams.{key}={value!r}"
        spec = group["template"]["spec"]
        # KubeRay: the Ray container is the first; it generates the command (`ray start`);
        # autoscaler v2 wants the restart policy unset (or Never).
        ray_container = spec["containers"][0]
        assert ray_container["name"] in {"ray-head", "ray-worker"}, where
        assert "command" not in ray_container and "args" not in ray_container, where
        assert spec.get("restartPolicy", "Never") == "Never", where
    for name, template in pod_templates([doc]):
        validate_pod_template(kv, template, name)
    options = cluster.get("autoscalerOptions")
    if options:  # its Kubernetes-typed fields, checked as the container they configure
        sidecar = {"name": "autoscaler", "image": "x"}
        for key in ("resources", "securityContext", "env", "envFrom", "volumeMounts"):
            if key in options:
                sidecar[key] = options[key]
        validate_pod_template(kv, {"spec": {"containers": [sidecar]}}, f"{where}/autoscaler")
    if doc["kind"] == "RayService":
        serve_schema_check(yaml.safe_load(doc["spec"]["serveConfigV2"]), where)


def validate_all(docs: list[dict[str, Any]], validator: Any) -> None:
    import kubernetes_validate as kv
    for doc in docs:
        if doc["kind"] in RAY_KINDS:
            validate_kuberay(kv, validator, doc)
            continue
        try:
            kv.validate(doc, KUBE_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")


DEFAULT_KINDS = sorted([
    "ConfigMap", "ConfigMap", "Secret", "ServiceAccount", "Deployment", "Deployment", "Service",
    "Job", "RayService", "PodDisruptionBudget", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy",
    "CronJob",
])


@pytest.mark.parametrize("variant", ["default", "gpu"])
def test_rendered_manifests_validate(
    rendered_default: list[dict[str, Any]],
    rendered_gpu: list[dict[str, Any]],
    kuberay_validator: Any,
    variant: str,
) -> None:
    docs = rendered_gpu if variant == "gpu" else rendered_default
    assert sorted(d["kind"] for d in docs) == DEFAULT_KINDS
    validate_all(docs, kuberay_validator)


def test_rendered_manifests_validate_full(
    rendered_full: list[dict[str, Any]], kuberay_validator: Any
) -> None:
    counts: dict[str, int] = {}
    for doc in rendered_full:
        counts[doc["kind"]] = counts.get(doc["kind"], 0) + 1
    assert counts == {
        "ConfigMap": 2, "Secret": 1, "ServiceAccount": 1, "Service": 1, "Job": 1,
        "Deployment": 3,  # ingestor, embedder workers, embedder snapshot replica
        "HorizontalPodAutoscaler": 2, "PodDisruptionBudget": 3, "Ingress": 2,
        "NetworkPolicy": 4, "RayService": 1, "RayJob": 4, "CronJob": 1,
    }
    validate_all(rendered_full, kuberay_validator)


def test_kubernetes_validate_has_teeth(rendered_default: list[dict[str, Any]]) -> None:
    import kubernetes_validate as kv
    deployment = next(iter(by_kind(rendered_default, "Deployment").values()))
    deployment = json.loads(json.dumps(deployment))  # a copy: the fixture is shared
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBE_VERSION, strict=True)


def test_kuberay_checks_have_teeth(
    rendered_full: list[dict[str, Any]], kuberay_validator: Any
) -> None:
    """Each mutation is a mistake the real CRD or KubeRay would reject (or silently drop)."""
    import kubernetes_validate as kv
    service = next(iter(by_kind(rendered_full, "RayService").values()))
    job = next(iter(by_kind(rendered_full, "RayJob").values()))

    def broken(doc: dict[str, Any], mutate: Any) -> dict[str, Any]:
        copy = json.loads(json.dumps(doc))
        mutate(copy)
        return copy

    cases = {
        "misspelt spec field": broken(service, lambda d: d["spec"].update(
            upgradeStrategyy=d["spec"].pop("upgradeStrategy"))),
        "misspelt head field": broken(service, lambda d: d["spec"]["rayClusterConfig"][
            "headGroupSpec"].update(rayStartParam={})),
        "misspelt worker field": broken(service, lambda d: d["spec"]["rayClusterConfig"][
            "workerGroupSpecs"][0].update(maxReplica=3)),
        "int rayStartParams value": broken(service, lambda d: d["spec"]["rayClusterConfig"][
            "headGroupSpec"]["rayStartParams"].update({"num-cpus": 0})),
        "unknown upgrade type": broken(service, lambda d: d["spec"]["upgradeStrategy"].update(
            type="BlueGreen")),
        "autoscaler typo": broken(service, lambda d: d["spec"]["rayClusterConfig"][
            "autoscalerOptions"].update(upscalingMode="Fast")),
        "name too long for KubeRay": broken(service, lambda d: d["metadata"].update(
            name="x" * 48)),
        "suspended job keeping its cluster": broken(job, lambda d: d["spec"].update(
            suspend=True, shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0)),
        "ttl without shutdown": broken(job, lambda d: d["spec"].update(
            shutdownAfterJobFinishes=False)),
        "unknown submission mode": broken(job, lambda d: d["spec"].update(
            submissionMode="K8sJob")),
        "misspelt job field": broken(job, lambda d: d["spec"].update(
            entryPoint=d["spec"]["entrypoint"])),
    }
    for name, doc in cases.items():
        assert kuberay_schema_errors(kuberay_validator, doc), name
    # ... and an embedded pod template is checked as strictly as a Deployment's.
    template = json.loads(json.dumps(ray_cluster(service)["headGroupSpec"]["template"]))
    template["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(pytest.fail.Exception):
        validate_pod_template(kv, template, "head")
    # ... and the Serve config against Ray Serve's schema, a misspelt field included.
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["applications"][0]["deployments"][0]["num_replica"] = 2
    with pytest.raises(AssertionError):
        serve_schema_check(config, "serveConfigV2")


# -- serveConfigV2 is exactly what the app's own code produces for the pods' settings.


def pod_environment(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets: its ConfigMaps, then its env (Secrets resolved)."""
    configmaps, secrets = by_kind(docs, "ConfigMap"), by_kind(docs, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        data = configmaps[source["configMapRef"]["name"]]["data"]
        assert not set(data) & set(env), "a setting in two ConfigMaps"
        env.update(data)
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]]["stringData"][ref["key"]]
    return env


@pytest.fixture(scope="module")
def deploy_config() -> Any:
    """``deploy_config`` of the retrieval app (imports torch via chatreid.query: slow once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from services.retrieval.app import deploy_config

    return deploy_config


SERVE_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu": {"retrieval": {"rerankNumGpus": 1, "rerankNumCpus": 2,
                          "gpuWorkers": {"enabled": True}}},
    "tuned": {"retrieval": {
        "model": "20250101T000000-3f2a9c", "port": 8080, "fallbackModel": "",
        "ingressReplicas": 2, "prefilterReplicas": 3, "lightNumCpus": 0.25,
        "rerankNumCpus": 0.5, "rerankMaxOngoingRequests": 8, "torchThreads": 4,
        "rerankAutoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6,
                              "targetOngoingRequests": 3},
        "apiKey": "k",
    }},
    # Three prefilter shards of two replicas each (and the `prefilter` worker group).
    "sharded": {"retrieval": {"prefilterShards": 3, "prefilterReplicas": 2}},
    "sharded-gpu": {"retrieval": {"prefilterShards": 2, "rerankNumGpus": 1, "rerankNumCpus": 2,
                                  "gpuWorkers": {"enabled": True},
                                  "prefilterWorkers": {"rayResource": "shard_slot"}}},
}


@pytest.mark.parametrize("variant", sorted(SERVE_VARIANTS))
def test_serve_config_is_deploy_config(
    helm: Any, deploy_config: Any, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    docs = render(helm, SERVE_VARIANTS[variant])
    service = by_kind(docs, "RayService")[f"{RELEASE}-chatreid-retrieval"]
    cluster = ray_cluster(service)
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [g["template"] for g in cluster["workerGroupSpecs"]]
    environments = [pod_environment(docs, t["spec"]["containers"][0]) for t in templates]
    assert all(env == environments[0] for env in environments), "Ray pods differ in settings"
    for key in environments[0]:
        if key.startswith("CHATREID_"):
            assert_known_setting(key)
    settings = settings_of(docs, templates[0]["spec"]["containers"][0], monkeypatch)
    expected = deploy_config(settings, portable=True)
    rendered = yaml.safe_load(service["spec"]["serveConfigV2"])
    # Exactly, types included (1.0 is not 1): what `chatreid serve --print-config` prints here.
    assert json.dumps(rendered, sort_keys=True) == json.dumps(expected, sort_keys=True)
    serve_schema_check(rendered, "serveConfigV2")
    # The Serve port is the one the pods expose, KubeRay's serve Service uses and policies open.
    serve_ports = {p["containerPort"] for t in templates for p in t["spec"]["containers"][0]
                   .get("ports", []) if p["name"] == "serve"}
    assert serve_ports == {settings.serve.http_port}
    assert settings.serve.http_host == "0.0.0.0"


def ray_pod_annotations(docs: list[dict[str, Any]]) -> list[dict[str, str]]:
    service = next(iter(by_kind(docs, "RayService").values()))
    return [t["metadata"]["annotations"] for _, t in pod_templates([service])]


def test_model_rollout_is_in_place(helm: Any) -> None:
    """A new model (or replica counts) changes serveConfigV2 only: KubeRay applies that in
    place. Settings the app reads from the pod environment roll the cluster instead."""
    base = render(helm, None)
    rollout = render(helm, {"retrieval": {"model": "20250102T000000-aa11bb", "rerankReplicas": 2}})
    assert ray_pod_annotations(rollout) == ray_pod_annotations(base)
    # ... and the other workloads do not restart for it either.
    for name in (f"{RELEASE}-chatreid-ingestor", f"{RELEASE}-chatreid-embedder"):
        before = by_kind(base, "Deployment")[name]["spec"]["template"]["metadata"]
        after = by_kind(rollout, "Deployment")[name]["spec"]["template"]["metadata"]
        assert before == after, name
    config = yaml.safe_load(
        next(iter(by_kind(rollout, "RayService").values()))["spec"]["serveConfigV2"])
    rerank = config["applications"][0]["deployments"][2]
    assert rerank["user_config"] == {"model": "20250102T000000-aa11bb"}
    assert rerank["num_replicas"] == 2
    for change in ({"retrieval": {"stage": "stage2"}}, {"kafka": {"bootstrapServers": "k:9092"}},
                   {"retrieval": {"apiKey": "new"}}, {"retrieval": {"torchThreads": 2}},
                   {"retrieval": {"prefilterShards": 2}}):  # the app reads it from the pods
        assert ray_pod_annotations(render(helm, change)) != ray_pod_annotations(base), change


# -- The RayService


def test_retrieval_rayservice(rendered_default: list[dict[str, Any]]) -> None:
    import ray

    service = by_kind(rendered_default, "RayService")[f"{RELEASE}-chatreid-retrieval"]
    spec = service["spec"]
    cluster = spec["rayClusterConfig"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    pinned = re.search(r'"ray\[[\w,]+\]==([\w.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned and cluster["rayVersion"] == pinned[1] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["upscalingMode"] == "Default"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-cpus"] == "0"  # the app runs on workers
    (cpu,) = cluster["workerGroupSpecs"]  # no GPU group by default
    assert (cpu["groupName"], cpu["replicas"], cpu["minReplicas"], cpu["maxReplicas"]) == (
        "cpu", 1, 1, 4)

    head_pod = head["template"]
    head_container = head_pod["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head_container["ports"]} == {
        "gcs-server": 6379, "dashboard": 8265, "serve": 8000}
    # The autoscaler sidecar needs an API token on the head; nothing else gets one.
    assert head_pod["spec"]["automountServiceAccountToken"] is True
    assert cpu["template"]["spec"]["automountServiceAccountToken"] is False
    for where, template in pod_templates([service]):
        labels = template["metadata"]["labels"]
        assert labels == {"app.kubernetes.io/name": "chatreid",
                          "app.kubernetes.io/instance": RELEASE,
                          "app.kubernetes.io/component": "retrieval"}, where
        pod = template["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "chatreid:0.1.0", where
        assert [e["configMapRef"]["name"] for e in container["envFrom"]] == [
            f"{RELEASE}-chatreid", f"{RELEASE}-chatreid-serve"], where
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HOME"] == "/tmp" and env["CHATREID_RAY__ADDRESS"] == "auto", where
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        # Ray writes its session under /tmp/ray and keeps objects in /dev/shm.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert set(mounts) == {"/tmp", "/dev/shm"}, where
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where
        assert "emptyDir" in volumes[mounts["/tmp"]], where
        assert container["resources"]["requests"], where
        assert "readinessProbe" in container and "livenessProbe" in container, where
    # Serve workers are ready only with a live Serve proxy (what KubeRay's default checks).
    readiness = cpu["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
    assert "http://127.0.0.1:8000/-/healthz" in readiness
    options = cluster["autoscalerOptions"]
    assert {"name": "tmp", "mountPath": "/tmp"} in options["volumeMounts"]
    assert options["securityContext"]["readOnlyRootFilesystem"] is True


def test_ray_probes_compile(rendered_full: list[dict[str, Any]]) -> None:
    """The Ray containers' probes are Python (the image has no wget): valid code, and the ports
    they poll are the ones the node listens on."""
    for where, container in containers(rendered_full):
        for probe in ("readinessProbe", "livenessProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command", [])
            if command[:2] != ["python", "-c"]:
                continue
            ast.parse(command[2])
            for url in command[3:]:
                port = int(url.split(":")[2].split("/")[0])
                assert port in {52365, 8265, 8000}, f"{where} {probe}: {url}"


@pytest.fixture(scope="module")
def ray_start_help() -> str:
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray, "the ray CLI (ray[serve,train], a required dependency) is not installed"
    out = subprocess.run([ray, "start", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_ray_start_params_exist(rendered_full: list[dict[str, Any]], ray_start_help: str) -> None:
    """Every rayStartParams key becomes `ray start --<key>=<value>`: the flag must exist."""
    found = 0
    for doc in rendered_full:
        if doc["kind"] in RAY_KINDS:
            cluster = ray_cluster(doc)
            for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
                for key in group.get("rayStartParams", {}):
                    found += 1
                    assert re.search(rf"--{re.escape(key)}\b", ray_start_help), key
    assert found


def test_chart_gpu_values(helm: Any, gpu_values: dict[str, Any]) -> None:
    docs = render(helm, merged(gpu_values, {"training": {"enabled": True}}))
    deployments = by_kind(docs, "Deployment")
    embedder = deployments[f"{RELEASE}-chatreid-embedder"]["spec"]["template"]["spec"]
    (container,) = embedder["containers"]
    assert container["image"] == "chatreid:0.1.0-cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in embedder["tolerations"])
    ingestor = deployments[f"{RELEASE}-chatreid-ingestor"]["spec"]["template"]["spec"]
    assert ingestor["containers"][0]["image"] == "chatreid:0.1.0"
    configmaps = by_kind(docs, "ConfigMap")
    assert configmaps[f"{RELEASE}-chatreid"]["data"]["CHATREID_EMBEDDER__DEVICE"] == "cuda"
    assert configmaps[f"{RELEASE}-chatreid-serve"]["data"]["CHATREID_SERVE__RERANK_NUM_GPUS"] \
        == "1.0"

    # Every Ray cluster (the RayService and each RayJob) has a GPU group on GPU nodes.
    ray_docs = [*by_kind(docs, "RayService").values(), *by_kind(docs, "RayJob").values()]
    assert len(ray_docs) == 5
    for doc in ray_docs:
        groups = {g["groupName"]: g for g in ray_cluster(doc)["workerGroupSpecs"]}
        assert set(groups) == {"cpu", "gpu"}, doc["metadata"]["name"]
        gpu_pod = groups["gpu"]["template"]["spec"]
        (gpu_container,) = gpu_pod["containers"]
        assert gpu_container["image"] == "chatreid:0.1.0-cuda"
        assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule"
                   for t in gpu_pod["tolerations"])
        assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        cpu_container = groups["cpu"]["template"]["spec"]["containers"][0]
        assert cpu_container["image"] == "chatreid:0.1.0"
        assert "nvidia.com/gpu" not in cpu_container["resources"].get("limits", {})
        assert ray_cluster(doc)["headGroupSpec"]["template"]["spec"]["containers"][0][
            "image"] == "chatreid:0.1.0"
    service = next(iter(by_kind(docs, "RayService").values()))
    rerank = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["deployments"][2]
    assert rerank["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1.0}
    for job in by_kind(docs, "RayJob").values():
        assert shlex.split(job["spec"]["entrypoint"])[-1] == "--gpu"


# -- Prefilter shards (retrieval.prefilterShards; docs/scale.md)


def shard_deployments(service: dict[str, Any]) -> list[dict[str, Any]]:
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    return [d for d in config["applications"][0]["deployments"]
            if d["name"].startswith("PrefilterShard")]


def test_prefilter_shards(helm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three shards: PrefilterShard0..2 in serveConfigV2 (equal to deploy_config's: see
    test_serve_config_is_deploy_config), a fixed `prefilter` worker group of shards x
    replicas pods that each offer one unit of the custom resource the shard replicas ask
    for, and the shard count in every pod's settings (the embedder re-indexes by shard)."""
    docs = render(helm, {"retrieval": {"prefilterShards": 3, "prefilterReplicas": 2}})
    service = by_kind(docs, "RayService")[f"{RELEASE}-chatreid-retrieval"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert [d["name"] for d in config["applications"][0]["deployments"]] == [
        "Ingress", "Prefilter", "PrefilterShard0", "PrefilterShard1", "PrefilterShard2",
        "Rerank"]
    for shard in shard_deployments(service):
        assert shard["num_replicas"] == 2
        assert shard["ray_actor_options"] == {"num_cpus": 0.0,
                                              "resources": {"prefilter_shard": 1.0}}

    groups = {g["groupName"]: g for g in ray_cluster(service)["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "prefilter"}
    group = groups["prefilter"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (6, 6, 6)
    params = group["rayStartParams"]
    assert params["num-cpus"] == "0"  # nothing but shard replicas lands here
    # KubeRay runs `ray start ... --resources=<value>` in a shell: the value is KubeRay's
    # documented form, a JSON map in literal quotes, and the shell hands Ray the map.
    assert params["resources"] == '"{\\"prefilter_shard\\": 1}"'
    assert json.loads(shlex.split(f"--resources={params['resources']}")[0].partition("=")[2]
                      ) == {"prefilter_shard": 1}
    pod = group["template"]["spec"]
    assert pod["containers"][0]["image"] == "chatreid:0.1.0"
    assert pod["containers"][0]["resources"]["requests"]["memory"] == "8Gi"
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"].get("limits", {})

    # Every pod (Ray pods, the embedder, the purge) starts with index.shards = 3.
    data = by_kind(docs, "ConfigMap")[f"{RELEASE}-chatreid"]["data"]
    assert data["CHATREID_INDEX__SHARDS"] == "3"
    embedder = by_kind(docs, "Deployment")[f"{RELEASE}-chatreid-embedder"]
    container = embedder["spec"]["template"]["spec"]["containers"][0]
    assert settings_of(docs, container, monkeypatch).index.shards == 3
    head = ray_cluster(service)["headGroupSpec"]["template"]["spec"]["containers"][0]
    settings = settings_of(docs, head, monkeypatch)
    assert (settings.index.shards, settings.serve.prefilter_shard_resource) == (
        3, "prefilter_shard")

    # The group's values reach it: pod resources, node placement, the resource name.
    docs = render(helm, {"retrieval": {"prefilterShards": 2, "prefilterWorkers": {
        "rayResource": "shard_slot", "nodeSelector": {"pool": "memory"},
        "resources": {"requests": {"cpu": "4", "memory": "64Gi"},
                      "limits": {"cpu": "4", "memory": "64Gi"}}}}})
    service = by_kind(docs, "RayService")[f"{RELEASE}-chatreid-retrieval"]
    group = {g["groupName"]: g for g in ray_cluster(service)["workerGroupSpecs"]}["prefilter"]
    assert group["replicas"] == 2
    assert group["rayStartParams"]["resources"] == '"{\\"shard_slot\\": 1}"'
    assert group["template"]["spec"]["nodeSelector"] == {"pool": "memory"}
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "64Gi"
    assert {d["name"]: d["ray_actor_options"]["resources"]
            for d in shard_deployments(service)} == {
        "PrefilterShard0": {"shard_slot": 1.0}, "PrefilterShard1": {"shard_slot": 1.0}}


def test_one_prefilter_shard_renders_as_before(helm: Any) -> None:
    """prefilterShards = 1 (the default): no shard deployment, no `prefilter` group, no shard
    setting in any ConfigMap: the chart renders byte for byte what it did before shards."""
    assert render_all(helm, {"retrieval": {"prefilterShards": 1}}) == render_all(helm, None)
    docs = render(helm, {"retrieval": {"prefilterShards": 1, "prefilterReplicas": 2}})
    service = by_kind(docs, "RayService")[f"{RELEASE}-chatreid-retrieval"]
    assert shard_deployments(service) == []
    assert [g["groupName"] for g in ray_cluster(service)["workerGroupSpecs"]] == ["cpu"]
    for configmap in by_kind(docs, "ConfigMap").values():
        assert not {"CHATREID_INDEX__SHARDS", "CHATREID_SERVE__PREFILTER_SHARD_RESOURCE"} & set(
            configmap["data"])


def test_prefilter_shard_values_are_checked(helm: Any) -> None:
    with pytest.raises(helm.HelmError, match=r"exceeds kafka\.partitions=6"):
        render(helm, {"retrieval": {"prefilterShards": 8}})
    render(helm, {"retrieval": {"prefilterShards": 8}, "kafka": {"partitions": 8}})  # fine
    with pytest.raises(helm.HelmError, match="between 1 and 64"):
        render(helm, {"retrieval": {"prefilterShards": 0}})
    with pytest.raises(helm.HelmError, match="must be a Ray resource name"):
        render(helm, {"retrieval": {"prefilterShards": 2,
                                    "prefilterWorkers": {"rayResource": "shard-slot"}}})
    # The shard count and its resource come from the values, never from extraConfig.
    for key in ("CHATREID_INDEX__SHARDS", "CHATREID_SERVE__PREFILTER_SHARD_RESOURCE"):
        with pytest.raises(helm.HelmError, match="is set by the chart"):
            render(helm, {"extraConfig": {key: "3"}})


# -- Deployments, HPAs, PDBs


def test_chart_workloads(rendered_default: list[dict[str, Any]]) -> None:
    deployments = by_kind(rendered_default, "Deployment")
    ingestor = deployments[f"{RELEASE}-chatreid-ingestor"]
    embedder = deployments[f"{RELEASE}-chatreid-embedder"]
    job = by_kind(rendered_default, "Job")[f"{RELEASE}-chatreid-init"]
    service = by_kind(rendered_default, "Service")[f"{RELEASE}-chatreid-ingestor"]

    assert service["spec"]["selector"] == ingestor["spec"]["selector"]["matchLabels"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    for doc in (ingestor, embedder, job):
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert container["image"] == "chatreid:0.1.0"
        assert "command" not in container  # the image's ENTRYPOINT is `chatreid`
        assert container["envFrom"] == [{"configMapRef": {"name": f"{RELEASE}-chatreid"}}]
        assert {s for s, _ in secret_refs(container).values()} == {f"{RELEASE}-chatreid"}
    probe = ingestor["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/healthz"
    # One embedder replica: it snapshots the index itself; no HPA, no PDB for single replicas.
    assert embedder["spec"]["template"]["spec"]["containers"][0]["args"] == ["embed"]
    assert by_kind(rendered_default, "HorizontalPodAutoscaler") == {}
    assert set(by_kind(rendered_default, "PodDisruptionBudget")) == {
        f"{RELEASE}-chatreid-retrieval-workers"}
    assert by_kind(rendered_default, "RayJob") == {}  # training is opt-in


def test_retention_cronjob(helm: Any, rendered_default: list[dict[str, Any]]) -> None:
    import kubernetes_validate as kv
    cron = by_kind(rendered_default, "CronJob")[f"{RELEASE}-chatreid-retention"]
    kv.validate(cron, KUBE_VERSION, strict=True)
    assert cron["spec"]["schedule"] == "30 3 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # never two purges at once
    pod = workload_template(cron)["spec"]
    assert pod["restartPolicy"] == "OnFailure" and pod["securityContext"]["runAsNonRoot"]
    (container,) = pod["containers"]
    assert container["args"] == ["purge"] and "command" not in container
    assert container["envFrom"] == [{"configMapRef": {"name": f"{RELEASE}-chatreid"}}]
    assert {s for s, _ in secret_refs(container).values()} == {f"{RELEASE}-chatreid"}
    (configmap,) = [c for c in by_kind(rendered_default, "ConfigMap").values()
                    if c["metadata"]["name"] == f"{RELEASE}-chatreid"]
    assert configmap["data"]["CHATREID_RETENTION__CROP_DAYS"] == "30.0"

    docs = render(helm, {"retention": {"schedule": "0 * * * *", "cropDays": 7,
                                       "timeZone": "Europe/Berlin"}})
    cron = by_kind(docs, "CronJob")[f"{RELEASE}-chatreid-retention"]
    kv.validate(cron, KUBE_VERSION, strict=True)
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == ("0 * * * *", "Europe/Berlin")
    assert by_kind(docs, "ConfigMap")[f"{RELEASE}-chatreid"]["data"][
        "CHATREID_RETENTION__CROP_DAYS"] == "7.0"
    assert by_kind(render(helm, {"retention": {"enabled": False}}), "CronJob") == {}
    for values, message in (({"retention": {"cropDays": 0}}, "retention.cropDays"),
                            ({"retention": {"schedule": ""}}, "retention.schedule")):
        with pytest.raises(helm.HelmError, match=re.escape(message)):
            render(helm, values)


def test_hpa_and_scaled_embedder(rendered_full: list[dict[str, Any]]) -> None:
    deployments = by_kind(rendered_full, "Deployment")
    hpas = by_kind(rendered_full, "HorizontalPodAutoscaler")
    assert set(hpas) == {f"{RELEASE}-chatreid-ingestor", f"{RELEASE}-chatreid-embedder"}
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        assert "replicas" not in deployments[name]["spec"], f"{name}: the HPA owns replicas"
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"]["type"] == "Utilization"
    assert (hpas[f"{RELEASE}-chatreid-embedder"]["spec"]["minReplicas"],
            hpas[f"{RELEASE}-chatreid-embedder"]["spec"]["maxReplicas"]) == (1, 4)
    # Scaled out, the workers leave snapshots to one dedicated replica.
    workers = deployments[f"{RELEASE}-chatreid-embedder"]["spec"]
    snapshot = deployments[f"{RELEASE}-chatreid-embedder-snapshot"]["spec"]
    assert workers["template"]["spec"]["containers"][0]["args"] == ["embed", "--no-snapshots"]
    assert snapshot["template"]["spec"]["containers"][0]["args"] == ["embed"]
    assert snapshot["replicas"] == 1 and snapshot["strategy"] == {"type": "Recreate"}
    assert snapshot["selector"]["matchLabels"]["app.kubernetes.io/component"] == \
        "embedder-snapshot"


@pytest.mark.parametrize(
    ("embedder", "partitions", "ok"),
    [
        ({"replicas": 1}, 1, True),  # one replica, one partition: fine
        ({"replicas": 5}, 6, True),  # 5 workers + the snapshot replica = 6 consumers
        ({"replicas": 6}, 6, False),
        ({"replicas": 7}, 6, False),
        ({"autoscaling": {"enabled": True, "maxReplicas": 5}}, 6, True),
        ({"autoscaling": {"enabled": True, "maxReplicas": 6}}, 6, False),
        ({"autoscaling": {"enabled": True, "maxReplicas": 11}}, 12, True),
    ],
)
def test_embedder_bounded_by_partitions(
    helm: Any, embedder: dict[str, Any], partitions: int, ok: bool
) -> None:
    values = {"embedder": embedder, "kafka": {"partitions": partitions}}
    if ok:
        render(helm, values)
    else:
        with pytest.raises(helm.HelmError, match=rf"exceed kafka\.partitions={partitions}\b"):
            render(helm, values)


def pdbs(helm: Any, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return by_kind(render(helm, values), "PodDisruptionBudget")


def test_pdb_rules(helm: Any, rendered_full: list[dict[str, Any]]) -> None:
    name = f"{RELEASE}-chatreid-ingestor"
    assert name not in pdbs(helm, {"ingestor": {"replicas": 1}})  # would block drains
    budget = pdbs(helm, {"ingestor": {"replicas": 2}})[name]["spec"]
    assert budget["maxUnavailable"] == 1 and "minAvailable" not in budget
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert budget["selector"]["matchLabels"]["app.kubernetes.io/component"] == "ingestor"
    budget = pdbs(helm, {"ingestor": {"replicas": 3,
                                      "pdb": {"minAvailable": "50%", "maxUnavailable": ""}}})
    assert budget[name]["spec"]["minAvailable"] == "50%"
    assert name not in pdbs(helm, {"ingestor": {"replicas": 3, "pdb": {"enabled": False}}})
    with pytest.raises(helm.HelmError, match="exactly one of minAvailable and maxUnavailable"):
        pdbs(helm, {"ingestor": {"replicas": 2, "pdb": {"minAvailable": 1}}})

    full = by_kind(rendered_full, "PodDisruptionBudget")
    assert set(full) == {f"{RELEASE}-chatreid-{n}"
                         for n in ("ingestor", "embedder", "retrieval-workers")}
    # The embedder's covers the workers, not the single snapshot replica.
    assert full[f"{RELEASE}-chatreid-embedder"]["spec"]["selector"]["matchLabels"][
        "app.kubernetes.io/component"] == "embedder"
    # Retrieval: the Ray worker pods (KubeRay labels them ray.io/node-type=worker), not the head.
    selector = full[f"{RELEASE}-chatreid-retrieval-workers"]["spec"]["selector"]["matchLabels"]
    assert selector["ray.io/node-type"] == "worker"
    service = next(iter(by_kind(rendered_full, "RayService").values()))
    for group in ray_cluster(service)["workerGroupSpecs"]:
        labels = {**group["template"]["metadata"]["labels"], "ray.io/node-type": "worker"}
        assert selector.items() <= labels.items()
    assert pdbs(helm, {"retrieval": {"pdb": {"enabled": False}}}) == {}


# -- NetworkPolicies


def selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = policy["spec"]["podSelector"]
    assert set(selector) == {"matchLabels"}
    return selector["matchLabels"].items() <= labels.items()


def test_network_policies(rendered_full: list[dict[str, Any]]) -> None:
    policies = by_kind(rendered_full, "NetworkPolicy")
    ingress_peers = [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ingress-nginx"}}}]
    deny = policies[f"{RELEASE}-chatreid-default-deny"]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]
    # Every pod of the release is isolated by it: Deployments, Job, Ray pods, submitters.
    for where, template in pod_templates(rendered_full):
        assert selects(deny, template["metadata"]["labels"]), where

    retrieval = policies[f"{RELEASE}-chatreid-retrieval"]
    service = next(iter(by_kind(rendered_full, "RayService").values()))
    for where, template in pod_templates([service]):
        assert selects(retrieval, template["metadata"]["labels"]), where
    rules = retrieval["spec"]["ingress"]
    own = retrieval["spec"]["podSelector"]["matchLabels"]
    assert rules[0] == {"from": [{"podSelector": {"matchLabels": own}}]}  # Ray <-> Ray
    # Outside the release, the API port only admits the ingress peers (and the KubeRay
    # operator, which health-checks the Serve proxies); nothing else is open.
    api_rules = [r for r in rules[1:] if {"protocol": "TCP", "port": 8000} in r["ports"]]
    assert {json.dumps(r["from"], sort_keys=True) for r in api_rules} == {
        json.dumps(ingress_peers, sort_keys=True),
        json.dumps([{"namespaceSelector": {}, "podSelector": {"matchLabels": {
            "app.kubernetes.io/name": "kuberay-operator"}}}], sort_keys=True),
    }
    for rule in rules[1:]:
        assert rule["ports"], "an outside peer on every port"
        if rule["from"] == ingress_peers:
            assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]

    ingestor = policies[f"{RELEASE}-chatreid-ingestor"]
    deployment = by_kind(rendered_full, "Deployment")[f"{RELEASE}-chatreid-ingestor"]
    assert selects(ingestor, deployment["spec"]["template"]["metadata"]["labels"])
    assert ingestor["spec"]["ingress"] == [
        {"from": ingress_peers, "ports": [{"protocol": "TCP", "port": 8070}]}]

    training = policies[f"{RELEASE}-chatreid-training"]
    for job in by_kind(rendered_full, "RayJob").values():
        for where, template in pod_templates([job]):
            assert selects(training, template["metadata"]["labels"]), where
            assert not selects(retrieval, template["metadata"]["labels"]), where
    assert all(r["ports"] == [{"protocol": "TCP", "port": 8265}]
               for r in training["spec"]["ingress"][1:])


def test_network_policy_values(helm: Any) -> None:
    cameras = [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    docs = render(helm, {"networkPolicy": {"ingestorFrom": cameras, "ingressFrom": [],
                                           "kuberayOperatorFrom": []}})
    policies = by_kind(docs, "NetworkPolicy")
    assert policies[f"{RELEASE}-chatreid-ingestor"]["spec"]["ingress"][0]["from"] == cameras
    # No ingress peers: the API is closed to everything outside the Ray pods.
    assert policies[f"{RELEASE}-chatreid-retrieval"]["spec"]["ingress"] == [
        policies[f"{RELEASE}-chatreid-retrieval"]["spec"]["ingress"][0]]
    assert by_kind(render(helm, {"networkPolicy": {"enabled": False}}), "NetworkPolicy") == {}


def test_ingresses(rendered_full: list[dict[str, Any]]) -> None:
    ingestor = by_kind(rendered_full, "Ingress")[f"{RELEASE}-chatreid-ingestor"]
    (rule,) = ingestor["spec"]["rules"]
    assert rule["host"] == "upload.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {
        "name": f"{RELEASE}-chatreid-ingestor", "port": {"number": 8070}}
    assert f"{RELEASE}-chatreid-ingestor" in by_kind(rendered_full, "Service")

    ingress = by_kind(rendered_full, "Ingress")[f"{RELEASE}-chatreid-retrieval"]
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    service = next(iter(by_kind(rendered_full, "RayService").values()))
    # KubeRay names the Serve Service <RayService>-serve-svc, port = the `serve` container port.
    assert path["backend"]["service"] == {
        "name": f"{service['metadata']['name']}-serve-svc", "port": {"number": 8000}}
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert rule["host"] == "reid.example.com"
    assert ingress["spec"]["tls"][0]["secretName"] == "reid-tls"


# -- Training RayJobs


def test_training_rayjobs(rendered_training: list[dict[str, Any]]) -> None:
    from ray_jobs.train import PRESETS

    jobs = by_kind(rendered_training, "RayJob")
    expected = {"embedder": ("embedder", False), "stage1": ("1", False),
                "stage2": ("2", True), "stage3": ("3", True)}
    assert set(jobs) == {f"{RELEASE}-chatreid-train-{name}" for name in expected}
    for name, (stage, suspended) in expected.items():
        spec = jobs[f"{RELEASE}-chatreid-train-{name}"]["spec"]
        argv = shlex.split(spec["entrypoint"])
        assert argv == ["chatreid", "train", "--stage", stage, "--preset", "default"], name
        assert argv[5] in PRESETS
        # Later stages continue the previous stage's checkpoint: created suspended.
        assert spec["suspend"] is suspended, name
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
        assert spec["backoffLimit"] == 0 and spec["submissionMode"] == "K8sJobMode"
        cluster = spec["rayClusterSpec"]
        assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["cpu"]
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in head["env"]}
        assert env["CHATREID_RAY__ADDRESS"] == "auto"  # the driver joins this cluster
        assert env["CHATREID_TRAIN__WORLD"].startswith("/tmp/")  # writable: the emptyDir
        submitter = spec["submitterPodTemplate"]["spec"]
        assert submitter["restartPolicy"] == "Never"
        assert "command" not in submitter["containers"][0]  # KubeRay generates it


def test_training_values(helm: Any) -> None:
    docs = render(helm, {"training": {
        "enabled": True, "runId": "r2", "preset": "micro", "workers": 3,
        "jobs": {"stage2": {"suspend": False}, "embedder": {"enabled": False}}}})
    jobs = by_kind(docs, "RayJob")
    assert set(jobs) == {f"{RELEASE}-chatreid-train-stage{n}-r2" for n in (1, 2, 3)}
    stage2 = jobs[f"{RELEASE}-chatreid-train-stage2-r2"]["spec"]
    assert stage2["suspend"] is False
    assert stage2["entrypoint"] == "chatreid train --stage 2 --preset micro --workers 3"
    with pytest.raises(helm.HelmError, match="shutdownAfterJobFinishes"):
        render(helm, {"training": {"enabled": True, "shutdownAfterJobFinishes": False}})


# -- Settings and secrets


def test_chart_settings_are_settings(rendered_full: list[dict[str, Any]]) -> None:
    for configmap in by_kind(rendered_full, "ConfigMap").values():
        for key in configmap["data"]:
            assert_known_setting(key)
    for where, container in containers(rendered_full):
        for var in container.get("env", []):
            if var["name"].startswith("CHATREID_"):
                assert_known_setting(var["name"])
            else:
                assert var["name"] in {"HOME", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, where


# Chart defaults that differ from the settings' on purpose (the settings default to the local
# stack; the chart to an in-cluster Kafka/MinIO and the Ray pods' writable /tmp).
CHART_DEFAULT_DIFFERS = {
    "CHATREID_KAFKA__BOOTSTRAP_SERVERS", "CHATREID_S3__ENDPOINT",
    "CHATREID_KAFKA__SECURITY_PROTOCOL", "CHATREID_KAFKA__SASL_MECHANISM",  # only with sasl.on
    "CHATREID_TRAIN__WORLD", "CHATREID_TRAIN__OUT_DIR",
    "CHATREID_SERVE__PREFILTER_SHARD_RESOURCE",  # only with prefilterShards > 1
}


def test_chart_values_map_to_settings_with_the_same_defaults() -> None:
    """The chart's values -> CHATREID_* mapping (read from the templates, as in
    docs/configuration.md) names real settings, and a values.yaml default equals the setting's
    default unless listed above: a default changed on one side only fails here."""
    from chatreid.config import env_name, setting_paths
    from chatreid.config_reference import default_of, field_info, helm_mapping

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    paths = {env_name(*p): p for p in setting_paths()}

    def norm(value: Any) -> Any:
        if value in (None, ""):
            return ""
        if isinstance(value, bool):
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            return str(value)

    compared, differ = 0, set()
    for var, source in helm_mapping().items():
        assert var in paths, f"the chart sets {var}, which is no setting"
        path = re.fullmatch(r"`([\w.]+)`(?: \(.*\))?", source)
        if not path:
            continue
        chart: Any = values
        for key in path[1].split("."):
            assert isinstance(chart, dict) and key in chart, f"{var}: no value {path[1]}"
            chart = chart[key]
        setting = default_of(field_info(paths[var]))
        compared += 1
        if norm(chart) != norm(setting):
            differ.add(var)
    assert compared >= 35
    assert differ == CHART_DEFAULT_DIFFERS, differ ^ CHART_DEFAULT_DIFFERS


def test_chart_existing_secret(helm: Any) -> None:
    docs = render(helm, {"s3": {"existingSecret": "object-store-keys"},
                         "retrieval": {"existingSecret": "api-keys"},
                         "ray": {"auth": {"existingSecret": "ray-token"}}}, secrets=False)
    assert by_kind(docs, "Secret") == {}
    for where, container in containers(docs):
        if where.endswith("/ray-job-submitter"):
            continue
        refs = secret_refs(container)
        assert {refs["CHATREID_S3__ACCESS_KEY"][0], refs["CHATREID_S3__SECRET_KEY"][0]} == {
            "object-store-keys"}, where


def settings_of(
    docs: list[dict[str, Any]], container: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> Any:
    """The chatreid Settings a container of the rendered chart starts with."""
    from chatreid.config import Settings

    for key in list(os.environ):
        if key.startswith("CHATREID_"):
            monkeypatch.delenv(key)
    for key, value in pod_environment(docs, container).items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


def test_chart_kafka_sasl(
    helm: Any, rendered_full: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Credentials in the chart's Secret, for every chatreid and Ray container.
    (secret,) = by_kind(rendered_full, "Secret").values()
    assert secret["stringData"]["kafka-sasl-username"] == "chatreid"
    assert secret["stringData"]["kafka-sasl-password"] == "kafka-pass"
    data = by_kind(rendered_full, "ConfigMap")[f"{RELEASE}-chatreid"]["data"]
    assert data["CHATREID_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    assert data["CHATREID_KAFKA__SASL_MECHANISM"] == "SCRAM-SHA-512"
    checked = 0
    for where, container in containers(rendered_full):
        if where.endswith("/ray-job-submitter"):  # only runs `ray job submit`
            continue
        refs = secret_refs(container)
        assert refs["CHATREID_KAFKA__SASL_USERNAME"] == (f"{RELEASE}-chatreid",
                                                         "kafka-sasl-username"), where
        assert refs["CHATREID_KAFKA__SASL_PASSWORD"] == (f"{RELEASE}-chatreid",
                                                         "kafka-sasl-password"), where
        # ... and chatreid reads them as its Kafka client options.
        options = settings_of(rendered_full, container, monkeypatch).kafka.client_options()
        assert options["security_protocol"] == "SASL_SSL", where
        assert options["sasl_mechanism"] == "SCRAM-SHA-512", where
        assert (options["sasl_plain_username"], options["sasl_plain_password"]) == (
            "chatreid", "kafka-pass"), where
        checked += 1
    assert checked >= 10

    # An existing Secret holding only the password (Strimzi's KafkaUser): the user name goes to
    # the ConfigMap and the chart stores nothing for Kafka.
    docs = render(helm, {"kafka": {"sasl": {
        "enabled": True, "existingSecret": "chatreid-user", "usernameKey": "",
        "passwordKey": "password", "username": "chatreid-user"}}})
    assert "kafka-sasl-password" not in next(iter(by_kind(docs, "Secret").values()))["stringData"]
    data = by_kind(docs, "ConfigMap")[f"{RELEASE}-chatreid"]["data"]
    assert data["CHATREID_KAFKA__SASL_USERNAME"] == "chatreid-user"
    for where, container in containers(docs):
        if where.endswith("/ray-job-submitter"):
            continue
        refs = secret_refs(container)
        assert refs["CHATREID_KAFKA__SASL_PASSWORD"] == ("chatreid-user", "password"), where
        assert "CHATREID_KAFKA__SASL_USERNAME" not in refs, where


def test_chart_api_key(
    helm: Any, rendered_full: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    (secret,) = by_kind(rendered_full, "Secret").values()
    assert secret["stringData"]["api-key"] == "api-key-value"
    for where, container in containers(rendered_full):
        refs = secret_refs(container)
        if where.startswith("RayService/"):
            assert refs["CHATREID_SERVE__API_KEY"] == (f"{RELEASE}-chatreid", "api-key"), where
            settings = settings_of(rendered_full, container, monkeypatch)
            assert settings.serve.api_key.get_secret_value() == "api-key-value", where
        else:  # only the Serve pods get it
            assert "CHATREID_SERVE__API_KEY" not in refs, where

    # All three parts external: no Secret at all, and every reference names the existing ones.
    docs = render(helm, {
        "s3": {"existingSecret": "s3-keys"},
        "kafka": {"sasl": {"enabled": True, "existingSecret": "kafka-creds"}},
        "retrieval": {"existingSecret": "api-keys", "apiKeyKey": "token"},
        "ray": {"auth": {"existingSecret": "ray-token"}},
    }, secrets=False)
    assert by_kind(docs, "Secret") == {}
    names = {ref for _, c in containers(docs) for ref in secret_refs(c).values()}
    assert names == {("s3-keys", "access-key"), ("s3-keys", "secret-key"),
                     ("kafka-creds", "kafka-sasl-username"),
                     ("kafka-creds", "kafka-sasl-password"), ("api-keys", "token"),
                     ("ray-token", "auth_token")}


def test_chart_rejects_bad_values(helm: Any) -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"extraConfig": {"NOT_PREFIXED": "1"}}, "CHATREID_"),
        ({"extraConfig": {"CHATREID_SERVE__MODEL": "x"}}, "set by the chart"),
        ({"extraConfig": {"CHATREID_KAFKA__PARTITIONS": "3"}}, "set by the chart"),
        ({"extraConfig": {"CHATREID_ACCESS__INSECURE": "true"}}, "set by the chart"),
        ({"extraConfig": {"CHATREID_RAY__AUTH_TOKEN": "t"}}, "set by the chart"),
        ({"embedder": {"imageVariant": "rocm"}}, "cpu or cuda"),
        ({"retrieval": {"rerankNumGpus": 1}}, "gpuWorkers.enabled"),
        ({"retrieval": {"upgradeStrategy": "Rolling"}}, "NewCluster or None"),
        ({"retrieval": {"cpuWorkers": {"minReplicas": 3}}}, "minReplicas <= replicas"),
        ({"kafka": {"sasl": {"enabled": True, "mechanism": "GSSAPI", "password": "p",
                             "username": "u"}}}, "mechanism"),
        ({"kafka": {"sasl": {"enabled": True, "username": "u"}}}, "kafka.sasl.password"),
        ({"kafka": {"sasl": {"enabled": True, "username": "u", "password": "p",
                             "passwordKey": "secret-key"}}}, "already used"),
        ({"training": {"enabled": True, "gpu": True}}, "gpuWorkers.enabled"),
        ({"training": {"enabled": True, "jobs": {"stage1": {"stage": "4"}}}}, "stage must be"),
        ({"fullnameOverride": "a-very-long-release-name-for-this-cluster-x"}, "47 characters"),
        ({"ingestor": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
         "above maxReplicas"),
    ]
    for values, message in bad:
        with pytest.raises(helm.HelmError, match=re.escape(message)):
            render(helm, values)


def test_notes(helm: Any, gpu_values: dict[str, Any]) -> None:
    notes = render_all(helm, merged(gpu_values, FULL_VALUES))["chatreid/templates/NOTES.txt"]
    for text in (
        "--reuse-values --set-string retrieval.model=<checkpoint version>",
        "DEPLOY_FAILED", "helm rollback", f"svc/{RELEASE}-chatreid-retrieval-serve-svc 8000",
        "Authorization: Bearer", f"{RELEASE}-chatreid-train-stage2: stage 2, suspended",
        """patch rayjob <name> --type merge -p '{"spec":{"suspend":false}}'""",
        "--set training.jobs.<job>.suspend=false",
    ):
        assert text in notes, text


VALUES_FILES = [CHART / "values.yaml", GPU_VALUES]
# Keys inside these values are plain data documented as a whole (Kubernetes or Ray objects).
PLAIN_DATA = {"resources", "requests", "limits", "podSecurityContext", "securityContext",
              "seccompProfile", "capabilities", "rayStartParams", "nodeSelector"}


@pytest.mark.parametrize("path", VALUES_FILES, ids=lambda p: p.name)
def test_values_every_key_commented(path: Path) -> None:
    """Each key line has a `# --` comment block right above it, unless it sits inside a value
    documented as a whole (resources, a list of peers, ...)."""
    lines = path.read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w./-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        block = []
        for j in range(i - 1, -1, -1):
            if not lines[j].strip().startswith("#"):
                break
            block.insert(0, lines[j].strip())
        documented = bool(block) and block[0].startswith("# --")
        if not documented and not _parent_is_documented(lines, i, indent):
            undocumented.append(line.strip())
    assert undocumented == []


def _parent_is_documented(lines: list[str], i: int, indent: int) -> bool:
    """True when the key sits inside a value documented as a whole: a plain-data mapping such
    as ``resources``, or an item of a list (peers, tolerations)."""
    for j in range(i - 1, -1, -1):
        m = re.match(r"^(\s*)(- )?([A-Za-z][\w./-]*)?:?", lines[j])
        if not m or not lines[j].strip() or lines[j].strip().startswith("#"):
            continue
        if len(m.group(1)) < indent:
            if m.group(2) or m.group(3) in PLAIN_DATA:
                return True
            return _parent_is_documented(lines, j, len(m.group(1)))  # data nested in data
    return False


def chart_commands(docs: list[dict[str, Any]], label: str) -> list[tuple[str, Argv]]:
    """`chatreid` command lines: Deployment/Job args and probes, and RayJob entrypoints (the Ray
    containers themselves run `ray start`, which KubeRay generates)."""
    found = []
    for doc in docs:
        where = f"chart[{label}] {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "RayJob":
            argv = shlex.split(doc["spec"]["entrypoint"])
            assert argv[0] == "chatreid", where
            found.append((f"{where} entrypoint", argv[1:]))
        if doc["kind"] not in WORKLOAD_KINDS:
            continue
        for container in workload_template(doc)["spec"]["containers"]:
            if container["image"].startswith("chatreid:") and "command" not in container:
                found.append((f"{where}/{container['name']}",
                              [str(a) for a in container["args"]]))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                exec_cmd = container.get(probe, {}).get("exec", {}).get("command", [])
                if exec_cmd[:1] == ["chatreid"]:
                    found.append((f"{where}/{container['name']} {probe}", exec_cmd[1:]))
    return found


# --------------------------------------------------------------------------------------------
# Every chatreid command line against the CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_commands(
    compose: dict[str, Any],
    rendered_default: list[dict[str, Any]],
    rendered_gpu: list[dict[str, Any]],
    rendered_full: list[dict[str, Any]],
) -> list[tuple[str, Argv]]:
    found = [
        *dockerfile_commands(),
        *compose_commands(compose),
        *chart_commands(rendered_default, "default"),
        *chart_commands(rendered_gpu, "gpu"),
        *chart_commands(rendered_full, "full"),
    ]
    # The services the deployment is for are all among them.
    lines = {" ".join(argv) for _, argv in found}
    for expected in ("init", "ingest http", "ingest synth", "embed", "train", "purge"):
        assert any(line.split(" --")[0] == expected for line in lines), expected
    return found


def split_subcommand(argv: Argv) -> tuple[Argv, Any]:
    """Walk the click tree: (subcommand path, the click command it names)."""
    import typer

    from chatreid.app.cli import app

    command: Any = typer.main.get_command(app)
    path: Argv = []
    for word in argv:
        # Groups have a `commands` mapping (typer vendors click, so no isinstance check).
        subcommands = getattr(command, "commands", None) or {}
        if word not in subcommands:
            break
        command = subcommands[word]
        path.append(word)
    return path, command


def test_every_command_line_parses(all_commands: list[tuple[str, Argv]]) -> None:
    from typer.testing import CliRunner

    from chatreid.app.cli import app

    runner = CliRunner()
    env = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    failures = []
    for where, argv in all_commands:
        path, command = split_subcommand(argv)
        flags = {w.split("=")[0] for w in argv if w.startswith("--") and w != "--help"}
        result = runner.invoke(app, [*path, "--help"], env=env)
        if result.exit_code != 0:
            failures.append(f"{where}: `chatreid {' '.join(path)} --help` -> {result.exit_code}")
            continue
        known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        for flag in sorted(flags):
            if flag not in result.output or flag not in known:
                failures.append(f"{where}: `chatreid {' '.join(path)}` has no {flag}")
        # The full line parses too (values included); --help exits before anything runs.
        full = runner.invoke(app, [*argv, "--help"], env=env)
        if full.exit_code != 0:
            failures.append(f"{where}: `chatreid {' '.join(argv)}` -> {full.output.strip()}")
    assert failures == [], "\n".join(failures)


# --------------------------------------------------------------------------------------------
# Secure by default (issue 14): no well-known secret anywhere, Ray token auth on every cluster
# --------------------------------------------------------------------------------------------


def test_compose_requires_every_secret_and_runs_ray_with_a_token(
        compose_raw: dict[str, Any], compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    for var in ("CHATREID_S3__ACCESS_KEY", "CHATREID_S3__SECRET_KEY", "CHATREID_SERVE__API_KEY",
                "RAY_AUTH_TOKEN"):
        uses = re.findall(r"\$\{" + var + r"(:?[-?])?[^}]*\}", text)
        assert uses and all(op == ":?" for op in uses), f"{var}: {uses} (must be required)"
    assert "chatreid-secret" not in text
    for name, svc in chatreid_services(compose).items():
        env = svc["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name  # head, workers and every client
        assert env["RAY_AUTH_TOKEN"] == "<RAY_AUTH_TOKEN>", name
        assert env["CHATREID_SERVE__API_KEY"] == "<CHATREID_SERVE__API_KEY>", name
        assert "CHATREID_ACCESS__INSECURE" not in env, name
    # published ports only on CHATREID_PUBLISH_HOST, loopback unless changed; never Ray's GCS
    for name, svc in compose_raw["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("${CHATREID_PUBLISH_HOST:-127.0.0.1}:"), (name, port)
            assert not port.endswith((":6379", ":10001")), (name, port)


def test_env_example_has_no_usable_secret() -> None:
    text = ENV_EXAMPLE.read_text()
    for var in ("CHATREID_S3__ACCESS_KEY", "CHATREID_S3__SECRET_KEY", "CHATREID_SERVE__API_KEY",
                "RAY_AUTH_TOKEN"):
        (value,) = re.findall(rf"^#?{var}=(.*)$", text, re.M)
        assert value == "", f"{var}={value!r}: .env.example must not carry a usable secret"


def test_chart_ray_token_auth(rendered_full: list[dict[str, Any]]) -> None:
    (secret,) = by_kind(rendered_full, "Secret").values()
    assert secret["stringData"]["auth_token"] == "ray-token-value"  # KubeRay's key name
    clusters = [d for d in rendered_full if d["kind"] in RAY_KINDS]
    assert {d["kind"] for d in clusters} == RAY_KINDS
    for doc in clusters:  # KubeRay authenticates its own dashboard calls with this Secret
        assert ray_cluster(doc)["authOptions"] == {"mode": "token",
                                                   "secretName": f"{RELEASE}-chatreid"}
    ray_containers = [(w, c) for w, c in containers(rendered_full)
                      if w.split("/")[0] in RAY_KINDS]
    assert len(ray_containers) >= 10
    for where, container in ray_containers:  # Ray pods, and job submitters (ray job submit)
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        assert secret_refs(container)["RAY_AUTH_TOKEN"] == (f"{RELEASE}-chatreid",
                                                            "auth_token"), where
    for where, container in containers(rendered_full):  # nothing else gets the token
        if where.split("/")[0] not in RAY_KINDS:
            assert "RAY_AUTH_TOKEN" not in secret_refs(container), where


def test_chart_has_no_default_secrets(helm: Any) -> None:
    for missing, message in (("s3", "s3.accessKey"), ("retrieval", "retrieval.apiKey"),
                             ("ray", "ray.auth.token")):
        values = {k: v for k, v in SECRET_VALUES.items() if k != missing}
        with pytest.raises(helm.HelmError, match=re.escape(message)):
            render(helm, values, secrets=False)
    # The token is needed only where a Ray cluster runs.
    docs = render(helm, {"s3": SECRET_VALUES["s3"], "retrieval": {"enabled": False}},
                  secrets=False)
    assert not [d for d in docs if d["kind"] in RAY_KINDS]


def test_chart_insecure_is_explicit(helm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"s3": SECRET_VALUES["s3"], "ray": SECRET_VALUES["ray"],
              "retrieval": {"insecure": True}}
    docs = render(helm, values, secrets=False)
    (secret,) = by_kind(docs, "Secret").values()
    assert "api-key" not in secret["stringData"]
    serve = [(w, c) for w, c in containers(docs) if w.startswith("RayService/")]
    for where, container in serve:
        settings = settings_of(docs, container, monkeypatch)
        assert settings.access.insecure is True and settings.serve.api_key is None, where
    notes = render_all(helm, values, secrets=False)["chatreid/templates/NOTES.txt"]
    assert "ACCESS CONTROL IS OFF" in notes
    default = render(helm, None)  # access control on, with the bootstrap key
    for where, container in containers(default):
        if where.startswith("RayService/"):
            settings = settings_of(default, container, monkeypatch)
            assert not settings.access.insecure and settings.serve.api_key, where
