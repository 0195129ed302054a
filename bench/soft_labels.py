"""What the teacher's soft labels say beyond the hard labels, on a distillation stage's own records.

Distillation can only teach a student what the teacher's distribution holds and the labels do
not. This reads the teacher cache (the very rows mimic_dense trains on) and, per kind of response
token, prints:

- share: of the response tokens the stage supervises;
- teacher p(label) and how often its argmax is the label: 1 - p(label) is the mass the soft label
  spreads beyond the hard one, and where the argmax is another token KD teaches the teacher's
  reading instead of the annotation;
- for each student given, the cosine between the two gradients with respect to its logits at
  that token, of the KD term (``p_s - p_t``) and of ce (``p_s - y``): 1.00 means the KD term
  pushes exactly where ce does, so a KD student and a no-teacher student get the same signal.

Token kinds: caption words; the content of VQA answers by question type ("red" in "The star is
red.", every word of "at the top left", yes/no, the count, the shape), apart from the words an
answer restates from its question ("The star is") and the full stop, which need no image; and the
end-of-turn tokens. Colour and position answers about a phantom (a partner the noisy annotation
added and the image does not show) are counted apart: their annotated colour or place is noise.
Kinds are read off the embedded world's question wording; other records' answers count as captions.

Needs the pipeline's data/curated, data/teacher_cache and the students (``dvc repro baseline``).

    python bench/soft_labels.py [--stage mimic_dense] [--students align baseline dense]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from model.builders import load_llava
from model.data import Collator, ConversationDataset, stage_records
from model.losses import next_token_targets
from model.teacher_cache import TeacherCache
from tasks.common import StagePaths
from tasks.params import REPO, load_params
from tasks.training import stage_files

QUESTION_KINDS = (("colour", "What colour"), ("position", "Where is"), ("shape", "What shape"), ("count", "How many"), ("existence", "Is there"))
RESTATED = {"colour": 3, "position": 3}  # "The star is" before the colour or place
STUDENTS = ("align", "baseline", "dense", "moe", "pref")


def kind_of(question: str) -> str:
    text = question.replace("<image>", "").strip()
    return next((kind for kind, start in QUESTION_KINDS if text.startswith(start)), "caption")


def asked_shape(question: str) -> str | None:
    """The shape a colour or position question names: "What colour is the star?" -> "star"."""
    text = question.replace("<image>", "").strip()
    return text.rstrip("?").split()[-1] if text.startswith(("What colour", "Where is")) else None


def token_kinds(record: dict, labels: list[int], end_ids: set[int], stop_ids: set[int], truth: dict[str, set[str]]) -> list[str]:
    """The kind of each response token of one encoded record, in order (the cache's rows).

    ``truth``: the shapes each embedded-world record's image really holds; a colour or position
    question about a shape it does not hold asks about a phantom, an annotated partner that the
    image does not show, and its annotated answer is noise.
    """
    shapes = truth.get(record["id"])
    turns = []
    for turn in record["conversations"][0::2]:
        shape = asked_shape(turn["value"])
        turns.append((kind_of(turn["value"]), shapes is not None and shape is not None and shape not in shapes))
    targets = labels[1:]
    runs: list[list[int]] = []
    for t, label in enumerate(targets):
        if label == -100:
            continue
        if not runs or t != runs[-1][-1] + 1:
            runs.append([])
        runs[-1].append(t)
    if len(runs) != len(turns):
        raise ValueError(f"record {record['id']}: {len(runs)} answers in its labels, {len(turns)} in its turns")
    out = []
    for run, (kind, phantom) in zip(runs, turns, strict=True):
        for i, t in enumerate(run):
            if targets[t] in end_ids:
                out.append("end of turn")
            elif i < RESTATED.get(kind, 0) or targets[t] in stop_ids:
                out.append(f"{kind}: no image needed")
            else:
                out.append(f"{kind}, about a phantom" if phantom else kind)
    return out


def world_truth(world_json: Path) -> dict[str, set[str]]:
    """Record id -> the shapes its image holds, for the embedded world's records ("world-multitask-000012")."""
    if not world_json.exists():
        return {}
    objects = json.loads(world_json.read_text())["objects"]
    return {f"world-{name.removeprefix('images/').removesuffix('.png')}": {o["shape"] for o in objs} for name, objs in objects.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="mimic_dense", help="a stage with teacher.mode: cached")
    parser.add_argument("--students", nargs="*", default=["align", "baseline", "dense"], choices=STUDENTS, help="models/student_<name>")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    paths = StagePaths(params)
    section = getattr(params, args.stage)
    records = stage_records([str(f) for f in stage_files(paths, section.splits)], section.fraction, params.seed)
    tokenizer = AutoTokenizer.from_pretrained(paths.teacher)
    processor = AutoProcessor.from_pretrained(paths.teacher).image_processor
    cache = TeacherCache(paths.teacher_cache)
    teacher_config = AutoConfig.from_pretrained(paths.teacher)
    dataset = ConversationDataset(records, paths.curated, tokenizer, processor, teacher_config.image_seq_length)
    end_ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), *tokenizer("\n", add_special_tokens=False)["input_ids"]}
    stop_ids = set(tokenizer(".", add_special_tokens=False)["input_ids"])
    truth = world_truth(paths.world / "world.json")
    kinds = [k for record, (_, labels) in zip(records, dataset.encoded, strict=True) for k in token_kinds(record, labels, end_ids, stop_ids, truth)]
    rows = cache.response_rows(cache.locate(records, dataset.encoded, args.stage), cache.header["top_k"])
    labels = torch.tensor([label for _, record_labels in dataset.encoded for label in record_labels[1:] if label != -100])
    in_top = rows.ids == labels[:, None]
    p_label = (rows.logprobs.exp() * in_top).sum(-1)  # 0 when the label is outside the top k
    argmax_is_label = rows.ids[:, 0] == labels

    # The KD target as a dense distribution (the tail's mass spread over no token: it is not a gradient direction).
    vocab_size = teacher_config.text_config.vocab_size
    teacher_p = torch.zeros(len(labels), vocab_size).scatter_(1, rows.ids, rows.logprobs.exp())
    onehot = torch.nn.functional.one_hot(labels, vocab_size).float()
    cosines: dict[str, torch.Tensor] = {}
    collate = Collator(tokenizer.pad_token_id)
    for name in args.students:
        student = load_llava(paths.student(name)).eval().requires_grad_(False)
        if student.config.text_config.vocab_size != vocab_size:
            raise SystemExit(f"{paths.student(name)}: {student.config.text_config.vocab_size} vocabulary rows, the teacher {vocab_size}")
        out = []
        with torch.no_grad():
            for start in range(0, len(dataset), args.batch):
                batch = collate([dataset[i] for i in range(start, min(start + args.batch, len(dataset)))])
                logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values).logits
                mask, _ = next_token_targets(batch.labels)
                out.append(logits[mask].softmax(-1))
        p_student = torch.cat(out)
        cosines[name] = torch.nn.functional.cosine_similarity(p_student - teacher_p, p_student - onehot, dim=-1)

    groups = defaultdict(list)
    for i, kind in enumerate(kinds):
        groups[kind].append(i)
    print(f"{args.stage}: {len(records)} records, {len(labels)} response tokens, teacher cache top-{cache.header['top_k']}")
    header = f"{'tokens':27} {'share':>6} {'teacher p(label)':>16} {'argmax = label':>14}" + "".join(f" {'cos ' + n:>13}" for n in cosines)
    print(header)
    for kind, index in sorted(groups.items(), key=lambda item: -len(item[1])):
        index = torch.tensor(index)
        line = f"{kind:27} {len(index) / len(labels):6.3f} {p_label[index].mean():16.3f} {argmax_is_label[index].float().mean():14.3f}"
        print(line + "".join(f" {c[index].mean():13.3f}" for c in cosines.values()))
    everything = f"{'all':27} {1.0:6.3f} {p_label.mean():16.3f} {argmax_is_label.float().mean():14.3f}"
    print(everything + "".join(f" {c.mean():13.3f}" for c in cosines.values()))


if __name__ == "__main__":
    main()
