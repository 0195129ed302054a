"""Stage `mimic_sparse`: dense-to-sparse mimic distillation of the upcycled MoE student.

Experts, routers, the projector and the dense FFNs of the layers that stayed
dense train (LLaVA-MoD; LLaVA-KD's DFT trains the whole LLM) against the frozen
teacher, with the router balance loss, on the recipe's splits (general +
multitask; the paper's multitask only, see recipes/llava-mod.yaml).

Run: ``python -m tasks.mimic_sparse [--params params.yaml]``
"""

from __future__ import annotations

import sys

from tasks.common import StagePaths, run_stage
from tasks.params import Params
from tasks.training import Job, run_job, stage_files, train_summary


def mimic_sparse(params: Params, paths: StagePaths) -> dict:
    section = params.mimic_sparse
    job = Job(
        "mimic_sparse",
        section,
        init=paths.student("upcycled"),
        out=paths.student("moe"),
        data_files=stage_files(paths, section.splits),
        teacher=paths.teacher,
    )
    return run_job(params, paths, job)


def main(argv: list[str] | None = None) -> int:
    return run_stage("mimic_sparse", mimic_sparse, __doc__, argv, train_summary)


if __name__ == "__main__":
    sys.exit(main())
