"""The library's internal layers, checked from its source (tests/unit/test_layout.py).

Training sits on top: it uses the model, the data, the distillation losses, the artifacts it writes
and evaluation's scene parser, and nothing in the library imports it back. So evaluation, export,
sampling and the artifact owners (`artifacts.student`, `artifacts.teacher_bundle`) load and run a
trained model without the training stack, and a change to training cannot break them through an
import. Every import statement counts, function-level ones included; relative imports are resolved.
"""
from __future__ import annotations

import ast
from pathlib import Path

# (package, the only package whose modules may import it)
RULES: tuple[tuple[str, str], ...] = (
    ("snapgen_model.training", "snapgen_model.training"),
)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level == 0:
            base = node.module or ""
        else:  # relative: from the module's own package, up level - 1 packages
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join(package + ([node.module] if node.module else []))
        return [base] + [f"{base}.{a.name}" for a in node.names]
    return []


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(root: str | Path, rules: tuple[tuple[str, str], ...] = RULES) -> list[str]:
    """'<file>:<line> (<module>) imports <name>' for every import that crosses a rule, under the
    package folder `root` (e.g. the `snapgen_model` folder)."""
    root = Path(root)
    found = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            crossing = [name for name in _imported(node, module, path.name == "__init__.py")
                        if any(_within(name, pkg) and not _within(module, owner) for pkg, owner in rules)]
            if crossing and isinstance(node, (ast.Import, ast.ImportFrom)):  # one line per statement, naming its module
                found.append(f"{path.relative_to(root.parent).as_posix()}:{node.lineno} ({module}) imports {crossing[0]}")
    return sorted(found)
