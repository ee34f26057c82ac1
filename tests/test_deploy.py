"""Deployment files, checked offline: Dockerfile, docker-compose.yml, .env.example, Helm chart.

No Docker engine or cluster is needed. The compose file is validated against the Compose
specification (check-jsonschema's vendored schema); the chart is rendered and linted with the
Helm SDK (helm-python-sdk) and every manifest is validated against the Kubernetes OpenAPI
schemas (kubernetes-validate, strict); and every ``chatreid ...`` command line these files run
is parsed against the real CLI (``chatreid.cli.app``), so a renamed command or flag fails here
instead of in a crash-looping pod.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
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


_VAR = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose ``${VAR:-default}`` interpolation with an empty environment (defaults only)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m["default"] or "", value)
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
    return pytest.importorskip("helm_python")


@pytest.fixture(scope="module")
def gpu_values(helm: Any) -> dict[str, Any]:
    return helm.values_from_yaml(GPU_VALUES.read_text())


def render(helm: Any, values: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Render the chart offline; the Kubernetes objects (NOTES.txt and empty docs dropped)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@pytest.fixture(scope="module")
def rendered_default(helm: Any) -> list[dict[str, Any]]:
    return render(helm, None)


@pytest.fixture(scope="module")
def rendered_gpu(helm: Any, gpu_values: dict[str, Any]) -> list[dict[str, Any]]:
    return render(helm, gpu_values)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
            for c in doc["spec"]["template"]["spec"]["containers"]:
                yield f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}", c


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
    assert one_shots == {"init", "train-embedder", "train-stage1", "train-stage2", "train-stage3"}
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
            assert_known_setting(key)
    # MinIO's root credentials and the clients' keys are one pair of variables.
    minio = compose["services"]["minio"]["environment"]
    embedder = compose["services"]["embedder"]["environment"]
    assert minio["MINIO_ROOT_USER"] == embedder["CHATREID_S3__ACCESS_KEY"]
    assert minio["MINIO_ROOT_PASSWORD"] == embedder["CHATREID_S3__SECRET_KEY"]


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
    if ray is None:
        pytest.skip("ray CLI not installed")
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


@pytest.mark.parametrize("variant", ["default", "gpu"])
def test_chart_lints_clean(helm: Any, gpu_values: dict[str, Any], variant: str) -> None:
    values = gpu_values if variant == "gpu" else None
    report = helm.lint(CHART, values=values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == [], report
    # Severity 2 = warning, 3 = error; 1 (info, e.g. "icon is recommended") is fine.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


@pytest.mark.parametrize("variant", ["default", "gpu"])
def test_rendered_manifests_validate(
    rendered_default: list[dict[str, Any]], rendered_gpu: list[dict[str, Any]], variant: str
) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = rendered_gpu if variant == "gpu" else rendered_default
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["ConfigMap", "Secret", "ServiceAccount", "Deployment", "Deployment", "Service", "Job"]
    )
    for doc in docs:
        try:
            kv.validate(doc, KUBE_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_kubernetes_validate_has_teeth(rendered_default: list[dict[str, Any]]) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    deployment = next(iter(by_kind(rendered_default, "Deployment").values()))
    deployment = json.loads(json.dumps(deployment))  # a copy: the fixture is shared
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBE_VERSION, strict=True)


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
        assert container["envFrom"][0]["configMapRef"]["name"] == f"{RELEASE}-chatreid"
        secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"][1:]}
        assert secret_refs == {f"{RELEASE}-chatreid"}
    probe = ingestor["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/healthz"


def test_chart_configmap_keys_are_settings(rendered_default: list[dict[str, Any]]) -> None:
    (configmap,) = by_kind(rendered_default, "ConfigMap").values()
    for key in configmap["data"]:
        assert_known_setting(key)


def test_chart_gpu_values(rendered_gpu: list[dict[str, Any]]) -> None:
    deployments = by_kind(rendered_gpu, "Deployment")
    embedder = deployments[f"{RELEASE}-chatreid-embedder"]["spec"]["template"]["spec"]
    (container,) = embedder["containers"]
    assert container["image"] == "chatreid:0.1.0-cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in embedder["tolerations"])
    ingestor = deployments[f"{RELEASE}-chatreid-ingestor"]["spec"]["template"]["spec"]
    assert ingestor["containers"][0]["image"] == "chatreid:0.1.0"
    (configmap,) = by_kind(rendered_gpu, "ConfigMap").values()
    assert configmap["data"]["CHATREID_EMBEDDER__DEVICE"] == "cuda"


def test_chart_existing_secret(helm: Any) -> None:
    docs = render(helm, {"s3": {"existingSecret": "object-store-keys"}})
    assert by_kind(docs, "Secret") == {}
    for _, container in containers(docs):
        refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"][1:]}
        assert refs == {"object-store-keys"}


def test_chart_rejects_bad_values(helm: Any) -> None:
    with pytest.raises(helm.HelmError, match="CHATREID_"):
        render(helm, {"extraConfig": {"NOT_PREFIXED": "1"}})
    with pytest.raises(helm.HelmError, match="cpu or cuda"):
        render(helm, {"embedder": {"imageVariant": "rocm"}})


def test_values_every_key_commented() -> None:
    """Each key line in values.yaml has a comment right above it (or is inside a documented
    block of plain data such as resources)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not match or i == 0:
            continue
        indent = len(match.group(1))
        prev = lines[i - 1]
        parent_documented = _parent_is_documented(lines, i, indent)
        if not prev.strip().startswith("#") and not parent_documented:
            undocumented.append(line.strip())
    assert undocumented == []


def _parent_is_documented(lines: list[str], i: int, indent: int) -> bool:
    """True when the key sits inside a value documented as a whole (e.g. ``resources:``)."""
    for j in range(i - 1, -1, -1):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", lines[j])
        if m and len(m.group(1)) < indent:
            return m.group(2) in {
                "resources",
                "requests",
                "limits",
                "podSecurityContext",
                "securityContext",
                "seccompProfile",
                "capabilities",
            }
    return False


def chart_commands(docs: list[dict[str, Any]], label: str) -> list[tuple[str, Argv]]:
    found = []
    for where, container in containers(docs):
        if container["image"].startswith("chatreid:") and "command" not in container:
            found.append((f"chart[{label}] {where}", [str(a) for a in container["args"]]))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            exec_cmd = container.get(probe, {}).get("exec", {}).get("command", [])
            if exec_cmd[:1] == ["chatreid"]:
                found.append((f"chart[{label}] {where} {probe}", exec_cmd[1:]))
    return found


# --------------------------------------------------------------------------------------------
# Every chatreid command line against the CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_commands(
    compose: dict[str, Any],
    rendered_default: list[dict[str, Any]],
    rendered_gpu: list[dict[str, Any]],
) -> list[tuple[str, Argv]]:
    found = [
        *dockerfile_commands(),
        *compose_commands(compose),
        *chart_commands(rendered_default, "default"),
        *chart_commands(rendered_gpu, "gpu"),
    ]
    # The services the deployment is for are all among them.
    lines = {" ".join(argv) for _, argv in found}
    for expected in ("init", "ingest http", "ingest synth", "embed"):
        assert any(line.split(" --")[0] == expected for line in lines), expected
    return found


def split_subcommand(argv: Argv) -> tuple[Argv, Any]:
    """Walk the click tree: (subcommand path, the click command it names)."""
    import typer

    from chatreid.cli import app

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

    from chatreid.cli import app

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
