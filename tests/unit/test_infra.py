"""infra/ checked offline: the compose file, Dockerfiles, Kubernetes manifests, the GPU work-pool
template and the commands they (and docs/infra.md) run, against the real parsers and schemas.

No network, no Docker engine, no cluster: what needs those (images build, servers start) is not
checked here. Schema packages (test extras): kubernetes-validate (Kubernetes OpenAPI schemas) and
check-jsonschema (ships the Compose specification's schema).
"""
from __future__ import annotations

import configparser
import copy
import importlib
import importlib.util
import json
import re
import shlex
import subprocess
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DOCKER = INFRA / "docker"
COMPOSE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
TEMPLATE = K8S / "gpu-work-pool-template.json"
DOC = ROOT / "docs" / "infra.md"
NAMESPACE = "snapgen"
K8S_VERSIONS = ("1.29.0", "1.37.0")  # oldest and newest Kubernetes the manifests are checked against
GPU = "nvidia.com/gpu"

REQUIRED_FILES = [
    "compose.yaml", ".env.example", ".gitignore", "mlflow/basic_auth.ini",
    "docker/Dockerfile.cpu", "docker/Dockerfile.cuda", "docker/Dockerfile.mlflow",
    "docker/Dockerfile.cpu.dockerignore", "docker/Dockerfile.cuda.dockerignore", "docker/Dockerfile.mlflow.dockerignore",
    "k8s/namespace.yaml", "k8s/config.yaml", "k8s/worker.yaml", "k8s/gpu-work-pool-template.json",
    "k8s/pretrain-shared-pvc.yaml", "k8s/pretrain-prepare-job.yaml", "k8s/pretrain-multinode-job.yaml",
    "scripts/pretrain_spec.py",
]
COMPOSE_SERVICES = {"prefect-db", "mlflow-db", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker"}
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY|PRIVATE_KEY|API_KEY)", re.I)
VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
PLACEHOLDER = re.compile(r"\{\{\s*([\w.\-]+)\s*\}\}")


