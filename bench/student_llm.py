"""Pretrain the student's small LLM on the world's text, as a real LLaVA student's LLM comes pretrained.

LLaVA-MoD and LLaVA-KD start their students from a pretrained small LLM (Qwen-1.8B, Qwen-0.5B)
that already reads its context: it finds the thing a question names and answers from what
surrounds it. The embedded default's student starts from a fresh LLM (``align.student.llm:
init``), and at its step count it never forms those lookups on images (colour 0.50, place
0.15-0.32, README "The students"). This script makes the stand-in for a pretrained LLM: the
student's own architecture (``align.student.text``), the teacher's tokenizer, trained as a plain
causal LM on conversations about world scenes drawn from their own seed (never a training image
or a probe). Where a LLaVA record has the image, the context holds the scene in one of two forms:

- ``--context cells`` (what ships): one position per grid cell, as the word-aligned projector
  presents an image, each the mean input embedding of the words for what the cell holds (its
  shape, colour, size and place; the image token's own embedding where it holds nothing). All of
  an object's words sit at one position, so "What colour is the star?" is one look-up, as it is
  on an image.
- ``--context caption``: the scene's ground-truth caption as text. In the caption the colour comes
  before the shape it belongs to, so its look-up runs backwards; this LLM answered colour at 0.11
  in text and cost the students colour on images (README, "A student LLM pretrained on the world's
  text").

    <|im_start|>user\n[9 cell positions | a small red star at the top left and ...]
    Where is the star?<|im_end|>\n<|im_start|>assistant\nThe star is at the top left.<|im_end|> ...

It writes a Hugging Face causal LM that ``align.student.llm: OUT`` takes (plain ``transformers``
loads it; with ``--intermediate-size`` or ``--hidden-size``, write the same in
``align.student.text``, which validation checks against OUT's config), and prints the in-context
answer accuracy per question type on fresh scenes (also in OUT/tinymod_metrics.json).

    python bench/student_llm.py OUT [--context cells|caption] [--intermediate-size N] [--hidden-size N] [--steps 1500] [--init FOLDER]

``--widen FOLDER --intermediate-size N`` trains nothing: it writes FOLDER's LLM with every FFN N
wide, computing the same function (claim (b)'s dense control starts from the MoE student's own
LLM, as the MoE's experts do; see :func:`widen`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch
from fresh_scenes import words
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from model import world as W
from model.builders import text_config
from model.config import WorldParams
from model.data import encode_prompt, expand_image_tokens
from model.tokenizer import IMAGE_TOKEN
from model.vision_pretrain import GRID, POSITIONS, cell_labels, word_ids
from tasks.params import REPO, load_params

CORPUS_SEED = 99  # not the world's: the text describes scenes no split or probe holds
EVAL_SEED = 2026
CAPTION_SHARE = 0.2  # records that also ask for the description, so the LM learns to write captions (--caption-share)
CELLS = GRID * GRID


class SceneContext:
    """How a scene stands where a LLaVA record has its image: nine cell positions (``cells``) or its caption (``caption``)."""

    def __init__(self, kind: str, tokenizer, spec: WorldParams):
        self.kind = kind
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.vocab = (list(spec.shapes), sorted(spec.colours), sorted(spec.sizes))
        self.word_ids = [word_ids(tokenizer, w) for w in (*self.vocab, POSITIONS)]

    def text(self, objects) -> str:
        return IMAGE_TOKEN if self.kind == "cells" else W.caption(objects)

    def embed(self, embeddings: torch.nn.Embedding, input_ids: torch.Tensor, scenes: list) -> torch.Tensor:
        """The input embeddings, each scene's nine image positions holding its cells' word means."""
        embedded = embeddings(input_ids)
        if self.kind != "cells":
            return embedded
        cells = torch.cat([self.cell_vectors(embeddings.weight, objects) for objects in scenes])
        return embedded.masked_scatter((input_ids == self.image_id)[..., None], cells)

    def cell_vectors(self, weight: torch.Tensor, objects) -> torch.Tensor:
        labels = cell_labels([dataclasses.asdict(o) for o in objects], *self.vocab)  # [4, 9], 0 = empty
        empty = weight[self.image_id]
        return torch.stack([
            torch.stack([weight[ids[label - 1]].mean(0) for ids, label in zip(self.word_ids, labels[:, cell].tolist(), strict=True)]).mean(0)
            if labels[0, cell] else empty
            for cell in range(CELLS)
        ])  # fmt: skip


def conversation(rng: random.Random, spec: WorldParams, context: SceneContext, colour_first: bool = False, caption_share: float = CAPTION_SHARE) -> tuple[list[dict], tuple]:
    """One record about a fresh scene, shown as ``context`` says, then shuffled questions about it; and the scene's objects.

    ``colour_first`` keeps every colour question among the six turns kept, so a record asks colour
    about every object it can.
    """
    scene = W.sample_scene(rng, spec, noisy=False)
    turns = W.vqa_pairs(rng, scene.objects, spec, spec.qa_per_image)  # (kind, question, answer)
    objects = W._reading_order(scene.objects)
    if len({o.shape for o in objects}) == len(objects):
        turns += [(kind, *W.lookup_turn(kind, o)) for o in objects for kind in W.LOOKUP_KINDS]
    rng.shuffle(turns)
    if colour_first:
        turns = sorted(turns, key=lambda turn: turn[0] != "colour")[:6]
        rng.shuffle(turns)
    turns = turns[:6]
    if rng.random() < caption_share:
        turns = [("caption", "Describe the image.", W.caption(scene.objects)), *turns]
    messages = []
    for i, (_, question, answer) in enumerate(turns):
        content = f"{context.text(scene.objects)}\n{question}" if i == 0 else question
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return messages, scene.objects


def token_ids(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """A whole conversation's tokens and labels: the LM learns every text token (model/data.py masks all but the answers), no image position."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return expand_image_tokens(tokenizer, ids, ids, CELLS)


