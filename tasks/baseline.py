"""Stage `baseline`: the mimic_dense student trained without a teacher, the yardstick of distillation.

Both papers' first claim is that a distilled student beats the same student
trained on the same data without a teacher. This stage trains that student:
the aligned student, ``mimic_dense``'s splits, fraction, steps, schedule and
seed, with cross-entropy only and no teacher in the job. The evaluate stage
scores it beside the distilled students, so ``reports/eval.md`` shows what the
teacher added. (Under ``recipe: llava-kd`` mimic_dense is SFT, ce only, so the
two coincide there: LLaVA-KD's distillation is in DPT and DFT.)

Run: ``python -m tasks.baseline [--params params.yaml]``
"""

from __future__ import annotations

import sys

from tasks.common import StagePaths, run_stage
from tasks.params import LossWeights, Params
from tasks.training import Job, run_job, stage_files, train_summary


def baseline(params: Params, paths: StagePaths) -> dict:
    section = params.mimic_dense.model_copy(update={"loss": LossWeights(ce=1.0)})
    job = Job("baseline", section, init=paths.student("align"), out=paths.student("baseline"), data_files=stage_files(paths, section.splits))
    return run_job(params, paths, job)


def main(argv: list[str] | None = None) -> int:
    return run_stage("baseline", baseline, __doc__, argv, train_summary)


if __name__ == "__main__":
    sys.exit(main())
