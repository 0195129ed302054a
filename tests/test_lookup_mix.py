"""bench/lookup_mix.py's lookup questions: one object of a 2-3 object scene, the loss on its answer only."""

from __future__ import annotations

import importlib.util
import random

from model.data import IGNORE
from model.tokenizer import IM_END
from tasks.params import REPO, load_params

spec = importlib.util.spec_from_file_location("lookup_mix", REPO / "bench" / "lookup_mix.py")
lookup_mix = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lookup_mix)


def test_lookup_questions_ask_about_one_object_of_a_scene_that_needs_a_lookup(tiny_tokenizer, monkeypatch):
    world = load_params(REPO / "params.yaml").curate.world
    scenes = []
    real_sample = lookup_mix.W.sample_scene
    monkeypatch.setattr(lookup_mix.W, "sample_scene", lambda *a, **k: scenes.append(real_sample(*a, **k)) or scenes[-1])
    rng = random.Random(0)
    for _ in range(40):
        image, ids, labels = lookup_mix.lookup_example(rng, world, tiny_tokenizer, image_tokens=4)
        scene = scenes[-1]
        assert 2 <= len(scene.objects) <= 3 and len({o.shape for o in scene.objects}) == len(scene.objects)
        assert image.size == (world.image_size, world.image_size) and len(ids) == len(labels)
        answered = [t for t in labels if t != IGNORE]
        assert ids[-len(answered):] == answered and answered[-1] == tiny_tokenizer.convert_tokens_to_ids(IM_END)
        answer = tiny_tokenizer.decode(answered[:-1])
        named = [o for o in scene.objects if answer.startswith(f"The {o.shape} is ")]
        assert len(named) == 1
        assert answer in (f"The {named[0].shape} is {lookup_mix.W.where(named[0])}.", f"The {named[0].shape} is {named[0].colour}.")
