"""The embedded image world: a procedural stand-in for COCO.

Images hold a few coloured shapes on a noisy background. Shapes follow a
popularity prior and a co-occurrence prior (like fork and knife in COCO), and
the *annotations* the models train on are noisy in a structured way: with
probability ``hallucination_rate`` an image whose anchor shape is present
without its partner is annotated as if the partner were there too. Text made
from those annotations (captions, VQA) teaches a model the co-occurrence
prior, so it hallucinates the partner the way caption-trained LLaVA models
hallucinate objects. Evaluation probes and preference "chosen" answers use the
ground truth.

Everything here is a pure function of a seed and ``curate.world``
(:class:`model.config.WorldParams`), so the same parameters always give the same world.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from model.config import WorldParams

COUNT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ROWS = ["top", "middle", "bottom"]
COLUMNS = ["left", "centre", "right"]
CAPTION_PROMPTS = ["Describe the image.", "What is in this picture?", "Give a short caption of the image."]
CAPTION_PROMPT_FOR_EVAL = "Describe the image."
POPE_SPLITS = ("random", "popular", "adversarial")
VQA_TYPES = ("colour", "shape", "count", "existence", "position")


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def position(self) -> str:
        return position_name(self.x, self.y)


@dataclass(frozen=True)
class Scene:
    """One image: its ground-truth objects and the (possibly noisy) annotation."""

    objects: tuple[WorldObject, ...]
    annotated: tuple[WorldObject, ...]
    noise_seed: int

    @property
    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}

    @property
    def phantoms(self) -> tuple[WorldObject, ...]:
        return tuple(o for o in self.annotated if o not in self.objects)


def position_name(x: float, y: float) -> str:
    """Name a point of the unit square on a 3x3 grid: 'top left', 'centre', 'bottom', ..."""
    row = ROWS[min(int(y * 3), 2)]
    col = COLUMNS[min(int(x * 3), 2)]
    if row == "middle" and col == "centre":
        return "centre"
    if row == "middle":
        return col
    if col == "centre":
        return row
    return f"{row} {col}"


def _place(rng: random.Random, spec: WorldParams, size: str, placed: list[WorldObject]) -> tuple[float, float] | None:
    """The centre of a free cell of the 3x3 grid, jittered; None when every cell is taken."""
    taken = {(min(int(o.x * 3), 2), min(int(o.y * 3), 2)) for o in placed}
    free = [(col, row) for row in range(3) for col in range(3) if (col, row) not in taken]
    if not free:
        return None
    col, row = rng.choice(free)
    # Jitter stays inside the cell, so an object never crosses into a neighbour's position.
    slack = max(0.0, (1 - spec.sizes[size]) / 2) * spec.jitter * 2
    x = (col + 0.5 + rng.uniform(-slack, slack)) / 3
    y = (row + 0.5 + rng.uniform(-slack, slack)) / 3
    return x, y


def _new_object(rng: random.Random, spec: WorldParams, shape: str, placed: list[WorldObject]) -> WorldObject | None:
    size = rng.choice(sorted(spec.sizes))
    where = _place(rng, spec, size, placed)
    if where is None:
        return None
    return WorldObject(shape=shape, colour=rng.choice(sorted(spec.colours)), size=size, x=where[0], y=where[1])


def sample_scene(rng: random.Random, spec: WorldParams, noisy: bool = True) -> Scene:
    """Draw the objects of one image, then its annotation (with phantom partners when ``noisy``)."""
    target = rng.randint(spec.min_objects, spec.max_objects)
    partner_of = {p.anchor: p for p in spec.pairings}
    objects: list[WorldObject] = []
    while len(objects) < target:
        shape = rng.choices(spec.shapes, weights=spec.shape_weights())[0]
        new = _new_object(rng, spec, shape, objects)
        if new is None:
            break
        objects.append(new)
        pairing = partner_of.get(shape)
        if pairing and len(objects) < spec.max_objects and rng.random() < pairing.probability:
            partner = _new_object(rng, spec, pairing.partner, objects)
            if partner is not None:
                objects.append(partner)
    annotated = list(objects)
    if noisy:
        present = {o.shape for o in objects}
        for pairing in spec.pairings:
            if pairing.anchor in present and pairing.partner not in present and rng.random() < spec.hallucination_rate:
                phantom = _new_object(rng, spec, pairing.partner, annotated)
                if phantom is not None:
                    annotated.append(phantom)
    return Scene(objects=tuple(objects), annotated=tuple(annotated), noise_seed=rng.randrange(2**31))


def _polygon(cx: float, cy: float, r: float, sides: int, rotation: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rotation + 2 * math.pi * i / sides), cy + r * math.sin(rotation + 2 * math.pi * i / sides))
        for i in range(sides)
    ]


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + math.pi * i / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(r * 0.4)))
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r, 3, -math.pi / 2), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4, 0.0), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0.0), fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; the world draws {sorted(SHAPES_DRAWN)}")


SHAPES_DRAWN = frozenset({"circle", "ring", "square", "triangle", "diamond", "hexagon", "star", "cross"})


def render(scene: Scene, spec: WorldParams) -> Image.Image:
    """Draw the ground-truth objects (never the phantoms) on a noisy grey background."""
    px = spec.image_size
    rng = np.random.default_rng(scene.noise_seed)
    base = int(rng.integers(90, 171))
    grey = base + rng.integers(-spec.background_noise, spec.background_noise + 1, size=(px, px))
    image = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    draw = ImageDraw.Draw(image)
    cell = px / 3
    for obj in scene.objects:
        _draw(draw, obj.shape, obj.x * px, obj.y * px, spec.sizes[obj.size] * cell / 2, spec.colours[obj.colour])
    return image


# ---------------------------------------------------------------- text


def _reading_order(objects: tuple[WorldObject, ...] | list[WorldObject]) -> list[WorldObject]:
    return sorted(objects, key=lambda o: (min(int(o.y * 3), 2), o.x))


def where(obj: WorldObject) -> str:
    return "in the centre" if obj.position == "centre" else f"at the {obj.position}"


def describe(obj: WorldObject) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape} {where(obj)}"


def caption(objects: tuple[WorldObject, ...] | list[WorldObject]) -> str:
    """'A small red circle at the top left and a large blue square in the centre.'

    Objects in reading order. The order is what the teacher binds attributes through: trained on
    captions listing objects in a random order instead, it answered colour 0.49 (from 0.99),
    shape 0.37 (from 1.00) and position 0.41 (from 0.72) on the same probes, every wrong answer
    still another object's (fresh scenes, 2,000 steps each).
    """
    parts = [describe(o) for o in _reading_order(objects)]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


def vqa_pairs(rng: random.Random, objects: tuple[WorldObject, ...], spec: WorldParams, n: int) -> list[tuple[str, str, str]]:
    """Up to ``n`` distinct (question_type, question, answer) about ``objects``, mixing every question type.

    As turns of one conversation, no answer can be read off the turns before it: each question is
    about a shape that no earlier question or answer named. Without that rule a text shortcut
    answered most existence and count questions ("named before" -> yes / one, else no / zero) and a
    teacher trained on it never looked at the image to answer them (measured: existence at chance,
    yes-ratio 0.01 on first-turn questions).

    Colour and position answers restate their subject. With one-word answers a teacher answered
    "What shape is the red object?" at 0.99 but "What colour is the star?" and "Where is the star?"
    at 0.52 / 0.48, every wrong answer another object's: it had learned the lookups its captions
    practise ("a small red" -> "star": the word just written finds its object, whose shape comes
    next) and not those its one-word answers asked for. Captions that named the shape first
    ("a small star in red") moved colour to 0.71 and shape down to 0.36: the captions' order, not
    the VQA data, decided which lookup formed (measured on fresh scenes).

    Position answers stay "The star is at the top left." although the teacher places objects
    better in captions (0.98 / 0.92 with two / three objects) than in these answers (0.72 / 0.61):
    answers in the captions' own words ("The star is a small red star at the top left.") gave
    position 0.18, and colour 0.60 and shape 0.58 fell with it (2,000 steps, same probes); and
    with the place one token after the subject as colour's is ("The star is top left."), position
    0.34, colour 0.62, shape 0.50. Every change of format tried so far (three, and the caption
    order) broke the colour and shape lookups it did not touch: at this size the lookups form in
    some training runs and not in others, and the shipped one is a run where they did.
    """
    by_shape: dict[str, list[WorldObject]] = {}
    by_colour: dict[str, list[WorldObject]] = {}
    for o in objects:
        by_shape.setdefault(o.shape, []).append(o)
        by_colour.setdefault(o.colour, []).append(o)
    present = sorted(by_shape)
    absent = [s for s in spec.shapes if s not in by_shape]
    # (question, answer, the shape a reader learns about from this turn)
    candidates: dict[str, list[tuple[str, str, str]]] = {t: [] for t in VQA_TYPES}
    for shape, objs in by_shape.items():
        if len(objs) == 1:
            # Answers that name their subject ("The star is red."): the colour or place is then read
            # off the object the answer's own words point at, as a caption reads each shape off
            # the colour just written (see the docstring).
            candidates["colour"].append((*lookup_turn("colour", objs[0]), shape))
            candidates["position"].append((*lookup_turn("position", objs[0]), shape))
    for colour, objs in by_colour.items():
        if len(objs) == 1:
            candidates["shape"].append((f"What shape is the {colour} object?", objs[0].shape, objs[0].shape))
    for shape in spec.shapes:
        candidates["count"].append((f"How many {plural(shape)} are there?", COUNT_WORDS[len(by_shape.get(shape, []))], shape))
    for shape in present:
        candidates["existence"].append((f"Is there a {shape} in the image?", "yes", shape))
    for shape in absent:
        candidates["existence"].append((f"Is there a {shape} in the image?", "no", shape))
    # Balance yes and no so that neither answer is a free prior.
    yes = [c for c in candidates["existence"] if c[1] == "yes"]
    no = [c for c in candidates["existence"] if c[1] == "no"]
    rng.shuffle(no)
    candidates["existence"] = yes + no[: max(1, len(yes))]
    # Most counts are zero; keep counts of present shapes and one absent one.
    counts = [c for c in candidates["count"] if c[1] != "zero"]
    zeros = [c for c in candidates["count"] if c[1] == "zero"]
    candidates["count"] = counts + rng.sample(zeros, min(1, len(zeros)))
    out: list[tuple[str, str, str]] = []
    named: set[str] = set()
    types = [t for t in VQA_TYPES if candidates[t] and t != "existence"]
    rng.shuffle(types)
    # Existence is picked first in each round, while present shapes are still unnamed; the turns
    # are shuffled at the end, so the picking order never shows in the conversation.
    types = ["existence", *types]
    while len(out) < n:
        asked = len(out)
        for qtype in types:
            fresh = [c for c in candidates[qtype] if c[2] not in named]
            if qtype == "existence":
                # Existence comes in yes/no pairs, each claiming its shape before the other types
                # name it: yes and no stay exactly balanced, whatever the other questions use up.
                picks = [[c for c in fresh if c[1] == answer] for answer in ("yes", "no")]
                chosen = [p[rng.randrange(len(p))] for p in picks if p] if all(picks) and len(out) + 2 <= n else []
            else:
                chosen = [fresh[rng.randrange(len(fresh))]] if fresh and len(out) < n else []
            for question, answer, shape in chosen:
                candidates[qtype].remove((question, answer, shape))
                named.add(shape)
                out.append((qtype, question, answer))
        if len(out) == asked:
            break
    # Subjects are distinct, so any order keeps answers unreadable from earlier turns; a shuffled
    # order keeps the turn position from predicting the question type.
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------- objects in free text (CHAIR)


def object_mentions(text: str, shapes: tuple[str, ...] | list[str]) -> list[str]:
    """Every shape a caption mentions, in order, singular, using the world's vocabulary."""
    words = {shape: shape for shape in shapes}
    words.update({plural(shape): shape for shape in shapes})
    found = []
    for token in re.findall(r"[a-z]+", text.lower()):
        if token in words:
            found.append(words[token])
    return found


