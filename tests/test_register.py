"""The promotion gate on hand-made scores: each check can fail on its own."""

from tasks.params import GateParams
from tasks.register import gate_checks, summary

TEACHER = {"POPE F1 adv": 0.60, "VQA acc": 0.70, "CHAIR-i": 0.10, "object recall": 0.90, "partner halluc.": 0.30}


def failed(student: dict) -> list[str]:
    return [c["check"] for c in gate_checks(student, TEACHER, GateParams()) if not c["passed"]]


def test_a_student_as_good_as_the_teacher_passes():
    assert failed(TEACHER) == []


def test_captions_that_name_nothing_do_not_pass_on_a_perfect_chair():
    silent = {**TEACHER, "CHAIR-i": 0.0, "object recall": 0.02}
    assert failed(silent) == ["object recall >= teacher - delta"]


def test_each_bound_is_its_own_check_relative_to_the_teacher():
    assert failed({**TEACHER, "POPE F1 adv": 0.59}) == ["POPE adversarial F1 >= teacher - margin"]
    assert failed({**TEACHER, "VQA acc": 0.59}) == ["VQA accuracy >= teacher - delta"]
    assert failed({**TEACHER, "VQA acc": 0.61}) == []  # trails by less than the understanding delta
    assert failed({**TEACHER, "CHAIR-i": 0.11}) == ["CHAIR-i <= teacher + margin"]
    assert failed({**TEACHER, "partner halluc.": 0.31}) == ["partner hallucination <= teacher + margin"]
    weak_teacher = {k: v / 2 for k, v in TEACHER.items()}
    assert [c["passed"] for c in gate_checks({**weak_teacher, "VQA acc": 0.30}, weak_teacher, GateParams())][0]  # 0.35 - 0.1


def test_a_failed_gate_says_which_checks_failed_and_what_promote_does():
    checks = gate_checks({**TEACHER, "VQA acc": 0.1}, TEACHER, GateParams())
    line = summary({"model_name": "tinymod-student", "version": 3, "new_version": True, "champion": False, "awaiting_approval": False, "checks": checks})
    assert "version 3 is @candidate: the gate FAILED 1 of 5 checks (VQA accuracy >= teacher - delta: 0.1 vs 0.6)" in line
    assert "promote refuses it" in line and "reports/review.md" in line
