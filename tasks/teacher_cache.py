"""Stage `teacher_cache`: the teacher's top-k outputs, once, over the records of every cached stage.

A training stage with ``teacher: {mode: cached}`` and a loss term that reads the teacher
(kl_response, kl_visual, relation) reads the teacher's rows from ``data/teacher_cache`` instead
of running the teacher in every step: the same records, subsampled by the same seed and
fraction, each cached once however many epochs the stage makes of them. What is cached follows
the stages' losses: response rows always, image-token rows for kl_visual, RDist's matrices for
relation. The header records the teacher's and tokenizer's hashes and each data file's, and a
stage refuses a cache made from anything else (``model/teacher_cache.py`` has the format).

Run: ``python -m tasks.teacher_cache [--params params.yaml]``
"""

from __future__ import annotations

import sys
import time

from transformers import AutoProcessor, AutoTokenizer

from model.builders import load_llava
from model.data import Collator, ConversationDataset, stage_records
from model.teacher_cache import bytes_per_token, tokenizer_digest, write_cache
from tasks.common import STAGING, StagePaths, run_stage, swap_in, write_json
from tasks.params import Params
from tasks.training import StageError, cache_identity, reads_cache, stage_files


def cached_stages(params: Params) -> list[str]:
    return [name for name, section in params.training_sections() if reads_cache(section)]


def teacher_cache(params: Params, paths: StagePaths) -> dict:
    started = time.perf_counter()
    stages = cached_stages(params)
    files, records, seen = [], [], set()
    for name in stages:
        section = getattr(params, name)
        stage_paths = stage_files(paths, section.splits)
        files += [f for f in stage_paths if f not in files]
        for record in stage_records([str(f) for f in stage_paths], section.fraction, params.seed):
            if record["id"] not in seen:
                seen.add(record["id"])
                records.append(record)
    for path in [paths.teacher, *files]:
        if not path.exists():
            raise StageError(f"teacher_cache: input {path} does not exist; run the stages before it (dvc repro)")
    losses = [getattr(params, name).loss for name in stages]
    teacher = load_llava(paths.teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(paths.teacher)
    image_processor = AutoProcessor.from_pretrained(paths.teacher).image_processor
    dataset = ConversationDataset(records, paths.curated, tokenizer, image_processor, teacher.config.image_seq_length)
    staging = paths.teacher_cache.with_name(paths.teacher_cache.name + STAGING)
    header = write_cache(
        teacher,
        dataset,
        Collator(tokenizer.pad_token_id),
        staging,
        top_k=params.teacher_cache.top_k,
        visual=any(loss.kl_visual for loss in losses),
        relation=any(loss.relation for loss in losses),
        header={"stages": stages, "tokenizer": tokenizer_digest(paths.teacher), **cache_identity(paths.teacher, files)},
        batch_size=params.teacher_cache.batch_size,
        vocab=len(tokenizer),  # a head padded past the tokenizer is cut to the tokens students share
    )
    swap_in(staging, paths.teacher_cache)
    vocab = header["vocab_size"]
    metrics = {
        **{k: header[k] for k in ("stages", "records", "response_rows", "top_k", "visual", "relation", "bytes", "bytes_per_token")},
        "bytes_per_token_at": {str(k): bytes_per_token(k, vocab) for k in (16, 32, 64)},
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(paths.metrics / "teacher_cache.json", metrics)
    return metrics


def summary(metrics: dict) -> str:
    if not metrics["stages"]:
        return "no stage has teacher.mode cached; the cache is empty"
    return (
        f"{metrics['records']:,} records, {metrics['response_rows']:,} response positions at top-{metrics['top_k']}"
        f" for {', '.join(metrics['stages'])}: {metrics['bytes'] / 1e6:.1f} MB ({metrics['bytes_per_token']} B/token) in {metrics['seconds']:.0f} s"
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage("teacher_cache", teacher_cache, __doc__, argv, summary)


if __name__ == "__main__":
    sys.exit(main())
