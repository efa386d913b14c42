"""DESIGN.md layout rules, checked by walking every import statement in the source tree."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_IN_LIBRARY = {"prefect", "mlflow", "boto3", "botocore", "s3fs", "tasks", "flows"}
ONLY_IN = {"lightning": "snapgen_model/training", "pytorch_lightning": "snapgen_model/training",
           "onnx": "snapgen_model/export", "onnxruntime": "snapgen_model/export",
           "onnxscript": "snapgen_model/export", "coremltools": "snapgen_model/export"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_no_orchestration_tracking_or_storage_clients():
    bad = []
    for path in (ROOT / "snapgen_model").rglob("*.py"):
        hits = _imports(path) & FORBIDDEN_IN_LIBRARY
        bad += [f"{path.relative_to(ROOT)}: {sorted(hits)}"] if hits else []
    assert not bad, bad


def test_heavy_frameworks_only_in_their_subpackage():
    bad = []
    for path in (ROOT / "snapgen_model").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        for mod in _imports(path) & set(ONLY_IN):
            if not rel.startswith(ONLY_IN[mod]):
                bad.append(f"{rel} imports {mod}")
    assert not bad, bad


def test_only_tracking_module_imports_mlflow_and_only_storage_imports_boto3():
    owners = {"mlflow": {"tasks/tracking.py", "tasks/metric_log.py", "tasks/registry.py", "tasks/mlflow_model.py"},
              "boto3": {"tasks/storage.py"}}
    bad = []
    for folder in ("tasks", "flows"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            for mod, allowed in owners.items():
                if mod in _imports(path) and rel not in allowed:
                    bad.append(f"{rel} imports {mod}")
    assert not bad, bad


def test_flows_hold_no_tensor_code():
    bad = [str(p.relative_to(ROOT)) for p in (ROOT / "flows").rglob("*.py") if "torch" in _imports(p)]
    assert not bad, bad


def test_nothing_in_the_library_imports_training():
    """Evaluation, export and the artifact owners run a trained model without the training stack
    (snapgen_model/layering.py: training sits on top, nothing imports it back)."""
    from snapgen_model.layering import violations

    assert violations(ROOT / "snapgen_model") == []


def test_the_layering_check_finds_imports_across_a_layer(tmp_path):
    """The check can fail: absolute, function-level and relative imports of training from outside it are
    named with their file and line; training importing itself and evaluation is allowed."""
    from snapgen_model.layering import violations

    pkg = tmp_path / "snapgen_model"
    for folder in ("evaluation", "training", "export"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "evaluation" / "runner.py").write_text("import json\n\n\ndef f():\n"
                                                  "    from snapgen_model.training.pretrain import fit\n")
    (pkg / "export" / "parts.py").write_text("from ..training import launch\n")
    (pkg / "training" / "pretrain.py").write_text("from snapgen_model.evaluation import runner\n"
                                                  "from . import launch\nfrom snapgen_model.training import stages\n")
    found = violations(pkg)
    assert found == ["snapgen_model/evaluation/runner.py:5 (snapgen_model.evaluation.runner) imports "
                     "snapgen_model.training.pretrain",
                     "snapgen_model/export/parts.py:1 (snapgen_model.export.parts) imports snapgen_model.training"]


def _ruff(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_source_passes_ruff():
    """pyproject.toml's [tool.ruff] rules (pyflakes: unused imports and variables, undefined names)."""
    proc = _ruff("snapgen_model", "tasks", "flows", "tests", "bench", "scripts")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_ruff_finds_an_unused_import_and_an_undefined_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    proc = _ruff(str(bad))
    assert proc.returncode == 1 and "F401" in proc.stdout and "F821" in proc.stdout, proc.stdout + proc.stderr


def _mypy(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def test_the_source_passes_mypy():
    """pyproject.toml's [tool.mypy]: the project's packages (snapgen_model, tasks, flows, reporting) type-check."""
    proc = _mypy()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_mypy_finds_a_wrong_type_against_the_project_configs(tmp_path):
    """The checker sees the project's own types: a sampler config built with a string step count and a
    function returning the wrong type are both reported."""
    bad = tmp_path / "bad_types.py"
    bad.write_text("from snapgen_model.configs import SamplerConfig\n\n"
                   "cfg = SamplerConfig(steps=\"4\")\n\n\n"
                   "def steps(cfg: SamplerConfig) -> str:\n    return cfg.steps\n")
    proc = _mypy(str(bad))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bad_types.py:3: error" in proc.stdout and "[arg-type]" in proc.stdout, proc.stdout
    assert "bad_types.py:7: error" in proc.stdout and "[return-value]" in proc.stdout, proc.stdout


def _flow_import_cycles(folder: Path) -> list[list[str]]:
    """Import cycles among the modules of the `flows` package in `folder` (every import statement counts,
    function-level ones included): each cycle as its module names."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.py")):
        name = f"flows.{path.stem}"
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            graph[name] |= {n for n in names if n.startswith("flows.") and n != name}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt in graph and nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for start in graph:
        if start not in state:
            visit(start, [start])
    return cycles


def test_flow_modules_import_one_another_without_a_circle(tmp_path):
    assert _flow_import_cycles(ROOT / "flows") == []
    # the check finds one: a -> b -> a through a function-level import
    pkg = tmp_path / "flows"
    pkg.mkdir()
    (pkg / "a.py").write_text("from flows.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from flows.a import x\n    return x\n")
    assert _flow_import_cycles(pkg) == [["flows.a", "flows.b", "flows.a"]]
