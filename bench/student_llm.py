"""Pretrain the student's small LLM on the world's text, as a real LLaVA student's LLM comes pretrained.

LLaVA-MoD and LLaVA-KD start their students from a pretrained small LLM (Qwen-1.8B, Qwen-0.5B)
that already reads its context: it finds the thing a question names and answers from what
surrounds it. The embedded default's student starts from a fresh LLM (``align.student.llm:
init``), and at its step count it never forms those lookups on images (colour 0.50, place
0.15-0.32, README "The students"). This script makes the stand-in for a pretrained LLM: the
student's own architecture (``align.student.text``), the teacher's tokenizer, trained as a plain
causal LM on text-only conversations about world scenes, the scene given in context as its
ground-truth caption where a LLaVA record has the image:

    <|im_start|>user\na small red star at the top left and a large blue circle in the centre.
    Where is the star?<|im_end|>\n<|im_start|>assistant\nThe star is at the top left.<|im_end|> ...

The scenes are drawn from their own seed, so the text never describes a training image or a
probe. It writes a Hugging Face causal LM that ``align.student.llm: OUT`` takes, and prints the
in-context answer accuracy per question type on fresh scenes (also in OUT/tinymod_metrics.json).

    python bench/student_llm.py OUT [--steps 1500] [--batch-size 64] [--lr 0.002]
"""

from __future__ import annotations

import argparse
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
from model.data import encode_prompt
from tasks.params import REPO, load_params

CORPUS_SEED = 99  # not the world's: the text describes scenes no split or probe holds
EVAL_SEED = 2026
CAPTION_SHARE = 0.2  # records that also ask for the description, so the LM learns to write captions


def conversation(rng: random.Random, spec: WorldParams) -> list[dict]:
    """One text-only record: the scene's caption where the image would be, then shuffled questions about it."""
    scene = W.sample_scene(rng, spec, noisy=False)
    description = W.caption(scene.objects)
    turns = [(question, answer) for _, question, answer in W.vqa_pairs(rng, scene.objects, spec, spec.qa_per_image)]
    objects = W._reading_order(scene.objects)
    if len({o.shape for o in objects}) == len(objects):
        turns += [W.lookup_turn(kind, o) for o in objects for kind in W.LOOKUP_KINDS]
    rng.shuffle(turns)
    turns = turns[:6]
    if rng.random() < CAPTION_SHARE:
        turns = [("Describe the image.", description), *turns]
    messages = []
    for i, (question, answer) in enumerate(turns):
        messages += [{"role": "user", "content": f"{description}\n{question}" if i == 0 else question}, {"role": "assistant", "content": answer}]
    return messages


def token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Every token of a whole conversation, all of which the LM learns (model/data.py masks all but the answers)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def pretrain(model, tokenizer, spec: WorldParams, steps: int, batch_size: int, lr: float) -> list[float]:
    """Plain causal-LM training on every token of freshly drawn conversations; returns the loss per step."""
    rng = random.Random(CORPUS_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    losses = []
    for _ in tqdm(range(steps), desc="student LLM", unit="step"):
        batch = [token_ids(tokenizer, conversation(rng, spec)) for _ in range(batch_size)]
        longest = max(map(len, batch))
        inputs = torch.full((batch_size, longest), pad)
        labels = torch.full((batch_size, longest), -100)
        for i, ids in enumerate(batch):
            inputs[i, : len(ids)] = labels[i, : len(ids)] = torch.tensor(ids)
        loss = model(input_ids=inputs, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def in_context_accuracy(model, tokenizer, spec: WorldParams, scenes: int) -> dict[str, float]:
    """Greedy answers to one question of every type about fresh scenes given as text, scored as the second scorer scores VQA."""
    model.eval()
    rng = random.Random(EVAL_SEED)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    right, total = Counter(), Counter()
    for _ in range(scenes):
        scene = W.sample_scene(rng, spec, noisy=False)
        for qtype, question, answer in W.vqa_pairs(rng, scene.objects, spec, len(W.VQA_TYPES)):
            prompt = encode_prompt(tokenizer, [{"from": "human", "value": f"{W.caption(scene.objects)}\n{question}"}], image_tokens=0)
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=pad)
            total[qtype] += 1
            right[qtype] += words(tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)) == words(answer)
    return {"accuracy": sum(right.values()) / sum(total.values())} | {f"accuracy/{t}": right[t] / total[t] for t in W.VQA_TYPES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the causal LM (align.student.llm takes it)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-scenes", type=int, default=150)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(REPO / params.curate.tokenizer.source)
    model = AutoModelForCausalLM.from_config(text_config(params.align.student.text, tokenizer))
    started = time.perf_counter()
    losses = pretrain(model, tokenizer, params.curate.world, args.steps, args.batch_size, args.lr)
    seconds = time.perf_counter() - started
    scores = in_context_accuracy(model, tokenizer, params.curate.world, args.eval_scenes)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    metrics = {"steps": args.steps, "seconds": round(seconds, 1), "final_loss": sum(losses[-50:]) / len(losses[-50:]), "in_context": scores}
    (args.out / "tinymod_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"{args.steps} steps in {seconds:.0f} s, loss {metrics['final_loss']:.3f}; in-context answers on {args.eval_scenes} fresh scenes: "
          + ", ".join(f"{k.removeprefix('accuracy/')} {v:.3f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
