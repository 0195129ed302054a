"""Pilot: distil the students from the teacher's own captions instead of the caption annotations (sequence-level KD).

The students name fewer of a scene's objects than the teacher does, mostly where the world's
co-occurrence prior pulls in an absent partner: they name it in a real object's place, where the
teacher names it beside them (README, "Why the students name fewer objects than the teacher").
The annotations the students learn from put the phantom partner at random places among the real
objects. The teacher's greedy captions are one candidate for better targets (its recall is 0.95).

This copies a finished run's workspace (e.g. an ablation run's), replaces every general-split
caption with the teacher's greedy answer to the same prompt, and runs the stages from the teacher
cache on (mimic_dense, upcycle, mimic_sparse, preference, evaluate) in the copy, directly, outside
DVC. It prints the students' caption figures before and after.

    python bench/teacher_captions.py .cache/ablation_ffn384/llava_mod-seed0 .cache/pilot-teacher-captions
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from fresh_scenes import ask
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor
from workspace import dvc_env

STAGES = ("teacher_cache", "mimic_dense", "upcycle", "mimic_sparse", "preference", "evaluate")
FIGURES = ("object_recall", "partner_hallucination", "chair_i")


def caption_with_teacher(workspace: Path, batch_size: int = 256) -> tuple[int, int]:
    """Rewrite ``workspace``'s general split with the teacher's greedy captions; returns (changed, total)."""
    split = workspace / "data/curated/general.jsonl"
    records = [json.loads(line) for line in split.read_text().splitlines()]
    model = AutoModelForImageTextToText.from_pretrained(workspace / "models/teacher").eval()
    processor = AutoProcessor.from_pretrained(workspace / "models/teacher")
    said: list[str] = []
    for start in tqdm(range(0, len(records), batch_size), desc="teacher captions", unit="batch"):
        chunk = records[start : start + batch_size]
        images = [Image.open(workspace / "data/curated" / r["image"]).convert("RGB") for r in chunk]
        prompts = [r["conversations"][0]["value"].split("\n", 1)[1] for r in chunk]
        said += ask(model, processor, images, prompts, 64)
    changed = sum(r["conversations"][1]["value"] != text for r, text in zip(records, said, strict=True))
    for record, text in zip(records, said, strict=True):
        record["conversations"][1]["value"] = text
    split.write_text("".join(json.dumps(r) + "\n" for r in records))
    return changed, len(records)


def caption_figures(workspace: Path) -> dict[str, dict[str, float]]:
    models = json.loads((workspace / "metrics/eval.json").read_text())["models"]
    return {name: {f: m["tasks"]["tinymod_caption"][f] for f in FIGURES} | {"vqa_accuracy": m["tasks"]["tinymod_vqa"]["vqa_accuracy"]} for name, m in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished workspace: data/curated, models/teacher, the students, metrics/eval.json")
    parser.add_argument("out", type=Path, help="where the copy goes (replaced)")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    shutil.copytree(args.run, args.out, symlinks=True)
    changed, total = caption_with_teacher(args.out)
    print(f"{changed} of {total} general captions differ from the annotations")
    for stage in STAGES:
        subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=args.out, env=dvc_env(), check=True)
    before, after = caption_figures(args.run), caption_figures(args.out)
    print(f"\n{'model':10} " + " ".join(f"{f:>30}" for f in (*FIGURES, "vqa_accuracy")) + "   (annotations -> teacher captions)")
    for name in after:
        print(f"{name:10} " + " ".join(f"{before[name][f]:14.3f} -> {after[name][f]:<12.3f}" for f in (*FIGURES, "vqa_accuracy")))


if __name__ == "__main__":
    main()
