"""infra/ checked offline (the compose file: services, volumes, ports, variables, auth, the commands it runs), against the real parsers and schemas: no network,
no Docker engine, no cluster (tests/fixtures/infra.py loads the files)."""
from __future__ import annotations

import configparser
import importlib
import importlib.util
import json
import re
from pathlib import Path


from tests.fixtures.infra import COMPOSE, COMPOSE_SERVICES, INFRA, ROOT, SECRET_NAME, VAR_REF, _require, compose, compose_raw, dockerfile_stages, env_example, infra_files, prefect_parse, program_invocations, service_env


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
