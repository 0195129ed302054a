"""tinymod's checkpoints as an lmms-eval model (``--model tinymod``).

Registered through the ``lmms_eval.models`` entry point (pyproject.toml), so
the CLI finds it::

    lmms-eval eval --model tinymod --model_args pretrained=models/student_pref \\
        --tasks tinymod_pope_adversarial --include_path model/lmms_tasks

The evaluate stage builds the same class and calls ``simple_evaluate``. Prompts
go through the checkpoint's own chat template (:class:`model.generate.Answerer`),
exactly as the model was trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm import tqdm

from model.data import IGNORE, encode_conversation
from model.generate import Answerer
from model.losses import sequence_logprobs

MODEL_ID = "tinymod"


class TinymodLlava(lmms):
    """Greedy generation and log-likelihoods of a LLaVA-format checkpoint (plain transformers underneath)."""

    is_simple = True

    def __init__(self, pretrained: str, batch_size: int | str = 32, device: str | None = None, max_new_tokens: int = 48, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"tinymod model: unknown model_args {sorted(kwargs)}; known: pretrained, batch_size, device, max_new_tokens")
        self.answerer = Answerer(Path(pretrained), device=device)
        self.batch_size = int(batch_size)
        self.default_max_new_tokens = int(max_new_tokens)

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if len(visuals) != 1:
            raise ValueError(f"{task} doc {doc_id}: tinymod models take exactly one image per question, got {len(visuals)}")
        return visuals

    def generate_until(self, requests: list[Instance]) -> list[str]:
        # Batch requests that share generation settings; answers go back in request order.
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        answers: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="tinymod: answering", disable=self.rank != 0)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new_tokens = int(kwargs.get("max_new_tokens", self.default_max_new_tokens))
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                raise ValueError("tinymod model decodes greedily; the task asks for sampling (do_sample / temperature > 0)")
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                contexts, images = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    contexts.append(context)
                    images += self._visuals(doc_to_visual, doc_id, task, split)
                for i, text in zip(chunk, self.answerer.answer(contexts, images, max_new_tokens), strict=True):
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    answers[i] = text.strip()
                bar.update(len(chunk))
        bar.close()
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(log p(continuation | image, context), whether greedy decoding would produce it)`` per request."""
        out = []
        a = self.answerer
        for request in tqdm(requests, desc="tinymod: log-likelihoods", disable=self.rank != 0):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            image = self._visuals(doc_to_visual, doc_id, task, split)[0]
            question = context if "<image>" in context else f"<image>\n{context}"
            ids, labels = encode_conversation(
                a.tokenizer, [{"from": "human", "value": question}, {"from": "gpt", "value": continuation}], a.image_tokens
            )
            # Score the continuation only, not the end-of-turn token the template appends.
            end = a.tokenizer.convert_tokens_to_ids(a.tokenizer.eos_token)
            labels = [IGNORE if token == end else label for token, label in zip(ids, labels, strict=True)]
            input_ids = torch.tensor([ids], device=a.device)
            pixels = a.image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"].to(a.device, a.model.dtype)
            logits = a.model(input_ids=input_ids, pixel_values=pixels).logits.float()
            target = torch.tensor([labels], device=a.device)
            logprob = float(sequence_logprobs(logits, target)[0])
            positions = (target[0, 1:] != IGNORE).nonzero().squeeze(-1)
            greedy = bool((logits[0, positions].argmax(-1) == target[0, positions + 1]).all())
            out.append((logprob, greedy))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the tinymod lmms-eval model answers one-turn questions; multi-round tasks are not supported")


manifest = ModelManifest(model_id=MODEL_ID, simple_class_path="model.lmms_model.TinymodLlava")
