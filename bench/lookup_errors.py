"""Where a checkpoint's wrong colour and position answers point, on fresh scenes.

"What colour is the star?" and "Where is the star?" need the same lookup: find the
object the question names among the image tokens, then read its colour or place.
This draws scenes of two or three objects with distinct shapes from another world
seed, asks both questions about every object, and sorts each answer: right, another
object's value (and which one, by reading order: the image tokens' order), or no
object's. It also prints position accuracy by the asked object's place in reading
order, which shows whether a failed lookup falls back on a fixed object.

With --attention it also shows where the lookup happens: teacher-forced on the right answers,
for each answer word that needs the image (the colour; "at" or "in" and each word of a place),
the attention head that looks most at the asked object's image token, and how much of its
attention goes to that token and to the other objects' tokens.

    python bench/lookup_errors.py [CHECKPOINT] [--questions N] [--attention]
"""

from __future__ import annotations

import argparse
import random
from collections import Counter, defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from model import world as W
from model.data import encode_prompt
from model.generate import Answerer
from model.tokenizer import IMAGE_TOKEN
from tasks.params import REPO, load_params


def cell(obj: W.WorldObject) -> int:
    """The object's grid cell, row-major: the index of its image token among the 9."""
    return min(int(obj.y * 3), 2) * 3 + min(int(obj.x * 3), 2)


def reading_order(scene: W.Scene) -> list[W.WorldObject]:
    return sorted(scene.objects, key=cell)


def value_of(kind: str, obj: W.WorldObject) -> str:
    return W.where(obj) if kind == "position" else obj.colour


def names(kind: str, obj: W.WorldObject, answer: str, others: list[W.WorldObject]) -> bool:
    """``answer`` gives ``obj``'s value (and no longer value that contains it: "at the top" in "at the top left")."""
    value = value_of(kind, obj)
    longer = [value_of(kind, o) for o in others if value in value_of(kind, o) and value_of(kind, o) != value]
    return value in answer and not any(other in answer for other in longer)


def answer_words(tokenizer, obj: W.WorldObject) -> dict[str, dict[str, int]]:
    """Per question kind, the index in its answer's tokens of each word that needs the image.

    Found by tokenising the answer's prefixes, so the indices follow the world's answer format.
    """

    def index(prefix: str) -> int:
        return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])

    subject = f"The {obj.shape} is"
    preposition, _, place = W.where(obj).partition(" the ")
    words = {'"at" / "in"': index(subject), "the place's first word": index(f"{subject} {preposition} the")}
    if " " in place:
        words["its second word"] = index(f"{subject} {preposition} the {place.split()[0]}")
    return {"colour": {"the colour": index(subject)}, "position": words}


def attention_to_asked(checkpoint: Path, scenes: list[tuple[list[W.WorldObject], object]]) -> None:
    """Per answer word that needs the image: the head most on the asked object, and its attention to it and to the others."""
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    on_asked: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)
    on_others: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)
    for objects, image in scenes:
        pixels = processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
        for obj in objects:
            for kind in ("colour", "position"):
                question, answer = W.lookup_turn(kind, obj)
                prompt = encode_prompt(tokenizer, [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}], model.config.image_seq_length)
                words = tokenizer(answer, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prompt + words])
                with torch.no_grad():
                    attentions = model(input_ids=ids, pixel_values=pixels, output_attentions=True).attentions
                image_at = (ids[0] == image_id).nonzero().flatten()
                others = [image_at[cell(o)] for o in objects if o is not obj]
                for word, k in answer_words(tokenizer, obj)[kind].items():
                    at = len(prompt) + k - 1  # the position that predicts answer token k
                    layers = torch.stack([a[0, :, at] for a in attentions])  # [layers, heads, T]
                    on_asked[(kind, word)].append(layers[:, :, image_at[cell(obj)]])
                    on_others[(kind, word)].append(layers[:, :, others].sum(-1))
    print("  where the lookup happens (teacher-forced on the right answers; attention of the head most on the asked object):")
    for key, answers in on_asked.items():
        asked, rest = torch.stack(answers).mean(0), torch.stack(on_others[key]).mean(0)
        layer, head = divmod(int((asked - rest).argmax()), asked.shape[1])
        print(f"    {key[0]:8} {key[1]:22} layer {layer} head {head}: {asked[layer, head]:.2f} on the asked object, "
              f"{rest[layer, head]:.2f} on the others ({len(answers)} answers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=Path, default=REPO / "teachers" / "embedded")
    parser.add_argument("--questions", type=int, default=600, help="questions of each kind, about")
    parser.add_argument("--seed", type=int, default=2027, help="the scenes' seed (the world's own is 1234)")
    parser.add_argument("--attention", action="store_true", help="also show which head looks up the asked object, per answer word")
    args = parser.parse_args()
    spec = load_params(REPO / "params.yaml").curate.world
    rng = random.Random(args.seed)
    asked: list[tuple[str, int, list[W.WorldObject], str]] = []
    images = []
    scenes: list[tuple[list[W.WorldObject], object]] = []
    while len(asked) < 2 * args.questions:
        objects, scene = W.lookup_scene(rng, spec)
        image = W.render(scene, spec)
        scenes.append((objects, image))
        for i, obj in enumerate(objects):
            for kind in ("position", "colour"):
                asked.append((kind, i, objects, f"<image>\n{W.lookup_turn(kind, obj)[0]}"))
                images.append(image)
    answerer = Answerer(args.checkpoint)
    answers: list[str] = []
    for start in range(0, len(asked), 64):
        answers += answerer.answer([q for _, _, _, q in asked[start : start + 64]], images[start : start + 64], 16)

    verdicts = {"colour": Counter(), "position": Counter()}
    by_place, right_by_place = Counter(), Counter()
    for (kind, i, objects, _), answer in zip(asked, answers, strict=True):
        others = [o for j, o in enumerate(objects) if j != i]
        right = names(kind, objects[i], answer, others)
        if kind == "position":
            by_place[(len(objects), i)] += 1
            right_by_place[(len(objects), i)] += right
        if right:
            verdicts[kind]["right"] += 1
            continue
        hits = [j for j, o in enumerate(objects) if j != i and names(kind, o, answer, [])]
        if not hits:
            verdicts[kind]["no object's"] += 1
            continue
        j = hits[0]
        which = "the first" if j == 0 else "the last" if j == len(objects) - 1 else "the middle"
        verdicts[kind][f"{which} object's ({'before' if j < i else 'after'} the asked one)"] += 1
    print(f"{args.checkpoint}: {len(asked) // 2} questions of each kind on scenes of 2-3 objects")
    for kind, counts in verdicts.items():
        total = sum(counts.values())
        print(f"  {kind:8} " + ", ".join(f"{name} {n} ({n / total:.2f})" for name, n in counts.most_common()))
    print("  position accuracy by (objects, place of the asked one in reading order): " + ", ".join(
        f"{k}: {right_by_place[k]}/{by_place[k]} ({right_by_place[k] / by_place[k]:.2f})" for k in sorted(by_place)
    ))  # fmt: skip
    if args.attention:
        attention_to_asked(args.checkpoint, scenes)


if __name__ == "__main__":
    main()