def pretrain(
    model, tokenizer, spec: WorldParams, context: SceneContext, steps: int, batch_size: int, lr: float, colour_first: bool = False, caption_share: float = CAPTION_SHARE
) -> list[float]:
    """Plain causal-LM training on every text token of freshly drawn conversations; returns the loss per step."""
    rng = random.Random(CORPUS_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    losses = []
    for _ in tqdm(range(steps), desc="student LLM", unit="step"):
        records = [conversation(rng, spec, context, colour_first, caption_share) for _ in range(batch_size)]
        batch = [token_ids(tokenizer, messages) for messages, _ in records]
        longest = max(len(ids) for ids, _ in batch)
        inputs = torch.full((batch_size, longest), pad)
        labels = torch.full((batch_size, longest), -100)
        attention = torch.zeros((batch_size, longest), dtype=torch.long)
        for i, (ids, targets) in enumerate(batch):
            inputs[i, : len(ids)], labels[i, : len(ids)], attention[i, : len(ids)] = torch.tensor(ids), torch.tensor(targets), 1
        embedded = context.embed(model.get_input_embeddings(), inputs, [objects for _, objects in records])
        loss = model(inputs_embeds=embedded, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def widen(model, intermediate_size: int, seed: int):
    """``model`` with every FFN ``intermediate_size`` wide, computing the same function.

    The new neurons' gate and up rows are drawn as a fresh LLM's are, and their down-projection
    columns are zero: they add nothing until training moves those columns, and unlike copied
    neurons they get gradients of their own from the first step. The dense control of claim (b)
    so starts from exactly the LLM the MoE student is upcycled from (whose experts are copies of
    its FFNs), and the two arms differ in their FFNs' shape alone.
    """
    config = model.config.__class__.from_dict({**model.config.to_dict(), "intermediate_size": intermediate_size})
    torch.manual_seed(seed)
    wide = type(model)(config)
    grown = wide.state_dict()
    for name, weight in model.state_dict().items():
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            grown[name][: weight.shape[0]] = weight
        elif name.endswith("down_proj.weight"):
            grown[name].zero_()
            grown[name][:, : weight.shape[1]] = weight
        else:
            grown[name].copy_(weight)
    wide.load_state_dict(grown)
    return wide


@torch.no_grad()
def in_context_accuracy(model, tokenizer, spec: WorldParams, context: SceneContext, scenes: int) -> dict[str, float]:
    """Greedy answers to one question of every type about fresh scenes in ``context``, scored as the second scorer scores VQA,
    and the share of each scene's shapes its caption names (object recall)."""
    model.eval()
    rng = random.Random(EVAL_SEED)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    right, total = Counter(), Counter()

    def reply(objects, question: str, max_new_tokens: int) -> str:
        prompt = torch.tensor([encode_prompt(tokenizer, [{"from": "human", "value": f"{context.text(objects)}\n{question}"}], CELLS)])
        embedded = context.embed(model.get_input_embeddings(), prompt, [objects])
        out = model.generate(inputs_embeds=embedded, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        return tokenizer.decode(out[0], skip_special_tokens=True)

    for _ in range(scenes):
        scene = W.sample_scene(rng, spec, noisy=False)
        for qtype, question, answer in W.vqa_pairs(rng, scene.objects, spec, len(W.VQA_TYPES)):
            total[qtype] += 1
            right[qtype] += words(reply(scene.objects, question, 12)) == words(answer)
        named = set(W.object_mentions(reply(scene.objects, W.CAPTION_PROMPT_FOR_EVAL, 64), spec.shapes))
        right["caption"] += len(named & scene.shapes)
        total["caption"] += len(scene.shapes)
    # a few scenes may never ask some type: it is left out rather than scored 0/0
    accuracy = {"accuracy": sum(right[t] for t in W.VQA_TYPES) / sum(total[t] for t in W.VQA_TYPES)} | {f"accuracy/{t}": right[t] / total[t] for t in W.VQA_TYPES if total[t]}
    return accuracy | {"caption_recall": right["caption"] / total["caption"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the causal LM (align.student.llm takes it)")
    parser.add_argument("--context", choices=["cells", "caption"], default="cells", help="how the scene stands where the image would")
    parser.add_argument("--intermediate-size", type=int, help="FFN width (default: align.student.text's; the dense control of claim (b) is wider)")
    parser.add_argument("--hidden-size", type=int, help="residual width (default: align.student.text's; the teacher's LLM is 256 wide)")
    parser.add_argument("--init", type=Path, help="continue from this folder's LLM instead of a fresh one (a new schedule)")
    parser.add_argument("--widen", type=Path, help="train nothing: this folder's LLM with every FFN --intermediate-size wide, the same function")
    parser.add_argument("--seed", type=int, default=0, help="seed of the LLM's initialisation (the corpus is always the same)")
    parser.add_argument("--colour-first", action="store_true", help="keep every colour question a record can ask among its turns")
    parser.add_argument("--caption-share", type=float, default=CAPTION_SHARE, help="share of records that open with the scene's description")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-scenes", type=int, default=150)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(REPO / params.curate.tokenizer.source)
    text = params.align.student.text
    resized = {"intermediate_size": args.intermediate_size, "hidden_size": args.hidden_size}
    text = text.model_copy(update={key: size for key, size in resized.items() if size})
    context = SceneContext(args.context, tokenizer, params.curate.world)
    started = time.perf_counter()
    if args.widen:
        if not args.intermediate_size:
            parser.error("--widen needs --intermediate-size, the new FFN width")
        model, losses = widen(AutoModelForCausalLM.from_pretrained(args.widen), args.intermediate_size, args.seed), []
    else:
        model = AutoModelForCausalLM.from_pretrained(args.init) if args.init else AutoModelForCausalLM.from_config(text_config(text, tokenizer))
        losses = pretrain(model, tokenizer, params.curate.world, context, args.steps, args.batch_size, args.lr, args.colour_first, args.caption_share)
    seconds = time.perf_counter() - started
    scores = in_context_accuracy(model, tokenizer, params.curate.world, context, args.eval_scenes)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    init = f"widened from {args.widen}" if args.widen else str(args.init) if args.init else f"fresh, seed {args.seed}"
    final_loss = sum(losses[-50:]) / len(losses[-50:]) if losses else None
    metrics = {"context": args.context, "init": init, "colour_first": args.colour_first, "caption_share": args.caption_share, "steps": len(losses), "seconds": round(seconds, 1), "final_loss": final_loss, "in_context": scores}
    (args.out / "tinymod_metrics.json").write_text(json.dumps(metrics, indent=2))
    trained = f"{len(losses)} steps in {seconds:.0f} s, loss {final_loss:.3f}" if losses else init
    print(f"{trained}; in-context answers on {args.eval_scenes} fresh scenes: " + ", ".join(f"{k.removeprefix('accuracy/')} {v:.3f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
