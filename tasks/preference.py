"""Stage `preference`: preference distillation of the MoE student (the DPO family).

The student from mimic_sparse trains on the curated preference pairs (a
faithful answer vs one with a hallucinated or wrong object) with the teacher as
the reference model (LLaVA-MoD), or its own frozen starting point
(``preference.dpo.reference: self``). Reference log-probabilities are computed
once per pair. Afterwards the stage measures what it is for: hallucination
(CHAIR-i on captions, POPE adversarial F1) before and after, in
``metrics/preference.json``.

Run: ``python -m tasks.preference [--params params.yaml]``
"""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.common import StagePaths, run_stage
from tasks.params import Params
from tasks.training import Job, run_job, stage_files, train_summary


def preference(params: Params, paths: StagePaths) -> dict:
    section = params.preference
    job = Job(
        "preference",
        section,
        init=paths.student("moe"),
        out=paths.student("pref"),
        data_files=stage_files(paths, section.splits),
        teacher=paths.teacher,
        dpo=section.dpo,
    )
    return run_job(params, paths, job, score=lambda trained: {"hallucination": hallucination_change(params, paths, trained)})


def hallucination_change(params: Params, paths: StagePaths, trained: Path) -> dict:
    """CHAIR and POPE adversarial F1 of the student before (student_moe) and after (``trained``) this stage."""
    from model.generate import (
        score_probes,  # torch and transformers: after the job, not before it
    )

    vocabulary = params.curate.world.shapes
    out = {}
    for when, checkpoint in (("before", paths.student("moe")), ("after", trained)):
        scores = score_probes(checkpoint, paths.probes, paths.curated, vocabulary, limit=params.evaluate.limit, pope_splits=("adversarial",))
        out[when] = {
            "chair_i": scores["caption"]["chair_i"],
            "chair_s": scores["caption"]["chair_s"],
            "pope_adversarial_f1": scores["pope_adversarial"]["f1"],
            "vqa_accuracy": scores["vqa"]["accuracy"],
        }
    out["chair_i_lower"] = out["after"]["chair_i"] < out["before"]["chair_i"]
    out["pope_adversarial_f1_higher"] = out["after"]["pope_adversarial_f1"] > out["before"]["pope_adversarial_f1"]
    return out


def summary(metrics: dict) -> str:
    h = metrics["hallucination"]
    return (
        f"{train_summary(metrics)}; CHAIR-i {h['before']['chair_i']:.3f} -> {h['after']['chair_i']:.3f},"
        f" POPE adversarial F1 {h['before']['pope_adversarial_f1']:.3f} -> {h['after']['pope_adversarial_f1']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage("preference", preference, __doc__, argv, summary)


if __name__ == "__main__":
    sys.exit(main())
