"""infra/ checked offline (the commands infra/ and docs/infra.md run: the CLI, prefect, torchrun, mlflow, deployments), against the real parsers and schemas: no network,
no Docker engine, no cluster (tests/fixtures/infra.py loads the files)."""
from __future__ import annotations

import importlib
import importlib.util
import re

import pytest
import yaml

from tests.fixtures.infra import DOC, DOCKER, ROOT, TEMPLATE, cli_commands, compose, container_commands, doc_text, doc_yaml_blocks, dockerfile_stages, infra_files, k8s, prefect_parse, program_invocations, template, torchrun_args


# ------------------------------------------------------------------------------------------------
# commands: the CLI, prefect, torchrun and mlflow as written in infra/ and docs/infra.md
# ------------------------------------------------------------------------------------------------
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
