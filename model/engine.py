"""The training recipe every training stage runs, one process per DeepSpeed rank.

A stage's ``main()`` writes a job spec (:class:`model.config.JobSpec` as JSON) and
launches this module with ``torchrun`` or the ``deepspeed`` launcher (see :mod:`tasks.training`)::

    torchrun --nproc_per_node 2 -m model.engine .cache/runs/mimic_dense/job.json

The recipe reads top to bottom: ``__init__`` takes the scalars from the spec,
``setup()`` builds everything in dependency order, ``train()`` is the loop,
``save()`` writes the Hugging Face checkpoint. Stages differ only in data:
which split, which modules train, and the objective: a list of weighted loss
modules (:func:`loss_terms`), and preference pairs for the preference stage.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model.builders import load_llava, save_checkpoint
from model.config import DPOParams, JobCache, JobSpec, TrainingParams
from model.data import (
    Collator,
    ConversationDataset,
    DistillBatch,
    PreferenceBatch,
    PreferenceDataset,
    stage_records,
)
from model.lifetime import die_with_parent
from model.losses import (
    CrossEntropy,
    DPOLoss,
    LossTerm,
    RelationKD,
    ResponseKL,
    RouterBalance,
    SharedVocabHead,
    TopK,
    VisualKL,
    chunked_relation,
    chunked_row_means,
    chunked_sequence_logprobs,
    next_token_targets,
)
from model.teacher_cache import TeacherCache, tokenizer_digest
from model.upcycle import RouterLogits, parameter_counts, routers

CHECKPOINTS_KEPT = 2


# ---------------------------------------------------------------- which modules train


def module_of(name: str, moe_layer: bool) -> set[str]:
    """The params' module names a parameter belongs to (``llm`` covers everything of the language model)."""
    found: set[str] = set()
    if name.startswith("model.vision_tower."):
        return {"vision"}
    if name.startswith("model.multi_modal_projector."):
        return {"projector"}
    if name.startswith("lm_head."):
        return {"llm", "lm_head"}
    if not name.startswith("model.language_model."):
        return found
    found.add("llm")
    if ".embed_tokens." in name:
        found.add("embeddings")
    elif ".self_attn." in name:
        found.add("attention")
    elif ".mlp.experts." in name:
        found.add("experts")
    elif ".mlp.gate.weight" in name and moe_layer:
        found.add("router")
    elif ".mlp.shared_expert" in name:
        found.add("shared_expert")
    elif ".mlp." in name:
        found.add("mlp")  # a dense FFN: every layer before upcycling, the non-MoE layers after
    elif "norm" in name:
        found.add("norms")
    return found


def select_trainable(model: torch.nn.Module, modules: list[str]) -> dict[str, int]:
    """Freeze everything, then unfreeze ``modules``; returns trainable / total counts per module.

    Raises ValueError naming the modules that matched no parameter (``experts`` on a dense model).
    On an upcycled model, ``mlp`` (the FFNs of the layers that stayed dense) and ``shared_expert``
    may match nothing: with ``upcycle.layers: all`` no dense FFN is left, and without
    ``upcycle.shared_expert`` there is none; the recipes list both for the students that have them.
    """
    model.requires_grad_(False)
    moe_layers = {n.split(".mlp.")[0] for n, _ in model.named_parameters() if ".mlp.experts." in n}
    matched: dict[str, int] = defaultdict(int)
    for name, param in model.named_parameters(remove_duplicate=False):
        owners = module_of(name, name.split(".mlp.")[0] in moe_layers)
        for module in set(modules) & owners:
            param.requires_grad_(True)
            matched[module] += param.numel()
    missing = [m for m in modules if not matched.get(m) and not (moe_layers and m in ("mlp", "shared_expert"))]
    if missing:
        raise ValueError(f"modules {missing} match no parameter of this model; nothing of them can train")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters()), **matched}


# ---------------------------------------------------------------- the teacher behind one interface


