"""Stage `dft`: LLaVA-KD's distilled fine-tuning (DFT) of the dense student.

The last stage of LLaVA-KD's DPT -> SFT -> DFT: the SFT student (mimic_dense's)
trains its projector and whole LLM against the frozen teacher with ce, MDist
(response and visual KL) and RDist, on the recipe's splits. The student stays
dense, as in the paper; its checkpoint is the recipe's final student.

Run: ``python -m tasks.dft [--params params.yaml]``
"""

from __future__ import annotations

import sys

from tasks.common import StagePaths, run_stage
from tasks.params import Params
from tasks.training import Job, run_job, stage_files, train_summary


def dft(params: Params, paths: StagePaths) -> dict:
    section = params.dft
    job = Job(
        "dft",
        section,
        init=paths.student("dense"),
        out=paths.student("dft"),
        data_files=stage_files(paths, section.splits),
        teacher=paths.teacher,
    )
    return run_job(params, paths, job)


def main(argv: list[str] | None = None) -> int:
    return run_stage("dft", dft, __doc__, argv, train_summary)


if __name__ == "__main__":
    sys.exit(main())
