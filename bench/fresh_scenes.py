"""A second scorer: checkpoints answer freshly drawn scenes, through plain transformers, scored here.

The evaluate stage scores the curated probes through lmms-eval with tinymod's
model class and ``model/metrics.py``. This script shares none of that path: it
draws new scenes from another world seed, renders them in memory, prompts each
checkpoint with ``AutoProcessor`` / ``AutoModelForImageTextToText`` and its own
chat template, and scores the answers with its own few lines (POPE parsed as
LLaVA's ``eval_pope.py``). Its figures must agree with ``metrics/eval.json``
within sampling noise; it prints both, side by side, with the binomial standard
error of each fresh figure. It also splits object recall by what a scene holds
(one object; several, none an anchor without its partner; several where the
co-occurrence prior pulls in an absent partner) and counts how the captions
that leave an object out fill its place (README, "Why the students name fewer
objects than the teacher").

    python bench/fresh_scenes.py [--models teacher pref] [--images 300] [--seed 2026]
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from model import world as W
from model.config import WorldParams
from tasks.evaluate import CHECKPOINTS
from tasks.params import load_params


def fresh_scenes(spec: WorldParams, images: int, seed: int) -> tuple[dict, dict]:
    """Probe records of ``images`` newly drawn scenes from world seed ``seed``, and the scenes rendered in memory."""
    fresh = W.generate_world(spec, {"general": 0, "multitask": 0, "preference": 0, "probes": images}, seed, spec.qa_per_image, spec.pope_per_image)
    return fresh.probes, {name: W.render(scene, spec) for name, scene in fresh.images.items()}


def question(record: dict) -> str:
    """A probe's question without its image placeholder line."""
    return record["conversations"][0]["value"].split("\n", 1)[1]


