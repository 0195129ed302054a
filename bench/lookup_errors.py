"""Where a checkpoint's wrong colour and position answers point, on fresh scenes.

"What colour is the star?" and "Where is the star?" need the same lookup: find the
object the question names among the image tokens, then read its colour or place.
This draws scenes of two or three objects with distinct shapes from another world
seed, asks both questions about every object, and sorts each answer: right, another
object's value (and which one, by reading order: the image tokens' order), or no
object's. It also prints position accuracy by the asked object's place in reading
order, which shows whether a failed lookup falls back on a fixed object.

    python bench/lookup_errors.py [CHECKPOINT] [--questions N]
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

from model import world as W
from model.generate import Answerer
from tasks.params import REPO, load_params


def reading_order(scene: W.Scene) -> list[W.WorldObject]:
    return sorted(scene.objects, key=lambda o: (min(int(o.y * 3), 2), min(int(o.x * 3), 2)))


def value_of(kind: str, obj: W.WorldObject) -> str:
    return W.where(obj) if kind == "position" else obj.colour


def names(kind: str, obj: W.WorldObject, answer: str, others: list[W.WorldObject]) -> bool:
    """``answer`` gives ``obj``'s value (and no longer value that contains it: "at the top" in "at the top left")."""
    value = value_of(kind, obj)
    longer = [value_of(kind, o) for o in others if value in value_of(kind, o) and value_of(kind, o) != value]
    return value in answer and not any(other in answer for other in longer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=Path, default=REPO / "teachers" / "embedded")
    parser.add_argument("--questions", type=int, default=600, help="questions of each kind, about")
    parser.add_argument("--seed", type=int, default=2027, help="the scenes' seed (the world's own is 1234)")
    args = parser.parse_args()
    spec = load_params(REPO / "params.yaml").curate.world
    rng = random.Random(args.seed)
    asked: list[tuple[str, int, list[W.WorldObject], str]] = []
    images = []
    while len(asked) < 2 * args.questions:
        scene = W.sample_scene(rng, spec, noisy=False)
        objects = reading_order(scene)
        if len(objects) < 2 or len({o.shape for o in objects}) != len(objects):
            continue  # one object needs no lookup; a shape twice has no single answer
        image = W.render(scene, spec)
        for i, obj in enumerate(objects):
            for kind, question in (("position", f"Where is the {obj.shape}?"), ("colour", f"What colour is the {obj.shape}?")):
                asked.append((kind, i, objects, f"<image>\n{question}"))
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


if __name__ == "__main__":
    main()
