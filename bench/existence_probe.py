"""Whether a checkpoint reads existence off the image or off the question's object name.

"Is there a <shape> in the image?" can be answered two ways: look for the shape among the
image tokens, or say what the training data says most often about that shape (circles and
squares, the popular shapes, are in most images). This asks every POPE question of freshly
drawn scenes twice, once with its own image and once with another scene's, and prints, per
checkpoint: accuracy, yes-ratio on positives and on negatives, how often the answer stays the
same when the image is swapped (1.00: the image plays no part), and the yes-ratio by the shape
the question names (1.0 or 0.0 for a shape: answered from the name alone).

    python bench/existence_probe.py CHECKPOINT [CHECKPOINT ...] [--images 200] [--seed 2026]
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from pathlib import Path

from fresh_scenes import ask, fresh_scenes, question, says_no
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging as hf_logging

from model import world as W
from tasks.params import load_params


def other_scene(names: list[str], seed: int) -> dict[str, str]:
    """Each image paired with another one, never itself: a shuffled cycle through them all."""
    cycle = sorted(names)
    random.Random(seed).shuffle(cycle)
    return dict(zip(cycle, cycle[1:] + cycle[:1], strict=True))


def figures(own: list[bool], swapped: list[bool], truth: list[bool], asked: list[str]) -> dict:
    """The "yes" answers to each question with its own image (``own``) and another scene's (``swapped``),
    against the truth: accuracy, yes-ratio on positives and negatives, the share of answers the swap
    left the same, and the yes-ratio by the shape asked (``asked``)."""
    by_shape: dict[str, list[bool]] = defaultdict(list)
    for shape, yes in zip(asked, own, strict=True):
        by_shape[shape].append(yes)
    positives = [y for y, t in zip(own, truth, strict=True) if t]
    negatives = [y for y, t in zip(own, truth, strict=True) if not t]
    return {
        "accuracy": sum(y == t for y, t in zip(own, truth, strict=True)) / len(own),
        "yes_positives": sum(positives) / len(positives),
        "yes_negatives": sum(negatives) / len(negatives),
        "same_with_other_image": sum(a == b for a, b in zip(own, swapped, strict=True)) / len(own),
        "yes_by_shape": {s: sum(v) / len(v) for s, v in sorted(by_shape.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--images", type=int, default=200, help="fresh probe images")
    parser.add_argument("--seed", type=int, default=2026, help="world seed of the fresh scenes (the pipeline's is curate.world.seed)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per checkpoint would split the table
    spec = load_params(args.params).curate.world
    probes, images = fresh_scenes(spec, args.images, args.seed)
    other = other_scene(list(images), args.seed)
    records = [r for split in W.POPE_SPLITS for r in probes[f"pope_{split}"]]
    questions = [question(r) for r in records]
    truth = [r["answer"] == "yes" for r in records]
    print(f"{len(records)} POPE questions on {args.images} fresh scenes (world seed {args.seed})")
    print(f"{'checkpoint':48} {'acc':>5} {'yes|pos':>7} {'yes|neg':>7} {'same w/ other image':>19}   yes-ratio by the shape asked")
    for folder in args.checkpoints:
        model = AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=True).eval()
        processor = AutoProcessor.from_pretrained(folder)
        own = [not says_no(a) for a in ask(model, processor, [images[r["image"]] for r in records], questions, 3)]
        swapped = [not says_no(a) for a in ask(model, processor, [images[other[r["image"]]] for r in records], questions, 3)]
        f = figures(own, swapped, truth, [r["object"] for r in records])
        shapes = " ".join(f"{s} {ratio:.2f}" for s, ratio in f["yes_by_shape"].items())
        print(f"{'/'.join(folder.parts[-3:]):48} {f['accuracy']:5.3f} {f['yes_positives']:7.2f} {f['yes_negatives']:7.2f} {f['same_with_other_image']:19.2f}   {shapes}")


if __name__ == "__main__":
    main()