# ---------------------------------------------------------------- POPE


def cooccurrence_counts(scenes: list[Scene], shapes: tuple[str, ...]) -> dict[str, dict[str, int]]:
    counts = {a: {b: 0 for b in shapes} for a in shapes}
    for scene in scenes:
        present = scene.shapes
        for a in present:
            for b in present:
                if a != b:
                    counts[a][b] += 1
    return counts


def pope_negatives(
    rng: random.Random,
    present: set[str],
    k: int,
    split: str,
    shapes: tuple[str, ...],
    frequency: dict[str, int],
    cooccurrence: dict[str, dict[str, int]],
) -> list[str]:
    """Absent shapes to ask about, chosen as POPE does: at random, the most frequent, or the most co-occurring."""
    absent = [s for s in shapes if s not in present]
    if split == "random":
        return rng.sample(absent, min(k, len(absent)))
    if split == "popular":
        ranked = sorted(absent, key=lambda s: (-frequency.get(s, 0), s))
    elif split == "adversarial":
        # POPE ranks by co-occurrence with the present objects; normalising by the present
        # object's frequency (P(absent | present)) keeps popular shapes from drowning out pairings.
        def pull(shape: str) -> float:
            return max(cooccurrence[p][shape] / max(1, frequency.get(p, 0)) for p in present)

        ranked = sorted(absent, key=lambda s: (-pull(s), s))
    else:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {POPE_SPLITS}")
    return ranked[:k]


