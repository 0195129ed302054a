"""Does the teacher's position lookup form when where-questions about scenes of several objects get more of the signal?

The shipped teacher's training data asks "Where is the <shape>?" in 6,943 of 60,000 VQA turns, about
6,000 of them on scenes where the answer needs a lookup (two or three objects), while existence takes
half the turns; twice the steps on that mix did not form the lookup (fresh-scene position 0.72 against
0.73). This continues the shipped teacher's training for ``--steps`` steps on batches whose first half
are its own training records (general and multitask, drawn at random) and whose second half are
one-turn colour and where questions about freshly drawn scenes of 2-3 objects with distinct shapes
(another world seed than the training, probe and bench scenes), tower frozen as in the teacher's own
training, then scores the result on the teacher's probes beside the shipped teacher's figures.
``python bench/lookup_errors.py OUT`` then sorts its fresh-scene answers.

    python bench/lookup_mix.py [--steps 600] [--lr 3e-4] [--out .cache/bench/lookup_mix]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from model import world as W
from model.data import Collator, encode_conversation
from model.generate import score_probes
from model.tokenizer import IMAGE_TOKEN
from tasks.params import REPO, TRAINED_ON, load_params


def lookup_record(rng: random.Random, spec) -> tuple[Image.Image, list[dict]]:
    """A one-turn colour or where question, LLaVA conversation format, about one object of a fresh lookup scene."""
    objects, scene = W.lookup_scene(rng, spec)
    question, answer = W.lookup_turn(rng.choice(W.LOOKUP_KINDS), rng.choice(objects))
    return W.render(scene, spec).convert("RGB"), [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=32, help="half the teacher's own records, half lookup questions")
    parser.add_argument("--seed", type=int, default=555, help="the lookup scenes' seed (the world's is 1234, the benches' 2027)")
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "bench" / "lookup_mix")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    params = load_params(REPO / "params.yaml")
    spec, shipped = params.curate.world, REPO / "teachers" / "embedded"
    model = AutoModelForImageTextToText.from_pretrained(shipped)
    processor = AutoProcessor.from_pretrained(shipped)
    tokenizer, image_tokens = processor.tokenizer, model.config.image_seq_length
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)  # as in the teacher's own training (LLaVA keeps CLIP frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    world = REPO / "data" / "world"
    records = [json.loads(line) for split in ("general", "multitask") for line in (world / f"{split}.jsonl").open()]
    rng = random.Random(args.seed)

    def own_record() -> tuple[Image.Image, list[dict]]:
        record = rng.choice(records)
        with Image.open(world / record["image"]) as image:
            return image.convert("RGB"), record["conversations"]

    collator = Collator(tokenizer.pad_token_id)
    half = args.batch_size // 2
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(args.steps), desc="lookup mix", unit="step"):
        batch = [own_record() for _ in range(args.batch_size - half)] + [lookup_record(rng, spec) for _ in range(half)]
        ids, mask, labels = collator.padded([encode_conversation(tokenizer, turns, image_tokens) for _, turns in batch])
        pixels = processor.image_processor(images=[image for image, _ in batch], return_tensors="pt")["pixel_values"]
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    (args.out / TRAINED_ON).write_text((shipped / TRAINED_ON).read_text())
    scores = score_probes(args.out, REPO / "data" / "curated" / "probes", REPO / "data" / "curated", spec.shapes)
    before = json.loads((shipped / "tinymod_metrics.json").read_text())["probes"]
    print(f"lookup mix: {args.steps} steps in {seconds:.0f} s, saved to {args.out}")
    rows = [("VQA accuracy", lambda s: s["vqa"]["accuracy"])]
    rows += [(f"... {t}", lambda s, t=t: s["vqa"][f"accuracy/{t}"]) for t in W.VQA_TYPES]
    rows += [
        ("POPE random accuracy", lambda s: s["pope_random"]["accuracy"]),
        ("POPE random yes-ratio", lambda s: s["pope_random"]["yes_ratio"]),
        ("POPE adversarial accuracy", lambda s: s["pope_adversarial"]["accuracy"]),
        ("caption object recall", lambda s: s["caption"]["recall"]),
        ("caption CHAIR-i", lambda s: s["caption"]["chair_i"]),
        ("captions naming the absent partner", lambda s: s["caption"]["partner_hallucination"]),
    ]
    print(f"  {'figure':36} {'shipped':>8} {'lookup mix':>10}")
    for name, value in rows:
        print(f"  {name:36} {value(before):8.4f} {value(scores):10.4f}")


if __name__ == "__main__":
    main()