class LiveTeacher:
    """The frozen teacher's outputs from a forward pass per batch.

    The engine asks only for hidden states at chosen positions and the logits of those
    rows. A stage with ``teacher: {mode: cached}`` has none: its batches carry the teacher's
    top-k rows from :class:`model.teacher_cache.TeacherCache` instead.
    """

    def __init__(self, model: torch.nn.Module, vocab: int | None = None):
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.head = SharedVocabHead(model.lm_head, vocab or model.config.text_config.vocab_size)

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model.model(input_ids=input_ids, pixel_values=pixel_values.to(dtype), attention_mask=attention_mask)
        return out.last_hidden_state

    @torch.no_grad()
    def logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        return self.head(hidden_rows)

    @torch.no_grad()
    def sequence_logprobs(self, input_ids, pixel_values, attention_mask, labels, chunk_size: int = 1024) -> torch.Tensor:
        return chunked_sequence_logprobs(self.hidden(input_ids, pixel_values, attention_mask), self.head, labels, chunk_size)


# ---------------------------------------------------------------- the objective


@dataclass(frozen=True)
class Term:
    """One term of the objective: its name (as logged), weight and loss module."""

    name: str
    weight: float
    loss: LossTerm


def loss_terms(train: TrainingParams, dpo: DPOParams | None, top_k: int) -> list[Term]:
    """The stage's objective from its spec: every term whose weight is above zero, in the order computed.

    ``loss`` weighs each term; the preference stage's terms are ``dpo`` (``loss.dpo``, the loss of
    ``dpo.loss_type`` at ``dpo.beta``), its ``sft`` cross-entropy on the chosen response
    (``dpo.sft_weight``) and the balance loss; validation keeps the other terms off there.
    """
    w = train.loss
    if dpo is not None:
        terms = [Term("dpo", w.dpo, DPOLoss(dpo.beta, dpo.loss_type)), Term("sft", dpo.sft_weight, CrossEntropy())]
    else:
        terms = [
            Term("ce", w.ce, CrossEntropy()),
            Term("kl_response", w.kl_response, ResponseKL(train.temperature)),
            Term("kl_visual", w.kl_visual, VisualKL(train.temperature)),
            Term("relation", w.relation, RelationKD()),
        ]
    if w.router_aux:  # validation and the recipe keep it to MoE students, whose top_k is >= 1
        terms.append(Term("router_aux", w.router_aux, RouterBalance(top_k)))
    return [term for term in terms if term.weight > 0]


def reads_teacher(terms: list[Term]) -> bool:
    """Whether any term compares the student with the teacher (live, or its cached rows)."""
    return any(term.loss.reads_teacher for term in terms)


