"""bench/lookup_mix.py's lookup questions: one object of a 2-3 object scene, in the LLaVA conversation format (the scenes and turns: test_world.py)."""

from __future__ import annotations

import importlib.util
import random
import sys

from tasks.params import REPO, load_params

sys.path.insert(0, str(REPO / "bench"))
spec = importlib.util.spec_from_file_location("lookup_mix", REPO / "bench" / "lookup_mix.py")
lookup_mix = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lookup_mix)


def test_a_lookup_record_is_one_llava_turn_about_one_object_of_both_kinds():
    world = load_params(REPO / "params.yaml").curate.world
    rng = random.Random(1)
    kinds = set()
    for _ in range(40):
        image, turns = lookup_mix.lookup_record(rng, world)
        assert image.size == (world.image_size, world.image_size)
        assert [t["from"] for t in turns] == ["human", "gpt"] and turns[0]["value"].startswith("<image>\n")
        shape = turns[0]["value"].removesuffix("?").split()[-1]
        assert shape in world.shapes and turns[1]["value"].startswith(f"The {shape} is ")
        kinds.add(turns[0]["value"].split("\n")[1].split()[0])
    assert kinds == {"Where", "What"}
