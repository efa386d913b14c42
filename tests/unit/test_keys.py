"""The one content-key and code-hash helper: keys follow behaviour-relevant code and config, not comments."""
from __future__ import annotations

import pytest

from snapgen_model.keys import behaviour_of, content_key, source_hash

CODE = '''"""Module docstring."""
import math


def area(r):
    """Area of a circle."""
    return math.pi * r ** 2  # the formula
'''


def test_content_key_is_canonical_json() -> None:
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2}) and len(content_key("x", 16)) == 16
    assert content_key([b"x"]) == content_key(["b'x'"])  # non-JSON values as their text


def test_comments_docstrings_and_layout_do_not_change_the_behaviour_hash() -> None:
    same = [CODE.replace("# the formula", "# pi r squared"),
            CODE.replace('"""Area of a circle."""', '"""The area, for a radius r."""'),
            CODE.replace('"""Module docstring."""\n', ""),
            CODE.replace("math.pi * r ** 2", "math.pi * (r ** 2)").replace("\n\n\n", "\n\n\n\n")]
    for text in same:
        assert behaviour_of(text) == behaviour_of(CODE), text
    changed = [CODE.replace("** 2", "** 3"), CODE.replace("def area(r)", "def area(radius)").replace("r **", "radius **"),
               CODE.replace("math.pi", "3.14")]
    for text in changed:
        assert behaviour_of(text) != behaviour_of(CODE), text


def test_source_hash_of_a_package_follows_its_code(tmp_path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "geometry.py").write_text(CODE)
    before = source_hash(("pkg",), tmp_path)
    (pkg / "geometry.py").write_text(CODE.replace("# the formula", "# edited comment"))
    assert source_hash(("pkg",), tmp_path) == before
    (pkg / "geometry.py").write_text(CODE.replace("** 2", "** 3"))
    assert source_hash(("pkg",), tmp_path) != before
    (pkg / "geometry.py").write_text(CODE)
    (pkg / "more.py").write_text("X = 1\n")
    assert source_hash(("pkg",), tmp_path) != before  # a new module is new behaviour


def test_stage_and_evaluation_keys_use_the_named_scopes() -> None:
    from tasks import evaluate, keys, pipeline

    assert pipeline.stage_key("curate", {"scenes": 8}, ["up"]) == \
        content_key(["curate", {"scenes": 8}, ["up"], keys.code_hash("pipeline")], 24)
    assert evaluate.code_version() == keys.code_hash("evaluation") != keys.code_hash("pipeline")
    with pytest.raises(ValueError, match="unknown scope 'docs'"):
        keys.code_hash("docs")
