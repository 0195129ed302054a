"""bench/existence_probe.py tells an answer read off the image from one read off the shape's name."""

from __future__ import annotations

import importlib.util
import sys

from tasks.params import REPO

sys.path.insert(0, str(REPO / "bench"))
spec = importlib.util.spec_from_file_location("existence_probe", REPO / "bench" / "existence_probe.py")
existence_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(existence_probe)


def test_the_other_image_is_never_the_question_s_own():
    names = [f"images/{i:03d}.png" for i in range(50)]
    other = existence_probe.other_scene(names, seed=7)
    assert sorted(other) == sorted(other.values()) == names  # every image once on each side
    assert all(image != swapped for image, swapped in other.items())
    assert other == existence_probe.other_scene(list(reversed(names)), seed=7)  # fixed by the seed, not the order given


def test_an_answer_from_the_name_alone_stays_the_same_with_another_image():
    truth = [True, False, True, False]
    asked = ["circle", "circle", "star", "star"]
    # Yes to every circle, no to every star, whatever the image shows.
    blind = existence_probe.figures([True, True, False, False], [True, True, False, False], truth, asked)
    assert blind["same_with_other_image"] == 1.0
    assert blind["yes_by_shape"] == {"circle": 1.0, "star": 0.0}
    assert blind["accuracy"] == 0.5
    assert (blind["yes_positives"], blind["yes_negatives"]) == (0.5, 0.5)


def test_an_answer_read_off_the_image_follows_the_image():
    truth = [True, False, True, False]
    asked = ["circle", "circle", "star", "star"]
    looking = existence_probe.figures([True, False, True, False], [False, True, False, False], truth, asked)
    assert looking["accuracy"] == 1.0
    assert (looking["yes_positives"], looking["yes_negatives"]) == (1.0, 0.0)
    assert looking["same_with_other_image"] == 0.25
    assert looking["yes_by_shape"] == {"circle": 0.5, "star": 0.5}
