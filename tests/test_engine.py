"""The training recipe's parts: data order, schedule, which modules train, and every loss term wired."""

from __future__ import annotations

import pytest
import torch

from model.builders import build_llava
from model.config import DPOParams, LossWeights, TrainingParams
from model.data import DistillBatch, PreferenceBatch
from model.engine import LiveTeacher, Objective, check_finite, global_batch, loss_terms, lr_lambda, select_trainable
from model.upcycle import upcycle
from tasks.params import TextParams, UpcycleParams, VisionParams

from .conftest import TINY_TEXT, TINY_VISION
from .test_upcycle import inputs


def test_global_batch_is_a_pure_function_of_the_step_and_covers_each_epoch():
    n, batch = 10, 4
    steps = [global_batch(s, batch, n, seed=3) for s in range(5)]
    assert steps == [global_batch(s, batch, n, seed=3) for s in range(5)]
    assert steps != [global_batch(s, batch, n, seed=4) for s in range(5)]
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda(warmup=4, total=20, min_ratio=0.1)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_select_trainable_freezes_the_rest_and_refuses_what_is_not_there(tiny_llava):
    counts = select_trainable(tiny_llava, ["projector"])
    trainable = {n for n, p in tiny_llava.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.multi_modal_projector.") for n in trainable)
    assert counts["trainable"] == counts["projector"] < counts["total"]
    with pytest.raises(ValueError, match="experts"):
        select_trainable(tiny_llava, ["projector", "experts"])

    moe = upcycle(tiny_llava, UpcycleParams(num_experts=4, top_k=2, layers="every_other"))
    select_trainable(moe, ["experts", "router", "mlp"])
    names = {n for n, p in moe.named_parameters() if p.requires_grad}
    assert any(".mlp.experts." in n for n in names) and any(n.endswith(".mlp.gate.weight") for n in names)
    # `mlp` is the dense FFN of the layers that stayed dense (1 and 3: every_other makes 0 and 2 sparse), nothing else.
    assert {n.split(".mlp.")[0].rsplit(".", 1)[-1] for n in names if ".mlp.gate_proj" in n} == {"1", "3"}
    assert not any("self_attn" in n or "vision_tower" in n for n in names)


def test_the_recipes_modules_fit_every_upcycled_layout(tiny_llava):
    """llava-mod's mimic_sparse modules: `layers: all` leaves no dense mlp, and a shared expert trains."""
    modules = ["projector", "experts", "router", "shared_expert", "mlp"]
    everything = upcycle(tiny_llava, UpcycleParams(num_experts=2, top_k=1, layers="all"))
    select_trainable(everything, modules)  # no dense FFN left and no shared expert: not an error
    shared = upcycle(tiny_llava, UpcycleParams(num_experts=2, top_k=1, shared_expert=True))
    counts = select_trainable(shared, modules)
    trained = {n for n, p in shared.named_parameters() if p.requires_grad}
    assert counts["shared_expert"] > 0 and any(".mlp.shared_expert." in n for n in trained)
    with pytest.raises(ValueError, match="experts"):
        select_trainable(tiny_llava, modules)  # before upcycling, experts are still an error


def batch_with_labels(model, tokenizer) -> dict:
    batch = inputs(model, tokenizer, batch=2)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -5:-1] = batch["input_ids"][:, -5:-1]
    labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels}


def objective_of(student, teacher, chunk_size=1024, temperature=1.0, distill_all_tokens=False, vocab=None, preference=None, **weights) -> Objective:
    """The objective a stage with these loss weights (and ``preference``'s DPO) builds: the recipe's own ``loss_terms``."""
    train = TrainingParams(loss=LossWeights(**weights), temperature=temperature, chunk_size=chunk_size, distill_all_tokens=distill_all_tokens)
    terms = loss_terms(train, preference, getattr(student.config.text_config, "num_experts_per_tok", 0))
    return Objective(student, teacher, terms, chunk_size, distill_all_tokens, vocab)


