"""Stage `align`: build the student and align its new projector to the teacher's vision tower.

The student is the teacher's vision tower (copied, frozen), LLaVA's 2-layer GELU
projector (new) and a small LLM (new, or a local pretrained one sharing the
teacher's vocabulary). With the LLaVA-MoD recipe only the projector trains on
captions (ce); with LLaVA-KD this is DPT: ce + MDist (response and visual KL)
+ RDist, against the frozen teacher.

Run: ``python -m tasks.align [--params params.yaml]``
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoProcessor, AutoTokenizer

from model.builders import build_student, load_llava, save_checkpoint
from tasks.common import StagePaths, run_stage
from tasks.params import Params
from tasks.training import Job, run_job, stage_files, train_summary


def align(params: Params, paths: StagePaths) -> dict:
    section = params.align

    def build(out: Path) -> None:
        teacher = load_llava(paths.teacher)
        tokenizer = AutoTokenizer.from_pretrained(paths.teacher)
        student = build_student(teacher, section.student.text, section.student.llm, tokenizer, params.seed)
        save_checkpoint(student, AutoProcessor.from_pretrained(paths.teacher), out)

    job = Job(
        "align",
        section,
        init=paths.runs / "align" / "init",
        out=paths.student("align"),
        data_files=stage_files(paths, section.splits),
        teacher=paths.teacher,
    )
    return run_job(params, paths, job, build_init=build)


def main(argv: list[str] | None = None) -> int:
    return run_stage("align", align, __doc__, argv, train_summary)


if __name__ == "__main__":
    sys.exit(main())
