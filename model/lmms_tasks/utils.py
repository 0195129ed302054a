"""Hooks of tinymod's lmms-eval tasks for the embedded probes (data/curated/probes/*.jsonl).

Documents are curated LLaVA records; images are read relative to the curated
folder (``TINYMOD_CURATED``, default ``data/curated``). Scores come from
:mod:`model.metrics`, the same functions the training stages' quick checks use.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from model.metrics import chair_scores, pope_scores, vqa_scores
from model.world import VQA_TYPES


def doc_to_visual(doc: dict) -> list:
    root = Path(os.environ.get("TINYMOD_CURATED", "data/curated"))
    with Image.open(root / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["conversations"][0]["value"]


def doc_to_target(doc: dict) -> str:
    return doc["conversations"][1]["value"]


# ---------------------------------------------------------------- POPE

POPE_METRICS = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1", "pope_yes_ratio", "pope_unparsed")


def pope_process_results(doc: dict, results: list[str]) -> dict:
    item = {"prediction": results[0], "answer": doc["answer"]}
    return {metric: item for metric in POPE_METRICS}


def _aggregation(scores, key: str, name: str, absent: float | None = None):
    """An lmms-eval aggregation (a named module-level function the task YAMLs point at) reading ``key`` of
    ``scores(items)``; ``absent`` is the score where the key may be missing (elsewhere a missing key is an error)."""

    def aggregate(items: list[dict]) -> float:
        result = scores(items)
        return result[key] if absent is None or key in result else absent

    aggregate.__name__ = name
    return aggregate


def _pope(items: list[dict]) -> dict:
    return pope_scores([i["prediction"] for i in items], [i["answer"] for i in items])


pope_accuracy = _aggregation(_pope, "accuracy", "pope_accuracy")
pope_precision = _aggregation(_pope, "precision", "pope_precision")
pope_recall = _aggregation(_pope, "recall", "pope_recall")
pope_f1 = _aggregation(_pope, "f1", "pope_f1")
# The share of *predicted* yes (POPE paper), not of ground-truth yes as lmms-eval's built-in POPE reports.
pope_yes_ratio = _aggregation(_pope, "yes_ratio", "pope_yes_ratio")
# Answers that said neither yes nor no (read as yes, as LLaVA's eval_pope.py does): a count, not a rate.
pope_unparsed = _aggregation(_pope, "unparsed", "pope_unparsed")


# ---------------------------------------------------------------- VQA

VQA_METRICS = ("vqa_accuracy", *(f"vqa_accuracy_{t}" for t in VQA_TYPES))


def vqa_process_results(doc: dict, results: list[str]) -> dict:
    item = {"prediction": results[0], "answer": doc["answer"], "type": doc["question_type"]}
    return {metric: item for metric in VQA_METRICS}


def _vqa(items: list[dict]) -> dict:
    return vqa_scores([i["prediction"] for i in items], [i["answer"] for i in items], [i["type"] for i in items])


vqa_accuracy = _aggregation(_vqa, "accuracy", "vqa_accuracy")
# A question type absent from the probes scores 0 rather than failing the whole task.
vqa_accuracy_colour = _aggregation(_vqa, "accuracy/colour", "vqa_accuracy_colour", absent=0.0)
vqa_accuracy_shape = _aggregation(_vqa, "accuracy/shape", "vqa_accuracy_shape", absent=0.0)
vqa_accuracy_count = _aggregation(_vqa, "accuracy/count", "vqa_accuracy_count", absent=0.0)
vqa_accuracy_existence = _aggregation(_vqa, "accuracy/existence", "vqa_accuracy_existence", absent=0.0)
vqa_accuracy_position = _aggregation(_vqa, "accuracy/position", "vqa_accuracy_position", absent=0.0)


# ---------------------------------------------------------------- captions (CHAIR)

CAPTION_METRICS = ("chair_i", "chair_s", "object_recall", "partner_hallucination")


def caption_process_results(doc: dict, results: list[str]) -> dict:
    item = {"caption": results[0], "objects": doc["objects"], "vocabulary": doc["vocabulary"], "absent_partners": doc.get("absent_partners", [])}
    return {metric: item for metric in CAPTION_METRICS}


def _chair(items: list[dict]) -> dict:
    return chair_scores(
        [i["caption"] for i in items], [i["objects"] for i in items], items[0]["vocabulary"] if items else [], [i["absent_partners"] for i in items]
    )


chair_i = _aggregation(_chair, "chair_i", "chair_i")
chair_s = _aggregation(_chair, "chair_s", "chair_s")
object_recall = _aggregation(_chair, "recall", "object_recall")
partner_hallucination = _aggregation(_chair, "partner_hallucination", "partner_hallucination")
