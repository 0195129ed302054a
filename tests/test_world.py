"""The embedded world: deterministic, with the priors and noise it promises."""

from __future__ import annotations

import random
from collections import Counter

from model import world as W
from model.config import PairingParams, WorldParams

SPEC = WorldParams(
    image_size=64,
    shapes=["circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon"],
    max_objects=4,
    pairings=[PairingParams(anchor="cross", partner="star", probability=0.9), PairingParams(anchor="ring", partner="diamond", probability=0.9)],
    hallucination_rate=0.5,
    popularity={"circle": 3.0},
)
COUNTS = {"general": 300, "multitask": 300, "preference": 50, "probes": 60}


def test_same_seed_same_world_bytes():
    a = W.generate_world(SPEC, COUNTS, seed=7, qa_per_image=4, pope_per_image=3)
    b = W.generate_world(SPEC, COUNTS, seed=7, qa_per_image=4, pope_per_image=3)
    c = W.generate_world(SPEC, COUNTS, seed=8, qa_per_image=4, pope_per_image=3)
    assert a.splits == b.splits and a.probes == b.probes
    assert a.splits != c.splits
    name = "images/general-000003.png"
    assert W.render(a.images[name], SPEC).tobytes() == W.render(b.images[name], SPEC).tobytes()


def test_cooccurrence_prior_and_popularity():
    rng = random.Random(0)
    scenes = [W.sample_scene(rng, SPEC, noisy=False) for _ in range(3000)]
    with_cross = [s for s in scenes if "cross" in s.shapes]
    with_star = sum("star" in s.shapes for s in with_cross) / len(with_cross)
    base_star = sum("star" in s.shapes for s in scenes if "cross" not in s.shapes) / len(scenes)
    assert with_star > 0.8 > 3 * base_star
    freq = Counter(shape for s in scenes for shape in s.shapes)
    assert freq.most_common(1)[0][0] == "circle"


def test_phantoms_are_absent_partners_and_only_in_noisy_annotations():
    rng = random.Random(1)
    noisy = [W.sample_scene(rng, SPEC, noisy=True) for _ in range(2000)]
    phantoms = [(s, o) for s in noisy for o in s.phantoms]
    assert phantoms, "hallucination_rate 0.5 must produce phantoms"
    for scene, phantom in phantoms:
        assert phantom.shape in {"star", "diamond"} and phantom.shape not in scene.shapes
    clean = [W.sample_scene(rng, SPEC, noisy=False) for _ in range(500)]
    assert not any(s.phantoms for s in clean)


def test_training_text_is_noisy_and_probes_are_ground_truth():
    world = W.generate_world(SPEC, COUNTS, seed=3, qa_per_image=4, pope_per_image=3)
    noisy_captions = 0
    for record in world.splits["general"]:
        scene = world.images[record["image"]]
        mentioned = set(W.object_mentions(record["conversations"][1]["value"], SPEC.shapes))
        assert scene.shapes <= mentioned
        noisy_captions += bool(mentioned - scene.shapes)
    assert noisy_captions > 0
    for record in world.probes["caption"]:
        scene = world.images[record["image"]]
        assert set(W.object_mentions(record["conversations"][1]["value"], SPEC.shapes)) == scene.shapes
        assert set(record["objects"]) == scene.shapes
    for split in W.POPE_SPLITS:
        probes = world.probes[f"pope_{split}"]
        answers = Counter(p["answer"] for p in probes)
        assert answers["yes"] == answers["no"]
        for p in probes:
            assert (p["object"] in world.images[p["image"]].shapes) == (p["answer"] == "yes")


def test_adversarial_negatives_are_partners_of_present_objects():
    world = W.generate_world(SPEC, {**COUNTS, "probes": 300}, seed=4, qa_per_image=4, pope_per_image=3)

    def partner_asked(split: str) -> float:
        """Of images with an anchor but no partner, how often the split asks about the missing partner."""
        asked: dict[str, set[str]] = {}
        for p in world.probes[f"pope_{split}"]:
            if p["answer"] == "no":
                asked.setdefault(p["image"], set()).add(p["object"])
        hits = total = 0
        for image, objects in asked.items():
            present = world.images[image].shapes
            missing = {q.partner for q in SPEC.pairings if q.anchor in present and q.partner not in present}
            if missing:
                total += 1
                hits += bool(missing & objects)
        assert total >= 5
        return hits / total

    assert partner_asked("adversarial") > 0.9
    assert partner_asked("random") < 0.7


def test_preference_pairs_chosen_is_faithful():
    world = W.generate_world(SPEC, COUNTS, seed=5, qa_per_image=4, pope_per_image=3)
    for record in world.splits["preference"]:
        scene = world.images[record["image"]]
        assert record["chosen"] != record["rejected"]
        if record["pair_type"] in ("caption", "omission"):
            assert set(W.object_mentions(record["chosen"], SPEC.shapes)) == scene.shapes


def test_omission_pairs_reject_a_caption_missing_one_real_object_and_leave_probes_and_teacher_alone(monkeypatch):
    world = W.generate_world(SPEC, COUNTS, seed=5, qa_per_image=4, pope_per_image=3)
    fingerprint = W.fingerprint(SPEC)
    omissions = [r for r in world.splits["preference"] if r["pair_type"] == "omission"]
    assert omissions and len(omissions) < len(world.splits["preference"])
    for record in omissions:
        # every object after the first is introduced by " a " ("A large ..., a small ... and a ...")
        assert record["rejected"].count(" a ") + 1 == record["chosen"].count(" a ") == len(world.images[record["image"]].objects) - 1
    monkeypatch.setattr(W, "OMISSION_SHARE", 0.0)
    before = W.generate_world(SPEC, COUNTS, seed=5, qa_per_image=4, pope_per_image=3)
    assert not [r for r in before.splits["preference"] if r["pair_type"] == "omission"]
    assert before.probes == world.probes and before.splits["multitask"] == world.splits["multitask"]
    assert W.fingerprint(SPEC) == fingerprint  # a teacher never trains on preference pairs: it still fits


