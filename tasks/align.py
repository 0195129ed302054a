"""Stage `align`: build the student and align its new projector to the teacher's vision tower.

The student is the teacher's vision tower (copied, frozen), LLaVA's 2-layer GELU
projector (new) and a small LLM (new, or a local pretrained one sharing the
teacher's vocabulary). With the LLaVA-MoD recipe only the projector trains on
captions (ce); with LLaVA-KD this is DPT: ce + MDist (response and visual KL)
+ RDist, against the frozen teacher.

A fresh LLM (``student.llm: init``) knows no words, so captions alone cannot
teach the projector where they are (ce stays near ln(vocab)). On the embedded
world the new student is first word-aligned (``align.word_align``): its
projected image cells are scored against its own word embeddings, as the
teacher's vision pretraining did for the teacher. Without it the students
answered at chance however long they trained on the default's data. A
pretrained LLM (``bench/student_llm.py`` makes one for the world) is
word-aligned too: its words mean something, its image tokens do not yet.

Run: ``python -m tasks.align [--params params.yaml]``
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoProcessor, AutoTokenizer

from model.builders import build_student, load_llava, save_checkpoint
from model.vision_pretrain import pretrain_vision
from tasks.common import StagePaths, check_pinned_weights, run_stage
from tasks.params import Params
from tasks.training import Job, run_job, stage_files, train_summary


def align(params: Params, paths: StagePaths) -> dict:
    section = params.align
    if section.student.llm != "init":
        check_pinned_weights(Path(section.student.llm), section.student.sha256, "align.student.sha256", "align.student.llm", " (students/README.md remakes the shipped ones)")

    def build(out: Path) -> dict:
        teacher = load_llava(paths.teacher)
        tokenizer = AutoTokenizer.from_pretrained(paths.teacher)
        processor = AutoProcessor.from_pretrained(paths.teacher)
        student = build_student(teacher, section.student.text, section.student.llm, tokenizer, params.seed)
        built = {}
        if params.word_aligns:
            w, wa = params.curate.world, section.word_align
            built["word_align"] = pretrain_vision(
                student, processor.image_processor, tokenizer, paths.world, list(w.shapes), sorted(w.colours), sorted(w.sizes),
                wa.steps, wa.lr, wa.batch_size, params.seed, train_tower=False,
            )  # fmt: skip
            print(f"align: student word-aligned, held-out cell accuracy {built['word_align']['held_out_cell_accuracy']}", flush=True)
        save_checkpoint(student, processor, out)
        return built

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