# ---------------------------------------------------------------- the world as LLaVA records


def _human(text: str, with_image: bool) -> dict:
    return {"from": "human", "value": f"<image>\n{text}" if with_image else text}


def _gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


@dataclass
class WorldRecords:
    """Everything one world generation produces, before it is written to disk."""

    splits: dict[str, list[dict]]
    probes: dict[str, list[dict]]
    images: dict[str, Scene]
    frequency: dict[str, int]
    cooccurrence: dict[str, dict[str, int]]


OMISSION_SHARE = 0.5  # of caption pairs about two or more objects: the rejected caption leaves one out


def _preference_record(rng: random.Random, omission_rng: random.Random, scene: Scene, spec: WorldParams, image: str, idx: int) -> dict:
    """A faithful answer (chosen) against one with a hallucinated, wrong or missing object (rejected).

    With phantom and recoloured captions alone as the rejected answers, DPO taught the student to
    stop early: after preference it named 1.68 of 2 and 2.25 of 3 objects (from 1.83 and 2.53) and
    object recall fell 0.91 -> 0.81. So half the caption pairs of scenes with two or more objects
    reject the caption with one real object left out. ``omission_rng`` makes that choice, so the
    world's other draws (the probes among them) stay as they were.
    """
    present = scene.shapes
    absent_partners = [p.partner for p in spec.pairings if p.anchor in present and p.partner not in present]
    if rng.random() < 0.6:
        prompt, chosen = CAPTION_PROMPT_FOR_EVAL, caption(scene.objects)
        wrong = list(scene.objects)
        if absent_partners or rng.random() < 0.5:
            shape = rng.choice(absent_partners or [s for s in spec.shapes if s not in present] or list(spec.shapes))
            phantom = _new_object(rng, spec, shape, wrong)
            if phantom is not None:
                wrong.append(phantom)
        if len(wrong) == len(scene.objects):  # no room for a phantom: recolour an object instead
            victim = rng.randrange(len(wrong))
            colour = rng.choice([c for c in sorted(spec.colours) if c != wrong[victim].colour])
            o = wrong[victim]
            wrong[victim] = WorldObject(o.shape, colour, o.size, o.x, o.y)
        rejected, kind = caption(wrong), "caption"
        if len(scene.objects) >= 2 and omission_rng.random() < OMISSION_SHARE:
            kept = list(scene.objects)
            kept.pop(omission_rng.randrange(len(kept)))
            rejected, kind = caption(kept), "omission"
    else:
        absent = absent_partners or [s for s in spec.shapes if s not in present]
        # Half the pairs prefer "no" (about the absent partner a prior would pull in), half "yes":
        # a skew either way would teach a yes/no bias instead of looking.
        if absent and rng.random() < 0.5:
            shape, chosen, rejected = rng.choice(absent), "no", "yes"
        else:
            shape, chosen, rejected = rng.choice(sorted(present)), "yes", "no"
        prompt, kind = f"Is there a {shape} in the image?", "existence"
    return {
        "id": f"world-preference-{idx:06d}",
        "image": image,
        "conversations": [_human(prompt, True)],
        "chosen": chosen,
        "rejected": rejected,
        "pair_type": kind,
    }


