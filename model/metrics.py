"""Scores for the embedded probes: POPE, VQA accuracy by question type, CHAIR.

Pure functions of strings, shared by the teacher stage's quick check and the
lmms-eval tasks in ``tasks/lmms_tasks/`` so that both score the same way.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

from model.world import object_mentions

_ARTICLES = {"a", "an", "the"}


def normalise(text: str) -> str:
    """Lower-case, punctuation and articles dropped, whitespace collapsed: 'The Red.' -> 'red'."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return " ".join(w for w in words if w not in _ARTICLES)


def parse_yes_no(text: str) -> str | None:
    """'Yes.', 'no,', 'Yes, there is' -> 'yes' / 'no'; None when the first sentence says neither."""
    words = re.findall(r"[a-z]+", first_sentence(text).lower())
    if "no" in words or "not" in words:
        return "no"
    if "yes" in words:
        return "yes"
    return None


def first_sentence(text: str) -> str:
    return text.split(".", 1)[0]


def pope_scores(predictions: Iterable[str], answers: Iterable[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of 'yes' as the positive class, and the *predicted* yes-ratio.

    Parsed as LLaVA's ``eval_pope.py`` does (the convention POPE numbers in the LLaVA papers use):
    a "no" or "not" in the first sentence means no, anything else means yes. ``unparsed`` counts
    the answers that said neither yes nor no, and so were read as yes.
    """
    tp = fp = tn = fn = unparsed = 0
    for prediction, answer in zip(predictions, answers, strict=True):
        said = parse_yes_no(prediction)
        unparsed += said is None
        yes = said != "no"
        if answer == "yes":
            tp += yes
            fn += not yes
        else:
            fp += yes
            tn += not yes
    total = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / total if total else 0.0,
        "unparsed": unparsed,
        "n": total,
    }


def vqa_scores(predictions: Iterable[str], answers: Iterable[str], question_types: Iterable[str]) -> dict[str, float]:
    """Exact-match accuracy after :func:`normalise`, overall and per question type (``accuracy/<type>``)."""
    hits: dict[str, list[int]] = defaultdict(list)
    for prediction, answer, qtype in zip(predictions, answers, question_types, strict=True):
        hit = int(normalise(prediction) == normalise(answer))
        hits["all"].append(hit)
        hits[qtype].append(hit)
    out = {"accuracy": sum(hits["all"]) / len(hits["all"]) if hits["all"] else 0.0, "n": len(hits["all"])}
    for qtype, values in sorted(hits.items()):
        if qtype != "all":
            out[f"accuracy/{qtype}"] = sum(values) / len(values)
    return out


def chair_scores(
    captions: Iterable[str], truths: Iterable[list[str]], vocabulary: list[str], absent_partners: Iterable[list[str]] | None = None
) -> dict[str, float]:
    """CHAIR (Rohrbach et al. 2018) over the world's object vocabulary.

    ``CHAIR-i = |hallucinated objects| / |mentioned objects|`` and
    ``CHAIR-s = |captions with a hallucinated object| / |captions|``, objects counted once per
    caption; ``recall`` is the share of ground-truth objects the captions mention. With
    ``absent_partners`` (per caption, the absent partners of its present anchors),
    ``partner_hallucination`` is the share of captions that have one and name it: the
    co-occurrence hallucination alone, as POPE's adversarial split probes it.
    """
    captions, truths = list(captions), list(truths)
    partners = list(absent_partners) if absent_partners is not None else [[] for _ in captions]
    mentioned = hallucinated = bad_captions = captions_n = truth_n = covered = exposed = named_partner = 0
    for caption, truth, absent in zip(captions, truths, partners, strict=True):
        objects = set(object_mentions(caption, vocabulary))
        wrong = objects - set(truth)
        mentioned += len(objects)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
        captions_n += 1
        truth_n += len(set(truth))
        covered += len(objects & set(truth))
        exposed += bool(absent)
        named_partner += bool(objects & set(absent))
    scores = {
        "chair_i": hallucinated / mentioned if mentioned else 0.0,
        "chair_s": bad_captions / captions_n if captions_n else 0.0,
        "recall": covered / truth_n if truth_n else 0.0,
        "n": captions_n,
    }
    if absent_partners is not None:
        scores["partner_hallucination"] = named_partner / exposed if exposed else 0.0
        scores["partner_exposed"] = exposed
    return scores