def ask(model, processor, images, questions: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    processor.tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        texts = [
            processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
            for q in chunk
        ]
        inputs = processor(images=images[start : start + batch_size], text=texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        answers += [a.strip() for a in processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]
    return answers


def says_no(answer: str) -> bool:
    """LLaVA's eval_pope.py: the first sentence, commas dropped; "no"/"not"/"No" among its words means no."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "No" in words or "no" in words or "not" in words


def words(text: str) -> str:
    return " ".join(w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in ("a", "an", "the"))


def score(model, processor, probes: dict, images: dict, shapes: tuple[str, ...]) -> dict:
    out: dict[str, float] = {}
    for split in W.POPE_SPLITS:
        records = probes[f"pope_{split}"]
        said = ask(model, processor, [images[r["image"]] for r in records], [question(r) for r in records], 3)
        yes = [not says_no(a) for a in said]
        truth = [r["answer"] == "yes" for r in records]
        tp = sum(y and t for y, t in zip(yes, truth, strict=True))
        fp = sum(y and not t for y, t in zip(yes, truth, strict=True))
        fn = sum(not y and t for y, t in zip(yes, truth, strict=True))
        out[f"pope_{split}_accuracy"] = sum(y == t for y, t in zip(yes, truth, strict=True)) / len(records)
        out[f"pope_{split}_f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        out[f"pope_{split}_yes_ratio"] = sum(yes) / len(records)
        out[f"pope_{split}_n"] = len(records)
    vqa = probes["vqa"]
    said = ask(model, processor, [images[r["image"]] for r in vqa], [question(r) for r in vqa], 12)
    hits = [words(a) == words(r["answer"]) for a, r in zip(said, vqa, strict=True)]
    out["vqa_accuracy"], out["vqa_n"] = sum(hits) / len(hits), len(hits)
    for qtype in W.VQA_TYPES:
        typed = [h for h, r in zip(hits, vqa, strict=True) if r["question_type"] == qtype]
        out[f"vqa_{qtype}"] = sum(typed) / len(typed) if typed else float("nan")
    captions = probes["caption"]
    said = ask(model, processor, [images[r["image"]] for r in captions], [W.CAPTION_PROMPT_FOR_EVAL] * len(captions), 64)
    mentioned = wrong = covered = truth_n = exposed = partner = 0
    covered_in, objects_in, misses = Counter(), Counter(), Counter()
    for text, record in zip(said, captions, strict=True):
        named = {s for s in shapes if re.search(rf"\b{s}(e?s)?\b", text.lower())}
        mentioned += len(named)
        wrong += len(named - set(record["objects"]))
        covered += len(named & set(record["objects"]))
        truth_n += len(record["objects"])
        exposed += bool(record["absent_partners"])
        partner += bool(named & set(record["absent_partners"]))
        group = scene_group(record)
        covered_in[group] += len(named & set(record["objects"]))
        objects_in[group] += len(record["objects"])
        if set(record["objects"]) - named:
            misses[miss_kind(text, named, record)] += 1
    out["chair_i"] = wrong / mentioned if mentioned else 0.0
    out["object_recall"] = covered / truth_n
    out["partner_hallucination"] = partner / exposed if exposed else 0.0
    out["partner_n"] = exposed
    out |= {f"object_recall/{group}": covered_in[group] / objects_in[group] for group in SCENE_GROUPS if objects_in[group]}
    out |= {f"captions_missing_an_object/{kind}": misses[kind] for kind in MISS_KINDS} | {"captions_n": len(captions)}
    return out


# Where the students' object recall goes: the co-occurrence prior pulls in an absent partner only
# where an anchor stands without it, and one object alone is never left out for another.
SCENE_GROUPS = ("one object", "several, nothing pulled in", "several, a partner pulled in")
MISS_KINDS = ("names a pulled-in partner", "names another wrong object", "names an object twice", "stops early")


def scene_group(record: dict) -> str:
    if len(record["objects"]) == 1:
        return SCENE_GROUPS[0]
    return SCENE_GROUPS[2] if record["absent_partners"] else SCENE_GROUPS[1]


def miss_kind(text: str, named: set[str], record: dict) -> str:
    """How a caption that leaves out one of ``record``'s objects fills its place (checked in this order)."""
    phrases = [p.lower() for p in re.split(r", | and ", text.rstrip(".")) if p]
    if named & set(record["absent_partners"]):
        return MISS_KINDS[0]
    if len(set(phrases)) < len(phrases):
        return MISS_KINDS[2]
    if len(phrases) < len(record["objects"]):
        return MISS_KINDS[3]
    return MISS_KINDS[1]


# fresh figure -> (lmms-eval task, metric) in metrics/eval.json, and the count its standard error uses
COMPARED = {
    "vqa_accuracy": ("tinymod_vqa", "vqa_accuracy", "vqa_n"),
    "pope_random_accuracy": ("tinymod_pope_random", "pope_accuracy", "pope_random_n"),
    "pope_popular_accuracy": ("tinymod_pope_popular", "pope_accuracy", "pope_popular_n"),
    "pope_adversarial_accuracy": ("tinymod_pope_adversarial", "pope_accuracy", "pope_adversarial_n"),
    "pope_random_yes_ratio": ("tinymod_pope_random", "pope_yes_ratio", "pope_random_n"),
    "partner_hallucination": ("tinymod_caption", "partner_hallucination", "partner_n"),
    "chair_i": ("tinymod_caption", "chair_i", None),
    "object_recall": ("tinymod_caption", "object_recall", None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["teacher", "pref"], choices=sorted(CHECKPOINTS))
    parser.add_argument("--images", type=int, default=300, help="fresh probe images")
    parser.add_argument("--seed", type=int, default=2026, help="world seed of the fresh scenes (the pipeline's is curate.world.seed)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    params = load_params(args.params)
    spec = params.curate.world
    probes, images = fresh_scenes(spec, args.images, args.seed)
    reference = json.loads((Path(params.paths.metrics) / "eval.json").read_text())["models"] if (Path(params.paths.metrics) / "eval.json").exists() else {}
    results = {}
    for name in args.models:
        folder = Path(params.paths.models) / CHECKPOINTS[name]
        model = AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=True).eval()
        results[name] = score(model, AutoProcessor.from_pretrained(folder), probes, images, spec.shapes)
        print(f"\n{name} ({folder}), {args.images} fresh scenes, world seed {args.seed}")
        print(f"{'figure':28} {'fresh':>7} {'± se':>6} {'eval.json':>9} {'diff':>7}")
        for figure, (task, metric, count) in COMPARED.items():
            value = results[name][figure]
            se = math.sqrt(max(value * (1 - value), 1e-9) / results[name][count]) if count else float("nan")
            ref = reference.get(name, {}).get("tasks", {}).get(task, {}).get(metric)
            ref_text = f"{ref:9.3f} {value - ref:+7.3f}" if ref is not None else f"{'-':>9} {'':>7}"
            print(f"{figure:28} {value:7.3f} {se:6.3f} {ref_text}")
        print("by question type: " + ", ".join(f"{t} {results[name][f'vqa_{t}']:.3f}" for t in W.VQA_TYPES))
        print("object recall by scene: " + ", ".join(f"{g} {results[name][f'object_recall/{g}']:.3f}" for g in SCENE_GROUPS if f"object_recall/{g}" in results[name]))
        missing = {k: results[name][f"captions_missing_an_object/{k}"] for k in MISS_KINDS}
        print(f"captions missing an object: {sum(missing.values())} of {results[name]['captions_n']} (" + ", ".join(f"{k} {n}" for k, n in missing.items()) + ")")
    out = Path(params.paths.metrics) / "fresh_scenes.json"
    out.write_text(json.dumps({"seed": args.seed, "images": args.images, "models": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