def generate_world(spec: WorldParams, counts: dict[str, int], seed: int, qa_per_image: int, pope_per_image: int) -> WorldRecords:
    """Scenes and LLaVA-format records for every split; training text from noisy annotations, probes from ground truth."""
    rng = random.Random(seed)
    omission_rng = random.Random(f"{seed}/omission")
    images: dict[str, Scene] = {}
    splits: dict[str, list[dict]] = {"general": [], "multitask": [], "preference": [], "lookup": []}
    probe_scenes: list[tuple[str, Scene]] = []
    for split in ("general", "multitask", "preference", "probes"):
        for i in range(counts[split]):
            scene = sample_scene(rng, spec, noisy=split in ("general", "multitask"))
            name = f"images/{split}-{i:06d}.png"
            images[name] = scene
            if split == "general":
                splits["general"].append(
                    {
                        "id": f"world-general-{i:06d}",
                        "image": name,
                        "conversations": [_human(rng.choice(CAPTION_PROMPTS), True), _gpt(caption(scene.annotated))],
                    }
                )
            elif split == "multitask":
                turns = []
                for t, (_, question, answer) in enumerate(vqa_pairs(rng, scene.annotated, spec, qa_per_image)):
                    turns += [_human(question, t == 0), _gpt(answer)]
                splits["multitask"].append({"id": f"world-multitask-{i:06d}", "image": name, "conversations": turns})
            elif split == "preference":
                splits["preference"].append(_preference_record(rng, omission_rng, scene, spec, name, i))
            else:
                probe_scenes.append((name, scene))
    all_scenes = list(images.values())
    frequency = {s: sum(s in sc.shapes for sc in all_scenes) for s in spec.shapes}
    cooc = cooccurrence_counts(all_scenes, spec.shapes)
    probes: dict[str, list[dict]] = {f"pope_{s}": [] for s in POPE_SPLITS}
    probes["vqa"], probes["caption"] = [], []
    for i, (name, scene) in enumerate(probe_scenes):
        present = sorted(scene.shapes)
        for split in POPE_SPLITS:
            positives = rng.sample(present, min(pope_per_image, len(present)))
            negatives = pope_negatives(rng, scene.shapes, len(positives), split, spec.shapes, frequency, cooc)
            for shape, answer in [(s, "yes") for s in positives] + [(s, "no") for s in negatives]:
                probes[f"pope_{split}"].append(
                    {
                        "id": f"world-pope-{split}-{len(probes[f'pope_{split}']):06d}",
                        "image": name,
                        "conversations": [_human(f"Is there a {shape} in the image?", True), _gpt(answer)],
                        "object": shape,
                        "answer": answer,
                        "pope_split": split,
                    }
                )
        for qtype, question, answer in vqa_pairs(rng, scene.objects, spec, len(VQA_TYPES)):
            probes["vqa"].append(
                {
                    "id": f"world-vqa-{len(probes['vqa']):06d}",
                    "image": name,
                    "conversations": [_human(question, True), _gpt(answer)],
                    "question_type": qtype,
                    "answer": answer,
                }
            )
        probes["caption"].append(
            {
                "id": f"world-caption-{i:06d}",
                "image": name,
                "conversations": [_human(CAPTION_PROMPT_FOR_EVAL, True), _gpt(caption(scene.objects))],
                "objects": present,
                "vocabulary": list(spec.shapes),  # CHAIR counts mentions of these words
                # What the co-occurrence prior pulls in: partners of present anchors that are absent.
                "absent_partners": sorted({p.partner for p in spec.pairings if p.anchor in scene.shapes} - scene.shapes),
            }
        )
    # Drawn last, from their own seed, and kept out of the frequencies: the lookup split leaves every
    # other split and probe as it was, and POPE's popular and adversarial negatives with them.
    lookup_rng = random.Random(f"{seed}/lookup")
    for i in range(counts.get("lookup", 0)):
        objects, scene = lookup_scene(lookup_rng, spec)
        name = f"images/lookup-{i:06d}.png"
        images[name] = scene
        for j, (question, answer) in enumerate(lookup_turn(kind, obj) for obj in objects for kind in LOOKUP_KINDS):
            splits["lookup"].append({"id": f"world-lookup-{i:06d}-{j}", "image": name, "conversations": [_human(question, True), _gpt(answer)]})
    return WorldRecords(splits=splits, probes=probes, images=images, frequency=frequency, cooccurrence=cooc)


