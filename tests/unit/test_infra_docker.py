"""infra/ checked offline (the Dockerfiles and their .dockerignore files), against the real parsers and schemas: no network,
no Docker engine, no cluster (tests/fixtures/infra.py loads the files)."""
from __future__ import annotations

import json
import re

import pytest

from tests.fixtures.infra import DOCKER, compose, dockerfile_stages, effective_user, pinned


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
