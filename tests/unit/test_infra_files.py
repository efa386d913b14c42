"""infra/ checked offline (every infra file exists and parses; no .env tracked), against the real parsers and schemas: no network,
no Docker engine, no cluster (tests/fixtures/infra.py loads the files)."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.fixtures.infra import DOC, INFRA, REQUIRED_FILES, ROOT, infra_files, yaml_docs


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
