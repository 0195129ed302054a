"""Probe metrics against cases worked out by hand."""

from __future__ import annotations

import pytest

from model.metrics import chair_scores, normalise, parse_yes_no, pope_scores, vqa_scores


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Yes.", "yes"), ("no,", "no"), ("YES", "yes"), ("Yes, there is a star", "yes"), ("No there is not", "no"),
     ("There is not a star", "no"), ("Yes. No star is red.", "yes"), ("There is a star", None), ("", None),
     ("maybe", None)],
)  # fmt: skip
def test_yes_no_parsing_follows_llava_eval_pope(text, expected):
    # LLaVA's eval_pope.py: only the first sentence counts; "no" or "not" in it means no.
    assert parse_yes_no(text) == expected


def test_pope_by_hand():
    # answers:     yes   yes   no    no    no
    # predictions: Yes.  no    yes   no,   ??? (unparsed: no "no"/"not", so it counts as yes)
    # TP=1 FN=1 FP=2 TN=1 -> acc 2/5, precision 1/3, recall 1/2, F1 2/5, predicted yes 3/5
    s = pope_scores(["Yes.", "no", "yes", "no,", "a star"], ["yes", "yes", "no", "no", "no"])
    assert s["accuracy"] == pytest.approx(0.4)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(0.5) and s["f1"] == pytest.approx(0.4)
    assert s["yes_ratio"] == pytest.approx(0.6), "POPE reports the yes-ratio of the predictions, not of the answers"
    assert s["unparsed"] == 1 and s["n"] == 5


def test_pope_when_nothing_is_said_yes():
    s = pope_scores(["no", "no"], ["yes", "no"])
    assert s["precision"] == 0.0 and s["f1"] == 0.0 and s["yes_ratio"] == 0.0 and s["accuracy"] == 0.5


def test_vqa_by_hand():
    # 'The Red.' -> 'red' matches; 'two' vs 'three' misses; 'top left' matches 'Top left.'
    s = vqa_scores(["The Red.", "two", "Top left."], ["red", "three", "top left"], ["colour", "count", "position"])
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["accuracy/colour"] == 1.0 and s["accuracy/count"] == 0.0 and s["accuracy/position"] == 1.0
    assert normalise("  An  Orange, STAR! ") == "orange star"


def test_chair_by_hand():
    vocabulary = ["circle", "star", "cross", "square"]
    captions = [
        "A red circle at the top left and a blue star in the centre.",  # circle ok, star hallucinated
        "Two crosses and a cross.",  # cross ok (counted once)
        "A green square.",  # square hallucinated
    ]
    truths = [["circle"], ["cross", "square"], ["circle"]]
    s = chair_scores(captions, truths, vocabulary)
    # mentioned objects per caption: {circle, star}, {cross}, {square} -> 4, hallucinated 2
    assert s["chair_i"] == pytest.approx(2 / 4)
    # captions with a hallucination: 1st and 3rd of 3
    assert s["chair_s"] == pytest.approx(2 / 3)
    # ground-truth objects 1 + 2 + 1 = 4, mentioned 1 + 1 + 0 = 2
    assert s["recall"] == pytest.approx(2 / 4)


def test_partner_hallucination_by_hand():
    vocabulary = ["circle", "star", "cross", "square"]
    captions = [
        "A cross and a star.",  # cross present, its partner star absent and named: counts
        "A cross.",  # partner absent, not named
        "A circle and a square.",  # no anchor without its partner: not exposed, the square does not count
    ]
    truths = [["cross"], ["cross"], ["circle"]]
    s = chair_scores(captions, truths, vocabulary, [["star"], ["star"], []])
    # exposed captions: 2; those naming their absent partner: 1
    assert s["partner_hallucination"] == pytest.approx(1 / 2) and s["partner_exposed"] == 2
    assert "partner_hallucination" not in chair_scores(captions, truths, vocabulary)


def test_world_caption_probes_name_the_absent_partners():

    import model.world as W
    from model.config import PairingParams, WorldParams

    spec = WorldParams(
        image_size=24, shapes=["circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon"], popularity={},
        pairings=[PairingParams(anchor="cross", partner="star", probability=0.0)], hallucination_rate=0.0, min_objects=1, max_objects=2,
    )  # fmt: skip
    records = W.generate_world(spec, {"general": 1, "multitask": 1, "preference": 1, "probes": 60}, 3, 2, 1)
    for record in records.probes["caption"]:
        expected = ["star"] if "cross" in record["objects"] and "star" not in record["objects"] else []
        assert record["absent_partners"] == expected
    assert any(r["absent_partners"] for r in records.probes["caption"]), "some probe image must hold a cross"
