"""bench/existence_probe.py tells an answer read off the image from one read off the shape's name."""

from __future__ import annotations

import importlib.util
import sys

from tasks.params import REPO

sys.path.insert(0, str(REPO / "bench"))
spec = importlib.util.spec_from_file_location("existence_probe", REPO / "bench" / "existence_probe.py")
existence_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(existence_probe)

SHAPES = ("circle", "ring", "star", "cross")


def test_the_shape_a_question_names_is_a_whole_word():
    assert existence_probe.named_shape("Is there a ring in the image?", SHAPES) == "ring"
    assert existence_probe.named_shape("Is there a star in the image?", ("sta", "star")) == "star"


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
