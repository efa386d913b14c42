"""Artifacts with owners: the student folder (`student`), and the teacher bundle (`teacher_bundle`)."""