def test_every_distillation_term_is_computed_and_weighted(tiny_llava, tiny_tokenizer):
    teacher = LiveTeacher(build_llava(VisionParams(**TINY_VISION), TextParams(**TINY_TEXT), tiny_tokenizer, seed=5))
    student = upcycle(tiny_llava, UpcycleParams(num_experts=4, top_k=2))
    weights = {"ce": 1.0, "kl_response": 0.5, "kl_visual": 0.25, "relation": 2.0, "router_aux": 0.1}
    objective = objective_of(student, teacher, chunk_size=3, temperature=2.0, **weights)
    terms = objective(DistillBatch(**batch_with_labels(student, tiny_tokenizer)))
    assert set(terms) == {"loss", "ce", "kl_response", "kl_visual", "relation", "router_aux"}
    expected = sum(weights[k] * terms[k] for k in ("ce", "kl_response", "kl_visual", "relation", "router_aux"))
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(terms[k].item() > 0 for k in ("ce", "kl_response", "kl_visual", "relation"))
    terms["loss"].backward()
    assert not any(p.grad is not None for p in teacher.model.parameters()), "the teacher must stay frozen"
    assert list(objective.parameters()) == list(student.parameters()), "the teacher is not part of the trained module"


def test_padded_heads_are_distilled_over_the_tokens_they_share(tiny_tokenizer):
    """Teacher and student of one tokenizer with embeddings padded to different sizes (as Qwen2-7B and
    -0.5B are): every term compares the tokenizer's tokens only; uncut, the KL could not even be taken."""
    from model.losses import forward_kl, next_token_targets

    vocab = len(tiny_tokenizer)
    teacher_model = build_llava(VisionParams(**TINY_VISION), TextParams(**TINY_TEXT), tiny_tokenizer, seed=5)
    student = build_llava(VisionParams(**TINY_VISION), TextParams(**TINY_TEXT), tiny_tokenizer, seed=0)
    teacher_model.resize_token_embeddings(vocab + 24)
    student.resize_token_embeddings(vocab + 8)
    with torch.no_grad():  # padded rows that would dominate any distribution they entered
        student.lm_head.weight[vocab:] = 50.0 * torch.randn_like(student.lm_head.weight[vocab:])
        teacher_model.lm_head.weight[vocab:] = 50.0 * torch.randn_like(teacher_model.lm_head.weight[vocab:])
    teacher = LiveTeacher(teacher_model, vocab)
    objective = objective_of(student, teacher, chunk_size=3, vocab=vocab, ce=1.0, kl_response=1.0, relation=1.0)
    batch = batch_with_labels(student, tiny_tokenizer)
    terms = objective(DistillBatch(**batch))
    response, targets = next_token_targets(batch["labels"])
    args = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s_logits = student(**args).logits[response][:, :vocab]
        t_logits = teacher_model(**args).logits[response][:, :vocab]
    assert terms["kl_response"].item() == pytest.approx(forward_kl(s_logits, t_logits).mean().item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(s_logits, targets[response]).item(), rel=1e-5)
    assert torch.isfinite(terms["relation"])
    with pytest.raises(ValueError, match="tokenizer has 999999 tokens but the LM head only"):
        LiveTeacher(teacher_model, 999_999)


def test_a_zero_weight_skips_the_term_and_the_teacher(tiny_llava, tiny_tokenizer):
    class NoTeacher:
        def __getattr__(self, name):
            raise AssertionError("the teacher was used although every teacher term is zero")

    objective = objective_of(tiny_llava, NoTeacher(), ce=1.0)
    terms = objective(DistillBatch(**batch_with_labels(tiny_llava, tiny_tokenizer)))
    assert set(terms) == {"loss", "ce"}