LOOKUP_KINDS = ("position", "colour")


def lookup_scene(rng: random.Random, spec: WorldParams) -> tuple[list[WorldObject], Scene]:
    """A scene whose colour and place questions need a lookup: 2-3 objects with distinct shapes, in reading order, annotations true."""
    while True:
        scene = sample_scene(rng, spec, noisy=False)
        objects = _reading_order(scene.objects)
        if len(objects) >= 2 and len({o.shape for o in objects}) == len(objects):
            return objects, scene  # one object needs no lookup; a shape twice has no single answer


def lookup_turn(kind: str, obj: WorldObject) -> tuple[str, str]:
    """The question about ``obj``'s colour or place and its right answer, as the multitask split and the lookup split ask it."""
    if kind == "position":
        return f"Where is the {obj.shape}?", f"The {obj.shape} is {where(obj)}."
    return f"What colour is the {obj.shape}?", f"The {obj.shape} is {obj.colour}."


def fingerprint(spec: WorldParams) -> str:
    """SHA-256 of a small world drawn from ``spec``: its records, probes and pixels.

    A trained teacher keeps it beside the ``curate.world`` it learned from. A change to this module
    that writes other records (one more turn per conversation, another answer format) leaves
    ``curate.world`` as it was, and without this a teacher trained on the old records would still
    be imported as if it fitted the new ones. The preference split is left out: a teacher never
    trains on it (it is the students' DPO data), so a new kind of preference pair still fits it.
    """
    counts = {split: 8 for split in ("general", "multitask", "preference", "probes", "lookup")}
    world = generate_world(spec, counts, spec.seed, spec.qa_per_image, spec.pope_per_image)
    taught = {split: records for split, records in world.splits.items() if split != "preference"}
    digest = hashlib.sha256(json.dumps([taught, world.probes], sort_keys=True).encode())
    for name in sorted(world.images):
        digest.update(name.encode())
        digest.update(render(world.images[name], spec).tobytes())
    return digest.hexdigest()
