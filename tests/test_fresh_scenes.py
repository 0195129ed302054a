"""bench/fresh_scenes.py's caption breakdown: which scenes lose objects, and what a caption names in a lost object's place."""

from __future__ import annotations

import importlib.util

from tasks.params import REPO

spec = importlib.util.spec_from_file_location("fresh_scenes", REPO / "bench" / "fresh_scenes.py")
fresh_scenes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fresh_scenes)

SHAPES = ("circle", "ring", "square", "diamond", "star", "cross")
RING_AND_CIRCLE = {"objects": ["ring", "circle"], "absent_partners": ["diamond", "square"]}


def kind(text: str, record: dict) -> str:
    named = {s for s in SHAPES if s in text.lower()}
    assert set(record["objects"]) - named, "only captions that leave an object out have a kind"
    return fresh_scenes.miss_kind(text, named, record)


def test_a_scene_is_grouped_by_whether_the_prior_can_pull_in_a_partner():
    assert fresh_scenes.scene_group({"objects": ["ring"], "absent_partners": ["diamond"]}) == "one object"
    assert fresh_scenes.scene_group({"objects": ["ring", "diamond"], "absent_partners": []}) == "several, nothing pulled in"
    assert fresh_scenes.scene_group(RING_AND_CIRCLE) == "several, a partner pulled in"


def test_a_caption_missing_an_object_is_told_by_what_stands_in_its_place():
    assert kind("A large red ring at the top and a small blue diamond at the left.", RING_AND_CIRCLE) == "names a pulled-in partner"
    assert kind("A large red ring at the top and a large red ring at the top.", RING_AND_CIRCLE) == "names an object twice"
    assert kind("A large red ring at the top.", RING_AND_CIRCLE) == "stops early"
    assert kind("A large red ring at the top and a small blue star at the left.", RING_AND_CIRCLE) == "names another wrong object"
