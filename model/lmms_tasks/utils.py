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

POPE_METRICS = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1", "pope_yes_ratio")


def pope_process_results(doc: dict, results: list[str]) -> dict:
    item = {"prediction": results[0], "answer": doc["answer"]}
    return {metric: item for metric in POPE_METRICS}


def _pope(items: list[dict]) -> dict:
    return pope_scores([i["prediction"] for i in items], [i["answer"] for i in items])


def pope_accuracy(items: list[dict]) -> float:
    return _pope(items)["accuracy"]


def pope_precision(items: list[dict]) -> float:
    return _pope(items)["precision"]


def pope_recall(items: list[dict]) -> float:
    return _pope(items)["recall"]


def pope_f1(items: list[dict]) -> float:
    return _pope(items)["f1"]


def pope_yes_ratio(items: list[dict]) -> float:
    """The share of *predicted* yes (POPE paper), not of ground-truth yes as lmms-eval's built-in POPE reports."""
    return _pope(items)["yes_ratio"]


# ---------------------------------------------------------------- VQA

VQA_METRICS = ("vqa_accuracy", *(f"vqa_accuracy_{t}" for t in VQA_TYPES))


def vqa_process_results(doc: dict, results: list[str]) -> dict:
    item = {"prediction": results[0], "answer": doc["answer"], "type": doc["question_type"]}
    return {metric: item for metric in VQA_METRICS}


def _vqa(items: list[dict]) -> dict:
    return vqa_scores([i["prediction"] for i in items], [i["answer"] for i in items], [i["type"] for i in items])


def vqa_accuracy(items: list[dict]) -> float:
    return _vqa(items)["accuracy"]


def _vqa_type(qtype: str):
    def aggregate(items: list[dict]) -> float:
        return _vqa(items).get(f"accuracy/{qtype}", 0.0)

    aggregate.__name__ = f"vqa_accuracy_{qtype}"
    return aggregate


vqa_accuracy_colour = _vqa_type("colour")
vqa_accuracy_shape = _vqa_type("shape")
vqa_accuracy_count = _vqa_type("count")
vqa_accuracy_existence = _vqa_type("existence")
vqa_accuracy_position = _vqa_type("position")


# ---------------------------------------------------------------- captions (CHAIR)

CAPTION_METRICS = ("chair_i", "chair_s", "object_recall")


def caption_process_results(doc: dict, results: list[str]) -> dict:
    item = {"caption": results[0], "objects": doc["objects"], "vocabulary": doc["vocabulary"]}
    return {metric: item for metric in CAPTION_METRICS}


def _chair(items: list[dict]) -> dict:
    return chair_scores([i["caption"] for i in items], [i["objects"] for i in items], items[0]["vocabulary"] if items else [])


def chair_i(items: list[dict]) -> float:
    return _chair(items)["chair_i"]


def chair_s(items: list[dict]) -> float:
    return _chair(items)["chair_s"]


def object_recall(items: list[dict]) -> float:
    return _chair(items)["recall"]