class Objective(torch.nn.Module):
    """The student plus every loss term of a stage; DeepSpeed wraps this module.

    ``forward(batch)`` returns the weighted total and each term. The teacher is kept out
    of the module's parameters (DeepSpeed must neither partition nor optimise it).
    A batch's ``token_share`` (see :func:`token_shares`) scales the per-token terms (ce,
    kl_response, DPO's sft) so that gradient accumulation and several ranks give one mean over
    the step's tokens. The other terms are means over samples (DPO, visual KL and RDist, whose
    image tokens are the same number per sample), equal for equal-sized micro-batches, or the
    balance loss, a statistic of each micro-batch's routing as in transformers.
    """

    def __init__(
        self, student, teacher: LiveTeacher | None, terms: list[Term], chunk_size: int = 1024, distill_all_tokens: bool = False,
        vocab: int | None = None,
    ):  # fmt: skip
        super().__init__()
        # Outside the module tree: DeepSpeed must see the LM head once, as the student's.
        self._head = (SharedVocabHead(student.lm_head, vocab or student.config.text_config.vocab_size),)
        self.distill_all_tokens = distill_all_tokens
        self.student = student
        self._teacher = (teacher,)
        self.terms = {term.name: term for term in terms}
        self.live = teacher is not None and reads_teacher(terms)  # the teacher runs in every step; else its rows come cached
        self.chunk_size = chunk_size
        self.image_token = student.config.image_token_index

    @property
    def teacher(self) -> LiveTeacher | None:
        return self._teacher[0]

    @property
    def head(self) -> SharedVocabHead:
        """The student's LM head over the vocabulary it shares with the teacher (the tokenizer's)."""
        return self._head[0]

    def forward(self, batch: DistillBatch | PreferenceBatch) -> dict[str, torch.Tensor]:
        if isinstance(batch, PreferenceBatch):
            return self.preference_terms(batch)
        return self.distillation_terms(batch)

    def _teacher_rows(self, teacher_hidden: torch.Tensor | None, rows: torch.Tensor, cached: TopK | None):
        """The teacher's side of the selected rows, a chunk at a time: its cached top-k, else its live logits."""
        if cached is not None:
            return lambda part: cached[part]
        selected = teacher_hidden[rows]
        return lambda part: self.teacher.logits(selected[part])

    def distillation_terms(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        """The stage's terms; the teacher's side comes live, or as the cached rows the batch carries."""
        terms, head, chunk = self.terms, self.head, self.chunk_size
        ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
        pixels = batch.pixel_values.to(self.student.dtype)
        with RouterLogits(self.student) as routed:
            hidden = self.student.model(input_ids=ids, pixel_values=pixels, attention_mask=mask).last_hidden_state
        live = self.live
        teacher_hidden = self.teacher.hidden(ids, batch.pixel_values, mask) if live else None
        values: dict[str, torch.Tensor] = {}
        ce, kl = terms.get("ce"), terms.get("kl_response")
        if ce or kl:
            response, targets = next_token_targets(labels)
            response_targets = targets[response]
            # LLaVA-MoD's distill_all_tokens: the KL at every text position, prompt and template too
            # (image positions are kl_visual's); ce stays on the response.
            separate = kl is not None and self.distill_all_tokens
            row_terms = [(ce.loss, lambda part: response_targets[part])] if ce else []
            if kl and not separate:
                row_terms.append((kl.loss, self._teacher_rows(teacher_hidden, response, batch.teacher_response)))
            means = chunked_row_means(hidden[response], head, row_terms, chunk)
            share = batch.token_share
            if ce:
                values["ce"] = means[0] * share
            if kl and separate:
                distilled = mask.bool() & (ids != self.image_token)
                values["kl_response"] = chunked_row_means(hidden[distilled], head, [(kl.loss, self._teacher_rows(teacher_hidden, distilled, None))], chunk)[0]
            elif kl:
                values["kl_response"] = means[-1] * share  # all-token KL above: a mean over the micro-batch's text
        visual, relation = terms.get("kl_visual"), terms.get("relation")
        if visual or relation:
            image = ids == self.image_token
            per_sample = int(image[0].sum())
            student_rows = hidden[image]
            if visual:
                rows_of = self._teacher_rows(teacher_hidden, image, batch.teacher_visual)
                values["kl_visual"] = chunked_row_means(student_rows, head, [(visual.loss, rows_of)], chunk)[0]
            if relation:
                shape = (ids.shape[0], per_sample, -1)
                student_relation = chunked_relation(student_rows.view(shape), head, chunk)
                if live:
                    teacher_relation = chunked_relation(teacher_hidden[image].view(shape), self.teacher.head, chunk)
                else:
                    teacher_relation = batch.teacher_relation
                values["relation"] = relation.loss(student_relation, teacher_relation)
        if "router_aux" in terms:
            values["router_aux"] = terms["router_aux"].loss(routed.logits, mask)
        return self._total(values)

    def preference_terms(self, batch: PreferenceBatch) -> dict[str, torch.Tensor]:
        ids, mask, labels = batch.stacked()
        pixels = batch.pixel_values.to(self.student.dtype).repeat(2, 1, 1, 1)
        with RouterLogits(self.student) as routed:
            hidden = self.student.model(input_ids=ids, pixel_values=pixels, attention_mask=mask).last_hidden_state
        logps = chunked_sequence_logprobs(hidden, self.head, labels, self.chunk_size)
        pairs = ids.shape[0] // 2
        policy_chosen, policy_rejected = logps[:pairs], logps[pairs:]
        reference = batch.reference_logps  # [B, 2], computed once per pair at setup
        lengths = next_token_targets(labels)[0].sum(-1)  # response tokens per row
        out = self.terms["dpo"].loss(policy_chosen, policy_rejected, reference[:, 0], reference[:, 1], lengths[:pairs], lengths[pairs:])
        values = {"dpo": out.losses.mean()}
        if "sft" in self.terms:
            response, targets = next_token_targets(labels[:pairs])
            chosen_targets = targets[response]
            sft = chunked_row_means(hidden[:pairs][response], self.head, [(self.terms["sft"].loss, lambda part: chosen_targets[part])], self.chunk_size)
            values["sft"] = sft[0] * batch.token_share
        if "router_aux" in self.terms:
            values["router_aux"] = self.terms["router_aux"].loss(routed.logits, mask)
        result = self._total(values)
        result.update(
            reward_accuracy=(out.chosen_rewards > out.rejected_rewards).float().mean(),
            reward_margin=(out.chosen_rewards - out.rejected_rewards).mean(),
            policy_chosen_logps=policy_chosen.detach().mean(),
            policy_rejected_logps=policy_rejected.detach().mean(),
            reference_chosen_logps=reference[:, 0].mean(),
            reference_rejected_logps=reference[:, 1].mean(),
        )
        return result

    def _total(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        total = sum(self.terms[name].weight * value for name, value in values.items())
        return {"loss": total, **{name: value.detach() for name, value in values.items()}}


# ---------------------------------------------------------------- data order, token shares and schedule


def response_tokens(batch: DistillBatch | PreferenceBatch) -> int:
    """Supervised next-token positions of a batch: those its ce and kl_response (or DPO's sft) average over."""
    return int(next_token_targets(batch.trained_labels)[0].sum())


def token_shares(counts: list[int], step_tokens: float, world: int) -> list[float]:
    """Per micro-batch, the factor that turns its per-token mean into its part of the step's per-token mean.

    A micro-batch's loss is a mean over its own tokens, and DeepSpeed divides each micro-batch's
    loss by the accumulation steps and averages gradients over ranks: micro-batches would count
    equally, however many tokens each holds. Scaled by ``count * accumulation * world / step_tokens``
    they add up to one mean over every token of the step, for any micro-batch size and rank count.
    """
    return [count * len(counts) * world / max(step_tokens, 1.0) for count in counts]


def global_batch(step: int, batch_size: int, num_records: int, seed: int) -> list[int]:
    """Record indices of optimizer step ``step``: epochs of seeded permutations, cut into batches.

    A pure function of the step, so a resumed run sees exactly the batches an
    uninterrupted one would have.
    """
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, num_records)
        order = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        take = order[offset : offset + batch_size - len(out)]
        out += take
        position += len(take)
    return out


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ---------------------------------------------------------------- step checks and throughput


def run_rates(trained_steps: int, batch_size: int, tokens: int, seconds: float, history: Path) -> dict[str, float]:
    """Samples and tokens per second of the steps this attempt trained.

    An attempt resumed after the last checkpoint trains none: the attempt that trained the steps
    measured them, in the history's last row (the final step always logs).
    """
    if not trained_steps:
        last = json.loads(history.read_text().splitlines()[-1])
        return {name: round(last[name], 2) for name in ("samples_per_second", "tokens_per_second")}
    return {
        "samples_per_second": round(trained_steps * batch_size / max(seconds, 1e-9), 2),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
    }


def check_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    """Stop on a NaN or inf loss term, naming the step and the term (the last good checkpoint stays).

    The total (``loss``) is checked last: a bad term makes it bad too, and the term is the news.
    """
    for name, value in sorted(terms.items(), key=lambda item: item[0] == "loss"):
        if not torch.isfinite(value).all():
            raise FloatingPointError(
                f"step {step}: loss term {name!r} is {float(value)}; stopping before the step is applied "
                "(checkpoints up to then are kept). Lower the learning rate or this term's weight and re-run the stage."
            )


# ---------------------------------------------------------------- the recipe


class TrainingRecipe:
    """One stage's training, as one DeepSpeed job."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.stage = spec.stage
        self.steps = spec.train.steps
        self.batch_size = spec.train.batch_size
        self.checkpoint_every = spec.train.checkpoint_every
        self.log_every = spec.train.log_every
        self.run_dir = Path(spec.run_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        self.seed = spec.seed

    def setup(self) -> None:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # The process group first: every later step may talk to the other ranks. DeepSpeed prints
        # "... shm_comm_op built successfully" at every CPU start: not news, so that line is dropped.
        with contextlib.redirect_stdout(io.StringIO()) as said:
            deepspeed.init_distributed(dist_backend=None)
        for line in said.getvalue().splitlines():
            if not line.endswith("built successfully"):
                print(line, flush=True)
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        torch.manual_seed(self.seed)
        spec, train = self.spec, self.spec.train

        # The student, with only the stage's modules trainable (the vision tower stays frozen).
        student = load_llava(Path(spec.init), dtype=torch.float32)
        self.counts = select_trainable(student, train.modules)
        self.counts.update({f"{k}_parameters": v for k, v in parameter_counts(student).items()})
        if train.loss.router_aux and not routers(student):
            raise ValueError(f"{self.stage}.loss.router_aux > 0 but the student has no MoE layer; upcycle it first")
        self.terms = loss_terms(train, spec.dpo, getattr(student.config.text_config, "num_experts_per_tok", 0))

        # KL and DPO compare distributions over the tokenizer's tokens: heads padded past it (Qwen2-7B's
        # 152,064 rows against 0.5B's 151,936, one tokenizer) are cut to it (SharedVocabHead).
        from transformers import AutoTokenizer

        self.vocab = len(AutoTokenizer.from_pretrained(spec.init))

        # The teacher, frozen, only if a term needs it and no cache stands in for it; the DPO
        # reference (teacher or the student's own starting point), frozen too.
        teacher = None
        needs_teacher = reads_teacher(self.terms) and not spec.teacher_cache
        if needs_teacher or spec.reference == "teacher":
            teacher = self._frozen(spec.teacher, student, dtype)
        if spec.reference:
            reference = teacher if spec.reference == "teacher" else self._frozen(spec.init, student, dtype)

        # The data: this stage's splits, the same subsample on every rank.
        self.dataset = self._dataset(student.config.image_seq_length)
        self.cache = self._open_cache(spec.teacher_cache) if spec.teacher_cache else None
        if spec.reference:
            self.reference_logps = self._reference_logps(reference)
            del reference  # its log-probs are all the stage needs from it

        # DeepSpeed last: it takes the trainable parameters and the schedule.
        objective = Objective(student, teacher, self.terms, train.chunk_size, train.distill_all_tokens, vocab=self.vocab)
        trainable = [p for p in objective.parameters() if p.requires_grad]
        schedule = lr_lambda(train.warmup_steps, self.steps, train.min_lr_ratio)
        config = dict(spec.deepspeed)
        if self.device.type == "cuda":
            config["bf16"] = {"enabled": True}  # fp32 on CPU: DeepSpeed's CPU path has no fp16
        self.engine, _, _, _ = deepspeed.initialize(
            model=objective,
            model_parameters=trainable,
            config=config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        )
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.start_step = self._resume()

    def _frozen(self, path: str, student, dtype: torch.dtype) -> LiveTeacher:
        model = load_llava(Path(path), dtype=dtype).to(self.device)
        rows = {"teacher": model.config.text_config.vocab_size, "student": student.config.text_config.vocab_size}
        short = {who: n for who, n in rows.items() if n < self.vocab}
        if short:
            raise ValueError(
                f"{path}: the tokenizer has {self.vocab} tokens but the {' and '.join(short)} LM head has only "
                f"{', '.join(map(str, short.values()))} rows; KL and DPO compare distributions over the tokenizer's vocabulary"
            )
        return LiveTeacher(model, self.vocab)

    def _open_cache(self, cache: JobCache) -> TeacherCache:
        """The teacher cache, checked against this stage's teacher, tokenizer and data before any step."""
        opened = TeacherCache(Path(cache.path))
        opened.check({**cache.expect, "tokenizer": tokenizer_digest(Path(self.spec.init))})
        if opened.header["vocab_size"] != self.vocab:
            raise ValueError(f"{cache.path}: cached over {opened.header['vocab_size']} tokens, the tokenizer has {self.vocab}; run `dvc repro teacher_cache`")
        if cache.top_k > opened.header["top_k"]:
            raise ValueError(f"{self.stage}.teacher.top_k is {cache.top_k}, the cache holds {opened.header['top_k']}; run `dvc repro teacher_cache`")
        for term, part in (("kl_visual", "visual"), ("relation", "relation")):
            if getattr(self.spec.train.loss, term) and not opened.header[part]:
                raise ValueError(f"{cache.path}: made without {part} rows, which {self.stage}.loss.{term} reads; run `dvc repro teacher_cache`")
        self.cached_rows = opened.locate(self.dataset.records, self.dataset.encoded, self.stage)
        self.cache_top_k = cache.top_k
        return opened

    def _dataset(self, image_tokens: int):
        from transformers import AutoProcessor, AutoTokenizer

        data, fraction = self.spec.data, self.spec.train.fraction
        records = stage_records(data.files, fraction, self.seed)
        if not records:
            raise ValueError(f"{self.stage}: no records in {data.files} (fraction {fraction})")
        tokenizer = AutoTokenizer.from_pretrained(self.spec.init)
        image_processor = AutoProcessor.from_pretrained(self.spec.init).image_processor
        self.collate = Collator(pad_id=tokenizer.pad_token_id)
        kind = PreferenceDataset if data.preference else ConversationDataset
        return kind(records, Path(data.image_root), tokenizer, image_processor, image_tokens)

    @torch.no_grad()
    def _reference_logps(self, reference: LiveTeacher) -> torch.Tensor:
        """Summed response log-probs of every pair under the frozen reference, once per pair: ``[N, 2]``."""
        out = torch.zeros(len(self.dataset), 2)
        indices = list(range(len(self.dataset)))
        for start in tqdm(range(0, len(indices), 32), desc=f"{self.stage}: reference log-probs", disable=self.rank != 0):
            batch = self.collate([self.dataset[i] for i in indices[start : start + 32]]).to(self.device)
            for column, side in enumerate(("chosen", "rejected")):
                ids, mask, labels = batch.side(side)
                out[start : start + 32, column] = reference.sequence_logprobs(ids, batch.pixel_values, mask, labels, self.spec.train.chunk_size).float().cpu()
        return out

    def _resume(self) -> int:
        if not (self.checkpoints / "latest").exists():
            return 0
        _, client = self.engine.load_checkpoint(str(self.checkpoints))
        step = int(client["step"])
        if self.rank == 0:
            print(f"{self.stage}: resumed from the checkpoint at step {step} of {self.steps}", flush=True)
        return step

    def _cached_teacher(self, chunk: list[int]) -> dict:
        """The teacher's rows for the records of one micro-batch, in the order the objective reads them."""
        rows = self.cached_rows[chunk]
        out = {}
        loss = self.spec.train.loss
        if loss.kl_response:
            out["teacher_response"] = self.cache.response_rows(rows, self.cache_top_k)
        if loss.kl_visual:
            out["teacher_visual"] = self.cache.visual_rows(rows, self.cache_top_k)
        if loss.relation:
            out["teacher_relation"] = self.cache.relation(rows)
        return out

    def _micro_batches(self, step: int):
        import deepspeed.comm as dist

        indices = global_batch(step, self.batch_size, len(self.dataset), self.seed)
        per_rank = len(indices) // self.world
        mine = indices[self.rank * per_rank : (self.rank + 1) * per_rank]
        batches = []
        for start in range(0, len(mine), self.micro):
            chunk = mine[start : start + self.micro]
            batch = self.collate([self.dataset[i] for i in chunk])
            if hasattr(self, "reference_logps"):
                batch.reference_logps = self.reference_logps[chunk]
            if self.cache is not None:
                for name, rows in self._cached_teacher(chunk).items():
                    setattr(batch, name, rows)
            batches.append(batch)
        counts = [response_tokens(batch) for batch in batches]
        step_tokens = torch.tensor(float(sum(counts)), device=self.device)
        if self.world > 1:
            dist.all_reduce(step_tokens)
        for batch, share in zip(batches, token_shares(counts, float(step_tokens), self.world), strict=True):
            batch.token_share = torch.tensor(share)
            yield batch.to(self.device)

    def train(self) -> dict:
        import deepspeed.comm as dist

        history = self._history()
        window: dict[str, list[float]] = defaultdict(list)
        started = time.time()
        tokens = 0
        bar = tqdm(
            total=self.steps, initial=self.start_step, desc=self.stage, unit="step", disable=self.rank != 0, mininterval=2, file=sys.stdout
        )
        window_started, window_tokens, window_steps = time.time(), 0, 0
        for step in range(self.start_step, self.steps):
            self.engine.train()
            for batch in self._micro_batches(step):
                terms = self.engine(batch)
                check_finite(terms, step + 1)  # before backward: the bad step is never applied
                self.engine.backward(terms["loss"])
                self.engine.step()
                batch_tokens = int(batch.attention_mask.sum())
                tokens += batch_tokens
                window_tokens += batch_tokens
                for name, value in terms.items():
                    window[name].append(float(value.detach()))
            done = step + 1
            window_steps += 1
            grad_norm = self.engine.get_global_grad_norm()
            if grad_norm is not None:
                window["grad_norm"].append(float(grad_norm))
            if done % self.log_every == 0 or done == self.steps:
                elapsed = max(time.time() - window_started, 1e-9)
                metrics = {name: sum(v) / len(v) for name, v in window.items()}
                metrics["lr"] = self.engine.get_lr()[0]
                metrics["samples_per_second"] = window_steps * self.batch_size / elapsed
                metrics["tokens_per_second"] = window_tokens * self.world / elapsed
                window.clear()
                window_started, window_tokens, window_steps = time.time(), 0, 0
                if self.rank == 0:
                    # The stage's process forwards these rows to MLflow as they land.
                    history.write(json.dumps({"step": done, **metrics}) + "\n")
                    history.flush()
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if done % self.checkpoint_every == 0 or done == self.steps:
                self._checkpoint(done)
            bar.update(1)
        bar.close()
        seconds = time.time() - started
        dist.barrier()
        rates = run_rates(self.steps - self.start_step, self.batch_size, tokens * self.world, seconds, self.run_dir / "history.jsonl")
        return {"steps": self.steps, "resumed_at": self.start_step, "seconds": round(seconds, 2), **rates, **self.counts}

    def _history(self):
        """The per-step log, cut back to the resumed step so a resumed run leaves no duplicate rows."""
        path = self.run_dir / "history.jsonl"
        kept = []
        if path.exists() and self.start_step:
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.start_step]
        if self.rank == 0:
            path.write_text("".join(line + "\n" for line in kept))
        return path.open("a") if self.rank == 0 else open(os.devnull, "w")

    def _checkpoint(self, step: int) -> None:
        import deepspeed.comm as dist

        self.engine.save_checkpoint(str(self.checkpoints), tag=f"step{step:07d}", client_state={"step": step})
        dist.barrier()
        if self.rank == 0:
            tags = sorted(p for p in self.checkpoints.glob("step*") if p.is_dir())
            for old in tags[:-CHECKPOINTS_KEPT]:
                shutil.rmtree(old, ignore_errors=True)

    def save(self, result: dict) -> None:
        """The student as a Hugging Face safetensors checkpoint (never DeepSpeed shards), from rank 0."""
        import deepspeed
        import deepspeed.comm as dist
        from transformers import AutoProcessor

        student = self.engine.module.student
        with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
            if self.rank == 0:
                state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in student.state_dict().items()}
        if self.rank == 0:
            model = load_llava(Path(self.spec.init), dtype=torch.float32)
            model.load_state_dict(state)
            save_checkpoint(model, AutoProcessor.from_pretrained(self.spec.init), Path(self.spec.out))
            (self.run_dir / "result.json").write_text(json.dumps(result, indent=2))
        dist.barrier()


def main(argv: list[str] | None = None) -> int:
    import signal

    die_with_parent(signal.SIGKILL)  # a rank outliving torchrun has no one to report to
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: torchrun [...] -m model.engine JOB.json  (written by a stage's main; see tasks/training.py)", file=sys.stderr)
        return 2
    recipe = TrainingRecipe(JobSpec.model_validate_json(Path(argv[0]).read_text()))
    recipe.setup()
    result = recipe.train()
    recipe.save(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
