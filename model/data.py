"""LLaVA conversation records -> model inputs.

Each record becomes ``input_ids`` with its ``<image>`` placeholder expanded to
the image's tokens, ``labels`` that keep only the assistant's tokens (-100
elsewhere), and ``pixel_values`` from the checkpoint's own image processor, so
training sees exactly what inference sees.

Assistant spans are found by rendering the tokenizer's chat template on
growing prefixes of the conversation, which works for any template (ChatML,
Vicuna, ...), not only the embedded one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from model.jsonl import read_jsonl
from model.tokenizer import IMAGE_TOKEN

IGNORE = -100
ROLES = {"human": "user", "gpt": "assistant"}


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns ({from, value}) -> chat-template messages; the image is a structured part, where it was.

    ``"<image>\nQ"`` becomes ``[image, "Q"]`` and ``"Q\n<image>"`` becomes ``["Q\n", image]``: both
    placements occur in LLaVA data, and the template renders the image part as ``<image>\n``.
    """
    messages = []
    for turn in conversations:
        before, found, after = turn["value"].partition(IMAGE_TOKEN)
        if found:
            content = [{"type": "text", "text": before}] if before else []
            content.append({"type": "image"})
            rest = after.removeprefix("\n")
            if rest:
                content.append({"type": "text", "text": rest})
        else:
            content = [{"type": "text", "text": before}]
        messages.append({"role": ROLES[turn["from"]], "content": content})
    return messages


def _ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, conversations: list[dict], image_tokens: int
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``; labels are -100 except on assistant answers (and their end-of-turn token)."""
    messages = to_messages(conversations)
    ids: list[int] = []
    labels: list[int] = []
    for end in range(1, len(messages) + 1):
        if messages[end - 1]["role"] != "assistant":
            continue
        prompt = _ids(tokenizer, messages[: end - 1], generation_prompt=True)
        full = _ids(tokenizer, messages[:end], generation_prompt=False)
        if full[: len(ids)] != ids or prompt[: len(ids)] != ids or full[: len(prompt)] != prompt:
            raise ValueError("the chat template does not render conversations as growing prefixes; cannot mask answers")
        labels += [IGNORE] * (len(prompt) - len(ids)) + full[len(prompt) :]
        ids = full
    return expand_image_tokens(tokenizer, ids, labels, image_tokens)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, conversations: list[dict], image_tokens: int) -> list[int]:
    """The prompt of a one-turn record, ending with the assistant's generation prompt."""
    ids = _ids(tokenizer, to_messages(conversations), generation_prompt=True)
    return expand_image_tokens(tokenizer, ids, [IGNORE] * len(ids), image_tokens)[0]


def expand_image_tokens(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int], image_tokens: int
) -> tuple[list[int], list[int]]:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    out_ids: list[int] = []
    out_labels: list[int] = []
    for token, label in zip(ids, labels, strict=True):
        if token == image_id:
            out_ids += [image_id] * image_tokens
            out_labels += [IGNORE] * image_tokens
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids, out_labels


def subsample(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """A fixed share of ``records``; the same seed and fraction always give the same records."""
    if fraction >= 1.0:
        return records
    keep = max(1, round(len(records) * fraction))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in sorted(order[:keep])]


def stage_records(files: list[str], fraction: float, seed: int) -> list[dict]:
    """The records a training stage reads: its split files, subsampled (the teacher cache reads the same)."""
    records = [record for path in files for record in read_jsonl(Path(path))]
    return subsample(records, fraction, seed)


class ConversationDataset(Dataset):
    """Tokenised up front (errors surface before training starts); images load lazily and stay cached.

    The cache keeps the first ``cache_images`` processed images in memory: the embedded world
    fits whole, a real dataset streams its images from disk after that.
    """

    def __init__(
        self,
        records: list[dict],
        image_root: Path,
        tokenizer: PreTrainedTokenizerBase,
        image_processor,
        image_tokens: int,
        cache_images: int = 50_000,
    ):
        self.records = records
        self.image_root = image_root
        self.image_processor = image_processor
        self.cache: dict[str, torch.Tensor] = {}
        self.cache_images = cache_images
        self.encoded = [encode_conversation(tokenizer, r["conversations"], image_tokens) for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        ids, labels = self.encoded[index]
        return {"input_ids": ids, "labels": labels, "pixel_values": self.pixels(index)}

    def pixels(self, index: int) -> torch.Tensor:
        name = self.records[index]["image"]
        if name in self.cache:
            return self.cache[name]
        with Image.open(self.image_root / name) as image:
            pixels = self.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        if len(self.cache) < self.cache_images:
            self.cache[name] = pixels
        return pixels


class PreferenceDataset(ConversationDataset):
    """Preference pairs: the prompt with the chosen and with the rejected answer."""

    def __init__(self, records: list[dict], image_root: Path, tokenizer: PreTrainedTokenizerBase, image_processor, image_tokens: int):
        self.records = records
        self.image_root = image_root
        self.image_processor = image_processor
        self.cache = {}
        self.cache_images = 50_000
        self.encoded = []
        for r in records:
            prompt = r["conversations"]
            chosen = encode_conversation(tokenizer, prompt + [{"from": "gpt", "value": r["chosen"]}], image_tokens)
            rejected = encode_conversation(tokenizer, prompt + [{"from": "gpt", "value": r["rejected"]}], image_tokens)
            self.encoded.append((chosen, rejected))

    def __getitem__(self, index: int) -> dict:
        (c_ids, c_labels), (r_ids, r_labels) = self.encoded[index]
        return {
            "chosen_input_ids": c_ids,
            "chosen_labels": c_labels,
            "rejected_input_ids": r_ids,
            "rejected_labels": r_labels,
            "pixel_values": self.pixels(index),
        }


@dataclass
class Collator:
    """Right-pads a batch; labels pad with -100 and the attention mask marks real tokens."""

    pad_id: int

    def pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"pixel_values": torch.stack([b["pixel_values"] for b in batch])}
        prefixes = [""] if "input_ids" in batch[0] else ["chosen_", "rejected_"]
        for prefix in prefixes:
            ids = [b[f"{prefix}input_ids"] for b in batch]
            out[f"{prefix}input_ids"] = self.pad(ids, self.pad_id)
            out[f"{prefix}labels"] = self.pad([b[f"{prefix}labels"] for b in batch], IGNORE)
            out[f"{prefix}attention_mask"] = self.pad([[1] * len(i) for i in ids], 0)
        return out