# ------------------------------------------------------------------------------------------------
# loading helpers
# ------------------------------------------------------------------------------------------------
def _require(module: str, dist: str):
    """Import a schema package; fail if the test extras list it, skip (with the reason) otherwise."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if f'"{dist}==' in (ROOT / "pyproject.toml").read_text():
            pytest.fail(f"{dist} is in the test extras but not installed")
        pytest.skip(f"{dist} is not installed: add it to the test extras to run this check")


def infra_files(*suffixes: str) -> list[Path]:
    """Files under infra/ (not caches, not a local infra/.env with real credentials)."""
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and p.name.endswith(suffixes)
                  and "__pycache__" not in p.parts and p.name != ".env")


@lru_cache(maxsize=None)
def yaml_docs(path: Path) -> tuple[Any, ...]:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in infra_files(".yaml", ".yml") if p.parent == K8S for d in yaml_docs(p)]


def k8s(kind: str, name: str) -> dict:
    found = [d for _, d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} under infra/k8s, found {len(found)}"
    return found[0]


@lru_cache(maxsize=None)
def env_example() -> dict[str, str]:
    values = {}
    for n, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f".env.example line {n}: not KEY=VALUE: {line!r}"
        assert key not in values, f".env.example: {key} set twice"
        values[key] = value
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, $$."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise AssertionError(f"${{{name}}} is required ({arg}) but .env.example does not set it")
        if op in (":-", "-") and (value is None or (op == ":-" and value == "")):
            return arg
        assert value is not None, f"${{{name}}} is not set in .env.example"
        return value

    out = VAR_REF.sub(one, text.replace("$$", "\0"))
    assert not re.search(r"\$[A-Za-z_{]", out), f"unsupported interpolation in {text!r}"
    return out.replace("\0", "$")


def _walk_strings(node: Any, fn) -> Any:
    if isinstance(node, dict):
        return {_walk_strings(k, fn): _walk_strings(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk_strings(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


@lru_cache(maxsize=None)
def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@lru_cache(maxsize=None)
def compose() -> dict:
    """The compose file as Compose sees it with infra/.env = .env.example."""
    env = env_example()
    return _walk_strings(compose_raw(), lambda s: interpolate(s, env))


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def pod_specs() -> Iterator[tuple[str, dict]]:
    """(label, pod spec) of every workload manifest and of the work-pool template."""
    for _, doc in k8s_docs():
        if doc["kind"] in ("Job", "Deployment"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]
    yield "gpu-work-pool-template.json", template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]


def containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"]]


@lru_cache(maxsize=None)
def template() -> dict:
    return json.loads(TEMPLATE.read_text())


@lru_cache(maxsize=None)
def cli_commands() -> dict:
    import typer.main

    from flows.cli import app

    return dict(typer.main.get_command(app).commands)


@lru_cache(maxsize=None)
def doc_text() -> str:
    return DOC.read_text()


def doc_code_lines() -> list[str]:
    """Command lines of the fenced code blocks of docs/infra.md (continuations joined, comments dropped)."""
    lines, block, pending = [], False, ""
    for raw in doc_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("```"):
            block = False if block else stripped[3:] or "text"
            continue
        if block not in ("bash", "sh", "text") or not stripped or stripped.startswith("#"):
            continue
        stripped = re.sub(r"\s+#\s.*$", "", stripped)  # trailing comment
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return lines


def doc_yaml_blocks() -> list[Any]:
    """The ```yaml blocks of docs/infra.md, parsed."""
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", doc_text(), re.S)]


def split_commands(line: str) -> list[list[str]]:
    """shlex tokens of a shell line, split at ; && || |."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    parts, current = [], []
    for tok in lexer:
        if tok in (";", "&&", "||", "|", "&"):
            parts.append(current)
            current = []
        else:
            current.append(tok)
    parts.append(current)
    return [p for p in parts if p]


def program_invocations(program: str) -> list[tuple[str, list[str]]]:
    """(where, argv after the program name) of every `program ...` in infra files and docs/infra.md."""
    found: list[tuple[str, list[str]]] = []

    def scan(argv: list[str], where: str) -> None:
        for i, tok in enumerate(argv):
            if tok == program or re.fullmatch(rf"/[\w./-]*/{program}", tok):  # also /path/to/program
                found.append((where, argv[i + 1:]))
                return

    for line in doc_code_lines():
        for argv in split_commands(line):
            if argv and argv[0] == "kubectl":
                continue
            if argv and argv[0] == "docker":
                # `docker run IMAGE snapgen ...`: the command after the image
                for i, tok in enumerate(argv):
                    if tok == program:
                        found.append(("docs/infra.md", argv[i + 1:]))
                        break
                continue
            scan(argv, "docs/infra.md")
    for where, argv in container_commands():
        scan(argv, where)
    return found


def container_commands() -> list[tuple[str, list[str]]]:
    """(where, command + args) of compose services, k8s containers and Dockerfile CMD/ENTRYPOINT."""
    out = []
    for name, svc in compose()["services"].items():
        cmd = svc.get("command")
        if isinstance(cmd, list):
            out.append((f"compose:{name}", [*(svc.get("entrypoint") or []), *cmd]))
    for label, pod in pod_specs():
        for c in containers(pod):
            argv = [*(c.get("command") or []), *(c.get("args") or [] if isinstance(c.get("args"), list) else [])]
            if argv:
                out.append((f"{label}:{c['name']}", argv))
    for path in infra_files("Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.mlflow"):
        for stage in dockerfile_stages(path):
            for instr, arg in stage["instructions"]:
                if instr in ("CMD", "ENTRYPOINT") and arg.startswith("["):
                    out.append((f"{path.name}:{stage['name']}", json.loads(arg)))
    return out


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not pending) or line.startswith("# syntax"):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instr, _, arg = line.partition(" ")
        out.append((instr.upper(), " ".join(arg.split())))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def dockerfile_stages(path: Path) -> list[dict]:
    stages: list[dict] = []
    for instr, arg in dockerfile_instructions(path):
        if instr == "FROM":
            words = arg.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"#{len(stages)}"
            stages.append({"name": name, "base": words[0], "instructions": []})
        else:
            assert stages or instr == "ARG", f"{path.name}: {instr} before FROM"
            if stages:
                stages[-1]["instructions"].append((instr, arg))
    return stages


def effective_user(stages: list[dict], index: int) -> str:
    """USER in effect at the end of stage `index` (inherited through FROM <earlier stage>)."""
    stage = stages[index]
    users = [arg for instr, arg in stage["instructions"] if instr == "USER"]
    if users:
        return users[-1]
    parents = [i for i, s in enumerate(stages[:index]) if s["name"] == stage["base"]]
    return effective_user(stages, parents[-1]) if parents else "root"


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(dist: str) -> str:
    for dep in pyproject()["project"]["dependencies"]:
        m = re.match(rf"^{re.escape(dist)}==([^\s;,]+)", dep)
        if m:
            return m.group(1)
    raise AssertionError(f"pyproject.toml does not pin {dist}")


# ------------------------------------------------------------------------------------------------
# every file parses
# ------------------------------------------------------------------------------------------------
def test_required_files_exist():
    missing = [f for f in REQUIRED_FILES if not (INFRA / f).is_file()]
    assert not missing, f"missing under infra/: {missing}"
    assert DOC.is_file()


@pytest.mark.parametrize("path", infra_files(".yaml", ".yml", ".json"), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_and_json_file_parses(path):
    if path.suffix == ".json":
        assert isinstance(json.loads(path.read_text()), dict)
    else:
        docs = yaml_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), f"{path.name}: expected mapping documents"


def test_env_file_is_ignored_and_not_tracked():
    assert ".env" in (INFRA / ".gitignore").read_text().split()
    tracked = subprocess.run(["git", "ls-files", "infra/.env"], cwd=ROOT, capture_output=True, text=True).stdout
    assert tracked.strip() == "", "infra/.env (real credentials) must never be committed"


# ------------------------------------------------------------------------------------------------
# compose
# ------------------------------------------------------------------------------------------------
def test_compose_validates_against_the_compose_specification():
    _require("check_jsonschema", "check-jsonschema")
    import importlib.resources

    import jsonschema

    schema = json.loads((importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
                         / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def test_compose_services_images_healthchecks_and_dependencies():
    services = compose()["services"]
    assert COMPOSE_SERVICES <= set(services), f"missing services: {COMPOSE_SERVICES - set(services)}"
    stage_names = {p.name: {s["name"] for s in dockerfile_stages(p)} for p in infra_files("Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.mlflow")}
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"{name}: needs image or build"
        if "build" in svc:
            build = svc["build"]
            dockerfile = (INFRA / build["context"] / build["dockerfile"]).resolve()
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
            assert (INFRA / build["context"]).resolve() == ROOT, f"{name}: build context must be the repository root"
            if "target" in build:
                assert build["target"] in stage_names[dockerfile.name], f"{name}: no stage {build['target']!r}"
        one_shot = svc.get("restart") == "no"
        if not one_shot:
            test = (svc.get("healthcheck") or {}).get("test")
            assert test and test != ["NONE"], f"{name}: long-running service without a healthcheck"
            assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name}: restart policy"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep!r}"
            condition = cond.get("condition") if isinstance(cond, dict) else None
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy but it has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is waited on to complete: make it one-shot"
    # mlflow needs its database and buckets; the worker needs every server
    assert {"mlflow-db", "minio-init"} <= set(services["mlflow"]["depends_on"])
    assert {"prefect-server", "mlflow", "minio-init"} <= set(services["prefect-worker"]["depends_on"])
    assert "prefect-db" in services["prefect-server"]["depends_on"]


def test_compose_named_volumes_are_declared_and_used():
    data = compose()
    declared = set(data.get("volumes") or {})
    used = set()
    for name, svc in data["services"].items():
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source")
            if source.startswith((".", "/")):
                assert (INFRA / source).exists(), f"{name}: bind-mounted {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source!r} is not declared"
                used.add(source)
    assert declared == used, f"declared but unused volumes: {declared - used}"
    for db in ("prefect-db", "mlflow-db"):
        assert any(str(v).endswith(":/var/lib/postgresql/data") for v in data["services"][db]["volumes"])


def test_compose_published_ports_bind_to_loopback():
    assert env_example()["BIND_ADDRESS"] == "127.0.0.1"
    published = 0
    for name, svc in compose_raw()["services"].items():
        for port in svc.get("ports") or []:
            assert isinstance(port, str), f"{name}: use the short syntax with an explicit host address"
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port} must bind to ${{BIND_ADDRESS:-127.0.0.1}}"
            published += 1
    for name, svc in compose()["services"].items():
        for port in svc.get("ports") or []:
            assert port.startswith("127.0.0.1:") and port.count(":") == 2, f"{name}: {port}"
    assert published >= 4  # prefect, mlflow, minio api + console
    for name in ("prefect-db", "mlflow-db", "prefect-worker", "minio-init"):
        assert not compose()["services"][name].get("ports"), f"{name} must not publish ports"


def test_compose_variables_come_from_env_example():
    text = COMPOSE.read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")).replace("$$", "")
    referenced = {m.group(1) for m in VAR_REF.finditer(body)}
    bare = set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", body))
    assert not bare, f"use ${{VAR}} (or $$VAR for the container's shell): {bare}"
    defined = set(env_example())
    assert referenced - defined == set(), f"referenced but not in .env.example: {referenced - defined}"
    assert defined - referenced == set(), f"in .env.example but unused: {defined - referenced}"
    compose()  # every required variable resolves


def test_env_example_holds_placeholders_only():
    secret_keys = [k for k in env_example() if SECRET_NAME.search(k) or k == "MINIO_ROOT_USER"]
    assert len(secret_keys) >= 8
    for key in secret_keys:
        value = env_example()[key]
        if key == "PREFECT_AUTH_STRING":  # user:password
            value = value.partition(":")[2]
        assert value.startswith("change-me"), f".env.example {key}: use a change-me placeholder, not a value"


def _only_interpolations(value: str) -> bool:
    return VAR_REF.sub("", value).strip() == ""


def test_compose_has_no_literal_secrets():
    for name, svc in compose_raw()["services"].items():
        for key, value in service_env(svc).items():
            if SECRET_NAME.search(key):
                assert _only_interpolations(value), f"{name}: {key} must come from infra/.env, not a literal"
            for m in re.finditer(r"://([^/\s:@]+):([^@\s]+)@", value):
                assert _only_interpolations(m.group(2)), f"{name}: {key} embeds a literal password"
        for tok in (svc.get("command") or []) if isinstance(svc.get("command"), list) else []:
            assert not re.search(r"://[^/\s:@]+:[^@\s$]+@", tok), f"{name}: credentials on the command line"
    # database URIs (with passwords) go through env vars, not argv
    mlflow_cmd = " ".join(compose()["services"]["mlflow"]["command"])
    assert "postgresql" not in mlflow_cmd and "MLFLOW_BACKEND_STORE_URI" in service_env(compose_raw()["services"]["mlflow"])


def test_compose_auth_is_enabled_everywhere():
    services = compose_raw()["services"]
    server_env = service_env(services["prefect-server"])
    assert _only_interpolations(server_env["PREFECT_SERVER_API_AUTH_STRING"])
    assert server_env["PREFECT_SERVER_API_AUTH_STRING"] == service_env(services["prefect-worker"])["PREFECT_API_AUTH_STRING"]
    assert "postgresql+asyncpg://" in server_env["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow = compose()["services"]["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    assert {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_CONFIG_PATH"} <= set(service_env(mlflow))
    worker_env = service_env(compose()["services"]["prefect-worker"])
    assert worker_env["MLFLOW_TRACKING_USERNAME"] and worker_env["MLFLOW_TRACKING_PASSWORD"]
    minio = service_env(services["minio"])
    assert _only_interpolations(minio["MINIO_ROOT_USER"]) and _only_interpolations(minio["MINIO_ROOT_PASSWORD"])
    # the application uses its own MinIO key pair, not the root credentials
    assert worker_env["SNAPGEN_AWS_ACCESS_KEY_ID"] == env_example()["MINIO_APP_ACCESS_KEY"]
    assert service_env(services["mlflow"])["AWS_ACCESS_KEY_ID"] == service_env(services["prefect-worker"])["SNAPGEN_AWS_ACCESS_KEY_ID"]


def _mlflow_auth_module(name: str):
    """mlflow/server/auth/<name>.py without the package's __init__ (which needs Flask-WTF, installed
    in the server image through mlflow[auth] but not a dependency of the project)."""
    import mlflow.server

    path = Path(mlflow.server.__file__).parent / "auth" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_mlflow_auth_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compose_mlflow_server_command_parses_and_auth_config_is_valid(monkeypatch):
    from mlflow.cli import server

    read_auth_config = _mlflow_auth_module("config").read_auth_config
    get_permission = _mlflow_auth_module("permissions").get_permission

    for where, argv in program_invocations("mlflow"):
        assert argv[0] == "server", f"{where}: mlflow {argv[0]}"
        server.make_context("server", list(argv[1:]))  # raises on an unknown option or a bad value
    svc = compose()["services"]["mlflow"]
    argv = svc["command"]
    assert argv[:2] == ["mlflow", "server"]
    ctx = server.make_context("server", list(argv[2:]))
    assert ctx.params["app_name"] == "basic-auth" and ctx.params["serve_artifacts"]
    assert ctx.params["host"] == "0.0.0.0" and ctx.params["port"] == 5000
    assert ctx.params["artifacts_destination"].startswith(f"s3://{env_example()['MLFLOW_BUCKET']}/")
    assert "mlflow" in ctx.params["allowed_hosts"].split(","), "workers reach MLflow as http://mlflow:5000"
    env = service_env(svc)
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://") and "@mlflow-db:5432/mlflow" in env["MLFLOW_BACKEND_STORE_URI"]
    # the auth config as the server reads it
    mount = next(v for v in svc["volumes"] if v.endswith(":/etc/mlflow/basic_auth.ini:ro"))
    ini = INFRA / mount.split(":", 1)[0]
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "x")
    config = read_auth_config()
    get_permission(config.default_permission)  # raises on an unknown permission
    assert config.default_permission in ("NO_PERMISSIONS", "READ")
    parser = configparser.ConfigParser()
    parser.read(ini)
    assert "admin_password" not in parser["mlflow"], "the admin password comes from the environment"
    auth_db = config.database_uri.removeprefix("sqlite:///")
    assert any(v.endswith(":" + str(Path(auth_db).parent)) for v in svc["volumes"]), "auth DB must be on a volume"


def test_compose_prefect_commands_parse():
    argv_worker = compose()["services"]["prefect-worker"]["command"]
    bound = prefect_parse(argv_worker[1:])
    assert bound["work_pool_name"] == "snapgen-process" and bound["worker_type"] == "process"
    assert bound["with_healthcheck"] is True
    port = service_env(compose()["services"]["prefect-worker"])["PREFECT_WORKER_WEBSERVER_PORT"]
    assert f"localhost:{port}/health" in " ".join(compose()["services"]["prefect-worker"]["healthcheck"]["test"])
    server = compose()["services"]["prefect-server"]["command"]
    assert prefect_parse(server[1:])["host"] == "0.0.0.0"


def test_compose_snapgen_settings_are_real_and_valid():
    from tasks.settings import SnapgenSettings

    env = service_env(compose()["services"]["prefect-worker"])
    values = {k[len("SNAPGEN_"):].lower(): v for k, v in env.items() if k.startswith("SNAPGEN_")}
    assert set(values) <= set(SnapgenSettings.model_fields), f"unknown settings: {set(values) - set(SnapgenSettings.model_fields)}"
    settings = SnapgenSettings(**values)
    assert settings.storage_root == f"s3://{env_example()['SNAPGEN_BUCKET']}/snapgen"
    assert settings.mlflow_tracking_uri == "http://mlflow:5000" and settings.s3_endpoint_url == "http://minio:9000"
    assert "change-me" not in json.dumps(settings.masked_dict(), default=str)


# ------------------------------------------------------------------------------------------------
# Dockerfiles
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,base,index", [("Dockerfile.cpu", "python:3.11-", "https://download.pytorch.org/whl/cpu"),
                                             ("Dockerfile.cuda", "nvidia/cuda:", "https://download.pytorch.org/whl/cu128")])
def test_training_dockerfiles(name, base, index):
    path = DOCKER / name
    stages = dockerfile_stages(path)
    assert stages[0]["base"].startswith(base), f"{name}: base image {stages[0]['base']}"
    text = " ".join(f"{i} {a}" for s in stages for i, a in s["instructions"])
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for s in stages for i, a in s["instructions"] if i == "ARG" and "=" in a}
    runs = [interpolate_docker(a, args) for s in stages for i, a in s["instructions"] if i == "RUN"]
    torch_pin = f"torch=={pinned('torch')}"
    assert torch_pin == "torch==2.13.0"
    torch_runs = [r for r in runs if "pip install" in r and re.search(r"\btorch==", r)]
    assert torch_runs and all(torch_pin in r for r in torch_runs), f"{name}: install {torch_pin}"
    assert any(f"--index-url {index}" in r for r in torch_runs), f"{name}: torch from {index}"
    pip_dot = [i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r)]
    assert pip_dot and min(pip_dot) > runs.index(torch_runs[0]), f"{name}: torch first, then `pip install .`"
    if "cuda" in name:
        assert "python3.11" in text, "the CUDA image must provide Python 3.11"
    for i, stage in enumerate(stages):
        user = effective_user(stages, i)
        assert user.split(":")[0] not in ("root", "0"), f"{name} stage {stage['name']}: runs as root"
    assert re.fullmatch(r"\d+:\d+", effective_user(stages, len(stages) - 1)), "numeric USER (runAsNonRoot can verify it)"
    entry = [json.loads(a) for s in stages for i, a in s["instructions"] if i == "ENTRYPOINT"]
    assert entry and entry[-1][0] == "tini", f"{name}: tini as PID 1 (forwards SIGTERM, reaps the launcher's children)"
    assert "COPY . ." in text and "SNAPGEN_HOME=/var/lib/snapgen" in text


def interpolate_docker(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def test_mlflow_dockerfile_pins_the_project_versions():
    stages = dockerfile_stages(DOCKER / "Dockerfile.mlflow")
    runs = " ".join(a for s in stages for i, a in s["instructions"] if i == "RUN")
    assert f"mlflow[auth]=={pinned('mlflow')}" in runs and f"boto3=={pinned('boto3')}" in runs
    assert re.search(r"psycopg2-binary==[\d.]+", runs)
    assert effective_user(stages, len(stages) - 1).split(":")[0] not in ("root", "0")
    assert compose()["services"]["mlflow"]["image"].endswith(pinned("mlflow"))


def test_k8s_worker_stage_installs_prefect_kubernetes():
    stages = {s["name"]: s for s in dockerfile_stages(DOCKER / "Dockerfile.cpu")}
    runs = " ".join(a for i, a in stages["k8s-worker"]["instructions"] if i == "RUN")
    assert re.search(r"prefect-kubernetes==[\d.]+", runs)


def _ignored(patterns: list[str], path: str) -> bool:
    """.dockerignore semantics: the last matching pattern wins; a matched folder drops what is under it."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "(?:/.*)?")

    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if regex(pattern.lstrip("!").strip("/")).fullmatch(path):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.mlflow"])
def test_dockerignore_keeps_sources_and_drops_state(name):
    patterns = [line.strip() for line in (DOCKER / f"{name}.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for keep in ("pyproject.toml", "README.md", "snapgen_model/__init__.py", "tasks/settings.py", "flows/cli.py",
                 "infra/scripts/pretrain_spec.py"):
        assert not _ignored(patterns, keep), f"{name}.dockerignore drops {keep}"
    for drop in (".git/HEAD", ".venv/bin/python", ".snapgen/mlflow.db", "infra/.env", "flows/__pycache__/x.pyc"):
        assert _ignored(patterns, drop), f"{name}.dockerignore keeps {drop}"


# ------------------------------------------------------------------------------------------------
# Kubernetes manifests
# ------------------------------------------------------------------------------------------------
KNOWN_KINDS = {("v1", "Namespace"), ("v1", "ConfigMap"), ("v1", "ServiceAccount"), ("v1", "Service"),
               ("v1", "PersistentVolumeClaim"), ("apps/v1", "Deployment"), ("batch/v1", "Job"),
               ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding")}


def test_k8s_kinds_names_and_namespaces():
    seen = set()
    docs = k8s_docs()
    assert len(docs) >= 10
    for path, doc in docs:
        assert (doc.get("apiVersion"), doc.get("kind")) in KNOWN_KINDS, f"{path.name}: {doc.get('apiVersion')}/{doc.get('kind')}"
        meta = doc["metadata"]
        key = (doc["kind"], meta["name"])
        assert key not in seen, f"{path.name}: {key} defined twice"
        seen.add(key)
        if doc["kind"] == "Namespace":
            assert meta["name"] == NAMESPACE
        else:
            assert meta.get("namespace") == NAMESPACE, f"{path.name}: {key} must be in namespace {NAMESPACE}"
        assert doc["kind"] != "Secret", "no Secret manifests (no secret values in the repository): kubectl create secret"


def test_k8s_manifests_validate_against_kubernetes_schemas():
    kv = _require("kubernetes_validate", "kubernetes-validate")
    for version in K8S_VERSIONS:
        for path, doc in k8s_docs():
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): "
                            f"{'/'.join(map(str, exc.path))}: {exc.message}")


def test_k8s_schema_check_can_fail():
    """The schema check rejects a broken manifest (so a green run means something)."""
    kv = _require("kubernetes_validate", "kubernetes-validate")
    job = copy.deepcopy(k8s("Job", "snapgen-pretrain"))
    job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["gpus"] = {"nvidia": 8}
    with pytest.raises(kv.ValidationError):
        kv.validate(job, K8S_VERSIONS[-1], strict=True)
    job = copy.deepcopy(k8s("Job", "snapgen-pretrain"))
    job["spec"]["template"]["spec"]["containers"][0]["comand"] = ["torchrun"]
    with pytest.raises(kv.ValidationError):
        kv.validate(job, K8S_VERSIONS[-1], strict=True)


def secret_refs(node: Any) -> Iterator[tuple[str, str, str]]:
    """(kind, name, key) of every secretKeyRef / configMapKeyRef below `node`."""
    if isinstance(node, dict):
        for kind in ("secretKeyRef", "configMapKeyRef"):
            if kind in node and isinstance(node[kind], dict):
                yield kind, node[kind]["name"], node[kind]["key"]
        for v in node.values():
            yield from secret_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from secret_refs(v)


def documented_secrets() -> dict[str, set[str]]:
    """{secret name: keys} from the `kubectl create secret generic` commands of docs/infra.md."""
    secrets: dict[str, set[str]] = {}
    for line in doc_code_lines():
        for argv in split_commands(line):
            if argv[:1] == ["kubectl"] and "secret" in argv and "generic" in argv:
                assert argv[argv.index("-n") + 1] == NAMESPACE
                name = argv[argv.index("generic") + 1]
                keys = secrets.setdefault(name, set())
                for tok in argv:
                    m = re.match(r"--from-(literal|file)=([\w.-]+)=(.*)", tok)
                    if m:
                        keys.add(m.group(2))
    return secrets


def test_secret_and_configmap_references_are_defined():
    secrets = documented_secrets()
    assert secrets, "docs/infra.md must show how to create the secrets"
    for line in doc_code_lines():
        if "create secret" in line:
            for m in re.finditer(r"--from-literal=[\w.-]+=(\S+)", line):
                assert m.group(1).startswith(('"$', "$")), f"docs: secret values come from the shell, not literals: {line}"
    config = k8s("ConfigMap", "snapgen-config")["data"]
    refs = [r for _, d in k8s_docs() for r in secret_refs(d)] + list(secret_refs(template()))
    assert any(kind == "secretKeyRef" for kind, _, _ in refs)
    for kind, name, key in refs:
        if kind == "secretKeyRef":
            assert key in secrets.get(name, set()), f"secretKeyRef {name}/{key} is not created in docs/infra.md"
        else:
            assert name == "snapgen-config" and key in config, f"configMapKeyRef {name}/{key} is not in config.yaml"
    used_secrets = {(n, k) for kind, n, k in refs if kind == "secretKeyRef"}
    worker_env = {e["name"]: e.get("value") for e in k8s("Deployment", "snapgen-worker")["spec"]["template"]["spec"]["containers"][0]["env"]}
    used_secrets.add((worker_env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME"],
                      worker_env["PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY"]))
    documented = {(n, k) for n, keys in secrets.items() for k in keys}
    assert documented == used_secrets, f"documented but unused: {documented - used_secrets}; used but undocumented: {used_secrets - documented}"


def k8s_env_entries() -> Iterator[tuple[str, dict]]:
    for label, pod in pod_specs():
        for c in containers(pod):
            for e in c.get("env") or [] if isinstance(c.get("env"), list) else []:
                yield f"{label}:{c['name']}", e


def test_no_literal_secrets_in_k8s():
    for where, entry in k8s_env_entries():
        if SECRET_NAME.search(entry["name"]) and not entry["name"].endswith(("_SECRET_NAME", "_SECRET_KEY")):
            assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), \
                f"{where}: {entry['name']} must come from a secretKeyRef"
    for key, value in k8s("ConfigMap", "snapgen-config")["data"].items():
        assert not SECRET_NAME.search(key), f"config.yaml: {key} looks secret; use a Secret"
        assert not re.search(r"://[^/\s:@]+:[^@\s]+@", value), f"config.yaml: {key} embeds credentials"


def test_all_infra_files_are_free_of_credentials():
    patterns = [(re.compile(r"AKIA[0-9A-Z]{16}"), "an AWS access key id"),
                (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
                (re.compile(r"\bminioadmin\b"), "MinIO's default credentials"),
                (re.compile(r"://[\w.-]+:(?!\$|\*\*\*|\{\{)[^@\s/]+@"), "a URI with a literal password")]
    for path in [*infra_files(""), DOC]:
        if path.name == ".env.example":
            continue
        text = path.read_text()
        for pattern, what in patterns:
            m = pattern.search(text)
            assert not m, f"{path.relative_to(ROOT)}: {what}: {m.group(0)!r}"


def test_pods_run_as_non_root_without_privileges():
    for label, pod in pod_specs():
        ctx = pod.get("securityContext") or {}
        assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) != 0, f"{label}: runAsNonRoot"
        for c in containers(pod):
            sc = c.get("securityContext") or {}
            assert sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged"), f"{label}:{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{label}:{c['name']}: drop all capabilities"
        mounts = {m["name"] for c in containers(pod) for m in c.get("volumeMounts", [])}
        home = template()["variables"]["properties"]["home_volume"]["default"]
        volumes = {(home if v == "{{ home_volume }}" else v)["name"] for v in pod.get("volumes", [])}
        assert mounts <= volumes, f"{label}: mounts without volumes: {mounts - volumes}"


def test_worker_rbac_and_deployment():
    sa = k8s("ServiceAccount", "snapgen-worker")
    deploy = k8s("Deployment", "snapgen-worker")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    binding = k8s("RoleBinding", "snapgen-worker")
    assert {"kind": "ServiceAccount", "name": "snapgen-worker", "namespace": NAMESPACE} in binding["subjects"]
    role = k8s(binding["roleRef"]["kind"], binding["roleRef"]["name"])
    grants = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"create", "get", "list", "watch", "delete"} <= grants[("batch", "jobs")]
    assert {"get", "list", "watch"} <= grants[("", "pods")] and "get" in grants[("", "pods/log")]
    assert not any("*" in verbs or r == "secrets" for (g, r), verbs in grants.items()), "least privilege"
    assert deploy["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    c = pod["containers"][0]
    argv = [*c["command"], *c["args"]]
    bound = prefect_parse(argv[argv.index("prefect") + 1:])
    assert bound["worker_type"] == "kubernetes" and bound["work_pool_name"] == "snapgen-gpu"
    env = {e["name"]: e for e in c["env"]}
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]["value"] == NAMESPACE
    assert c["livenessProbe"]["httpGet"]["port"] in [p["name"] for p in c["ports"]]
    assert str(c["ports"][0]["containerPort"]) == env["PREFECT_WORKER_WEBSERVER_PORT"]["value"]
    # the flow-run service account exists and has no token
    runner = template()["variables"]["properties"]["service_account_name"]["default"]
    assert k8s("ServiceAccount", runner).get("automountServiceAccountToken") is False


def torchrun_args(job: dict, index: int = 0):
    from torch.distributed.run import get_args_parser

    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["torchrun"]
    args = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in c["args"]]  # Kubernetes' $(VAR) expansion
    return get_args_parser().parse_args(args), c


def test_multinode_job_is_consistent():
    job = k8s("Job", "snapgen-pretrain")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 2
    assert pod["restartPolicy"] == "Never"
    args, c = torchrun_args(job)
    assert args.nnodes == str(spec["completions"]), "--nnodes must equal the Job's completions"
    assert int(args.nproc_per_node) == int(c["resources"]["limits"][GPU]), "--nproc-per-node must equal the GPU limit"
    assert "$(JOB_COMPLETION_INDEX)" in " ".join(c["args"]) and args.node_rank == 0
    assert args.rdzv_backend == "c10d" and args.max_restarts == 0
    # rendezvous on pod 0 through the headless Service named by the pod's subdomain
    svc = k8s("Service", pod["subdomain"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"].get("publishNotReadyAddresses") is True
    host, port = args.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]] and int(port) in [p["containerPort"] for p in c["ports"]]
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    # the launcher module exists; the spec is on the shared volume
    assert args.module and importlib.util.find_spec(args.training_script) is not None
    assert args.training_script == "snapgen_model.training.launch"
    spec_path = args.training_script_args[0]
    shared = _mount_of(pod, c, spec_path)
    assert shared["persistentVolumeClaim"]["claimName"] == k8s("PersistentVolumeClaim", "snapgen-shared")["metadata"]["name"]
    assert "ReadWriteMany" in k8s("PersistentVolumeClaim", "snapgen-shared")["spec"]["accessModes"]
    assert pod["nodeSelector"] and pod["tolerations"] and pod.get("terminationGracePeriodSeconds", 30) >= 120


def _mount_of(pod: dict, container: dict, path: str) -> dict:
    mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{path} is on no mounted volume"
    return next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])


def load_prepare_script():
    spec = importlib.util.spec_from_file_location("pretrain_spec", INFRA / "scripts" / "pretrain_spec.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_job_matches_the_multinode_job():
    script = load_prepare_script()
    prep = k8s("Job", "snapgen-pretrain-prepare")
    pod = prep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"][0] == "python"
    script_in_image = c["command"][1]
    assert script_in_image == "/opt/snapgen/app/infra/scripts/pretrain_spec.py", "WORKDIR of the images + repo path"
    opts = script.build_parser().parse_args(c["args"])
    job = k8s("Job", "snapgen-pretrain")
    args, train = torchrun_args(job)
    assert opts.nodes == job["spec"]["completions"] == int(args.nnodes)
    assert opts.gpus_per_node == int(args.nproc_per_node) == int(train["resources"]["limits"][GPU])
    assert str(opts.out) == args.training_script_args[0]
    assert _mount_of(pod, c, str(opts.out)) == _mount_of(job["spec"]["template"]["spec"], train, str(opts.out))
    home = {e["name"]: e.get("value") for e in c["env"]}["SNAPGEN_HOME"]
    assert home == {e["name"]: e.get("value") for e in train["env"]}["SNAPGEN_HOME"]
    _mount_of(pod, c, home + "/x")
    batch = [s for s in opts.set_ if s.startswith("batch_size=")]
    assert batch and int(batch[0].split("=")[1]) % (opts.nodes * opts.gpus_per_node) == 0


def test_prepare_script_writes_the_spec_the_launcher_reads(tmp_path):
    from snapgen_model.config_base import ConfigError
    from snapgen_model.distill.cache import CacheConfig
    from snapgen_model.training.pretrain import PretrainConfig

    script = load_prepare_script()
    manifest = {"key": "k" * 16, "config": CacheConfig(targets_per_sample=1).to_dict(), "encoders": [{"name": "clip"}]}
    spec = script.build_spec(tmp_path / "cache", manifest, preset="toy-smoke", preset_overrides=[],
                             pretrain_overrides=["steps=4", "batch_size=8"], nodes=2, gpus_per_node=2, home=tmp_path)
    assert set(spec) >= {"preset", "overrides", "pretrain", "cache", "cache_dir", "encoders", "state_root", "result_path"}
    cfg = PretrainConfig.from_dict(spec["pretrain"])
    assert (cfg.devices, cfg.num_nodes, cfg.strategy, cfg.accelerator, cfg.steps) == (2, 2, "ddp", "gpu", 4)
    assert CacheConfig.from_dict(spec["cache"]).targets_per_sample == 1 and spec["encoders"] == ["clip"]
    assert spec["state_root"].startswith(str(tmp_path / "runs" / "pretrain-")) and spec["state_root"].endswith("/state")
    with pytest.raises(ConfigError, match="batch_size"):
        script.build_spec(tmp_path, manifest, preset="toy-smoke", preset_overrides=[], pretrain_overrides=["batch_size=6"],
                          nodes=2, gpus_per_node=2, home=tmp_path)
    with pytest.raises(ConfigError, match="devices"):
        script.build_spec(tmp_path, manifest, preset="toy-smoke", preset_overrides=[], pretrain_overrides=["devices=4"],
                          nodes=2, gpus_per_node=2, home=tmp_path)
    out = tmp_path / "shared" / "spec.json"
    script.write_json_atomic(out, spec)
    assert json.loads(out.read_text()) == spec and not list(out.parent.glob(".*tmp*"))


# ------------------------------------------------------------------------------------------------
# the GPU work-pool template
# ------------------------------------------------------------------------------------------------
# prefect-kubernetes compares each flow-run manifest with this base and rejects missing or different values
PREFECT_K8S_BASE_MANIFEST = {
    "apiVersion": "batch/v1", "kind": "Job", "metadata": {"annotations": {}, "labels": {}},
    "spec": {"template": {"spec": {"parallelism": 1, "completions": 1, "restartPolicy": "Never",
                                   "containers": [{"name": "prefect-job"}]}}},
}


def render_template(values: dict[str, Any]) -> dict:
    """The job configuration the worker builds: defaults + job variables, through Prefect's templating."""
    from prefect.utilities.templating import apply_values

    tpl = template()
    variables = {k: copy.deepcopy(v["default"]) for k, v in tpl["variables"]["properties"].items() if "default" in v}
    variables.update(values)
    return apply_values(copy.deepcopy(tpl["job_configuration"]), variables)


def _drop_none(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_none(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_drop_none(v) for v in node if v is not None]
    return node


def test_template_passes_prefects_work_pool_validation():
    from prefect.server.schemas.actions import WorkPoolCreate

    pool = WorkPoolCreate(name="snapgen-gpu", type="kubernetes", base_job_template=template())
    assert pool.base_job_template["job_configuration"]["job_manifest"]["kind"] == "Job"
    broken = copy.deepcopy(template())
    del broken["variables"]["properties"]["gpu_count"]
    with pytest.raises(ValueError, match="gpu_count"):
        WorkPoolCreate(name="snapgen-gpu", type="kubernetes", base_job_template=broken)


def test_template_variables_are_a_valid_schema_with_valid_defaults():
    import jsonschema

    variables = template()["variables"]
    cls = jsonschema.validators.validator_for(variables, default=jsonschema.Draft202012Validator)
    cls.check_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    cls(variables).validate(defaults)
    gpu = variables["properties"]["gpu_count"]
    assert gpu["type"] == "integer" and gpu["default"] >= 1 and gpu.get("minimum") == 0
    with pytest.raises(jsonschema.ValidationError):
        cls(variables).validate(defaults | {"gpu_count": "eight"})
    used = set(PLACEHOLDER.findall(json.dumps(template()["job_configuration"])))
    custom = {"gpu_count", "node_selector", "tolerations", "shm_size", "home_volume"}
    assert custom <= used, f"declared but unused variables: {custom - used}"


def test_template_requests_gpus_through_the_gpu_count_variable():
    manifest = template()["job_configuration"]["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"][GPU] == "{{ gpu_count }}"
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"
    for key in ("command", "env", "labels", "name", "namespace", "job_manifest"):
        assert key in template()["job_configuration"], f"job_configuration.{key} (Prefect's kubernetes format)"


def test_rendered_template_is_a_valid_prefect_and_kubernetes_job():
    from jsonpatch import JsonPatch

    config = render_template({"gpu_count": 4, "name": "nightly-abc", "command": "prefect flow-run execute",
                              "labels": {"prefect.io/flow-run-id": "1"}, "annotations": {}, "env": {"A": "1"}})
    manifest = _drop_none(config["job_manifest"])
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"][GPU] == 4
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert manifest["metadata"]["namespace"] == NAMESPACE and manifest["metadata"]["generateName"] == "nightly-abc-"
    assert {v["name"] for v in pod["volumes"]} >= {m["name"] for m in container["volumeMounts"]}
    # prefect-kubernetes' own manifest check
    patch = JsonPatch.from_diff(manifest, PREFECT_K8S_BASE_MANIFEST)
    problems = [op for op in patch if op["op"] in ("add", "replace")]
    assert not problems, f"prefect-kubernetes would reject the manifest: {problems}"
    # the Kubernetes API schema (the API server drops the two pod-level fields Prefect insists on, with a warning)
    kv = _require("kubernetes_validate", "kubernetes-validate")
    api = copy.deepcopy(manifest)
    api["metadata"].pop("namespace")
    for key in ("parallelism", "completions"):
        api["spec"]["template"]["spec"].pop(key)
    container = api["spec"]["template"]["spec"]["containers"][0]
    container["args"] = container["args"].split() if isinstance(container.get("args"), str) else container.get("args")
    container["env"] = [{"name": "A", "value": "1"}, *container["env"]]  # the worker turns the env dict into a list
    for version in K8S_VERSIONS:
        kv.validate(api, version, strict=True)
    # a zero-GPU override still renders (CPU flow runs on the same pool)
    assert render_template({"gpu_count": 0})["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][GPU] == 0


# ------------------------------------------------------------------------------------------------
# commands: the CLI, prefect, torchrun and mlflow as written in infra/ and docs/infra.md
# ------------------------------------------------------------------------------------------------
def prefect_parse(argv: list[str]) -> dict[str, Any]:
    """Bind `prefect ARGV` with Prefect's own CLI parser (nothing runs)."""
    from prefect.cli._app import _app

    try:
        _, bound, _ = _app.parse_args(list(argv), exit_on_error=False, print_error=False)
    except Exception as exc:  # cyclopts' errors
        raise AssertionError(f"`prefect {' '.join(argv)}` does not parse: {exc}") from None
    return dict(bound.arguments)


def test_snapgen_commands_in_infra_and_docs_exist_with_their_options():
    commands = cli_commands()
    invocations = program_invocations("snapgen")
    assert any(argv and argv[0] == "pretrain" for _, argv in invocations), "docs/infra.md shows snapgen pretrain"
    for where, argv in invocations:
        if not argv or argv[0].startswith("-"):
            continue  # `snapgen --help`
        name = argv[0]
        assert name in commands, f"{where}: `snapgen {name}` is not a command of flows/cli.py ({sorted(commands)})"
        options = {opt for p in commands[name].params for opt in (*p.opts, *p.secondary_opts)}
        for tok in argv[1:]:
            if tok.startswith("--"):
                assert tok.split("=", 1)[0] in options, f"{where}: `snapgen {name}` has no option {tok.split('=', 1)[0]}"


def test_prefect_commands_in_infra_and_docs_parse():
    invocations = program_invocations("prefect")
    seen = {tuple(argv[:2]) for _, argv in invocations}
    for needed in [("work-pool", "create"), ("work-pool", "set-concurrency-limit"), ("concurrency-limit", "create"),
                   ("gcl", "create"), ("worker", "start"), ("deploy", "--all")]:
        assert needed in seen, f"docs/infra.md should show `prefect {' '.join(needed)}`"
    for where, argv in invocations:
        bound = prefect_parse([a for a in argv])
        if argv[:2] == ["work-pool", "create"] and bound.get("type") == "kubernetes":
            assert bound["name"] == "snapgen-gpu"
            assert (ROOT / bound["base_job_template"]).resolve() == TEMPLATE


def test_torchrun_in_docs_matches_the_job():
    from torch.distributed.run import get_args_parser

    job_args, _ = torchrun_args(k8s("Job", "snapgen-pretrain"))
    docs = [argv for where, argv in program_invocations("torchrun") if where == "docs/infra.md"]
    assert docs
    for argv in docs:
        args = get_args_parser().parse_args([a.replace("$JOB_COMPLETION_INDEX", "0") for a in argv])
        for field in ("nnodes", "nproc_per_node", "rdzv_backend", "rdzv_endpoint", "training_script", "training_script_args"):
            assert getattr(args, field) == getattr(job_args, field), f"docs/infra.md torchrun {field} differs from the Job"


def test_python_modules_run_with_dash_m_exist():
    for where, argv in container_commands():
        for i, tok in enumerate(argv[:-1]):
            if tok == "-m" and not argv[i + 1].startswith("-"):
                assert importlib.util.find_spec(argv[i + 1]) is not None, f"{where}: no module {argv[i + 1]}"


def test_snapgen_env_vars_everywhere_are_settings_fields():
    from tasks.settings import CONFIG_FILE_ENV, SnapgenSettings

    fields = set(SnapgenSettings.model_fields)
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in [*infra_files(""), DOC]}
    found = 0
    for where, text in texts.items():
        for name in set(re.findall(r"\bSNAPGEN_[A-Z0-9_]+\b", text)):
            if name in (CONFIG_FILE_ENV, "SNAPGEN_BUCKET", "SNAPGEN_IMAGE"):  # the config file; compose-only variables
                continue
            found += 1
            assert name[len("SNAPGEN_"):].lower() in fields, f"{where}: {name} is not a setting of tasks/settings.py"
    assert found >= 10


def test_deployments_named_in_docs_exist_in_prefect_yaml():
    path = ROOT / "prefect.yaml"
    named = set(re.findall(r"\bsnapgen-(?:nightly|reevaluate|export|promote)\b", doc_text()))
    assert named == {"snapgen-nightly", "snapgen-reevaluate", "snapgen-export", "snapgen-promote"}
    if not path.exists():
        pytest.skip("prefect.yaml is not in the repository yet")
    config = yaml.safe_load(path.read_text())
    deployments = {d["name"]: d for d in config.get("deployments") or []}
    assert named <= set(deployments), f"not in prefect.yaml: {named - set(deployments)}"
    for name, entry in re.findall(r"`(snapgen-\w+)`\s*\n?\(`(flows/[\w/]+\.py:\w+)`\)", doc_text()):
        assert deployments[name]["entrypoint"] == entry, f"{name}: docs say {entry}"
    pools = {((d.get("work_pool") or {}).get("name")) for d in deployments.values()}
    assert "snapgen-process" in pools
    # `prefect deployment run 'FLOW/DEPLOYMENT'`: FLOW is the name of the deployment's flow
    documented = {d["name"]: d for b in doc_yaml_blocks() if isinstance(b, list) for d in b}
    for flow_name, deployment in re.findall(r"prefect deployment run '([\w-]+)/([\w-]+)'", doc_text()):
        assert deployment in {**documented, **deployments}, f"docs run an undefined deployment {deployment}"
        entry = {**documented, **deployments}[deployment]["entrypoint"]
        file, _, attr = entry.partition(":")
        if (ROOT / file).is_file():
            module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
            assert getattr(module, attr).name == flow_name, f"docs: flow of {deployment} is {getattr(module, attr).name!r}"


def _validate_job_variables(job_variables: dict, where: str) -> None:
    import jsonschema

    variables = template()["variables"]
    unknown = set(job_variables) - set(variables["properties"])
    assert not unknown, f"{where}: job variables the GPU template does not declare: {unknown}"
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validators.validator_for(variables)(variables).validate(defaults | job_variables)


def test_gpu_deployments_use_the_templates_job_variables():
    blocks = [b for b in doc_yaml_blocks() if isinstance(b, list)]
    gpu = [d for b in blocks for d in b if (d.get("work_pool") or {}).get("name") == "snapgen-gpu"]
    assert gpu, "docs/infra.md shows a deployment on the snapgen-gpu pool"
    for deployment in gpu:
        _validate_job_variables(deployment["work_pool"]["job_variables"], f"docs/infra.md {deployment['name']}")
        assert deployment["work_pool"]["job_variables"]["gpu_count"] >= 1
        file, _, attr = deployment["entrypoint"].partition(":")
        if (ROOT / file).is_file():
            assert re.search(rf"^def {attr}\(", (ROOT / file).read_text(), re.M), f"no flow {attr} in {file}"
        if "preset" in (deployment.get("parameters") or {}):
            from snapgen_model.presets import get_preset

            get_preset(deployment["parameters"]["preset"])
    run = re.findall(r"prefect deploy --name ([\w-]+)", doc_text())
    assert {d["name"] for d in gpu} <= set(run)
    path = ROOT / "prefect.yaml"
    if path.exists():  # the repository's own GPU pool definitions and deployments
        config = yaml.safe_load(path.read_text())
        pools = [*((config.get("definitions") or {}).get("work_pools") or {}).values(),
                 *[d.get("work_pool") or {} for d in config.get("deployments") or []]]
        for pool in pools:
            if pool.get("name") == "snapgen-gpu":
                _validate_job_variables(pool.get("job_variables") or {}, "prefect.yaml")


def test_images_set_pwd_for_prefects_pull_step():
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        instructions = [(i, a) for s in dockerfile_stages(DOCKER / name) for i, a in s["instructions"]]
        workdir = [a for i, a in instructions if i == "WORKDIR"][-1]
        assert ("ENV", f"PWD={workdir}") in instructions, f"{name}: ENV PWD={workdir}"
        assert compose()["services"]["prefect-worker"]["working_dir"] == workdir
    path = ROOT / "prefect.yaml"
    if path.exists():
        steps = [step for step in yaml.safe_load(path.read_text()).get("pull") or []]
        for step in steps:
            directory = (step.get("prefect.deployments.steps.set_working_directory") or {}).get("directory")
            if directory is not None:
                assert directory in ("{{ $PWD }}", "/opt/snapgen/app"), \
                    f"prefect.yaml pull step {directory!r} does not resolve to the source in the images"
