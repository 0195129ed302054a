"""bench/soft_labels.py sorts each response token by what it needs, phantoms apart."""

from __future__ import annotations

import importlib.util
import json
import sys

from tasks.params import REPO

sys.path.insert(0, str(REPO / "bench"))
spec = importlib.util.spec_from_file_location("soft_labels", REPO / "bench" / "soft_labels.py")
soft_labels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(soft_labels)

END, NEWLINE, STOP, IGNORE = 1, 2, 3, -100


def record(record_id: str) -> dict:
    return {
        "id": record_id,
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the star?"},
            {"from": "gpt", "value": "The star is red."},
            {"from": "human", "value": "Is there a cross in the image?"},
            {"from": "gpt", "value": "no"},
        ],
    }


# A token before the first answer (labels are unshifted: labels[t + 1] is what position t predicts).
LABELS = [IGNORE, IGNORE, 10, 11, 12, 13, STOP, END, NEWLINE, IGNORE, IGNORE, 20, END, NEWLINE]


def test_answer_words_are_sorted_by_what_they_need():
    kinds = soft_labels.token_kinds(record("world-multitask-000007"), LABELS, {END, NEWLINE}, {STOP}, {"world-multitask-000007": {"star", "circle"}})
    assert kinds == ["colour: no image needed"] * 3 + ["colour", "colour: no image needed"] + ["end of turn"] * 2 + ["existence"] + ["end of turn"] * 2


def test_a_question_about_a_shape_the_image_does_not_hold_is_about_a_phantom():
    kinds = soft_labels.token_kinds(record("world-multitask-000007"), LABELS, {END, NEWLINE}, {STOP}, {"world-multitask-000007": {"cross"}})
    assert kinds[3] == "colour, about a phantom"
    assert kinds[7] == "existence"  # existence answers are about the image, never a phantom
    # Records of other sources have no ground truth to compare with.
    assert soft_labels.token_kinds(record("llava-1"), LABELS, {END, NEWLINE}, {STOP}, {})[3] == "colour"


def test_labels_with_another_number_of_answers_are_refused():
    import pytest

    with pytest.raises(ValueError, match="2 answers in its turns|1 answers in its labels"):
        soft_labels.token_kinds(record("x"), LABELS[:9] + [IGNORE] * 5, {END, NEWLINE}, {STOP}, {})


def test_world_truth_maps_record_ids_to_their_images_shapes(tmp_path):
    (tmp_path / "world.json").write_text(json.dumps({"objects": {"images/multitask-000007.png": [{"shape": "star"}, {"shape": "cross"}]}}))
    assert soft_labels.world_truth(tmp_path / "world.json") == {"world-multitask-000007": {"star", "cross"}}
    assert soft_labels.world_truth(tmp_path / "missing.json") == {}
