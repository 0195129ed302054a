"""Stage `mimic_dense`: dense-to-dense mimic distillation (LLaVA-MoD) or SFT (LLaVA-KD).

The aligned student trains projector + LLM on the general and multitask splits,
against the frozen teacher with the recipe's loss weights (LLaVA-MoD: ce +
forward KL on response tokens; LLaVA-KD SFT: ce only).

Run: ``python -m tasks.mimic_dense [--params params.yaml]``
"""

from __future__ import annotations

import sys

from tasks.common import StagePaths, run_stage
from tasks.params import Params
from tasks.training import Job, run_job, stage_files, train_summary


def mimic_dense(params: Params, paths: StagePaths) -> dict:
    section = params.mimic_dense
    job = Job(
        "mimic_dense",
        section,
        init=paths.student("align"),
        out=paths.student("dense"),
        data_files=stage_files(paths, section.splits),
        teacher=paths.teacher,
    )
    return run_job(params, paths, job)


def main(argv: list[str] | None = None) -> int:
    return run_stage("mimic_dense", mimic_dense, __doc__, argv, train_summary)


if __name__ == "__main__":
    sys.exit(main())
