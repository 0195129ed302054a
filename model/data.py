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
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from model.jsonl import read_jsonl
from model.losses import TopK
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


def stage_records(files: list[str], fraction: float | dict[str, float], seed: int) -> list[dict]:
    """The records a training stage reads: its split files, subsampled (the teacher cache reads the same).

    ``fraction`` is one share of all the files' records together, or one share per split, keyed by
    the split's name (its file's stem).
    """
    if isinstance(fraction, dict):
        return [record for path in files for record in subsample(list(read_jsonl(Path(path))), fraction[Path(path).stem], seed)]
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
        self.encoded = [self.encode(tokenizer, r, image_tokens) for r in records]

    def encode(self, tokenizer: PreTrainedTokenizerBase, record: dict, image_tokens: int):
        return encode_conversation(tokenizer, record["conversations"], image_tokens)

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

    def encode(self, tokenizer: PreTrainedTokenizerBase, record: dict, image_tokens: int):
        prompt = record["conversations"]
        chosen = encode_conversation(tokenizer, prompt + [{"from": "gpt", "value": record["chosen"]}], image_tokens)
        rejected = encode_conversation(tokenizer, prompt + [{"from": "gpt", "value": record["rejected"]}], image_tokens)
        return chosen, rejected

    def __getitem__(self, index: int) -> dict:
        (c_ids, c_labels), (r_ids, r_labels) = self.encoded[index]
        return {"chosen": (c_ids, c_labels), "rejected": (r_ids, r_labels), "pixel_values": self.pixels(index)}


def _to(value, device):
    return value.to(device) if hasattr(value, "to") else value


@dataclass
class DistillBatch:
    """Padded conversations (``[B, T]`` each, pixels ``[B, C, H, W]``) and, for a cached stage, the teacher's rows.

    ``token_share`` scales the per-token terms so that accumulation and ranks give one mean over the
    step's tokens (see ``model.engine.token_shares``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    token_share: torch.Tensor | float = 1.0
    teacher_response: TopK | None = None
    teacher_visual: TopK | None = None
    teacher_relation: torch.Tensor | None = None

    @property
    def trained_labels(self) -> torch.Tensor:
        """The labels whose response tokens ce and kl_response average over."""
        return self.labels

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """What a LLaVA model's forward takes."""
        return {"input_ids": self.input_ids, "pixel_values": self.pixel_values, "attention_mask": self.attention_mask}

    def to(self, device) -> DistillBatch:
        return DistillBatch(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})


@dataclass
class PreferenceBatch:
    """Preference pairs: the chosen and the rejected conversation (``[B, T]`` each), one image per pair."""

    chosen_input_ids: torch.Tensor
    chosen_attention_mask: torch.Tensor
    chosen_labels: torch.Tensor
    rejected_input_ids: torch.Tensor
    rejected_attention_mask: torch.Tensor
    rejected_labels: torch.Tensor
    pixel_values: torch.Tensor
    reference_logps: torch.Tensor | None = None  # [B, 2]: chosen, rejected under the frozen reference
    token_share: torch.Tensor | float = 1.0

    @property
    def trained_labels(self) -> torch.Tensor:
        """The labels whose response tokens the sft term averages over: the chosen responses'."""
        return self.chosen_labels

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.chosen_attention_mask

    def side(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, labels)`` of ``chosen`` or ``rejected``."""
        return getattr(self, f"{name}_input_ids"), getattr(self, f"{name}_attention_mask"), getattr(self, f"{name}_labels")

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chosen rows then rejected rows, right-padded to one width: ``[2B, T]`` each (ids, mask, labels)."""
        width = max(self.chosen_input_ids.shape[1], self.rejected_input_ids.shape[1])

        def pad(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        ids = torch.cat([pad(self.chosen_input_ids, 0), pad(self.rejected_input_ids, 0)])
        mask = torch.cat([pad(self.chosen_attention_mask, 0), pad(self.rejected_attention_mask, 0)])
        labels = torch.cat([pad(self.chosen_labels, IGNORE), pad(self.rejected_labels, IGNORE)])
        return ids, mask, labels

    def to(self, device) -> PreferenceBatch:
        return PreferenceBatch(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})


@dataclass
class Collator:
    """Right-pads a batch; labels pad with -100 and the attention mask marks real tokens."""

    pad_id: int

    def pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    def padded(self, rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, labels)`` of ``(ids, labels)`` rows."""
        ids = [r[0] for r in rows]
        return self.pad(ids, self.pad_id), self.pad([[1] * len(i) for i in ids], 0), self.pad([r[1] for r in rows], IGNORE)

    def __call__(self, batch: list[dict]) -> DistillBatch | PreferenceBatch:
        pixels = torch.stack([b["pixel_values"] for b in batch])
        if "chosen" in batch[0]:
            chosen, rejected = self.padded([b["chosen"] for b in batch]), self.padded([b["rejected"] for b in batch])
            return PreferenceBatch(*chosen, *rejected, pixel_values=pixels)
        ids, mask, labels = self.padded([(b["input_ids"], b["labels"]) for b in batch])
        return DistillBatch(ids, mask, labels, pixels)
