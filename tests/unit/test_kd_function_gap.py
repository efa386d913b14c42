"""bench/kd_function_gap.py: the per-scene figures against hand-worked velocities, the paired interval against a
hand-worked sample, and the ledger reader's errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.bench import load_bench_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gap():
    return load_bench_script("kd_function_gap")


def _caption_velocity(offset: float = 0.0, uses_caption: bool = True):
    """v = x + (caption length / 10 if uses_caption) + offset: a velocity whose caption response is known."""
    def v(x, t, captions):
        shift = torch.tensor([len(c) / 10 if uses_caption else 0.0 for c in captions]).view(-1, 1, 1, 1)
        return x + shift + offset
    return v


def test_figures_of_known_velocities(gap):
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    captions = ["a", "bbb", "cc", "dddd"]  # swapped: scene i gets scene i-1's, so the length changes for each
    teacher = _caption_velocity()
    res = gap.measure(_caption_velocity(offset=0.1), teacher, x0, noise, captions, [0.5])["0.5"]
    close = _caption_velocity(offset=0.0)
    same = gap.measure(close, teacher, x0, noise, captions, [0.5])["0.5"]
    np.testing.assert_allclose(res["student"]["kd"], 0.01, rtol=1e-5)  # (0.1)^2 everywhere
    np.testing.assert_allclose(same["student"]["kd"], 0.0, atol=1e-12)
    np.testing.assert_allclose(res["student"]["cosine"], 1.0, rtol=1e-5)  # the same response as the teacher's
    np.testing.assert_allclose(same["student"]["flow"], same["teacher"]["flow"], rtol=1e-6)
    blind = gap.measure(_caption_velocity(uses_caption=False), teacher, x0, noise, captions, [0.5])["0.5"]
    np.testing.assert_allclose(blind["student"]["response"], 0.0, atol=1e-12)  # ignores the caption
    np.testing.assert_allclose(blind["student"]["cosine"], 0.0, atol=1e-6)
    # the flow error is against noise - x0 at x_t = (1 - t) x0 + t noise
    xt = 0.5 * x0 + 0.5 * noise
    shift = torch.tensor([len(c) / 10 for c in captions]).view(-1, 1, 1, 1)
    expected = (xt + shift - (noise - x0)).pow(2).flatten(1).mean(1).numpy()
    np.testing.assert_allclose(same["teacher"]["flow"], expected, rtol=1e-5)


def test_paired_difference_against_a_hand_worked_sample(gap):
    d = gap.paired_mean_difference(np.array([1.0, 2.0, 3.0, 4.0]), np.zeros(4), replicates=4000)
    assert d["value"] == pytest.approx(2.5)
    assert 1.0 <= d["lo"] < 2.5 < d["hi"] <= 4.0
    # resampling means of {1, 2, 3, 4}: the 2.5% / 97.5% quantiles of a 4-draw mean lie near 1.5 and 3.5
    assert d["lo"] == pytest.approx(1.5, abs=0.26) and d["hi"] == pytest.approx(3.5, abs=0.26)
    const = gap.paired_mean_difference(np.full(5, 0.3), np.full(5, 0.1), replicates=200)
    assert const["lo"] == pytest.approx(0.2) and const["hi"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="equal 1-D samples"):
        gap.paired_mean_difference(np.zeros(3), np.zeros(4), replicates=10)


def test_ledger_reader_names_what_is_missing(gap, tmp_path):
    student = tmp_path / "student"
    student.mkdir()
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    entries = {"a": {"variant": "scaled", "seed": 0, "pretrained": f"file://{student}", "teacher": f"file://{teacher}"},
               "b": {"label": "an evaluation", "overall": 0.1}}
    ledger = tmp_path / "ledger.json"
    ledger.write_text(json.dumps({"version": 2, "entries": entries}))
    students, bundle = gap.ledger_students(ledger)
    assert students == {"scaled": {0: (f"file://{student}", student)}} and bundle == teacher
    entries["c"] = {"variant": "task_only", "seed": 0, "pretrained": "file:///nowhere/student",
                    "teacher": f"file://{teacher}"}
    ledger.write_text(json.dumps({"version": 2, "entries": entries}))
    with pytest.raises(SystemExit, match="/nowhere/student .*not on this machine"):
        gap.ledger_students(ledger)
    # measured before (another machine): needs no folder here; --seeds leaves other seeds' students out
    students, _ = gap.ledger_students(ledger, recorded={"file:///nowhere/student"})
    assert students["task_only"] == {0: ("file:///nowhere/student", None)}
    assert gap.ledger_students(ledger, recorded={"file:///nowhere/student"}, seeds=[0])[0].keys() == {"scaled", "task_only"}
    with pytest.raises(SystemExit, match="no finished pipeline yet of seeds \\[1\\]"):
        gap.ledger_students(ledger, recorded={"file:///nowhere/student"}, seeds=[1])
    ledger.write_text(json.dumps({"version": 2, "entries": {"b": entries["b"]}}))
    with pytest.raises(SystemExit, match="no finished pipeline"):
        gap.ledger_students(ledger)
    with pytest.raises(SystemExit, match="no such file"):
        gap.ledger_students(tmp_path / "absent.json")


def test_timesteps_are_checked(gap):
    with pytest.raises(SystemExit, match="every t must lie in"):
        gap.parse_args(["--timesteps", "0.5,1.5"])
    with pytest.raises(SystemExit, match="not a comma-separated list"):
        gap.parse_args(["--timesteps", "half"])
    assert gap.parse_args(["--timesteps", "0.9, 0.1"]).t_list == [0.9, 0.1]


def test_each_ledger_has_its_own_section_and_json(gap):
    args = gap.parse_args(["--ledger", "bench/evidence/ledger-toy-long.json"])
    assert args.json_out.endswith("bench/evidence/kd_function_gap-ledger-toy-long.json")
    assert "ledger-toy-long" in gap.SECTION.format(ledger="ledger-toy-long") and gap.SECTION.startswith("## ")


def test_students_measured_on_other_machines_are_reused_from_the_json(gap, tmp_path):
    """Each evidence student is trained in another session, on a fresh machine, and its folder is gone by the next
    one: the per-scene measures of every student measured so far travel in the JSON, and a run with every student
    recorded computes nothing (no model needed here) and reports the same figures; other scenes or timesteps are
    not reused (the student is then required here, and named)."""
    rng = np.random.default_rng(0)
    uris = {"task_only": "file:///gone/task_only", "scaled": "file:///gone/scaled"}
    entries = {v: {"variant": v, "seed": 1, "pretrained": u, "teacher": "file:///gone/teacher"} for v, u in uris.items()}
    ledger = tmp_path / "ledger-x.json"
    ledger.write_text(json.dumps({"version": 2, "entries": entries}))

    def fake(offset):
        return {"0.5": {"student": {k: rng.random(8) + offset for k in ("kd", "flow", "response", "cosine")},
                        "teacher": {"flow": np.full(8, 0.2), "response": np.full(8, 0.3)}}}

    measures = {uris["task_only"]: fake(0.5), uris["scaled"]: fake(0.0)}
    out, results = tmp_path / "gap.json", tmp_path / "RESULTS.md"
    args = gap.parse_args(["--ledger", str(ledger), "--scenes", "8", "--timesteps", "0.5", "--json", str(out),
                           "--out", str(results), "--replicates", "200"])
    out.write_text(json.dumps({"scenes": 8, "seed": 0, "timesteps": ["0.5"],
                               "measures": gap._as_lists(measures)}))
    summary = gap.main(["--ledger", str(ledger), "--scenes", "8", "--timesteps", "0.5", "--json", str(out),
                        "--out", str(results), "--replicates", "200"])
    kd = summary["0.5"]["scaled_minus_task_only_kd"]["value"]
    assert kd == pytest.approx(float(np.mean(measures[uris["scaled"]]["0.5"]["student"]["kd"]
                                             - measures[uris["task_only"]]["0.5"]["student"]["kd"])))
    assert kd == pytest.approx(-0.5, abs=0.5)
    written = json.loads(out.read_text())
    assert set(written["measures"]) == set(uris.values()) and written["summary"]["0.5"]["teacher"]["flow"] == 0.2
    assert gap.main(["--ledger", str(ledger), "--scenes", "8", "--timesteps", "0.5", "--json", str(out),
                     "--out", str(results), "--replicates", "200"]) == summary  # its own output, reused again
    assert "KD function gap of the ledger-x students" in results.read_text()
    assert gap.recorded_measures(out, args) and not gap.recorded_measures(
        out, gap.parse_args(["--ledger", str(ledger), "--scenes", "16", "--timesteps", "0.5"]))
    with pytest.raises(SystemExit, match="/gone/.* not on this machine and was not measured before"):
        gap.main(["--ledger", str(ledger), "--scenes", "8", "--timesteps", "0.4", "--json", str(out), "--out", ""])
    assert gap.parse_args(["--ledger", str(ledger), "--seeds", "1"]).json_out.endswith("kd_function_gap-ledger-x-seeds-1.json")