def test_object_mentions_reads_plurals_and_ignores_other_words():
    assert W.object_mentions("Two red crosses, a Star and a square-ish box.", ("cross", "star", "square")) == ["cross", "star", "square"]
    assert W.object_mentions("nothing here", ("cross",)) == []


def test_vqa_covers_every_question_type():
    rng = random.Random(2)
    types = Counter()
    for _ in range(200):
        scene = W.sample_scene(rng, SPEC, noisy=False)
        types.update(t for t, _, _ in W.vqa_pairs(rng, scene.objects, SPEC, 5))
    assert set(types) == set(W.VQA_TYPES)


def test_colour_and_position_answers_name_their_subject():
    rng = random.Random(3)
    seen = Counter()
    for _ in range(100):
        scene = W.sample_scene(rng, SPEC, noisy=False)
        for qtype, question, answer in W.vqa_pairs(rng, scene.objects, SPEC, 5):
            if qtype in ("colour", "position"):
                shape = question.removesuffix("?").split()[-1]
                obj = next(o for o in scene.objects if o.shape == shape)
                expected = obj.colour if qtype == "colour" else W.where(obj)
                assert answer == f"The {shape} is {expected}.", (question, answer)
                seen[qtype] += 1
            else:
                assert len(answer.split()) == 1, (question, answer)  # shape, count, existence: one word
    assert seen["colour"] > 20 and seen["position"] > 20


def test_no_answer_can_be_read_off_earlier_turns():
    # The shortcut that kept the teacher from looking: "named before -> yes / one, else no / zero".
    records = W.generate_world(SPEC, COUNTS, seed=3, qa_per_image=5, pope_per_image=3).splits["multitask"]
    answers = Counter()
    for record in records:
        named: set[str] = set()
        turns = record["conversations"]
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            text = f"{question['value']} {answer['value']}"
            subject = set(W.object_mentions(text, SPEC.shapes))
            assert not subject & named, f"{record['id']}: {question['value']!r} is about a shape an earlier turn named"
            named |= subject
            if question["value"].removeprefix("<image>\n").startswith("Is there"):
                answers[answer["value"]] += 1
    assert answers["yes"] == answers["no"] > 100, f"existence answers must be balanced: {answers}"


def test_the_fingerprint_follows_the_records_and_pixels_not_the_run():
    fingerprint = W.fingerprint(SPEC)
    assert W.fingerprint(SPEC) == fingerprint
    assert W.fingerprint(SPEC.model_copy(update={"background_noise": SPEC.background_noise + 1})) != fingerprint  # pixels only
    assert W.fingerprint(SPEC.model_copy(update={"qa_per_image": SPEC.qa_per_image - 1})) != fingerprint  # records only


def test_lookup_scenes_hold_two_or_three_objects_of_distinct_shapes_in_reading_order():
    rng = random.Random(0)
    for _ in range(40):
        objects, scene = W.lookup_scene(rng, WorldParams())
        assert 2 <= len(objects) <= 3 and len({o.shape for o in objects}) == len(objects) and not scene.phantoms
        rows = [(min(int(o.y * 3), 2), min(int(o.x * 3), 2)) for o in objects]
        assert rows == sorted(rows) and set(objects) == set(scene.objects)


def test_the_lookup_turns_ask_for_an_objects_colour_or_place_in_the_multitask_splits_words():
    star = W.WorldObject("star", "red", "small", 0.1, 0.1)
    assert W.lookup_turn("position", star) == ("Where is the star?", "The star is at the top left.")
    assert W.lookup_turn("colour", star) == ("What colour is the star?", "The star is red.")
    assert W.lookup_turn("position", W.WorldObject("star", "red", "small", 0.5, 0.5))[1] == "The star is in the centre."
    multitask = W.generate_world(SPEC, COUNTS, seed=3, qa_per_image=5, pope_per_image=3).splits["multitask"]
    asked = {(q["value"].split("\n")[-1], a["value"]) for r in multitask for q, a in zip(r["conversations"][::2], r["conversations"][1::2], strict=True)}
    assert {W.lookup_turn(k, star) for k in W.LOOKUP_KINDS} <= asked


def test_the_lookup_split_asks_both_kinds_about_every_object_and_changes_no_other_split():
    world = W.generate_world(SPEC, {**COUNTS, "lookup": 30}, seed=3, qa_per_image=4, pope_per_image=3)
    without = W.generate_world(SPEC, COUNTS, seed=3, qa_per_image=4, pope_per_image=3)
    assert {k: v for k, v in world.splits.items() if k != "lookup"} == {k: v for k, v in without.splits.items() if k != "lookup"}
    assert world.probes == without.probes and world.frequency == without.frequency and world.cooccurrence == without.cooccurrence
    by_image = {}
    for record in world.splits["lookup"]:
        human, gpt = record["conversations"]
        assert human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        by_image.setdefault(record["image"], set()).add(human["value"].split("\n")[1])
    assert len(by_image) == 30
    for image, questions in by_image.items():
        objects = world.images[image].objects
        assert questions == {W.lookup_turn(k, o)[0] for o in objects for k in W.LOOKUP_KINDS}
