"""Batched greedy answers from a LLaVA checkpoint, loaded with plain transformers.

Used by the teacher stage's quick check and by tinymod's lmms-eval model, so a
checkpoint is always prompted the way it was trained: the chat template of its
own tokenizer, one ``<image>`` expanded to the vision tower's tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor

from model.builders import load_llava
from model.data import encode_prompt
from model.jsonl import read_jsonl
from model.tokenizer import IMAGE_TOKEN


class Answerer:
    """Greedy decoding of one-turn image questions; counts decode throughput as it goes."""

    def __init__(self, checkpoint: Path, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = load_llava(Path(checkpoint), dtype=dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        processor = AutoProcessor.from_pretrained(checkpoint)
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_tokens = self.model.config.image_seq_length
        self.generated_tokens = 0
        self.seconds = 0.0

    @torch.no_grad()
    def answer(self, questions: list[str], images: list[Image.Image], max_new_tokens: int) -> list[str]:
        """One answer per (question, image); a question without ``<image>`` gets it in front."""
        prompts = []
        for question in questions:
            text = question if IMAGE_TOKEN in question else f"{IMAGE_TOKEN}\n{question}"
            prompts.append(encode_prompt(self.tokenizer, [{"from": "human", "value": text}], self.image_tokens))
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        # Left padding, so every prompt ends where generation starts.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        pixels = self.image_processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
        started = time.perf_counter()
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels.to(self.device, self.model.dtype),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        self.seconds += time.perf_counter() - started
        new = out[:, width:]
        self.generated_tokens += int(((new != pad) & (new != self.tokenizer.eos_token_id)).sum()) + len(prompts)
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


def answer_records(answerer: Answerer, records: list[dict], image_root: Path, max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Answers to LLaVA-format one-turn records (their first human turn), in order."""
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = []
        for record in chunk:
            with Image.open(image_root / record["image"]) as image:
                images.append(image.convert("RGB"))
        questions = [record["conversations"][0]["value"] for record in chunk]
        answers += answerer.answer(questions, images, max_new_tokens)
    return answers


def score_probes(
    checkpoint: Path, probes: Path, image_root: Path, vocabulary: list[str], limit: int | None = None, batch_size: int = 64,
    pope_splits: tuple[str, ...] = ("random", "popular", "adversarial"),
) -> dict:
    """VQA accuracy, POPE per split (``pope_splits``) and caption CHAIR of ``checkpoint`` on the embedded probes.

    A quick in-process check for the training stages; the evaluate stage scores the same probes
    through lmms-eval with the same metric functions.
    """

    from model.metrics import chair_scores, pope_scores, vqa_scores

    def load(name: str) -> list[dict]:
        records = list(read_jsonl(probes / f"{name}.jsonl"))
        return records[:limit] if limit else records

    answerer = Answerer(checkpoint)
    vqa = load("vqa")
    predictions = answer_records(answerer, vqa, image_root, max_new_tokens=12, batch_size=batch_size)
    scores: dict = {"vqa": vqa_scores(predictions, [r["answer"] for r in vqa], [r["question_type"] for r in vqa])}
    for split in pope_splits:
        records = load(f"pope_{split}")
        predictions = answer_records(answerer, records, image_root, max_new_tokens=3, batch_size=batch_size)
        scores[f"pope_{split}"] = pope_scores(predictions, [r["answer"] for r in records])
    captions = load("caption")
    predictions = answer_records(answerer, captions, image_root, max_new_tokens=64, batch_size=batch_size)
    scores["caption"] = chair_scores(
        predictions, [r["objects"] for r in captions], vocabulary, [r.get("absent_partners", []) for r in captions]
    )
    scores["decode_tokens_per_second"] = round(answerer.tokens_per_second, 1)
    return scores