def test_preference_terms(tiny_llava, tiny_tokenizer):
    objective = objective_of(tiny_llava, None, preference=DPOParams(beta=0.1, loss_type="sigmoid", sft_weight=0.5), dpo=1.0)
    one = batch_with_labels(tiny_llava, tiny_tokenizer)
    pair = {f"{side}_{k}": one[k] for side in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels")}
    pair["rejected_input_ids"] = pair["rejected_input_ids"].flip(0)
    batch = PreferenceBatch(**pair, pixel_values=one["pixel_values"], reference_logps=torch.tensor([[-5.0, -5.0], [-6.0, -4.0]]))
    terms = objective(batch)
    assert {"dpo", "sft", "reward_accuracy", "reward_margin", "policy_chosen_logps", "reference_rejected_logps"} <= set(terms)
    assert terms["loss"].item() == pytest.approx(terms["dpo"].item() + 0.5 * terms["sft"].item(), rel=1e-6)
    assert terms["reference_rejected_logps"].item() == pytest.approx(-4.5)


def test_a_nan_or_inf_term_stops_training_naming_step_and_term():
    check_finite({"loss": torch.tensor(1.0), "ce": torch.tensor(0.5)}, step=3)
    with pytest.raises(FloatingPointError, match=r"step 7: loss term 'kl_visual' is nan"):
        check_finite({"loss": torch.tensor(1.0), "kl_visual": torch.tensor(float("nan"))}, step=7)
    # As the objective returns them: the total first, already NaN through the bad term.
    with pytest.raises(FloatingPointError, match=r"loss term 'relation' is nan"):
        check_finite({"loss": torch.tensor(float("nan")), "ce": torch.tensor(0.5), "relation": torch.tensor(float("nan"))}, step=2)
    with pytest.raises(FloatingPointError, match="'ce' is inf"):
        check_finite({"ce": torch.tensor(float("inf"))}, step=1)


def test_distill_all_tokens_takes_the_kl_at_every_text_position(tiny_llava, tiny_tokenizer):
    """LLaVA-MoD's distill_all_tokens: KL over prompt, template and response (not image) positions; ce stays on the response."""
    from model.losses import forward_kl

    teacher = LiveTeacher(build_llava(VisionParams(**TINY_VISION), TextParams(**TINY_TEXT), tiny_tokenizer, seed=5))
    batch = batch_with_labels(tiny_llava, tiny_tokenizer)
    response_only = objective_of(tiny_llava, teacher, chunk_size=3, ce=1.0, kl_response=1.0)(DistillBatch(**batch))
    everywhere = objective_of(tiny_llava, teacher, chunk_size=3, distill_all_tokens=True, ce=1.0, kl_response=1.0)(DistillBatch(**batch))
    assert everywhere["ce"].item() == pytest.approx(response_only["ce"].item(), rel=1e-6)
    with torch.no_grad():
        student = tiny_llava(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
        teacher_logits = teacher.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    text = batch["attention_mask"].bool() & (batch["input_ids"] != tiny_llava.config.image_token_index)
    expected = forward_kl(student[text], teacher_logits[text]).mean()
    assert everywhere["kl_response"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert everywhere["kl_response"].item() != pytest.approx(response_only["kl_response"].item(), rel=1e-3)


def test_a_run_resumed_after_its_last_checkpoint_reports_the_rate_its_steps_were_trained_at(tmp_path):
    from model.engine import run_rates

    history = tmp_path / "history.jsonl"
    history.write_text('{"step": 10, "samples_per_second": 50.0, "tokens_per_second": 4000.0}\n')
    assert run_rates(0, 32, 0, 0.4, history) == {"samples_per_second": 50.0, "tokens_per_second": 4000.0}  # was 0.0
    assert run_rates(10, 32, 8000, 2.0, history) == {"samples_per_second": 160.0, "tokens_per_second": 4000.0}


def test_the_terms_that_read_the_teacher_are_the_ones_validation_knows():
    """The engine loads a teacher for the terms whose module reads it; params validation and the cache know them by name."""
    from model.config import TEACHER_TERMS

    train = TrainingParams(loss=LossWeights(ce=1.0, kl_response=1.0, kl_visual=1.0, relation=1.0, router_aux=1.0))
    terms = loss_terms(train, None, top_k=2)
    assert [t.name for t in terms] == ["ce", "kl_response", "kl_visual", "relation", "router_aux"]
    assert {t.name for t in terms if t.loss.reads_teacher} == set(TEACHER_TERMS)
    assert [t.name for t in loss_terms(TrainingParams(loss=LossWeights(ce=1.0)), None, 0)] == ["ce"], "a zero weight is no term"
    preference = loss_terms(TrainingParams(loss=LossWeights(dpo=1.0, router_aux=0.01)), DPOParams(beta=0.2, sft_weight=0.5), top_k=2)
    assert [(t.name, t.weight) for t in preference] == [("dpo", 1.0), ("sft", 0.5), ("router_aux", 0.01)]
    assert preference[0].loss.beta == 0.2 and preference[2].loss.top_k == 2
