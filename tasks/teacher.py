"""Stage `teacher`: train the embedded teacher on the world, or import and validate a real one.

``teacher.source: train`` trains a LLaVA model from scratch on the curated
general + multitask splits (ce only, every module) as a DeepSpeed job, then
checks that it is good at the world and hallucinates the way the world
provokes: held-out VQA accuracy, POPE F1 per split, adversarial below random.

``teacher.source: <folder or s3://...>`` imports a LLaVA-format Hugging Face
checkpoint, validated before anything trains (safetensors only, no remote
code, a Llava config, the image token, the student tokenizer's vocabulary).

Run: ``python -m tasks.teacher [--params params.yaml]``
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from transformers import AutoTokenizer

from model.builders import (
    CheckpointError,
    build_llava,
    build_processor,
    fetch,
    load_llava,
    save_checkpoint,
    validate_checkpoint,
)
from model.generate import score_probes
from model.upcycle import parameter_counts
from model.vision_pretrain import pretrain_vision
from model.world import fingerprint as world_fingerprint
from tasks.common import (
    StagePaths,
    check_pinned_weights,
    read_jsonl,
    run_stage,
    weights_sha256,
    write_json,
)
from tasks.params import TRAINED_ON, Params, trained_on_record, world_differences
from tasks.training import Job, plot_history, run_job, stage_files

HISTORY = "tinymod_history.jsonl"  # the training run's per-step log, shipped beside a trained teacher's weights

# What the embedded teacher should reach (issue: the teacher must be good and must hallucinate).
AIMS = {"vqa_accuracy": 0.9, "vqa_accuracy_per_type": 0.8, "pope_random_accuracy": 0.9, "yes_ratio": (0.4, 0.6), "adversarial_drop": 0.08, "partner_hallucination": 0.2}


def train_teacher(params: Params, paths: StagePaths) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer)
    t = params.teacher

    def build(out: Path) -> dict:
        model = build_llava(t.vision, t.text, tokenizer, t.seed)
        processor = build_processor(tokenizer, model.config.vision_config)
        built = {}
        if t.vision_pretrain.steps and params.uses_world:
            w = params.curate.world
            built["vision_pretrain"] = pretrain_vision(
                model, processor.image_processor, tokenizer, paths.world, list(w.shapes), sorted(w.colours), sorted(w.sizes),
                t.vision_pretrain.steps, t.vision_pretrain.lr, t.vision_pretrain.batch_size, t.seed,
            )  # fmt: skip
            print(f"teacher: vision tower pretrained, held-out cell accuracy {built['vision_pretrain']['held_out_cell_accuracy']}", flush=True)
        save_checkpoint(model, processor, out)
        return built

    def score(checkpoint: Path) -> dict:
        """The trained teacher against its aims, and what it learned from, before the stage writes anything."""
        write_json(checkpoint / TRAINED_ON, trained_on(params))
        probes = score_probes(checkpoint, paths.probes, paths.curated, params.curate.world.shapes)
        return {"sha256": weights_sha256(checkpoint), "probes": probes, "checks": teacher_checks(probes)}

    data = stage_files(paths, t.train.splits)
    if t.lookup is None:
        job = Job("teacher", t.train, init=paths.runs / "teacher" / "init", out=paths.teacher, data_files=data, seed=t.seed)
        return run_job(params, paths, job, build_init=build, score=score)
    first = paths.runs / "teacher_phase1"
    phase1 = run_job(params, paths, Job("teacher_phase1", t.train, init=first / "init", out=first / "model", data_files=data, seed=t.seed, phase=True), build_init=build)
    history = phase1.pop("history")
    second = Job("teacher", t.lookup, init=first / "model", out=paths.teacher, data_files=stage_files(paths, t.lookup.splits), seed=t.seed, earlier_history=history)
    return run_job(params, paths, second, score=lambda checkpoint: {**score(checkpoint), "phase1": phase1})


def trained_on(params: Params) -> dict:
    """What a trained teacher learned from: the world it saw, what model/world.py made of it, and its own recipe (shipped with its weights)."""
    return {
        "curate.world": params.curate.world.model_dump(mode="json"),
        "world_fingerprint": world_fingerprint(params.curate.world),
        "teacher": params.teacher.model_dump(mode="json", exclude={"source", "sha256"}),
    }


def check_world(params: Params, folder: Path) -> None:
    """A teacher trained on the embedded world only fits that world: refuse it when ``curate.world`` changed."""
    if not params.uses_world:
        return
    changed = world_differences(folder, params.curate.world)
    if changed:
        raise CheckpointError(
            f"teacher {folder} was trained on another world: curate.world.{', curate.world.'.join(changed)} differ. "
            "Set teacher.source: train (and curate.tokenizer.source: world) to train a teacher on this world, "
            "or restore those values."
        )
    seen = trained_on_record(folder).get("world_fingerprint")
    if seen and seen != world_fingerprint(params.curate.world):
        raise CheckpointError(
            f"teacher {folder} was trained on records model/world.py no longer writes (world_fingerprint in {TRAINED_ON} differs), "
            "with the same curate.world: the world's code changed since. Set teacher.source: train (and curate.tokenizer.source: world) "
            "to train a teacher on the new records, or restore model/world.py."
        )


def teacher_checks(probes: dict) -> dict:
    """Whether the teacher meets its aims; reported, not enforced (a small CI run cannot meet them)."""
    vqa, rand, adv = probes["vqa"], probes["pope_random"], probes["pope_adversarial"]
    low, high = AIMS["yes_ratio"]
    return {
        "vqa_accuracy_at_least_0.9": vqa["accuracy"] >= AIMS["vqa_accuracy"],
        "every_question_type_at_least_0.8": all(v >= AIMS["vqa_accuracy_per_type"] for k, v in vqa.items() if k.startswith("accuracy/")),
        "pope_random_accuracy_at_least_0.9": rand["accuracy"] >= AIMS["pope_random_accuracy"],
        "pope_random_yes_ratio_0.4_to_0.6": low <= rand["yes_ratio"] <= high,
        "pope_adversarial_at_least_0.08_below_random": rand["accuracy"] - adv["accuracy"] >= AIMS["adversarial_drop"],
        "partner_named_in_at_least_20%_of_captions": probes["caption"].get("partner_hallucination", 0.0) >= AIMS["partner_hallucination"],
    }


def import_teacher(params: Params, paths: StagePaths) -> dict:
    source = fetch(params.teacher.source, paths.runs / "s3")
    validate_checkpoint(source, student_tokenizer=AutoTokenizer.from_pretrained(paths.tokenizer))
    digest = check_pinned_weights(source, params.teacher.sha256, "teacher.sha256", "teacher.source")
    check_world(params, source)
    tmp = paths.teacher.with_name(paths.teacher.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.pth", "*.pkl", "*.py", ".*"))
    shutil.rmtree(paths.teacher, ignore_errors=True)
    tmp.rename(paths.teacher)
    model = load_llava(paths.teacher)
    # The loss curve of the run that made it, when it ships one (teachers/embedded does); the plot is a stage output.
    history_file = paths.teacher / HISTORY
    history = list(read_jsonl(history_file)) if history_file.exists() else []
    plot_history(history, paths.plots / "teacher_loss.png", f"teacher (imported from {params.teacher.source})")
    write_json(paths.metrics / "history" / "teacher.json", history)  # the loss curve for `dvc plots`
    # Scored by the evaluate stage, with every student, through lmms-eval: scoring it here too was the
    # same work twice (~35 s of the embedded default).
    metrics = {"source": params.teacher.source, "sha256": digest, **{f"{k}_parameters": v for k, v in parameter_counts(model).items()}}
    write_json(paths.metrics / "teacher.json", metrics)
    return metrics


def teacher(params: Params, paths: StagePaths) -> dict:
    return train_teacher(params, paths) if params.teacher.source == "train" else import_teacher(params, paths)


def summary(metrics: dict) -> str:
    probes = metrics.get("probes")
    if not probes:
        return f"imported {metrics['source']} (SHA-256 {metrics['sha256'][:12]}...); the evaluate stage scores it"
    return (
        f"VQA accuracy {probes['vqa']['accuracy']:.3f}, POPE F1 random {probes['pope_random']['f1']:.3f}"
        f" / popular {probes['pope_popular']['f1']:.3f} / adversarial {probes['pope_adversarial']['f1']:.3f},"
        f" CHAIR-i {probes['caption']['chair_i']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage("teacher", teacher, __doc__, argv, summary)


if __name__ == "__main__":
    sys.exit(main())
