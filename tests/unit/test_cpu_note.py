"""The closing note of a CPU toy run states each model against the floor from the run's own table."""
from __future__ import annotations

from flows.pipeline_report import CPU_MECHANICS, cpu_note


def summary(preset: str, scale: str, teacher: float, student: float, floor: float | None) -> dict:
    refs = {"floor": {"geneval": {"overall": floor}}} if floor is not None else {}
    return {"preset": preset, "config": {"scale": scale}, "results": {"evaluate": {"models": {
        "teacher": {"benchmarks": {"geneval": {"overall": teacher}}, "reference_rows": refs},
        "pretrained": {"benchmarks": {"geneval": {"overall": student}}, "reference_rows": refs}}}}}


def test_note_reads_the_floor_and_scores_of_this_run():
    note = cpu_note(summary("toy", "toy", 0.253, 0.015, 0.210))
    assert note.startswith(CPU_MECHANICS)
    assert "floor 0.210" in note and "teacher (toy SD3) 0.253 (above it)" in note
    assert "student, KD-pretrained 0.015 (not above it)" in note
    smoke = cpu_note(summary("toy-smoke", "toy", 0.0, 0.0, 0.5))
    assert "teacher (toy SD3) 0.000 (not above it)" in smoke and "follows prompts" not in smoke


def test_no_note_on_gpu_or_full_scale_and_plain_note_without_a_floor():
    assert cpu_note(summary("toy-gpu", "toy", 0.7, 0.6, 0.2)) is None
    assert cpu_note(summary("snapgen-1024", "full", 0.7, 0.6, 0.2)) is None
    assert cpu_note(summary("toy", "toy", 0.3, 0.1, None)) == CPU_MECHANICS


def test_a_student_started_from_the_shipped_one_is_named_in_the_note_and_the_table():
    from flows.pipeline_report import summary_rows

    run = summary("toy", "toy", 0.42, 0.40, 0.21)
    plain = [row[0] for row in summary_rows(run)]
    assert plain[:2] == ["teacher (toy SD3)", "student, KD-pretrained"] and "shipped" not in cpu_note(run)
    run["results"]["pretrain"] = {"init": "release://toy-student/v1", "step": 300}
    note = cpu_note(run)
    assert "started from the shipped student toy-student/v1" in note and "300 more steps" in note
    assert "student, KD-pretrained 0.400 (above it)" in note
    assert [row[0] for row in summary_rows(run)][1] == "student, KD-pretrained (from toy-student/v1, +300 steps here)"
